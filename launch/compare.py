"""`python -m launch.compare DIR`: one table and one figure for a sweep's runs.

    python -m launch.compare /tmp/sweep

Every sub-folder of DIR with a `config.json` or TensorBoard event files is a
run (DIR itself too, if it is a single run). For each run it reads the event
files (TensorBoard's `EventAccumulator`) and `config.json`, and reports:

- the overridden fields: from `DIR/sweep.json` when `launch.sweep` wrote it,
  otherwise the config fields whose values differ between the runs;
- status: `done` (reached `train.steps`), `running` (a sweep's RUNNING marker
  whose process is alive), `crashed` (a FAILED marker, or a RUNNING marker
  whose process is gone) or `stopped` (short of its last step, no marker);
- step, final train loss (`train/loss` at the last logged step), best eval loss
  (the minimum of `eval/loss`) and its step, tokens/s (median of
  `train/tokens_per_second`: robust to a slow step), parameters
  (`model.count_params`), and for MoE runs the final `train/moe_aux_loss` and
  `train/moe_expert_load_max` (1.0 is perfect balance).

It prints the table and writes `DIR/compare.csv`, `DIR/compare.md` and
`DIR/compare.png` (train- and eval-loss curves of every run, matplotlib Agg).
"""

import csv
import glob
import io
import json
import math
import os
import statistics
import sys

from launch import sweep as sweep_lib

COLUMNS = ('run', 'overrides', 'status', 'step', 'final_train_loss',
           'best_eval_loss', 'best_eval_step', 'tokens_per_second', 'parameters',
           'moe_aux_loss', 'moe_expert_load_max')


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


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def run_status(run_dir: str, config: dict | None, last_step: int | None) -> str:
  steps = (config or {}).get('train', {}).get('steps')
  ckpt = max(sweep_lib.checkpoint_steps(run_dir), default=None)
  if os.path.exists(os.path.join(run_dir, sweep_lib.DONE)):
    return 'done'
  running = _load_json(os.path.join(run_dir, sweep_lib.RUNNING))
  if running is not None:
    return 'running' if _pid_alive(int(running.get('pid', -1))) else 'crashed'
  if os.path.exists(os.path.join(run_dir, sweep_lib.FAILED)):
    return 'crashed'
  if steps is not None and ckpt is not None and ckpt >= steps:
    return 'done'
  if steps is not None and last_step is not None and last_step >= steps:
    return 'done'
  return 'stopped'


def _parameters(config: dict | None):
  if not config or 'model' not in config:
    return None
  try:
    import ml_collections  # pylint: disable=g-import-not-at-top
    import model  # pylint: disable=g-import-not-at-top
    return int(model.count_params(ml_collections.ConfigDict(config['model'])))
  except Exception:  # pylint: disable=broad-except
    return None      # a config from another ablax version: leave the cell empty


def find_runs(root: str) -> list[str]:
  def is_run(d):
    return (os.path.exists(os.path.join(d, 'config.json')) or
            glob.glob(os.path.join(d, 'events.out.tfevents.*')))
  runs = sorted(d for d in glob.glob(os.path.join(root, '*'))
                if os.path.isdir(d) and is_run(d))
  if not runs and is_run(root):
    runs = [root]
  return runs


def summarize(run_dir: str) -> dict:
  """One row of the table (numbers as floats, None where absent)."""
  config = _load_json(os.path.join(run_dir, 'config.json'))
  scalars = read_scalars(run_dir)
  train = scalars.get('train/loss', [])
  evals = scalars.get('eval/loss', [])
  tps = [v for _, v in scalars.get('train/tokens_per_second', [])]
  last_step = max((s for series in scalars.values() for s, _ in series), default=None)
  best = min(evals, key=lambda sv: sv[1]) if evals else None
  row = {
      'run': os.path.basename(os.path.normpath(run_dir)),
      'status': run_status(run_dir, config, last_step),
      'step': last_step,
      'final_train_loss': train[-1][1] if train else None,
      'best_eval_loss': best[1] if best else None,
      'best_eval_step': best[0] if best else None,
      'tokens_per_second': statistics.median(tps) if tps else None,
      'parameters': _parameters(config),
      'moe_aux_loss': None,
      'moe_expert_load_max': None,
  }
  for tag, column in (('train/moe_aux_loss', 'moe_aux_loss'),
                      ('train/moe_expert_load_max', 'moe_expert_load_max')):
    if scalars.get(tag):
      row[column] = scalars[tag][-1][1]
  row['_config'] = config
  row['_scalars'] = scalars
  return row


