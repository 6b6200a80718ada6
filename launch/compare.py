"""`python -m launch.compare DIR`: one table and one figure for a sweep's runs.

    python -m launch.compare /tmp/sweep [--metric eval/loss] [--baseline ARM]
    python -m launch.compare /tmp/ladder --scaling      # writes scaling.csv for launch.fit
    python -m launch.compare /tmp/sweep --lengths       # eval_lengths.json columns

Every sub-folder of DIR with a `config.json`, TensorBoard event files or a
sweep marker is a run (DIR itself too, if it is a single run); a seeded
sweep's runs are `DIR/<arm>/seed=<s>/` (`DIR/tune/` holds `--tune` runs and
is left out). For each run it reads the event files (TensorBoard's
`EventAccumulator`) and `config.json`, and reports:

- the overridden fields: from `DIR/sweep.json` when `launch.sweep` wrote it
  (each arm's overrides and matched or tuned values), otherwise the config
  fields whose values differ between the runs;
- status: `done` (reached `train.steps`), `running` (a sweep's RUNNING marker
  or the trainer's `DIR/LOCK` whose process is alive), `crashed` (a FAILED
  marker, or a RUNNING marker or LOCK whose process is gone), `failed to
  start` (no step logged and no checkpoint) or `stopped` (short of its last
  step, no marker); the workdir's own files are read by `train.workdir`;
- step, final train loss, best eval loss and its step, tokens/s (median),
  parameters, FLOPs per token, and for MoE runs the final
  `train/moe_aux_loss` and `train/moe_expert_load_max`.

A seeded sweep is tabled per arm instead (the statistics of Student's t, by
scipy.stats): the final and the best value of `--metric` over the seeds
(mean, standard deviation, half-width of the 95% interval), and against the
baseline arm (`--baseline`, default the first) the paired difference of the
final values over the seeds both arms have, its 95% interval, the paired
t-test's p-value and `*` when the interval excludes 0. The pooled within-arm
standard deviation is the noise floor.

It prints the table and writes `DIR/compare.csv`, `DIR/compare.md` and
`DIR/compare.png` (curves of every run, or each arm's mean with a band of
one standard deviation over its seeds; matplotlib Agg).
"""

import csv
import glob
import io
import json
import math
import os
import statistics
import sys

from absl import flags

import configs
from configs import cli
from configs import errors
from launch import fit as fit_lib
from launch import sweep as sweep_lib
from train import workdir as workdir_lib

COLUMNS = ('run', 'overrides', 'status', 'step', 'final_train_loss',
           'best_eval_loss', 'best_eval_step', 'tokens_per_second', 'parameters',
           'flops_per_token', 'moe_aux_loss', 'moe_expert_load_max')
OVERRIDES_WIDTH = 60     # the printed table cuts longer override lists


class CompareError(configs.UserError):
  """Nothing to compare, or a flag that does not fit the runs."""


