"""`python -m launch.sweep`: run an ablation sweep, one run after another.

    python -m launch.sweep --config configs/llama.py:tiny --workdir /tmp/sweep \\
        --sweep model.norm_type=rmsnorm,layernorm --sweep model.position=rope,alibi \\
        --config.train.steps=100

- Every `--sweep PATH=V1,V2,...` is one axis; the runs are the cross product
  of the axes. `--zip PATH=V1,V2 --zip PATH2=W1,W2` pairs lists of equal
  length into one axis (V1 with W1, V2 with W2), crossed with the others.
- `--sweep_file FILE.py[:FUNCTION]` gives the runs as Python: FUNCTION
  (default `sweep`) returns a list of dicts `{'model.position': 'alibi', ...}`
  (values are Python objects, so dicts and None are fine); crossed with any
  flag axes.
- `--config.PATH=VALUE` overrides the base config of every run.
- Each run gets a readable name from its overrides (`norm_type=layernorm,
  position=alibi`) and trains in `WORKDIR/<name>/`, so `tensorboard --logdir
  WORKDIR` overlays the curves and `python -m launch.compare WORKDIR` tables
  them. `WORKDIR/sweep.json` records the runs.
- Every run's config is loaded and validated before the first run starts: an
  unknown field or a refused value stops the sweep naming the run and field.
- A run that finishes writes `WORKDIR/<name>/DONE`; re-running the sweep skips
  those and resumes the others from their latest checkpoint (the trainer
  resumes by itself). A run that fails gets `FAILED` (with its exit status)
  and the sweep goes on to the next; the sweep exits non-zero at the end.
- Each run is a `python -m train` subprocess (a crash or an out-of-memory stays
  in its run); `--in_process` calls `train.loop.train_and_evaluate` in this
  process instead (quicker for tiny runs: no start-up per run).
"""

import dataclasses
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time

import configs

DONE = 'DONE'
FAILED = 'FAILED'
RUNNING = 'RUNNING'


class SweepError(ValueError):
  """A sweep that cannot run; the message says which run and field."""


@dataclasses.dataclass
class Run:
  name: str
  overrides: dict           # PATH -> value (Python object) for this run
  workdir: str

  def override_args(self) -> list[str]:
    return [f'{path}={format_value(value)}' for path, value in self.overrides.items()]


def format_value(value) -> str:
  """The text of a value as `configs.apply_override` and the flags parse it."""
  return value if isinstance(value, str) else repr(value)


def parse_value(text: str):
  """Flag text -> Python value, as `configs.apply_override` reads it."""
  return configs._parse_value(text.strip())  # pylint: disable=protected-access


def _split_axis(spec: str, flag: str) -> tuple[str, list[str]]:
  if '=' not in spec:
    raise SweepError(f'--{flag} {spec!r} is not of the form PATH=V1,V2,...')
  path, values = spec.split('=', 1)
  values = [v.strip() for v in _split_commas(values)]
  if not path.strip() or not values or any(v == '' for v in values):
    raise SweepError(f'--{flag} {spec!r}: needs a field and non-empty values')
  return path.strip(), values


def _split_commas(text: str) -> list[str]:
  """Splits on commas outside brackets and quotes (`[1,2],[3,4]` is two values)."""
  parts, depth, quote, current = [], 0, None, ''
  for ch in text:
    if quote:
      quote = None if ch == quote else quote
    elif ch in '\'"':
      quote = ch
    elif ch in '([{':
      depth += 1
    elif ch in ')]}':
      depth -= 1
    elif ch == ',' and depth == 0:
      parts.append(current)
      current = ''
      continue
    current += ch
  parts.append(current)
  return parts


def expand(sweeps=(), zips=(), file_runs=None) -> list[dict]:
  """The runs' override dicts: the cross product of the axes.

  `sweeps`: `PATH=V1,V2` strings, one axis each. `zips`: `PATH=V1,V2` strings
  of equal length, together one axis. `file_runs`: a list of dicts, one more
  axis. Values from flags are parsed as `configs.apply_override` does.
  """
  axes = []
  for spec in sweeps:
    path, values = _split_axis(spec, 'sweep')
    axes.append([{path: parse_value(v)} for v in values])
  if zips:
    columns = [_split_axis(spec, 'zip') for spec in zips]
    lengths = {len(values) for _, values in columns}
    if len(lengths) != 1:
      raise SweepError('--zip lists must have the same length; got ' + ', '.join(
          f'{path} ({len(values)})' for path, values in columns))
    axes.append([{path: parse_value(values[i]) for path, values in columns}
                 for i in range(lengths.pop())])
  if file_runs is not None:
    axes.append([dict(r) for r in file_runs])
  runs = []
  for combination in itertools.product(*axes):
    merged = {}
    for part in combination:
      for path in part:
        if path in merged:
          raise SweepError(f'field {path!r} is swept by more than one axis')
      merged.update(part)
    runs.append(merged)
  return runs