def _overrides(root: str, rows: list[dict]) -> None:
  """Fills each row's `overrides` cell."""
  recorded = _load_json(os.path.join(root, 'sweep.json'))
  by_name = {r['name']: r['overrides'] for r in (recorded or {}).get('runs', [])}
  flats = [_flatten(r['_config']) if r['_config'] else {} for r in rows]
  differing = sorted({k for f in flats for k in f
                      if len({json.dumps(g.get(k), sort_keys=True) for g in flats}) > 1})
  for row, flat in zip(rows, flats):
    if row['run'] in by_name:
      items = by_name[row['run']].items()
    else:
      items = ((k, flat.get(k)) for k in differing)
    row['overrides'] = ' '.join(f'{k}={v}' for k, v in items)


def _cell(value) -> str:
  if value is None:
    return ''
  if isinstance(value, float):
    if math.isnan(value):
      return 'nan'
    return f'{value:,.0f}' if abs(value) >= 1000 else f'{value:.4f}'
  if isinstance(value, int):
    return f'{value:,}'
  return str(value)


def _present_columns(rows):
  return [c for c in COLUMNS
          if c in ('run', 'overrides', 'status') or any(r.get(c) is not None for r in rows)]


def markdown(rows: list[dict]) -> str:
  columns = _present_columns(rows)
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  for r in rows:
    lines.append('| ' + ' | '.join(_cell(r.get(c)).replace('|', '\\|') for c in columns) + ' |')
  return '\n'.join(lines) + '\n'


def text_table(rows: list[dict]) -> str:
  columns = _present_columns(rows)
  cells = [columns] + [[_cell(r.get(c)) for c in columns] for r in rows]
  widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
  return '\n'.join('  '.join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
                   for line in cells) + '\n'


def write_csv(rows: list[dict], path: str) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(COLUMNS)
    for r in rows:
      writer.writerow(['' if r.get(c) is None else r.get(c) for c in COLUMNS])


def plot(rows: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
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
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_xlabel('step')
    ax.set_ylabel('loss')
    ax.grid(True, alpha=0.3)
  handles, labels = axes[1].get_legend_handles_labels()
  if not handles:
    handles, labels = axes[0].get_legend_handles_labels()
  if handles:
    fig.legend(handles, labels, loc='lower center', ncol=min(len(labels), 3),
               fontsize='small')
    fig.subplots_adjust(bottom=0.12 + 0.05 * math.ceil(len(labels) / 3))
  fig.savefig(path, dpi=100)
  plt.close(fig)


def compare(root: str, out=None) -> list[dict]:
  """Reads every run under `root`, prints the table, writes CSV, Markdown, PNG."""
  out = out or sys.stdout
  run_dirs = find_runs(root)
  if not run_dirs:
    raise FileNotFoundError(f'no runs (sub-folders with config.json or event files) in {root}')
  rows = [summarize(d) for d in run_dirs]
  # The sweep's order (its last axis varies fastest), then any other runs.
  order = [r['name'] for r in (_load_json(os.path.join(root, 'sweep.json')) or {}).get('runs', [])]
  rows.sort(key=lambda r: (order.index(r['run']) if r['run'] in order else len(order), r['run']))
  _overrides(root, rows)
  write_csv(rows, os.path.join(root, 'compare.csv'))
  with open(os.path.join(root, 'compare.md'), 'w') as f:
    f.write(markdown(rows))
  plot(rows, os.path.join(root, 'compare.png'))
  buffer = io.StringIO()
  buffer.write(text_table(rows))
  buffer.write(f'\nwrote {os.path.join(root, "compare.csv")}, compare.md, compare.png\n')
  out.write(buffer.getvalue())
  return rows


def main(argv=None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog='python -m launch.compare',
                                   description='Table and curves of the runs in DIR.')
  parser.add_argument('dir', help='a sweep folder (one run per sub-folder)')
  args = parser.parse_args(argv)
  try:
    compare(args.dir)
  except FileNotFoundError as e:
    print(f'ablax-compare: {e}', file=sys.stderr)
    return 2
  return 0


def run():
  """The `ablax-compare` console script."""
  sys.exit(main())


if __name__ == '__main__':
  run()