def read_scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} from the run's event files, sorted by step.

  A resumed run logs some steps twice (after its last checkpoint and again
  after resuming); the later value of a step wins.
  """
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  out = {}
  for path in sorted(glob.glob(os.path.join(run_dir, 'events.out.tfevents.*')),
                     key=os.path.getmtime):
    acc = event_accumulator.EventAccumulator(
        path, size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    for tag in acc.Tags()['scalars']:
      by_step = out.setdefault(tag, {})
      for event in acc.Scalars(tag):
        by_step[event.step] = event.value
  return {tag: sorted(by_step.items()) for tag, by_step in out.items()}


def _flatten(tree: dict, prefix='') -> dict:
  flat = {}
  for key, value in tree.items():
    path = f'{prefix}{key}'
    if isinstance(value, dict) and value and path.count('.') < 1:
      flat.update(_flatten(value, path + '.'))
    else:
      flat[path] = value
  return flat


def _load_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def run_status(run_dir: str, config: dict | None, last_step: int | None) -> str:
  """The sweep's markers (DONE, RUNNING, FAILED) first, then the workdir's own
  `train.workdir.status` (a live or stale trainer lock, the newest checkpoint),
  then the last logged step."""
  steps = (config or {}).get('train', {}).get('steps')
  ckpt = max(workdir_lib.steps(run_dir), default=None)
  if os.path.exists(os.path.join(run_dir, sweep_lib.DONE)):
    return 'done'
  state = sweep_lib.running_state(run_dir)
  trainer = workdir_lib.status(run_dir).state
  if state == 'running' or trainer == 'running':
    return 'running'
  started = ckpt is not None or bool(last_step)
  if (state == 'stale' or trainer == 'crashed'
      or os.path.exists(os.path.join(run_dir, sweep_lib.FAILED))):
    return 'crashed' if started else 'failed to start'
  if steps is not None and ckpt is not None and ckpt >= steps:
    return 'done'
  if steps is not None and last_step is not None and last_step >= steps:
    return 'done'
  if not started:
    return 'failed to start'
  return 'stopped'


def _read_config(run_dir: str) -> dict | None:
  """The run's config.json, or None when it has none that reads."""
  try:
    return workdir_lib.read_config_json(run_dir)
  except configs.UserError:
    return None


def _model_numbers(config: dict | None) -> dict:
  """parameters, non-embedding parameters and FLOPs/token of a config.json."""
  if not config or 'model' not in config:
    return {}
  try:
    import ml_collections  # pylint: disable=g-import-not-at-top
    import model  # pylint: disable=g-import-not-at-top
    cfg = ml_collections.ConfigDict(config)
    return {'parameters': int(model.count_params(cfg.model)),
            'non_embedding_parameters': sweep_lib.non_embedding_params(cfg.model),
            'flops_per_token': sweep_lib.flops_per_token(cfg),
            'tokens_per_step': sweep_lib.tokens_per_step(cfg)}
  except Exception:  # pylint: disable=broad-except
    return {}        # a config from another ablax version: leave the cells empty


def _is_run(d: str) -> bool:
  return bool(os.path.exists(workdir_lib.config_path(d)) or
              glob.glob(os.path.join(d, 'events.out.tfevents.*')) or
              any(os.path.exists(os.path.join(d, m))
                  for m in (sweep_lib.DONE, sweep_lib.FAILED, sweep_lib.RUNNING,
                            workdir_lib.START_FAILED_FILE)))


def find_runs(root: str) -> list[str]:
  """The run folders under `root`: its sub-folders and their `seed=*` folders."""
  if not os.path.isdir(root):
    raise CompareError(f'{root}: no such folder' if not os.path.exists(root)
                       else f'{root} is not a folder')
  runs = []
  for d in sorted(glob.glob(os.path.join(root, '*'))):
    if not os.path.isdir(d) or os.path.basename(d) == sweep_lib.TUNE_DIR:
      continue
    if _is_run(d):
      runs.append(d)
    runs += sorted(s for s in glob.glob(os.path.join(d, 'seed=*'))
                   if os.path.isdir(s) and _is_run(s))
  if not runs and _is_run(root):
    runs = [root]
  return runs


def _seed_of(name: str):
  last = name.rsplit('/', 1)[-1]
  if last.startswith('seed='):
    try:
      return int(last[5:])
    except ValueError:
      return None
  return None


