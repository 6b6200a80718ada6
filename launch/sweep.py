"""`python -m launch.sweep`: run an ablation sweep, one run after another.

    python -m launch.sweep --config configs/llama.py:tiny --workdir /tmp/sweep \\
        --sweep model.norm_type=rmsnorm,layernorm --sweep model.position=rope,alibi \\
        --config.train.steps=100 --seeds 3

- Every `--sweep PATH=V1,V2,...` is one axis; the arms are the cross product
  of the axes. `--zip PATH=V1,V2 --zip PATH2=W1,W2` pairs lists of equal
  length into one axis (V1 with W1, V2 with W2), crossed with the others.
- `--sweep_file FILE.py[:FUNCTION]` gives the arms as Python: FUNCTION
  (default `sweep`) returns a list of dicts `{'model.position': 'alibi', ...}`
  (values are Python objects, so dicts and None are fine); crossed with any
  flag axes.
- `--config.PATH=VALUE` overrides the base config of every run.
- Each arm gets a readable name from its overrides (`norm_type=layernorm,
  position=alibi`) and trains in `WORKDIR/<arm>/`, so `tensorboard --logdir
  WORKDIR` overlays the curves and `python -m launch.compare WORKDIR` tables
  them. `WORKDIR/sweep.json` records the arms and runs.
- `--seeds N` (seeds 0..N-1) or `--seeds 0,1,2` trains every arm once per seed
  in `WORKDIR/<arm>/seed=<s>/`; seed s sets `train.seed` and
  `data.shuffle_seed` in every arm, so arms are paired (same data order, same
  initial weights where shapes agree) and `launch.compare` reports intervals.
- `--match params|flops --match_field F [--match_multiple K]` sets the integer
  field F of every arm so that its non-embedding parameters (or training FLOPs
  per token) equal the first arm's within 1%; `--budget_flops C` sets each
  run's `train.steps` so that it spends C FLOPs; `--tune FIELD=V1,V2,...` first
  trains every arm at every value (seeds `--tune_seeds`, default 0) in
  `WORKDIR/tune/`, then the seeds at each arm's best value by `--metric`.
- Every run's config is loaded and validated before the first run starts: an
  unknown field, a refused value or an unreachable match stops the sweep
  naming the arm and field.
- A run that finishes writes `DONE` in its folder; re-running the sweep skips
  those and resumes the others from their latest checkpoint (the trainer
  resumes by itself). A run that fails gets `FAILED` (with its exit status)
  and the sweep goes on to the next; the sweep exits non-zero at the end.
- Each run is a `python -m train` subprocess (a crash or an out-of-memory stays
  in its run) that dies with the sweep: SIGTERM or Ctrl-C to the sweep is
  passed to the trainer, which saves a checkpoint, and the sweep stops (exit
  128 + the signal); a SIGKILLed sweep's trainer gets SIGTERM from the kernel.
  `--in_process` calls `train.loop.train_and_evaluate` in this process
  instead (quicker for tiny runs: no start-up per run).
"""

import dataclasses
import itertools
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import flags

import configs
from configs import cli
from configs import errors
from train import workdir as workdir_lib

DONE = 'DONE'
FAILED = 'FAILED'
RUNNING = 'RUNNING'
TUNE_DIR = 'tune'
SEED_FIELDS = ('train.seed', 'data.shuffle_seed')


class SweepError(configs.UserError):
  """A sweep that cannot run; the message says which run and field."""


