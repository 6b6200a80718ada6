"""User errors and the entry-point wrapper every `python -m ...` command uses.

A user error is anything the user fixes by changing an argument, a file or a
flag. Its class derives from `UserError` (`configs.ConfigError`,
`data.sources.DataError`, `data.tokenizers.TokenizerError`,
`train.workdir.CheckpointError`, `model.hf.HFError`, ...), and its message
names what to change. `run(main)` turns one into a single line on stderr,

    ablax: model.num_layerz is not a config field; did you mean num_layers?

and an exit status (see `EXIT_*`); `--debug` on the command line (or
`ABLAX_DEBUG=1` in the environment) shows the full traceback instead.
`call(main, argv)` does the same in-process and returns the status (tests,
notebooks). The flags themselves are parsed as `configs/cli.py` describes.

Exit statuses of every ablax command:

| status | meaning |
| --- | --- |
| 0 | done; or stopped by SIGTERM after saving a checkpoint; or nothing to do |
| 1 | an unexpected error (a bug or a crash): the traceback is printed |
| 2 | a user error: one `ablax: ...` line says what to change |
| 3 | the run diverged (a non-finite loss, gradient or parameter) and stopped |
| 130 | interrupted by Ctrl-C (SIGINT), after saving a checkpoint where one was due |
"""

import logging
import os
import sys
import traceback

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130
DEBUG_ENV = 'ABLAX_DEBUG'


class UserError(ValueError):
  """An error the user fixes by changing an argument, a file or a flag."""


def debug_enabled() -> bool:
  return os.environ.get(DEBUG_ENV, '') not in ('', '0', 'false', 'False')


def one_line(error: BaseException) -> str:
  """The message of `error` on one line (multi-line messages joined by '; ')."""
  text = str(error).strip()
  if isinstance(error, KeyError) and text.startswith(("'", '"')):
    text = text[1:-1]           # KeyError quotes its message
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return '; '.join(lines) or type(error).__name__


def _exit(message: str, status: int):
  sys.stderr.write(f'ablax: {message}\n')
  logging.shutdown()                      # flushes every handler
  sys.stdout.flush()
  sys.stderr.flush()
  jax = sys.modules.get('jax')
  if jax is not None and jax.distributed.is_initialized():
    sys.exit(status)    # let jax.distributed shut down with the other processes
  # Leave without the interpreter's shutdown: a library thread still at work
  # (orbax's asynchronous path checks after a failed restore) would otherwise
  # print a 'cannot schedule new futures after shutdown' traceback as the
  # thread pools close under it, after the one line above.
  os._exit(status)


def _diagnose_flags(argv, error: Exception) -> str:
  """A one-line message for a command line that absl could not parse.

  `ml_collections.config_flags` reports a config file's errors as a
  traceback in text; loading the file with `configs.load_file` names the
  file and line instead. An unknown flag is named with the closest of the
  entry's own flags.
  """
  import difflib  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  import configs  # pylint: disable=g-import-not-at-top
  if isinstance(error, flags.UnrecognizedFlagError):
    own = [f.name for f in flags.FLAGS.flags_by_module_dict().get(argv[0], [])]
    close = difflib.get_close_matches(error.flagname, own, n=2, cutoff=0.7)
    hint = f'; did you mean {" or ".join("--" + c for c in close)}?' if close else ''
    return f'unknown flag --{error.flagname}{hint} (see {_main_prog(argv)} --help)'
  spec = None
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith('--config='):
      spec = arg.split('=', 1)[1]
    elif arg == '--config' and i + 1 < len(argv):
      spec = argv[i + 1]
  if spec:
    try:
      configs.load_file(spec)
    except UserError as e:
      return one_line(e)
  return one_line(error)


def _main_prog(argv) -> str:
  spec = getattr(sys.modules.get('__main__'), '__spec__', None)
  if spec is not None and spec.name:
    return 'python -m ' + spec.name.removesuffix('.__main__')
  return os.path.basename(argv[0]) if argv else 'ablax'