def summarize(run_dir: str, root: str | None = None) -> dict:
  """One row of the table (numbers as floats, None where absent)."""
  config = _read_config(run_dir)
  scalars = read_scalars(run_dir)
  train = scalars.get('train/loss', [])
  evals = scalars.get('eval/loss', [])
  tps = [v for _, v in scalars.get('train/tokens_per_second', [])]
  last_step = max((s for series in scalars.values() for s, _ in series), default=None)
  best = min(evals, key=lambda sv: sv[1]) if evals else None
  name = (os.path.relpath(run_dir, root).replace(os.sep, '/') if root and
          os.path.normpath(run_dir) != os.path.normpath(root)
          else os.path.basename(os.path.normpath(run_dir)))
  seed = _seed_of(name)
  row = {
      'run': name,
      'arm': name.rsplit('/', 1)[0] if seed is not None else name,
      'seed': seed,
      'status': run_status(run_dir, config, last_step),
      'step': last_step,
      'final_train_loss': train[-1][1] if train else None,
      'best_eval_loss': best[1] if best else None,
      'best_eval_step': best[0] if best else None,
      'tokens_per_second': statistics.median(tps) if tps else None,
      'moe_aux_loss': None,
      'moe_expert_load_max': None,
      **{k: None for k in ('parameters', 'non_embedding_parameters', 'flops_per_token',
                           'tokens_per_step')},
      **_model_numbers(config),
  }
  # The sweep's FAILED marker, or the trainer's own record of a failed start.
  failed = (sweep_lib.read_marker(run_dir, sweep_lib.FAILED)
            or workdir_lib.read_start_failed(run_dir) or {})
  if row['status'] == 'failed to start' and failed.get('message'):
    row['status'] += f': {failed["message"]}'
  for tag, column in (('train/moe_aux_loss', 'moe_aux_loss'),
                      ('train/moe_expert_load_max', 'moe_expert_load_max')):
    if scalars.get(tag):
      row[column] = scalars[tag][-1][1]
  row['_config'] = config
  row['_scalars'] = scalars
  return row


def _stage_sections(row) -> set:
  """Config sections a run's stage reads: `dpo` only for DPO runs."""
  config = row['_config'] or {}
  dpo = bool((config.get('dpo') or {}).get('init_checkpoint')) or any(
      tag.startswith('dpo/') for tag in row['_scalars'])
  return {s for s in config if s != 'dpo' or dpo}


def _overrides(root: str, rows: list[dict]) -> None:
  """Fills each row's `overrides` cell."""
  recorded = _load_json(os.path.join(root, 'sweep.json')) or {}
  by_name = {a['name']: a['overrides'] for a in recorded.get('arms', [])}
  by_name.update({r['name']: {k: v for k, v in r['overrides'].items()
                              if r.get('seed') is None or k not in sweep_lib.SEED_FIELDS}
                  for r in recorded.get('runs', [])})
  flats = [_flatten(r['_config']) if r['_config'] else {} for r in rows]
  differing = sorted({k for f in flats for k in f
                      if len({json.dumps(g.get(k), sort_keys=True) for g in flats}) > 1})
  for row, flat in zip(rows, flats):
    if row['run'] in by_name or row['arm'] in by_name:
      items = by_name.get(row['run'], by_name.get(row['arm'])).items()
    else:
      sections = _stage_sections(row)
      items = ((k, flat[k]) for k in differing
               if k in flat and k.split('.', 1)[0] in sections
               and k not in sweep_lib.SEED_FIELDS)
    row['overrides'] = ' '.join(f'{k}={v}' for k, v in items)


def _short(text: str, width: int = OVERRIDES_WIDTH) -> str:
  """Field paths cut to their last names, then the text to `width`."""
  text = ' '.join(part.split('=', 1)[0].rsplit('.', 1)[-1] + '=' + part.split('=', 1)[1]
                  if '=' in part else part for part in text.split(' '))
  return text if len(text) <= width else text[:width - 3] + '...'


def _cell(value) -> str:
  if value is None:
    return ''
  if isinstance(value, bool):
    return 'yes' if value else 'no'
  if isinstance(value, float):
    if math.isnan(value):
      return 'nan'
    if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
      return f'{value:.3g}'
    return f'{value:,.0f}' if abs(value) >= 1000 else f'{value:.4f}'
  if isinstance(value, int):
    return f'{value:,}'
  return str(value)


