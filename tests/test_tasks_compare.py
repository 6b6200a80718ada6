"""`launch.compare` shows the evaluation-task columns: per run, and per arm with
the seeds' mean and 95% interval when the sweep is seeded."""

import csv
import json
import math
import os

import numpy as np
import pytest
from scipy import stats

import configs
from launch import compare
from launch import sweep
from train import metrics

TAGS = ('eval/bits_per_byte', 'eval/core', 'eval/next_line/accuracy',
        'eval/next_line/accuracy_calibrated', 'eval/passkey@256/exact_match')


def fake_run(run_dir, final: dict, extra_tags=()):
  """A finished run: config.json, event files with each tag at steps 0 and
  10 (the final value at 10), a DONE marker."""
  os.makedirs(run_dir)
  with open(os.path.join(run_dir, 'config.json'), 'w') as f:
    json.dump(configs.load('configs/llama.py:tiny', []).to_dict(), f)
  writer = metrics.SummaryWriter(run_dir, enabled=True)
  writer.scalars(0, {t: 0.0 for t in final} | {'eval/loss': 5.0})
  writer.scalars(10, final | {'eval/loss': 3.0, 'eval/next_line/perplexity': 7.0,
                              **dict(extra_tags)})
  writer.close()
  with open(os.path.join(run_dir, sweep.DONE), 'w') as f:
    json.dump({'step': 10}, f)


def test_compare_shows_task_columns_per_run(tmp_path, capsys):
  finals = {name: {t: 0.1 * i + 0.01 * k for k, t in enumerate(TAGS)}
            for i, name in enumerate(('rope', 'nope'))}
  for name, final in finals.items():
    fake_run(str(tmp_path / name), final, extra_tags=[('eval/web/loss', 3.0)])
  rows = compare.compare(str(tmp_path))
  printed = capsys.readouterr().out
  with open(tmp_path / 'compare.csv') as f:
    table = {r['run']: r for r in csv.DictReader(f)}
  for name, final in finals.items():
    for tag, value in final.items():
      assert float(table[name][tag[5:]]) == np.float32(value)
    assert 'next_line/perplexity' not in table[name] and 'web/loss' not in table[name]
  header = printed.splitlines()[0].split()
  assert header[-5:] == ['bits_per_byte', 'core', 'next_line/accuracy',
                         'next_line/accuracy_calibrated', 'passkey@256/exact_match']
  assert {r['run'] for r in rows} == set(finals)


def test_compare_shows_task_columns_with_the_seeds_statistics(tmp_path, capsys):
  values = {'a': [0.31, 0.35, 0.30], 'b': [0.26, 0.25, 0.27]}   # next_line accuracy
  for arm, accs in values.items():
    for seed, acc in enumerate(accs):
      fake_run(str(tmp_path / arm / f'seed={seed}'),
               {'eval/next_line/accuracy': acc, 'eval/core': (acc - 0.25) / 0.75})
  compare.compare(str(tmp_path))
  printed = capsys.readouterr().out
  with open(tmp_path / 'compare.csv') as f:
    table = {r['arm']: r for r in csv.DictReader(f)}
  for arm, accs in values.items():
    x = np.asarray(accs, np.float32).astype(np.float64)   # event files hold float32
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    row = table[arm]
    assert float(row['next_line/accuracy']) == pytest.approx(x.mean())
    assert float(row['next_line/accuracy_ci95']) == pytest.approx(half)
    assert float(row['core']) == pytest.approx(((x - 0.25) / 0.75).mean(), rel=1e-5)
    line = next(l for l in printed.splitlines() if l.startswith(arm + ' '))
    assert f'{x.mean():.4f} ± {half:.4f}' in line, line