@dataclasses.dataclass
class Run:
  name: str                 # the folder under the sweep: ARM or ARM/seed=S
  overrides: dict           # PATH -> value (Python object) for this run
  workdir: str
  arm: str = ''
  seed: int | None = None
  info: dict = dataclasses.field(default_factory=dict)   # more for sweep.json

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
  """The arms' override dicts: the cross product of the axes.

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


def parse_seeds(spec) -> list[int] | None:
  """`--seeds`: `3` is seeds 0, 1, 2; `0,5,7` those seeds; None: unseeded."""
  if spec is None or spec == '':
    return None
  text = str(spec).strip()
  try:
    if ',' in text:
      seeds = [int(s) for s in text.split(',') if s.strip()]
    else:
      seeds = list(range(int(text)))
  except ValueError:
    raise SweepError(f'--seeds {spec!r}: give a count (3) or a list (0,1,2)') from None
  if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
    raise SweepError(f'--seeds {spec!r}: needs at least one seed, all distinct and >= 0')
  return seeds


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


def _load(config: str, overrides: dict, base_overrides=(), what='') -> 'configs.ConfigDict':
  args = list(base_overrides) + [f'{p}={format_value(v)}' for p, v in overrides.items()]
  try:
    return configs.load(config, args)
  except configs.ConfigError as e:
    raise SweepError(f'{what}: {e}' if what else str(e)) from None


def name_arms(runs: list[dict]) -> list[tuple[str, dict]]:
  """[(arm name, overrides)]; refuses two arms of one name."""
  arms, names = [], set()
  for overrides in runs:
    name = run_name(overrides)
    if name in names:
      raise SweepError(f'two runs would share the name {name!r}')
    names.add(name)
    arms.append((name, dict(overrides)))
  return arms


def plan(config: str, workdir: str, runs: list[dict], base_overrides=(), *,
         seeds=None, adjusted=None, budget_flops=None) -> list[Run]:
  """The runs (every arm once per seed) with validated configs; raises before any run.

  `adjusted`: {arm name: {PATH: value}} applied on top of the arm's overrides
  (matched or tuned fields). `budget_flops`: sets each run's `train.steps`.
  """
  planned = []
  for arm, overrides in name_arms(runs):
    if seeds is not None:
      for path in SEED_FIELDS:
        if path in overrides:
          raise SweepError(f'arm {arm!r} sets {path}, which --seeds sets; drop one')
    arm_overrides = {**overrides, **(adjusted or {}).get(arm, {})}
    for seed in (seeds if seeds is not None else [None]):
      run_overrides = dict(arm_overrides)
      name = arm
      if seed is not None:
        run_overrides.update({path: seed for path in SEED_FIELDS})
        name = f'{arm}/seed={seed}'
      cfg = _load(config, run_overrides, base_overrides, f'run {name!r}')
      if budget_flops is not None:
        run_overrides['train.steps'] = budget_steps(cfg, budget_flops, name)
        _load(config, run_overrides, base_overrides, f'run {name!r}')
      planned.append(Run(name, run_overrides, os.path.join(workdir, name), arm, seed))
  return planned


def run_config(config: str, run: Run, base_overrides=()):
  return configs.load(config, list(base_overrides) + run.override_args())


# ----------------------------------------------------------------------------
# Equal size (--match) and equal compute (--budget_flops).


def non_embedding_params(cfg_model) -> int:
  """`model.count_params` less the token embeddings, the output head and
  learned positions: the N of scaling laws (Kaplan et al. 2020)."""
  import model  # pylint: disable=g-import-not-at-top
  embedding = cfg_model.vocab_size * cfg_model.d_model
  embedding *= 1 if cfg_model.tie_embeddings else 2
  if cfg_model.position == 'learned':
    embedding += cfg_model.max_seq_len * cfg_model.d_model
  return int(model.count_params(cfg_model)) - embedding


def flops_per_token(cfg) -> float:
  import model  # pylint: disable=g-import-not-at-top
  return float(model.flops_per_token(cfg.model, cfg.train.seq_len))


def tokens_per_step(cfg) -> int:
  return int(cfg.train.global_batch_size) * int(cfg.train.seq_len)


MATCH = {'params': lambda cfg: non_embedding_params(cfg.model), 'flops': flops_per_token}
MATCH_TOLERANCE = 0.01


def budget_steps(cfg, budget_flops: float, what: str) -> int:
  """Whole steps whose FLOPs (steps x tokens/step x FLOPs/token) are nearest C."""
  per_step = tokens_per_step(cfg) * flops_per_token(cfg)
  steps = round(budget_flops / per_step)
  if steps < 1:
    raise SweepError(f'{what}: --budget_flops {budget_flops:.3g} is less than one step '
                     f'({per_step:.3g} FLOPs)')
  return steps


def match_arms(config: str, arms: list[tuple[str, dict]], base_overrides, kind: str,
               field: str, multiple: int = 1) -> dict:
  """{arm: {field: value}} so every arm's `kind` equals the first arm's within 1%.

  The value is searched among multiples of `multiple` (the quantity must grow
  with the field); raises SweepError before any run when 1% is out of reach.
  """
  if kind not in MATCH:
    raise SweepError(f'--match {kind!r}: choose params or flops')
  if multiple < 1:
    raise SweepError(f'--match_multiple {multiple}: must be >= 1')
  measure = MATCH[kind]
  base_name, base_over = arms[0]
  target = measure(_load(config, base_over, base_overrides, f'arm {base_name!r}'))
  adjusted = {}
  for name, overrides in arms[1:]:
    if field in overrides:
      raise SweepError(f'arm {name!r} sweeps {field}, the --match_field; match another field')
    cache = {}

    def at(value, name=name, overrides=overrides, cache=cache):
      if value not in cache:
        try:
          cfg = configs.load(config, list(base_overrides) + [
              f'{p}={format_value(v)}' for p, v in {**overrides, field: value}.items()])
          cache[value] = measure(cfg)
        except (configs.ConfigError, KeyError, TypeError, ZeroDivisionError):
          cache[value] = None
      return cache[value]
    current = _load(config, overrides, base_overrides, f'arm {name!r}')
    try:
      start = int(configs._get(current, field))  # pylint: disable=protected-access
    except (KeyError, TypeError, ValueError):
      raise SweepError(f'--match_field {field!r}: not an integer field of the config') from None
    lo_k, hi_k = 1, max(1, start // multiple)
    # Grow the upper end until it reaches the target, then bisect (monotone).
    while (at(hi_k * multiple) or -math.inf) < target and hi_k < 2**24:
      hi_k *= 2
    while hi_k - lo_k > 1:
      mid = (lo_k + hi_k) // 2
      if (at(mid * multiple) or -math.inf) < target:
        lo_k = mid
      else:
        hi_k = mid
    candidates = [k * multiple for k in {lo_k, hi_k} if at(k * multiple) is not None]
    if not candidates:
      raise SweepError(f'--match {kind}: arm {name!r} has no valid {field}')
    best = min(candidates, key=lambda v: abs(at(v) / target - 1))
    error = at(best) / target - 1
    if abs(error) > MATCH_TOLERANCE:
      raise SweepError(
          f'--match {kind}: arm {name!r} cannot come within 1% of {base_name!r} '
          f'({target:,.0f}) by {field}: the closest, {field}={best}, gives '
          f'{at(best):,.0f} ({100 * error:+.1f}%); try a smaller --match_multiple '
          'or another --match_field')
    adjusted[name] = {field: best}
  return adjusted


# ----------------------------------------------------------------------------
# Markers and one run.


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


# A run's saved steps; the name stays for the tests that call it.


def read_marker(workdir: str, name: str) -> dict | None:
  try:
    with open(os.path.join(workdir, name)) as f:
      content = json.load(f)
    return content if isinstance(content, dict) else {}
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}


def pid_alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except (ProcessLookupError, ValueError, TypeError, OverflowError):
    return False
  except PermissionError:
    return True
  return True


def running_state(workdir: str) -> str | None:
  """None (no RUNNING marker), 'running' (its sweep or trainer is alive, or it
  was written on another host) or 'stale' (both processes are gone)."""
  marker = read_marker(workdir, RUNNING)
  if marker is None:
    return None
  if marker.get('host', socket.gethostname()) != socket.gethostname():
    return 'running'
  pids = [marker.get('pid'), marker.get('child')]
  return 'running' if any(p is not None and pid_alive(p) for p in pids) else 'stale'


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


# Runs a command (argv[2:]) after asking the kernel to send it SIGTERM when
# the sweep (pid argv[1]) dies, even by SIGKILL: prctl(PR_SET_PDEATHSIG)
# survives exec. A wrapper, not a preexec_fn: no fork of a threaded process.
_DIE_WITH_PARENT = """
import ctypes, os, signal, sys
if sys.platform.startswith('linux'):
  ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
  if os.getppid() != int(sys.argv[1]):                         # the sweep already died
    sys.exit(143)