def _present_columns(rows, columns=COLUMNS, always=('run', 'overrides', 'status')):
  return [c for c in columns if c in always or any(r.get(c) is not None for r in rows)]


def markdown(rows: list[dict], columns=None) -> str:
  columns = columns or _present_columns(rows)
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  for r in rows:
    cells = [_short(r.get(c) or '') if c == 'overrides' else _cell(r.get(c))
             for c in columns]
    lines.append('| ' + ' | '.join(c.replace('|', '\\|') for c in cells) + ' |')
  return '\n'.join(lines) + '\n'


def text_table(rows: list[dict], columns=None) -> str:
  columns = columns or _present_columns(rows)
  cells = [columns] + [[_short(r.get(c) or '') if c == 'overrides' else _cell(r.get(c))
                        for c in columns] for r in rows]
  widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
  return '\n'.join('  '.join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
                   for line in cells) + '\n'


def write_csv(rows: list[dict], path: str, columns=COLUMNS) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    for r in rows:
      writer.writerow(['' if r.get(c) is None else r.get(c) for c in columns])


# ----------------------------------------------------------------------------
# Seeds: statistics per arm.


def metric_values(scalars: dict, tag: str) -> tuple[float | None, float | None]:
  """(final, best) of a tag; best is the max for accuracy-like tags."""
  series = scalars.get(tag, [])
  if not series:
    return None, None
  values = [v for _, v in series]
  best = max(values) if sweep_lib.higher_is_better(tag) else min(values)
  return series[-1][1], best


def interval(values) -> tuple[float, float, float]:
  """(mean, standard deviation, half-width of the 95% Student-t interval)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from scipy import stats  # pylint: disable=g-import-not-at-top
  x = np.asarray(values, np.float64)
  if len(x) < 2:
    return float(x.mean()) if len(x) else math.nan, math.nan, math.nan
  std = float(np.std(x, ddof=1))
  half = float(stats.t.ppf(0.975, len(x) - 1) * stats.sem(x))
  return float(x.mean()), std, half


def paired(arm: dict, baseline: dict) -> tuple[float, float, float, int]:
  """(mean difference arm - baseline, its 95% half-width, paired t-test p,
  pairs) over the seeds both have; `arm`, `baseline`: {seed: value}."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from scipy import stats  # pylint: disable=g-import-not-at-top
  seeds = sorted(set(arm) & set(baseline))
  a = np.asarray([arm[s] for s in seeds], np.float64)
  b = np.asarray([baseline[s] for s in seeds], np.float64)
  if len(seeds) < 2:
    return (float((a - b).mean()) if seeds else math.nan), math.nan, math.nan, len(seeds)
  test = stats.ttest_rel(a, b)
  low, high = test.confidence_interval(0.95)
  return float((a - b).mean()), float(high - low) / 2, float(test.pvalue), len(seeds)