def _print_absl_help(argv) -> None:
  """`--help` of an entry whose flags are absl's global FLAGS: its docstring
  and the flags its own module defines (not absl's or a library's)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from configs import cli  # pylint: disable=g-import-not-at-top
  # The main module's key flags: those it defines and those it registered
  # (model/hf.py hands over to train/hf_workdir.py's flags).
  own = flags.FLAGS.get_key_flags_for_module(argv[0])
  doc = getattr(sys.modules.get('__main__'), '__doc__', '') or ''
  required = [f.name for f in own
              if any('must have a value other than None' in str(v.message)
                     for v in f.validators)]
  overrides = 'config' in flags.FLAGS
  usage = _main_prog(argv) + ' [flags]' + (' [--config.PATH=VALUE ...]' if overrides else '')
  sys.stdout.write(cli.help_text(own, doc, usage, required=required, overrides=overrides))
  sys.stdout.flush()


def _parse_absl_flags(argv):
  """absl's global FLAGS parse `argv`; `--config.PATH=VALUE` overrides are
  applied by `configs.apply_override` (see configs/cli.py), not by
  config_flags, whose typed parsers refuse `None` for a field whose default is
  a typed None and cannot set a dict field."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from configs import cli  # pylint: disable=g-import-not-at-top
  if cli.wants_help(argv[1:]):
    _print_absl_help(argv)
    sys.exit(EXIT_OK)
  rest_argv, overrides = (cli.split_overrides(argv) if 'config' in flags.FLAGS
                          else (argv, []))
  saved = sys.argv
  try:
    # config_flags reads its overrides from sys.argv: give it none.
    sys.argv = rest_argv
    rest = flags.FLAGS(rest_argv)
    if 'config' in flags.FLAGS:
      # A config file that failed to load is a placeholder that raises on
      # first use: use it here, where the error can be explained.
      config = flags.FLAGS['config'].value
      if config is not None:
        getattr(config, 'keys')
        import configs  # pylint: disable=g-import-not-at-top
        for override in overrides:
          configs.apply_override(config, override)
      elif overrides:
        raise UserError('--config.PATH=VALUE overrides need --config FILE.py')
    return rest
  except UserError as e:
    if debug_enabled():
      raise
    _exit(one_line(e), EXIT_USER_ERROR)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError,
          SyntaxError) as e:
    if debug_enabled():
      raise
    _exit(_diagnose_flags(argv, e), EXIT_USER_ERROR)
  finally:
    sys.argv = saved


_FAILURES = ((UserError, EXIT_USER_ERROR), (FloatingPointError, EXIT_DIVERGED),
             (KeyboardInterrupt, EXIT_INTERRUPTED))


def _failure(error: BaseException) -> tuple[str, int]:
  """(the `ablax:` message, the exit status) of an error `run` reports."""
  if isinstance(error, KeyboardInterrupt):
    return 'interrupted (Ctrl-C)', EXIT_INTERRUPTED
  status = next(s for kind, s in _FAILURES if isinstance(error, kind))
  return one_line(error), status


def call(main, argv) -> int:
  """`main(argv)` as its command runs it, returning the exit status instead of
  exiting: a user error (or divergence, or Ctrl-C) is one `ablax: ...` line
  on stderr and its status. For tests and scripts calling an entry in-process."""
  try:
    return main(list(argv)) or EXIT_OK
  except tuple(kind for kind, _ in _FAILURES) as e:
    if debug_enabled():
      traceback.print_exc()
    message, status = _failure(e)
    sys.stderr.write(f'ablax: {message}\n')
    return status


def run(main, *, absl_flags: bool = True, argv=None) -> None:
  """Runs an entry point's `main` with ablax's error handling (see module doc).

  With `absl_flags`, `main(argv)` is run by `absl.app.run` (flags defined on
  absl's global FLAGS, `--config` with `ml_collections.config_flags`);
  otherwise `main` gets the argument list without the program name and
  parses it itself (`configs.cli.parse` on its own FlagValues).
  """
  argv = list(sys.argv if argv is None else argv)
  if '--debug' in argv:
    argv.remove('--debug')
    os.environ[DEBUG_ENV] = '1'           # subprocesses (sweeps) inherit it
  try:
    if absl_flags:
      from absl import app  # pylint: disable=g-import-not-at-top
      app.run(main, argv=argv, flags_parser=_parse_absl_flags)
    else:
      status = main(argv[1:])
      sys.exit(status or 0)
  except tuple(kind for kind, _ in _FAILURES) as e:
    if debug_enabled():
      traceback.print_exc()
    _exit(*_failure(e))
