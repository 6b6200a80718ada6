"""The command line of every `python -m ...` entry: absl flags, one convention.

An entry defines its flags at module level on its own `flags.FlagValues`
(`FLAGS = flags.FlagValues()`, `flags.DEFINE_string(..., flag_values=FLAGS)`),
so its `main(argv)` can be called again and again in one process (the tests
do) without meeting another entry's flags, and parses with `parse`:

    args = cli.parse(FLAGS, argv, doc=__doc__, prog='python -m launch.compare',
                     positional={'DIR': 'a sweep folder'})
    args.DIR, args.metric, ...

- `--help` (or `-h`) prints the entry's docstring (what it does, with example
  commands) and every flag with its meaning and default, and exits 0.
- `--config.PATH=VALUE` overrides (`--config.model.qk_norm` and
  `--noconfig.model.qk_norm` for booleans) are split from the rest by
  `split_overrides` and applied by `configs.apply_override`, the one parser of
  override text: `configs.load`, `launch.sweep` and `python -m train` read
  `--config.train.spike_threshold=None` or `--config.model.rope_scaling=
  "{'type': 'linear', 'factor': 2.0}"` alike.
- A flag the entry does not define, a flag value absl refuses, a missing
  required flag or a wrong number of positional arguments raises `UsageError`
  (a `UserError`): `configs.errors.run` prints one `ablax: ...` line and
  exits 2.
"""

import difflib
import sys
import textwrap
import types

from absl import flags

from configs.errors import UserError

HELP_FLAGS = ('-h', '--help', '-help', '--helpshort', '--helpfull')


class UsageError(UserError):
  """A command line the entry cannot parse; the message says which argument."""


def wants_help(argv) -> bool:
  """Whether `argv` asks for help before a `--` (whatever follows `--` is
  passed on to another command)."""
  for arg in argv:
    if arg == '--':
      return False
    if arg in HELP_FLAGS:
      return True
  return False


def _is_flag(arg: str) -> bool:
  """`--x`, `-x`; not `-1` or `-1e-3` (a negative value, e.g. mesh.fsdp=-1)."""
  if not arg.startswith('-'):
    return False
  try:
    float(arg)
    return False
  except ValueError:
    return True


def split_overrides(argv, name: str = 'config') -> tuple[list[str], list[str]]:
  """`argv` -> (the other arguments, the `--config.PATH=VALUE` overrides as
  `PATH=VALUE`, in order). `--config.PATH VALUE` takes the next argument as
  its value unless that one is a flag (then VALUE is True, as absl reads a
  bare boolean; `-1` is a value); `--noconfig.PATH` is `PATH=False`. Nothing after `--`."""
  rest, overrides = [], []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    if arg == '--':
      rest.extend(args[i:])
      break
    for dashes in ('--', '-'):
      if arg.startswith(f'{dashes}{name}.'):
        path = arg[len(dashes) + len(name) + 1:]
        if '=' not in path:
          if i + 1 < len(args) and not _is_flag(args[i + 1]):
            path, i = f'{path}={args[i + 1]}', i + 1
          else:
            path = f'{path}=True'
        overrides.append(path)
        break
      if arg.startswith(f'{dashes}no{name}.') and '=' not in arg:
        overrides.append(arg[len(dashes) + len(name) + 3:] + '=False')
        break
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def _flag_line(flag, required: bool) -> str:
  name = f'--{flag.name}'
  notes = [f'a switch: --no{flag.name} turns it off'] if flag.boolean else []
  if required:
    notes.append('required')
  elif flag.default not in (None, [], '') and not flag.boolean:
    notes.append(f'default: {flag.default}')
  elif flag.boolean and flag.default:
    notes.append('default: true')
  if isinstance(flag, flags.MultiFlag):
    notes.append('repeatable')
  return name + (f'  ({"; ".join(notes)})' if notes else '')


