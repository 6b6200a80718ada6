"""User errors and the entry-point wrapper every `python -m ...` command uses.

A user error is anything the user fixes by changing an argument, a file or a
flag. Its class derives from `UserError` (`configs.ConfigError`,
`data.sources.DataError`, `data.tokenizers.TokenizerError`,
`train.checkpoint.CheckpointError`, `model.hf.HFError`, ...), and its message
names what to change. `run(main)` turns one into a single line on stderr,

    ablax: model.num_layerz is not a config field; did you mean num_layers?

and an exit status (see `EXIT_*`); `--debug` on the command line (or
`ABLAX_DEBUG=1` in the environment) shows the full traceback instead.

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

  `ml_collections.config_flags` reports config-file errors as tracebacks in
  text and unknown override fields as a bare AttributeError; loading the
  config with `configs.load` names the file, line or field instead.
  """
  import configs  # pylint: disable=g-import-not-at-top
  spec, paths = None, []
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith('--config='):
      spec = arg.split('=', 1)[1]
    elif arg == '--config' and i + 1 < len(argv):
      spec = argv[i + 1]
    elif arg.startswith(('--config.', '--noconfig.')):
      paths.append(arg.split('=', 1)[0].split('.', 1)[1])
  if spec:
    try:
      cfg = configs.load_file(spec)
      for path in paths:
        configs.check_field(cfg, path)
    except UserError as e:
      return one_line(e)
  return one_line(error)


def _parse_absl_flags(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    rest = flags.FLAGS(argv)
    if 'config' in flags.FLAGS:
      # A config file that failed to load is a placeholder that raises on
      # first use: use it here, where the error can be explained.
      config = flags.FLAGS['config'].value
      if config is not None:
        getattr(config, 'keys')
    return rest
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError,
          SyntaxError) as e:
    if debug_enabled():
      raise
    _exit(_diagnose_flags(argv, e), EXIT_USER_ERROR)


def run(main, *, absl_flags: bool = True, argv=None) -> None:
  """Runs an entry point's `main` with ablax's error handling (see module doc).

  With `absl_flags`, `main(argv)` is run by `absl.app.run` (flags defined with
  absl, `--config` with `ml_collections.config_flags`); otherwise `main` gets
  the argument list without the program name (argparse entry points).
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
  except UserError as e:
    if debug_enabled():
      traceback.print_exc()
    _exit(one_line(e), EXIT_USER_ERROR)
  except FloatingPointError as e:
    if debug_enabled():
      traceback.print_exc()
    _exit(one_line(e), EXIT_DIVERGED)
  except KeyboardInterrupt:
    if debug_enabled():
      traceback.print_exc()
    _exit('interrupted (Ctrl-C)',
          EXIT_INTERRUPTED)