def noise_floor(groups) -> float:
  """Pooled within-arm standard deviation: sqrt(sum (n-1) s^2 / sum (n-1))."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  num = den = 0.0
  for values in groups:
    if len(values) > 1:
      num += (len(values) - 1) * float(np.var(np.asarray(values, np.float64), ddof=1))
      den += len(values) - 1
  return math.sqrt(num / den) if den else math.nan


def stat_columns(metric: str) -> list[str]:
  return ['arm', 'seeds', f'{metric}_mean', f'{metric}_std', f'{metric}_ci95',
          'delta_vs_baseline', 'delta_ci95', 'p_value', 'significant',
          f'{metric}_best_mean', f'{metric}_best_std', f'{metric}_best_ci95',
          'parameters', 'non_embedding_parameters', 'flops_per_token']


def arm_statistics(rows: list[dict], metric: str, baseline: str | None = None
                   ) -> tuple[list[dict], float, str]:
  """One row per arm (see `stat_columns`), the noise floor and the baseline."""
  arms = {}
  for r in rows:
    arms.setdefault(r['arm'], []).append(r)
  if not arms:
    raise CompareError('no runs to compare')
  baseline = baseline or next(iter(arms))
  if baseline not in arms:
    raise CompareError(f'--baseline {baseline!r} is not an arm; the arms are: '
                       + ', '.join(arms))
  finals, bests = {}, {}
  for arm, runs in arms.items():
    finals[arm], bests[arm] = {}, {}
    for r in runs:
      final, best = metric_values(r['_scalars'], metric)
      if final is not None and math.isfinite(final):
        finals[arm][r['seed']] = final
        bests[arm][r['seed']] = best
  if not any(finals.values()):
    tags = sorted({t for r in rows for t in r['_scalars']})
    raise CompareError(f'--metric {metric!r}: no run logged it; the runs log: '
                       + ', '.join(tags))
  out = []
  for arm, runs in arms.items():
    mean, std, half = interval(list(finals[arm].values()))
    best_mean, best_std, best_half = interval(list(bests[arm].values()))
    row = {'arm': arm, 'seeds': len(finals[arm]),
           f'{metric}_mean': mean, f'{metric}_std': std, f'{metric}_ci95': half,
           f'{metric}_best_mean': best_mean, f'{metric}_best_std': best_std,
           f'{metric}_best_ci95': best_half,
           **{k: runs[0].get(k) for k in ('parameters', 'non_embedding_parameters',
                                          'flops_per_token')},
           'overrides': runs[0].get('overrides', ''),
           '_runs': runs}
    if arm != baseline:
      delta, delta_half, p, _ = paired(finals[arm], finals[baseline])
      row.update(delta_vs_baseline=delta, delta_ci95=delta_half, p_value=p,
                 significant=bool(math.isfinite(delta_half) and abs(delta) > delta_half))
    out.append(row)
  return out, noise_floor([list(v.values()) for v in finals.values()]), baseline


def _pm(mean, half) -> str:
  if mean is None or (isinstance(mean, float) and math.isnan(mean)):
    return ''
  return _cell(mean) + ('' if half is None or math.isnan(half) else f' ± {_cell(half)}')


def stat_display(stats_rows: list[dict], metric: str, extra_columns=()) -> list[dict]:
  """Rows for the printed and Markdown tables: mean ± half-width cells."""
  shown = []
  for r in stats_rows:
    d = {'arm': r['arm'], 'seeds': r['seeds'],
         f'final {metric}': _pm(r[f'{metric}_mean'], r[f'{metric}_ci95']),
         'std': _cell(r[f'{metric}_std']),
         f'best {metric}': _pm(r[f'{metric}_best_mean'], r[f'{metric}_best_ci95']),
         'delta vs baseline': (_pm(r['delta_vs_baseline'], r['delta_ci95'])
                               + (' *' if r.get('significant') else '')
                               if 'delta_vs_baseline' in r else '(baseline)'),
         'p': _cell(r.get('p_value')),
         'parameters': r.get('parameters'), 'FLOPs/token': r.get('flops_per_token')}
    for c in extra_columns:
      d[c] = _pm(r.get(c), r.get(f'{c}_ci95')) if f'{c}_ci95' in r else r.get(c)
    shown.append(d)
  return shown


# ----------------------------------------------------------------------------
# Figures.


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _finish(fig, axes, path):
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  for ax in axes:
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_xlabel('step')
    ax.grid(True, alpha=0.3)
  handles, labels = axes[-1].get_legend_handles_labels()
  if not handles:
    handles, labels = axes[0].get_legend_handles_labels()
  if handles:
    fig.legend(handles, labels, loc='lower center', ncol=min(len(labels), 3),
               fontsize='small')
    fig.subplots_adjust(bottom=0.12 + 0.05 * math.ceil(len(labels) / 3))
  fig.savefig(path, dpi=100)


def plot(rows: list[dict], path: str) -> None:
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for ax, tag, title in ((axes[0], 'train/loss', 'train loss'),
                         (axes[1], 'eval/loss', 'eval loss')):
    for r in rows:
      series = r['_scalars'].get(tag, [])
      if series:
        steps, values = zip(*series)
        label = r['run'] + ('' if r['status'] == 'done' else f' ({r["status"]})')
        ax.plot(steps, values, marker='o' if len(series) < 20 else None,
                markersize=3, label=label)
    ax.set_title(title)
    ax.set_ylabel('loss')
  _finish(fig, axes, path)
  plt.close(fig)


def plot_arms(stats_rows: list[dict], metric: str, path: str) -> None:
  """Each arm's mean curve over its seeds, with a band of one standard deviation."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  plt = _plt()
  tags = ['train/loss'] + ([metric] if metric != 'train/loss' else [])
  fig, axes = plt.subplots(1, len(tags), figsize=(6 * len(tags), 4.5), squeeze=False)
  axes = list(axes[0])
  for ax, tag in zip(axes, tags):
    for r in stats_rows:
      curves = [dict(run['_scalars'].get(tag, [])) for run in r['_runs']]
      curves = [c for c in curves if c]
      if not curves:
        continue
      steps = sorted(set.intersection(*(set(c) for c in curves)))
      if not steps:
        continue
      values = np.asarray([[c[s] for s in steps] for c in curves])
      mean, std = values.mean(0), values.std(0, ddof=1) if len(curves) > 1 else 0 * values[0]
      line, = ax.plot(steps, mean, marker='o' if len(steps) < 20 else None, markersize=3,
                      label=f'{r["arm"]} ({len(curves)} seeds)')
      ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.25)
    ax.set_title(f'{tag}: mean ± std over seeds')
    ax.set_ylabel(tag)
  _finish(fig, axes, path)
  plt.close(fig)