def _name_value(value) -> str:
  text = format_value(value)
  # Folder-safe: no path separators or spaces.
  return re.sub(r'[/\\\s]+', '_', text).replace("'", '')


def run_name(overrides: dict) -> str:
  """`norm_type=layernorm,position=alibi`: the fields' last names, unless two collide."""
  if not overrides:
    return 'base'
  leaves = [path.rsplit('.', 1)[-1] for path in overrides]
  parts = []
  for path, leaf in zip(overrides, leaves):
    key = leaf if leaves.count(leaf) == 1 else path
    parts.append(f'{key}={_name_value(overrides[path])}')
  return ','.join(parts)


def load_sweep_file(spec: str) -> list[dict]:
  """`FILE.py[:FUNCTION]` -> the list of override dicts FUNCTION returns."""
  path, _, function = spec.partition(':')
  module = configs.load_module(path)
  function = function or 'sweep'
  if not hasattr(module, function):
    raise SweepError(f'sweep file {path} has no function {function!r}')
  runs = getattr(module, function)()
  if not isinstance(runs, (list, tuple)) or not all(isinstance(r, dict) for r in runs):
    raise SweepError(f'{path}:{function}() must return a list of dicts of overrides')
  return list(runs)


def plan(config: str, workdir: str, runs: list[dict], base_overrides=()) -> list[Run]:
  """Names the runs and validates every run's config; raises before any runs."""
  planned, names = [], set()
  for overrides in runs:
    name = run_name(overrides)
    if name in names:
      raise SweepError(f'two runs would share the name {name!r}')
    names.add(name)
    run = Run(name, overrides, os.path.join(workdir, name))
    try:
      configs.load(config, list(base_overrides) + run.override_args())
    except configs.ConfigError as e:
      raise SweepError(f'run {name!r}: {e}') from None
    planned.append(run)
  return planned


def run_config(config: str, run: Run, base_overrides=()):
  return configs.load(config, list(base_overrides) + run.override_args())


def is_done(run: Run, steps: int) -> bool:
  """True if the run's DONE marker says it reached `steps`."""
  path = os.path.join(run.workdir, DONE)
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      return json.load(f).get('step', 0) >= steps
  except (OSError, ValueError):
    return False


def checkpoint_steps(workdir: str) -> list[int]:
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def train_command(config: str, run: Run, base_overrides=()) -> list[str]:
  """The `python -m train` command line of a run."""
  return ([sys.executable, '-m', 'train', '--config', config, '--workdir', run.workdir]
          + [f'--config.{o}' for o in list(base_overrides) + run.override_args()])


def _write_marker(run: Run, name: str, content: dict) -> None:
  os.makedirs(run.workdir, exist_ok=True)
  path = os.path.join(run.workdir, name)
  with open(path + '.tmp', 'w') as f:
    json.dump(content, f, indent=2)
  os.replace(path + '.tmp', path)


def _remove_marker(run: Run, name: str) -> None:
  try:
    os.remove(os.path.join(run.workdir, name))
  except FileNotFoundError:
    pass


def execute(config: str, run: Run, base_overrides=(), *, in_process=False) -> int:
  """Trains one run; returns the exit status (0 when it reached its last step)."""
  cfg = run_config(config, run, base_overrides)
  _remove_marker(run, FAILED)
  _write_marker(run, RUNNING, {'pid': os.getpid(), 'started': time.time()})
  if in_process:
    from train import loop  # pylint: disable=g-import-not-at-top
    try:
      summary = loop.train_and_evaluate(cfg, run.workdir)
      status, step = 0, summary['step']
    except Exception as e:  # pylint: disable=broad-except
      # The sweep goes on; the run's FAILED marker says why.
      print(f'ablax-sweep: run {run.name} failed: {type(e).__name__}: {e}',
            file=sys.stderr, flush=True)
      status, step = 1, None
  else:
    status = subprocess.call(train_command(config, run, base_overrides))
    step = max(checkpoint_steps(run.workdir), default=0)
  _remove_marker(run, RUNNING)
  if status == 0 and step is not None and step >= cfg.train.steps:
    _write_marker(run, DONE, {'step': step, 'finished': time.time()})
    return 0
  # Exit 0 short of the last step is a preemption (SIGTERM saved and returned).
  _write_marker(run, FAILED, {'status': status, 'step': step, 'time': time.time()})
  return status or 1