def help_text(flag_list, doc: str, usage: str, positional=None, required=(),
              overrides: bool = False) -> str:
  """The `--help` text: usage line, the docstring, positionals and `flag_list`
  (absl `Flag`s, in order)."""
  lines = [f'usage: {usage}', '', textwrap.dedent(doc or '').strip(), '']
  wrap = lambda text: textwrap.fill(' '.join(text.split()), width=88,
                                    initial_indent=' ' * 6, subsequent_indent=' ' * 6)
  if positional:
    lines.append('arguments:')
    for name, text in positional.items():
      lines += [f'  {name}', wrap(text)]
    lines.append('')
  lines.append('flags:')
  for flag in flag_list:
    lines += [f'  {_flag_line(flag, flag.name in required)}', wrap(flag.help or '')]
  if overrides:
    lines += ['  --config.PATH=VALUE  (repeatable)',
              wrap('set one field of the config, e.g. --config.model.num_layers=4, '
                   '--config.model.qk_norm=True, --config.train.spike_threshold=None; '
                   'an unknown field is refused with the closest names')]
  lines += ['  --debug', wrap('show the full traceback of an error instead of the one '
                              '`ablax:` line (or set ABLAX_DEBUG=1)')]
  return '\n'.join(lines) + '\n'


def parse(fv: flags.FlagValues, argv, *, doc: str, prog: str, positional=None,
          required=(), overrides: bool = False, aliases=None):
  """Parses `argv` (without the program name) with the flags of `fv`.

  Returns a namespace of every flag's value, each positional argument under
  its name (`positional`: name -> help, in order) and, with `overrides`,
  `overrides` (the
  `--config.PATH=VALUE` arguments as `PATH=VALUE`). `required` flags must be
  given; `aliases` maps another spelling (`dry-run`) to a flag (`dry_run`).
  `--help` prints `help_text` and exits 0. Raises UsageError.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  positional = dict(positional or {})
  usage = prog + ''.join(f' {p}' for p in positional)
  usage += ' [flags]' + (' [--config.PATH=VALUE ...]' if overrides else '')
  see = f'(see {prog} --help)'
  if wants_help(argv):
    own = [fv[name] for name in fv if fv[name].name == name]   # definition order
    sys.stdout.write(help_text(own, doc, usage, positional, required, overrides))
    sys.stdout.flush()
    raise SystemExit(0)
  config_overrides = []
  if overrides:
    argv, config_overrides = split_overrides(argv)
  for alias, name in (aliases or {}).items():
    argv = [f'--{name}{a[len(alias) + 2:]}' if a == f'--{alias}' or
            a.startswith(f'--{alias}=') else a for a in argv]
  fv.unparse_flags()            # defaults again: main() may run twice in a process
  try:
    rest = fv([prog] + argv)[1:]
  except flags.Error as e:
    message = str(e).rstrip('.')
    if isinstance(e, flags.UnrecognizedFlagError):
      message = f'unknown flag --{e.flagname}'
      close = _close_flags(fv, e.flagname)
      if close:
        message += f'; did you mean {" or ".join("--" + c for c in close)}?'
      elif e.flagname.startswith('config.'):
        message += ' (this command takes no config overrides)'
    raise UsageError(f'{message} {see}') from None
  for name in required:
    if fv[name].value in (None, []):
      raise UsageError(f'--{name} is required: {fv[name].help} {see}')
  if len(rest) != len(positional):
    given = ' '.join(rest) or 'none'
    raise UsageError(f'expected {" ".join(positional) or "no arguments"}, got: {given} '
                     f'{see}')
  values = {name: fv[name].value for name in fv if fv[name].name == name}
  values.update(zip(positional, rest))
  if overrides:
    values['overrides'] = config_overrides
  return types.SimpleNamespace(**values)


def _close_flags(fv, name: str) -> list[str]:
  name = name.split('=', 1)[0]
  return difflib.get_close_matches(name, [n for n in fv], n=2, cutoff=0.7)