# ----------------------------------------------------------------------------
# Scaling ladders and context lengths.


def scaling_table(rows: list[dict], root: str, metric: str = 'eval/loss') -> list[dict]:
  """params (non-embedding), tokens (trained), loss (final `metric`) per run,
  with the run's compute budget from a `launch.scaling` sweep.json."""
  recorded = _load_json(os.path.join(root, 'sweep.json')) or {}
  budgets = {r['name']: r.get('budget') for r in recorded.get('runs', [])}
  ladders = {r['name']: r.get('ladder', '') for r in recorded.get('runs', [])}
  table = []
  for r in rows:
    final, _ = metric_values(r['_scalars'], metric)
    if final is None or r['non_embedding_parameters'] is None or not r['step']:
      continue
    tokens = r['step'] * r['tokens_per_step']
    table.append({'arm': ladders.get(r['run'], ''), 'run': r['run'],
                  'budget': budgets.get(r['run']) or tokens * r['flops_per_token'],
                  'params': r['non_embedding_parameters'], 'tokens': tokens, 'loss': final})
  return table


# The evaluation tags a table shows (train/tasks.py: `eval/<task>/<metric>`;
# centered_accuracy follows from accuracy, perplexity is left to TensorBoard).
TASK_METRICS = ('accuracy', 'accuracy_norm', 'accuracy_calibrated', 'exact_match')


def task_columns(rows: list[dict]) -> list[str]:
  """Adds the final `eval/bits_per_byte`, `eval/core` and `eval/<task>/<metric>`
  of each run as cells named without `eval/`; returns the columns."""
  found = set()
  for r in rows:
    for tag, series in r['_scalars'].items():
      parts = tag.split('/')
      if series and parts[0] == 'eval' and (
          tag in ('eval/bits_per_byte', 'eval/core')
          or (len(parts) == 3 and parts[2] in TASK_METRICS)):
        r[tag[5:]] = series[-1][1]
        found.add(tag[5:])
  first = [c for c in ('bits_per_byte', 'core') if c in found]
  return first + sorted(found - set(first))


