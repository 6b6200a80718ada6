"""`python -m launch.scaling`: an isoFLOP ladder of runs for a scaling law.

    python -m launch.scaling --config configs/llama.py:tiny --workdir /tmp/ladder \\
        --budgets 3e10,1e11,3e11 --sizes 3 [--sweep model.position=rope,alibi] [--dry-run]
    python -m launch.compare /tmp/ladder --scaling     # -> /tmp/ladder/scaling.csv
    python -m launch.fit /tmp/ladder/scaling.csv

For every compute budget C it plans `--sizes` models around the budget's
expected optimum and sets each one's `train.steps` so that steps x tokens per
step x `model.flops_per_token` is C (to the nearest step). The size rule:

- the expected optimum is `--tokens_per_param` r tokens per parameter
  (default 20, Chinchilla's), C = 6 N D with D = r N, so N* = sqrt(C / 6r)
  non-embedding parameters (sqrt(C / 120) by default);
- the sizes are N* x `--spread`^u for u evenly spaced in [-1/2, 1/2] (default
  spread 16: from N*/4 to 4 N*);
- each size is the shape of the config's family scaled in `d_model` and
  `num_layers`: `d_model` a multiple m of head_dim x (num_heads /
  num_kv_heads), up to 32 m (head_dim, the GQA grouping and d_ff / d_model
  kept), 1 to 32 layers; among the shapes within 15% of the wanted N, the
  one whose d_model / num_layers is nearest the config's (its aspect
  ratio), else the shape nearest in N.

Runs are named `C=<budget>,d_model=<d>,num_layers=<l>` (prefixed by the arm
with `--sweep`, one ladder per arm) and trained one after another by the
sweep machinery (`launch.sweep`: resume, skip, markers, signals).
"""

import math
import os
import sys

import numpy as np

from absl import flags

import configs
from configs import errors
from launch import sweep as sweep_lib

TOKENS_PER_PARAM = 20


class ScalingError(sweep_lib.SweepError):
  """A ladder that cannot be planned."""


def shapes(cfg) -> list[dict]:
  """The candidate shapes of the config's family (see the module docstring)."""
  m = cfg.model
  head_dim = m.head_dim or m.d_model // m.num_heads
  group = m.num_heads // m.num_kv_heads
  step = head_dim * group
  ratio = m.d_ff / m.d_model
  out = []
  for layers in range(1, 33):
    for width in range(step, 32 * step + 1, step):
      heads = width // head_dim
      out.append({'model.d_model': width, 'model.num_layers': layers,
                  'model.num_heads': heads, 'model.num_kv_heads': heads // group,
                  'model.d_ff': max(8, int(round(ratio * width / 8)) * 8)})
  return out


def _measure(cfg, shape: dict) -> float:
  c = cfg.copy_and_resolve_references()
  for path, value in shape.items():
    configs.apply_override(c, f'{path}={value}')
  return sweep_lib.non_embedding_params(c.model)


def pick_sizes(cfg, budget: float, sizes: int, spread: float,
               tokens_per_param: float = TOKENS_PER_PARAM) -> list[dict]:
  """`sizes` distinct shapes around N* = sqrt(C / 6r), smallest first."""
  aspect = cfg.model.d_model / cfg.model.num_layers
  candidates = [(shape, _measure(cfg, shape)) for shape in shapes(cfg)]
  optimum = math.sqrt(budget / (6 * tokens_per_param))
  wanted = [optimum * spread ** u for u in np.linspace(-0.5, 0.5, sizes)] if sizes > 1 else [
      optimum]
  chosen = []
  for n in wanted:
    near = [(s, p) for s, p in candidates if abs(math.log(p / n)) <= math.log(1.15)]
    if near:
      shape = min(near, key=lambda sp: abs(math.log(
          sp[0]['model.d_model'] / sp[0]['model.num_layers'] / aspect)))[0]
    else:
      shape = min(candidates, key=lambda sp: abs(math.log(sp[1] / n)))[0]
    if shape not in chosen:
      chosen.append(shape)
  return chosen