def write_sweep_json(workdir: str, config: str, base_overrides, runs: list[Run]) -> None:
  os.makedirs(workdir, exist_ok=True)
  content = {
      'config': config,
      'base_overrides': list(base_overrides),
      'runs': [{'name': r.name, 'overrides': {p: format_value(v) for p, v in r.overrides.items()}}
               for r in runs],
  }
  with open(os.path.join(workdir, 'sweep.json'), 'w') as f:
    json.dump(content, f, indent=2)


def sweep(config: str, workdir: str, runs: list[dict], base_overrides=(), *,
          dry_run=False, in_process=False, out=None) -> dict:
  """Validates, then trains each unfinished run in turn.

  Returns {run name: 'skipped' | 'done' | 'failed' | 'planned'}.
  """
  out = out or sys.stdout
  planned = plan(config, workdir, runs, base_overrides)
  results = {}
  if dry_run:
    for run in planned:
      steps = run_config(config, run, base_overrides).train.steps
      state = 'done' if is_done(run, steps) else (
          f'resume from step {max(checkpoint_steps(run.workdir))}'
          if checkpoint_steps(run.workdir) else 'new')
      print(f'{run.name}  [{state}]\n  {shlex.join(train_command(config, run, base_overrides))}',
            file=out, flush=True)
      results[run.name] = 'planned'
    return results
  write_sweep_json(workdir, config, base_overrides, planned)
  for i, run in enumerate(planned):
    steps = run_config(config, run, base_overrides).train.steps
    if is_done(run, steps):
      print(f'[{i + 1}/{len(planned)}] {run.name}: done, skipping', file=out, flush=True)
      results[run.name] = 'skipped'
      continue
    print(f'[{i + 1}/{len(planned)}] {run.name}: training in {run.workdir}',
          file=out, flush=True)
    status = execute(config, run, base_overrides, in_process=in_process)
    results[run.name] = 'done' if status == 0 else 'failed'
    if status:
      print(f'[{i + 1}/{len(planned)}] {run.name}: FAILED (exit status {status})',
            file=out, flush=True)
  return results


def main(argv=None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog='python -m launch.sweep', description=__doc__.split('\n\n')[0],
      epilog='Base overrides: --config.PATH=VALUE (any number).')
  parser.add_argument('--config', required=True, help='configs/NAME.py[:ARG]')
  parser.add_argument('--workdir', required=True, help='one sub-folder per run')
  parser.add_argument('--sweep', action='append', default=[],
                      help='PATH=V1,V2,...: one axis of the cross product')
  parser.add_argument('--zip', action='append', default=[],
                      help='PATH=V1,V2,...: lists of equal length paired into one axis')
  parser.add_argument('--sweep_file', default=None,
                      help='FILE.py[:FUNCTION] returning a list of override dicts')
  parser.add_argument('--dry-run', '--dry_run', dest='dry_run', action='store_true',
                      help='print the runs and their commands; train nothing')
  parser.add_argument('--in_process', action='store_true',
                      help='train in this process instead of a subprocess per run')
  args, rest = parser.parse_known_args(argv)
  base = []
  for arg in rest:
    if not arg.startswith('--config.') or '=' not in arg:
      parser.error(f'unrecognised argument {arg!r} (base overrides are --config.PATH=VALUE)')
    base.append(arg[len('--config.'):])
  try:
    file_runs = load_sweep_file(args.sweep_file) if args.sweep_file else None
    runs = expand(args.sweep, args.zip, file_runs)
    results = sweep(args.config, args.workdir, runs, base, dry_run=args.dry_run,
                    in_process=args.in_process)
  except (SweepError, configs.ConfigError) as e:
    print(f'ablax-sweep: {e}', file=sys.stderr)
    return 2
  failed = [name for name, r in results.items() if r == 'failed']
  if failed:
    print(f'ablax-sweep: {len(failed)} run(s) failed: {", ".join(failed)}', file=sys.stderr)
    return 1
  if not args.dry_run:
    print(f'sweep finished: python -m launch.compare {args.workdir}')
  return 0


def run():
  """The `ablax-sweep` console script."""
  sys.exit(main())


if __name__ == '__main__':
  run()