def length_columns(rows: list[dict], run_dirs: list[str]) -> list[str]:
  """Adds `loss@L` cells from each run's eval_lengths.json; returns the columns."""
  lengths = set()
  for r, d in zip(rows, run_dirs):
    saved = _load_json(os.path.join(d, 'eval_lengths.json')) or {}
    for item in saved.get('lengths', []):
      r[f'loss@{item["length"]}'] = item['loss']
      lengths.add(int(item['length']))
  return [f'loss@{n}' for n in sorted(lengths)]


# ----------------------------------------------------------------------------
# The command.


def compare(root: str, out=None, *, metric: str = 'eval/loss', baseline: str | None = None,
            scaling: bool = False, lengths: bool = False) -> list[dict]:
  """Reads every run under `root`, prints the table, writes CSV, Markdown, PNG.

  Returns the per-run rows (unseeded) or the per-arm rows (seeded sweeps).
  """
  out = out or sys.stdout
  run_dirs = find_runs(root)
  if not run_dirs:
    raise CompareError(f'no runs (sub-folders with config.json or event files) in {root}')
  rows = [summarize(d, root) for d in run_dirs]
  recorded = _load_json(os.path.join(root, 'sweep.json')) or {}
  # The sweep's order (its last axis varies fastest), then any other runs.
  order = [r['name'] for r in recorded.get('runs', [])]
  by_dir = dict(zip((r['run'] for r in rows), run_dirs))
  rows.sort(key=lambda r: (order.index(r['run']) if r['run'] in order else len(order),
                           r['run']))
  run_dirs = [by_dir[r['run']] for r in rows]
  _overrides(root, rows)
  extra = length_columns(rows, run_dirs) if lengths else []
  if lengths and not extra:
    raise CompareError(f'--lengths: no run under {root} has eval_lengths.json; run '
                       'python -m train.evaluate --workdir RUN --lengths L1,L2 first')
  extra += task_columns(rows)
  buffer = io.StringIO()
  written = ['compare.csv', 'compare.md', 'compare.png']
  seeded = any(r['seed'] is not None for r in rows)
  if seeded:
    result = _compare_seeded(root, rows, metric, baseline, recorded, extra, buffer)
  else:
    if metric != 'eval/loss' or baseline:
      raise CompareError('--metric and --baseline need a seeded sweep (launch.sweep --seeds)')
    columns = _present_columns(rows) + extra
    write_csv(rows, os.path.join(root, 'compare.csv'), COLUMNS + tuple(extra))
    with open(os.path.join(root, 'compare.md'), 'w') as f:
      f.write(markdown(rows, columns))
    plot(rows, os.path.join(root, 'compare.png'))
    buffer.write(text_table(rows, columns))
    result = rows
  if scaling:
    table = scaling_table(rows, root, metric)
    if not table:
      raise CompareError(f'--scaling: no run under {root} logged {metric}')
    write_csv(table, os.path.join(root, 'scaling.csv'),
              ('arm', 'run', 'budget', 'params', 'tokens', 'loss'))
    written.append('scaling.csv')
    if len({r['arm'] for r in table}) > 1:
      # A ladder per arm: each arm's fitted law and the gap it predicts at 10x
      # the largest budget run ("does the change still win at 10x?").
      budgets = [float(r['budget']) for r in table if r.get('budget')]
      try:
        fit_lib.fit(os.path.join(root, 'scaling.csv'), out=buffer,
                    budget=10 * max(budgets) if budgets else None)
        written += ['fit.json', 'fit_<arm>.png']
      except fit_lib.FitError as e:
        buffer.write(f'no per-arm fit: {e}\n')
  buffer.write(f'\nwrote {os.path.join(root, written[0])}, {", ".join(written[1:])}\n')
  out.write(buffer.getvalue())
  return result