def plan(config: str, workdir: str, budgets, sizes: int, arms=(), base_overrides=(), *,
         spread: float = 16.0, tokens_per_param: float = TOKENS_PER_PARAM
         ) -> list[sweep_lib.Run]:
  runs = []
  for arm, overrides in sweep_lib.name_arms(list(arms) or [{}]):
    cfg = sweep_lib._load(config, overrides, base_overrides, f'arm {arm!r}')  # pylint: disable=protected-access
    for budget in budgets:
      for shape in pick_sizes(cfg, budget, sizes, spread, tokens_per_param):
        run_overrides = {**overrides, **shape}
        shaped = sweep_lib._load(config, run_overrides, base_overrides)  # pylint: disable=protected-access
        name = (f'C={budget:.3g},d_model={shape["model.d_model"]},'
                f'num_layers={shape["model.num_layers"]}')
        if arms:
          name = f'{arm},{name}'
        run_overrides['train.steps'] = sweep_lib.budget_steps(shaped, budget, name)
        sweep_lib._load(config, run_overrides, base_overrides, f'run {name!r}')  # pylint: disable=protected-access
        runs.append(sweep_lib.Run(name, run_overrides, os.path.join(workdir, name), name,
                                  info={'budget': budget, 'ladder': arm if arms else ''}))
  return runs


FLAGS = flags.FlagValues()
sweep_lib.define_run_flags(FLAGS)
flags.DEFINE_list('budgets', None, 'C1,C2,...: the compute budgets in training FLOPs, '
                  'one ladder rung each (e.g. 3e10,1e11,3e11)', flag_values=FLAGS)
flags.DEFINE_integer('sizes', 5, 'model sizes per budget', flag_values=FLAGS)
flags.DEFINE_float('spread', 16.0, 'largest / smallest size of a budget', flag_values=FLAGS)
flags.DEFINE_float('tokens_per_param', TOKENS_PER_PARAM, 'the centre of the sizes: '
                   'N* = sqrt(C / (6 x this)) non-embedding parameters', flag_values=FLAGS)
flags.DEFINE_multi_string('sweep', [], 'PATH=V1,V2,...: one ladder per arm, as '
                          'launch.sweep --sweep', flag_values=FLAGS)


def main(argv=None) -> int:
  """`python -m launch.scaling ARGS` (argv without the program name) -> exit status."""
  args = sweep_lib.parse_run_flags(FLAGS, argv, __doc__, 'python -m launch.scaling')
  base = args.overrides
  if not args.budgets:
    raise ScalingError('--budgets is required: the compute budgets, e.g. --budgets 3e10,1e11')
  try:
    budgets = [float(b) for b in args.budgets]
  except ValueError:
    raise ScalingError(f'--budgets {",".join(args.budgets)!r}: give FLOPs, e.g. '
                       '1e11,3e11') from None
  if args.sizes < 1 or args.spread < 1 or args.tokens_per_param <= 0:
    raise ScalingError('--sizes must be >= 1, --spread >= 1, --tokens_per_param > 0')
  arms = sweep_lib.expand(args.sweep) if args.sweep else []
  runs = plan(args.config, args.workdir, budgets, args.sizes, arms, base,
              spread=args.spread, tokens_per_param=args.tokens_per_param)
  for run in runs:
    cfg = sweep_lib.run_config(args.config, run, base)
    flops = cfg.train.steps * sweep_lib.tokens_per_step(cfg) * sweep_lib.flops_per_token(cfg)
    print(f'{run.name}: {sweep_lib.non_embedding_params(cfg.model):,} non-embedding '
          f'parameters, {cfg.train.steps} steps, '
          f'{cfg.train.steps * sweep_lib.tokens_per_step(cfg):,} tokens, {flops:.3g} FLOPs')
  if args.dry_run:
    return 0
  sweep_lib.write_sweep_json(args.workdir, args.config, base, runs,
                             scaling={'budgets': budgets, 'sizes': args.sizes,
                                      'spread': args.spread,
                                      'tokens_per_param': args.tokens_per_param})
  with sweep_lib.Stop() as stop:
    results = sweep_lib.train_all(args.config, runs, base, in_process=args.in_process,
                                  out=sys.stdout, stop=stop)
  if stop.signum is not None:
    return 128 + stop.signum
  failed = [name for name, r in results.items() if r == 'failed']
  if failed:
    print(f'ablax: {len(failed)} run(s) failed: {", ".join(failed)}', file=sys.stderr)
    return 1
  print(f'ladder finished: python -m launch.compare {args.workdir} --scaling && '
        f'python -m launch.fit {os.path.join(args.workdir, "scaling.csv")}')
  return 0


if __name__ == '__main__':
  errors.run(main, absl_flags=False)