os.execv(sys.executable, [sys.executable] + sys.argv[2:])
"""


def _child_command(command: list[str]) -> list[str]:
  return [sys.executable, '-c', _DIE_WITH_PARENT, str(os.getpid()), *command[1:]]


class Stop:
  """SIGTERM and SIGINT while the sweep runs: the first is passed on to the
  running trainer as SIGTERM (it saves a checkpoint and exits), a second as
  SIGKILL; the sweep then starts no further run."""

  def __init__(self):
    self.signum = None
    self.child = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    forward = signal.SIGTERM if self.signum is None else signal.SIGKILL
    self.signum = self.signum or signum
    if self.child is not None and self.child.poll() is None:
      self.child.send_signal(forward)
    elif self.child is None and forward == signal.SIGKILL:
      raise KeyboardInterrupt      # in-process or between runs: stop at once

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)


def execute(config: str, run: Run, base_overrides=(), *, in_process=False,
            stop: Stop | None = None) -> int:
  """Trains one run; returns the exit status (0 when it reached its last step)."""
  cfg = run_config(config, run, base_overrides)
  _remove_marker(run, FAILED)
  marker = {'pid': os.getpid(), 'host': socket.gethostname(), 'started': time.time()}
  _write_marker(run, RUNNING, marker)
  if in_process:
    from train import loop  # pylint: disable=g-import-not-at-top
    try:
      summary = loop.train_and_evaluate(cfg, run.workdir)
      status, step = 0, summary['step']
      if summary.get('status') == 'preempted' and stop is not None:
        # The trainer's own SIGTERM handler saved; the sweep stops too.
        stop.signum = stop.signum or signal.SIGTERM
    except Exception as e:  # pylint: disable=broad-except
      # The sweep goes on; the run's FAILED marker says why.
      message = f'{type(e).__name__}: {e}'
      print(f'ablax: run {run.name} failed: {message}', file=sys.stderr, flush=True)
      status, step = 1, None
  else:
    # Its own process group: a Ctrl-C at the terminal reaches the sweep,
    # which passes it on once (see Stop).
    child = subprocess.Popen(_child_command(train_command(config, run, base_overrides)),
                             process_group=0)
    if stop is not None:
      stop.child = child
    _write_marker(run, RUNNING, {**marker, 'child': child.pid})
    while True:
      try:
        status = child.wait()
        break
      except KeyboardInterrupt:      # a second signal while waiting
        child.kill()
    if stop is not None:
      stop.child = None
    step = max(workdir_lib.steps(run.workdir), default=0)
  _remove_marker(run, RUNNING)
  if status == 0 and step is not None and step >= cfg.train.steps:
    _write_marker(run, DONE, {'step': step, 'finished': time.time()})
    return 0
  if stop is not None and stop.signum is not None:
    return 128 + stop.signum       # stopped by the user: no FAILED marker
  # Exit 0 short of the last step is a preemption (SIGTERM saved and returned).
  failure = {'status': status, 'step': step or None, 'time': time.time()}
  if in_process and step is None:
    failure['message'] = message
  _write_marker(run, FAILED, failure)
  return status or 1


def write_sweep_json(workdir: str, config: str, base_overrides, runs: list[Run],
                     **extra) -> None:
  os.makedirs(workdir, exist_ok=True)
  arms = {}
  for r in runs:
    arms.setdefault(r.arm or r.name, {k: format_value(v) for k, v in r.overrides.items()
                                      if r.seed is None or k not in SEED_FIELDS})
  content = {
      'config': config,
      'base_overrides': list(base_overrides),
      'arms': [{'name': name, 'overrides': overrides} for name, overrides in arms.items()],
      'runs': [{'name': r.name, 'arm': r.arm or r.name, 'seed': r.seed,
                'overrides': {p: format_value(v) for p, v in r.overrides.items()}, **r.info}
               for r in runs],
      **extra,
  }
  with open(os.path.join(workdir, 'sweep.json.tmp'), 'w') as f:
    json.dump(content, f, indent=2)
  os.replace(os.path.join(workdir, 'sweep.json.tmp'), os.path.join(workdir, 'sweep.json'))


def train_all(config, planned, base_overrides, *, in_process, out, stop, label='') -> dict:
  results = {}
  for i, run in enumerate(planned):
    tag = f'[{label}{i + 1}/{len(planned)}] {run.name}'
    if stop.signum is not None:
      break
    steps = run_config(config, run, base_overrides).train.steps
    if is_done(run, steps):
      print(f'{tag}: done, skipping', file=out, flush=True)
      results[run.name] = 'skipped'
      continue
    state = running_state(run.workdir)
    if state == 'running':
      marker = read_marker(run.workdir, RUNNING)
      print(f'{tag}: running in process {marker.get("child") or marker.get("pid")} '
            f'on {marker.get("host", "?")} (RUNNING marker), skipping', file=out, flush=True)
      results[run.name] = 'busy'
      continue
    if state == 'stale':
      print(f'{tag}: its last trainer is gone (stale RUNNING marker); resuming',
            file=out, flush=True)
    print(f'{tag}: training in {run.workdir}', file=out, flush=True)
    status = execute(config, run, base_overrides, in_process=in_process, stop=stop)
    if stop.signum is not None and status != 0:
      results[run.name] = 'stopped'
      step = max(workdir_lib.steps(run.workdir), default=None)
      print(f'{tag}: stopped by {signal.Signals(stop.signum).name}'
            + (f' at checkpoint {step}' if step else ' before its first checkpoint')
            + '; re-run the same command to resume', file=out, flush=True)
      break
    results[run.name] = 'done' if status == 0 else 'failed'
    if status:
      print(f'{tag}: FAILED (exit status {status})', file=out, flush=True)
  return results


# ----------------------------------------------------------------------------
# Tuning (--tune).


def higher_is_better(tag: str) -> bool:
  """Accuracy-like tags are maximised, losses and perplexities minimised."""
  return any(word in tag for word in ('accuracy', 'exact_match', 'core', 'reward'))


def final_metric(run_dir: str, tag: str) -> float:
  from launch import compare  # pylint: disable=g-import-not-at-top
  series = compare.read_scalars(run_dir).get(tag, [])
  return series[-1][1] if series else math.nan


def _tune_runs(config, workdir, arms, base_overrides, adjusted, field, values, tune_seeds,
               budget_flops) -> dict:
  """{(arm, value): [Run, ...]}: each arm at each grid value and tune seed."""
  grid = {}
  leaf = field.rsplit('.', 1)[-1]
  for arm, overrides in arms:
    if field in overrides:
      raise SweepError(f'arm {arm!r} sweeps {field}, the --tune field')
    for text in values:
      value = parse_value(text)
      runs = plan(config, os.path.join(workdir, TUNE_DIR, arm), [{}], base_overrides,
                  seeds=tune_seeds, budget_flops=budget_flops,
                  adjusted={'base': {**overrides, **adjusted.get(arm, {}), field: value}})
      name = f'{leaf}={_name_value(value)}'
      for r in runs:
        r.arm = arm
        r.name = f'{TUNE_DIR}/{arm}/{name}/{r.name.split("/", 1)[1]}'
        r.workdir = os.path.join(workdir, r.name)
      grid[(arm, value)] = runs
  return grid


def pick_tuned(grid: dict, metric: str, out) -> tuple[dict, dict]:
  """({arm: {field: best value}}, record for sweep.json) from the tune runs."""
  sign = -1 if higher_is_better(metric) else 1
  by_arm = {}
  for (arm, value), runs in grid.items():
    scores = [final_metric(r.workdir, metric) for r in runs]
    score = sum(scores) / len(scores) if scores else math.nan
    by_arm.setdefault(arm, []).append((value, score))
  chosen, record = {}, {}
  for arm, scored in by_arm.items():
    finite = [(v, s) for v, s in scored if math.isfinite(s)]
    if not finite:
      raise SweepError(f'--tune: no run of arm {arm!r} logged {metric}; see tune/{arm}/')
    best, _ = min(finite, key=lambda vs: sign * vs[1])
    values = [v for v, _ in scored]
    edge = len(values) > 1 and best in (values[0], values[-1])
    chosen[arm] = best
    record[arm] = {'chosen': best, 'edge': edge,
                   'scores': [[v, s] for v, s in scored]}
    print(f'tune: {arm}: best {best!r} ({metric} '
          + ', '.join(f'{v!r}: {s:.4f}' for v, s in scored) + ')'
          + ('  WARNING: at the edge of the grid; widen it' if edge else ''),
          file=out, flush=True)
  return chosen, record


# ----------------------------------------------------------------------------
# The sweep.


def sweep(config: str, workdir: str, runs: list[dict], base_overrides=(), *,
          seeds=None, match=None, match_field=None, match_multiple=1,
          budget_flops=None, tune=None, tune_seeds=(0,), metric='eval/loss',
          dry_run=False, in_process=False, out=None) -> dict:
  """Validates, then trains each unfinished run in turn.

  Returns {run name: 'skipped' | 'done' | 'failed' | 'busy' | 'stopped' |
  'planned'}. The options are those of the command line (see the module
  docstring); `seeds` is a list or None.
  """
  out = out or sys.stdout
  arms = name_arms(runs)
  for arm, overrides in arms:
    _load(config, overrides, base_overrides, f'run {arm!r}')
  extra = {'seeds': seeds, 'metric': metric}
  adjusted = {}
  if match is not None:
    if not match_field:
      raise SweepError('--match needs --match_field (e.g. model.d_ff)')
    adjusted = match_arms(config, arms, base_overrides, match, match_field, match_multiple)
    measure = MATCH[match]
    target = measure(_load(config, arms[0][1], base_overrides))
    for arm, overrides in arms:
      value = measure(_load(config, {**overrides, **adjusted.get(arm, {})}, base_overrides))
      field_value = adjusted.get(arm, {}).get(match_field, '(as configured)')
      print(f'match {match}: {arm}: {match_field}={field_value}, {value:,.0f} '
            f'({100 * (value / target - 1):+.2f}%)', file=out, flush=True)
    extra['match'] = {'kind': match, 'field': match_field, 'multiple': match_multiple}
  if budget_flops is not None:
    extra['budget_flops'] = budget_flops
  grid = None
  if tune:
    field, values = _split_axis(tune, 'tune')
    grid = _tune_runs(config, workdir, arms, base_overrides, adjusted, field, values,
                      list(tune_seeds), budget_flops)
    extra['tune'] = {'field': field, 'values': [parse_value(v) for v in values],
                     'seeds': list(tune_seeds)}
  planned = plan(config, workdir, runs, base_overrides, seeds=seeds, adjusted=adjusted,
                 budget_flops=budget_flops)
  if dry_run:
    tune_runs = [r for rs in (grid or {}).values() for r in rs]
    for run in tune_runs + (planned if not grid else []):
      _print_planned(config, run, base_overrides, out)
    if grid:
      print(f'then {len(planned)} run(s): every arm at its best {extra["tune"]["field"]}'
            + (f', seeds {seeds}' if seeds else ''), file=out, flush=True)
    return {r.name: 'planned' for r in tune_runs + planned}
  results = {}
  with Stop() as stop:
    if grid:
      tune_runs = [r for rs in grid.values() for r in rs]
      write_sweep_json(workdir, config, base_overrides, planned, **extra)
      results.update(train_all(config, tune_runs, base_overrides, in_process=in_process,
                                out=out, stop=stop, label='tune '))
      if stop.signum is None:
        chosen, record = pick_tuned(grid, metric, out)
        extra['tune']['arms'] = record
        for arm, value in chosen.items():
          adjusted.setdefault(arm, {})[extra['tune']['field']] = value
        planned = plan(config, workdir, runs, base_overrides, seeds=seeds,
                       adjusted=adjusted, budget_flops=budget_flops)
    if stop.signum is None:
      write_sweep_json(workdir, config, base_overrides, planned, **extra)
      results.update(train_all(config, planned, base_overrides, in_process=in_process,
                                out=out, stop=stop))
  if stop.signum is not None:
    results['_signal'] = stop.signum
  return results


def _print_planned(config, run, base_overrides, out):
  cfg = run_config(config, run, base_overrides)
  steps = cfg.train.steps
  ckpts = workdir_lib.steps(run.workdir)
  state = 'done' if is_done(run, steps) else (
      f'resume from step {ckpts[-1]}' if ckpts else 'new')
  flops = steps * tokens_per_step(cfg) * flops_per_token(cfg)
  print(f'{run.name}  [{state}; {steps} steps, {flops:.3g} FLOPs, '
        f'{non_embedding_params(cfg.model):,} non-embedding parameters]\n'
        f'  {shlex.join(train_command(config, run, base_overrides))}', file=out, flush=True)


def define_run_flags(fv: flags.FlagValues) -> None:
  """The flags of the commands that train runs one after another (launch.sweep,
  launch.scaling)."""
  flags.DEFINE_string('config', None, 'the base config of every run: '
                      'configs/NAME.py[:ARG]', flag_values=fv)
  flags.DEFINE_string('workdir', None, 'the sweep folder: one sub-folder per run, '
                      'sweep.json, and what launch.compare writes', flag_values=fv)
  flags.DEFINE_bool('dry_run', False, 'print every run, its state and its command; '
                    'train nothing (also --dry-run)', flag_values=fv)
  flags.DEFINE_bool('in_process', False, 'train in this process instead of a python -m '
                    'train subprocess per run (quicker for tiny runs)', flag_values=fv)


def parse_run_flags(fv: flags.FlagValues, argv, doc: str, prog: str):
  """`cli.parse` with the run flags required, overrides and `--dry-run`."""
  return cli.parse(fv, argv, doc=doc, prog=prog, required=('config', 'workdir'),
                   overrides=True, aliases={'dry-run': 'dry_run'})


FLAGS = flags.FlagValues()
define_run_flags(FLAGS)
flags.DEFINE_multi_string('sweep', [], 'PATH=V1,V2,...: one axis; the arms are the cross '
                          'product of the axes (e.g. --sweep model.norm_type=rmsnorm,layernorm)',
                          flag_values=FLAGS)
flags.DEFINE_multi_string('zip', [], 'PATH=V1,V2,...: lists of equal length paired into one '
                          'axis (V1 with the first value of every other --zip)',
                          flag_values=FLAGS)
flags.DEFINE_string('sweep_file', None, 'FILE.py[:FUNCTION]: FUNCTION (default sweep) '
                    'returns a list of override dicts, one per arm', flag_values=FLAGS)
flags.DEFINE_string('seeds', None, 'N (seeds 0..N-1) or S1,S2,...: train every arm once per '
                    'seed in WORKDIR/<arm>/seed=<s>/ (paired seeds: launch.compare reports '
                    'intervals)', flag_values=FLAGS)
flags.DEFINE_enum('match', None, sorted(MATCH), 'equalise the non-embedding parameters '
                  '(params) or training FLOPs per token (flops) of every arm to the '
                  "first arm's, by setting --match_field", flag_values=FLAGS)
flags.DEFINE_string('match_field', None, 'the integer field --match sets, e.g. model.d_ff',
                    flag_values=FLAGS)
flags.DEFINE_integer('match_multiple', 1, '--match_field takes multiples of this',
                     flag_values=FLAGS)
flags.DEFINE_float('budget_flops', None, "set each run's train.steps so that it spends "
                   'this many training FLOPs (e.g. 1e12)', flag_values=FLAGS)
flags.DEFINE_string('tune', None, 'FIELD=V1,V2,...: first train every arm at every value '
                    "(in WORKDIR/tune/), then the seeds at each arm's best by --metric",
                    flag_values=FLAGS)
flags.DEFINE_string('tune_seeds', '1', 'seeds of the --tune runs, as --seeds (1: seed 0)',
                    flag_values=FLAGS)
flags.DEFINE_string('metric', 'eval/loss', 'the scalar tag --tune picks by (its final value)',
                    flag_values=FLAGS)


def main(argv=None) -> int:
  """`python -m launch.sweep ARGS` (argv without the program name) -> exit status."""
  args = parse_run_flags(FLAGS, argv, __doc__, 'python -m launch.sweep')
  file_runs = load_sweep_file(args.sweep_file) if args.sweep_file else None
  runs = expand(args.sweep, args.zip, file_runs)
  results = sweep(args.config, args.workdir, runs, args.overrides,
                  seeds=parse_seeds(args.seeds), match=args.match,
                  match_field=args.match_field, match_multiple=args.match_multiple,
                  budget_flops=args.budget_flops, tune=args.tune,
                  tune_seeds=parse_seeds(args.tune_seeds), metric=args.metric,
                  dry_run=args.dry_run, in_process=args.in_process)
  signum = results.pop('_signal', None)
  if signum is not None:
    return 128 + signum
  failed = [name for name, r in results.items() if r == 'failed']
  if failed:
    print(f'ablax: {len(failed)} run(s) failed: {", ".join(failed)}', file=sys.stderr)
    return 1
  if not args.dry_run:
    print(f'sweep finished: python -m launch.compare {args.workdir}')
  return 0


def run():
  """The `ablax-sweep` console script."""
  errors.run(main, absl_flags=False)


if __name__ == '__main__':
  run()