def _compare_seeded(root, rows, metric, baseline, recorded, extra, buffer):
  stats_rows, floor, baseline = arm_statistics(rows, metric, baseline)
  # Matched and tuned values: one column per adjusted field.
  adjusted = []
  for field in ((recorded.get('match') or {}).get('field'),
                (recorded.get('tune') or {}).get('field')):
    if field:
      adjusted.append(field)
      for r in stats_rows:
        r[field] = r['_runs'][0]['_config'] and _flatten(
            r['_runs'][0]['_config']).get(field)
  for c in extra:        # loss@L, task metrics: mean and 95% half-width over seeds
    for r in stats_rows:
      values = [run[c] for run in r['_runs'] if run.get(c) is not None]
      r[c], _, r[f'{c}_ci95'] = interval(values) if values else (None, None, None)
  columns = stat_columns(metric) + adjusted + [x for c in extra for x in (c, f'{c}_ci95')]
  write_csv(stats_rows, os.path.join(root, 'compare.csv'), columns)
  write_csv(rows, os.path.join(root, 'compare_runs.csv'),
            ('arm', 'seed') + COLUMNS + tuple(extra))
  shown = stat_display(stats_rows, metric, adjusted + extra)
  shown_columns = _present_columns(shown, list(shown[0]), always=('arm', 'seeds'))
  notes = [f'baseline {baseline}; mean ± half-width of the 95% t interval over seeds; '
           f'delta = arm - baseline, paired by seed; * = interval excludes 0',
           f'noise floor (pooled within-arm std of final {metric}): {_cell(floor)}']
  for arm, record in ((recorded.get('tune') or {}).get('arms') or {}).items():
    if record.get('edge'):
      notes.append(f'WARNING: {arm}: the best {recorded["tune"]["field"]} '
                   f'({record["chosen"]}) is at the edge of the grid; widen it')
  unfinished = [r for r in rows if r['status'] != 'done']
  for r in unfinished:
    notes.append(f'{r["run"]}: {r["status"]} at step {r["step"]}')
  with open(os.path.join(root, 'compare.md'), 'w') as f:
    f.write(markdown(shown, shown_columns) + '\n' + '\n'.join(
        f'- {n}' for n in notes) + '\n')
  plot_arms(stats_rows, metric, os.path.join(root, 'compare.png'))
  buffer.write(text_table(shown, shown_columns) + '\n' + '\n'.join(notes) + '\n')
  return stats_rows


FLAGS = flags.FlagValues()
flags.DEFINE_string('metric', 'eval/loss', 'seeded sweeps: the scalar tag to compare '
                    '(its final and best value over the seeds)', flag_values=FLAGS)
flags.DEFINE_string('baseline', None, 'seeded sweeps: the arm the others are compared with '
                    '(default: the first arm)', flag_values=FLAGS)
flags.DEFINE_bool('scaling', False, 'also write DIR/scaling.csv (params, tokens, loss of '
                  'each run) for python -m launch.fit', flag_values=FLAGS)
flags.DEFINE_bool('lengths', False, "add a column per context length of the runs' "
                  'eval_lengths.json (python -m train.evaluate --lengths)', flag_values=FLAGS)


def main(argv=None) -> int:
  """`python -m launch.compare DIR [flags]` (argv without the program name)."""
  args = cli.parse(FLAGS, argv, doc=__doc__, prog='python -m launch.compare',
                   positional={'DIR': 'a sweep folder (one run per sub-folder), or one '
                               'run\'s workdir'})
  try:
    compare(args.DIR, metric=args.metric, baseline=args.baseline, scaling=args.scaling,
            lengths=args.lengths)
  except FileNotFoundError as e:
    raise CompareError(str(e)) from e
  return 0


def run():
  """The `ablax-compare` console script."""
  errors.run(main, absl_flags=False)


if __name__ == '__main__':
  run()
