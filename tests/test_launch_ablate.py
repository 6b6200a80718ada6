"""Ablations that support a conclusion: seeds, statistics, matched arms,
budgets, tuning, signals, scaling fits.

Most tests build fake runs (event files and config.json written here, with
known losses) or plan sweeps without training; one small seeded sweep trains
in-process, and one subprocess sweep is stopped by signals.
"""

import csv
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import stats

import configs
from configs import errors
from launch import compare
from launch import fit
from launch import sweep
from train import metrics
from train import workdir as workdir_lib

CONFIG = 'configs/llama.py:tiny'
TINY = ['model.num_layers=1', 'model.d_model=32', 'model.d_ff=64', 'train.seq_len=16',
        'train.warmup_steps=1', 'train.log_every_steps=1', 'train.eval_steps=1']
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_run(run_dir, curves, overrides=(), done=True):
  """A run folder as the trainer leaves it: config.json, event files, DONE."""
  os.makedirs(run_dir, exist_ok=True)
  cfg = configs.load(CONFIG, list(overrides))
  with open(os.path.join(run_dir, 'config.json'), 'w') as f:
    json.dump(cfg.to_dict(), f)
  writer = metrics.SummaryWriter(run_dir, enabled=True)
  steps = sorted({s for series in curves.values() for s, _ in series})
  for step in steps:
    writer.scalars(step, {tag: v for tag, series in curves.items() for s, v in series
                          if s == step})
  writer.close()
  if done:
    with open(os.path.join(run_dir, sweep.DONE), 'w') as f:
      json.dump({'step': steps[-1]}, f)


def t_reference(x):
  """mean, sample std, 95% half-width by the textbook formulas."""
  x = np.asarray(x, np.float64)
  n = len(x)
  std = math.sqrt(((x - x.mean())**2).sum() / (n - 1))
  low, high = stats.t.interval(0.95, n - 1, loc=x.mean(), scale=std / math.sqrt(n))
  return x.mean(), std, (high - low) / 2


# ----------------------------------------------------------------------------
# Statistics on fake runs with known losses.

FINALS = {   # arm -> final eval/loss per seed (seed 3 of `c` is missing)
    'a': [3.10, 3.14, 3.08, 3.12],
    'b': [3.00, 3.05, 3.01, 3.02],
    'c': [3.11, 3.12, 3.10],
}


@pytest.fixture(scope='module')
def fake_sweep(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('fake'))
  for arm, finals in FINALS.items():
    for seed, final in enumerate(finals):
      # The best eval loss is at step 10, 0.05 + seed/100 below the final one.
      fake_run(os.path.join(root, f'lr={arm}', f'seed={seed}'), {
          'train/loss': [(10, final + 0.3), (20, final + 0.2)],
          'eval/loss': [(10, final - 0.05 - seed / 100), (20, final)],
          'eval/next_line/accuracy': [(10, 0.2 + seed / 10), (20, 0.1)],
      }, ['train.steps=20', f'train.seed={seed}', f'data.shuffle_seed={seed}'])
  return root


def test_statistics_equal_scipy_on_fake_runs(fake_sweep, capsys):
  assert compare.main([fake_sweep]) == 0
  printed = capsys.readouterr().out
  with open(os.path.join(fake_sweep, 'compare.csv')) as f:
    reader = csv.DictReader(f)
    rows = {r['arm']: r for r in reader}
    columns = reader.fieldnames
  assert columns[:9] == ['arm', 'seeds', 'eval/loss_mean', 'eval/loss_std', 'eval/loss_ci95',
                         'delta_vs_baseline', 'delta_ci95', 'p_value', 'significant']
  assert {'parameters', 'flops_per_token'} <= set(columns)
  for arm, finals in FINALS.items():
    row = rows[f'lr={arm}']
    mean, std, half = t_reference(finals)
    assert int(row['seeds']) == len(finals)
    np.testing.assert_allclose([float(row['eval/loss_mean']), float(row['eval/loss_std']),
                                float(row['eval/loss_ci95'])], [mean, std, half], rtol=1e-5)
    best = [v - 0.05 - s / 100 for s, v in enumerate(finals)]
    np.testing.assert_allclose(float(row['eval/loss_best_mean']), np.mean(best), rtol=1e-5)
    if arm == 'a':
      assert row['delta_vs_baseline'] == ''        # the baseline: the first arm
      continue
    # Paired over the seeds both arms have, by the t formula.
    n = len(finals)
    d = np.asarray(finals) - np.asarray(FINALS['a'][:n])
    sd = d.std(ddof=1)
    t = d.mean() / (sd / math.sqrt(n))
    p = 2 * stats.t.sf(abs(t), n - 1)
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    np.testing.assert_allclose([float(row['delta_vs_baseline']), float(row['delta_ci95']),
                                float(row['p_value'])], [d.mean(), half, p], rtol=1e-4)
    assert row['significant'] == str(abs(d.mean()) > half)
  assert rows['lr=b']['significant'] == 'True' and rows['lr=c']['significant'] == 'False'
  # The noise floor: pooled within-arm standard deviation.
  pooled = math.sqrt(sum((len(v) - 1) * np.var(v, ddof=1) for v in FINALS.values())
                     / sum(len(v) - 1 for v in FINALS.values()))
  assert f'noise floor (pooled within-arm std of final eval/loss): {pooled:.4f}' in printed
  assert ' *' in printed and os.path.getsize(os.path.join(fake_sweep, 'compare.png')) > 10_000
  md = open(os.path.join(fake_sweep, 'compare.md')).read()
  assert md.count('| lr=') == 3 and 'noise floor' in md


def test_metric_and_baseline_flags(fake_sweep, capsys):
  tag = 'eval/next_line/accuracy'
  assert compare.main([fake_sweep, '--metric', tag, '--baseline', 'lr=b']) == 0
  capsys.readouterr()
  with open(os.path.join(fake_sweep, 'compare.csv')) as f:
    rows = {r['arm']: r for r in csv.DictReader(f)}
  assert rows['lr=b']['delta_vs_baseline'] == ''
  # Accuracy: the best value is the maximum, 0.2 + seed / 10.
  np.testing.assert_allclose(float(rows['lr=a'][f'{tag}_best_mean']), 0.35, rtol=1e-5)
  np.testing.assert_allclose(float(rows['lr=a'][f'{tag}_mean']), 0.1, rtol=1e-5)
  assert errors.call(compare.main, [fake_sweep, '--baseline', 'lr=z']) == 2
  err = capsys.readouterr().err
  assert err.startswith('ablax: --baseline') and 'lr=a' in err and err.count('\n') == 1


# ----------------------------------------------------------------------------
# compare's small defects: missing folders, failed starts, unused fields.


def test_compare_missing_folder_failed_start_and_stage_fields(tmp_path, capsys):
  assert errors.call(compare.main, [str(tmp_path / 'nope')]) == 2
  err = capsys.readouterr().err
  assert err == f'ablax: {tmp_path / "nope"}: no such folder\n'
  root = tmp_path / 'runs'
  fake_run(str(root / 'pre'), {'train/loss': [(1, 3.0), (2, 2.9)]}, ['train.steps=2'])
  # A run that failed before its first step: config.json only, or only a
  # FAILED marker with the trainer's message.
  os.makedirs(root / 'no_start')
  configs_json = json.dumps(configs.load(CONFIG, ['train.steps=2']).to_dict())
  (root / 'no_start' / 'config.json').write_text(configs_json)
  os.makedirs(root / 'no_config')
  (root / 'no_config' / sweep.FAILED).write_text(json.dumps(
      {'status': 1, 'message': 'data.train_files: no such file'}))
  # A DPO run next to a pretraining run: dpo.* differ, but only the DPO run uses them.
  fake_run(str(root / 'dpo'), {'dpo/loss': [(1, 0.69)]},
           ['train.steps=1', 'dpo.init_checkpoint=/x', 'dpo.beta=0.5'])
  rows = {r['run']: r for r in compare.compare(str(root))}
  capsys.readouterr()
  assert rows['no_start']['status'] == 'failed to start'
  assert rows['no_config']['status'] == 'failed to start: data.train_files: no such file'
  assert rows['pre']['status'] == 'done'
  assert 'dpo.' not in rows['pre']['overrides'] and 'None' not in rows['pre']['overrides']
  assert 'dpo.beta=0.5' in rows['dpo']['overrides']
  # A long list of overrides is cut in the printed table, whole in the CSV.
  assert len(compare._short('model.x=1 ' * 20)) == compare.OVERRIDES_WIDTH


# ----------------------------------------------------------------------------
# Matched arms and equal compute: planned, nothing trained.


def non_embedding_from_module(overrides):
  """Parameters of the built Decoder outside its embedding and head."""
  import jax
  from flax import nnx
  import model
  cfg = configs.load(CONFIG, overrides)
  decoder = nnx.eval_shape(lambda: model.Decoder(cfg.model, rngs=nnx.Rngs(0)))
  leaves = jax.tree_util.tree_leaves_with_path(nnx.state(decoder, nnx.Param))
  return sum(int(np.prod(x.shape)) for path, x in leaves
             if jax.tree_util.keystr(path).split("'")[1] not in ('embed', 'head'))


def test_match_params_gated_vs_plain(tmp_path, capsys):
  arms = sweep.expand(['model.mlp_gated=True,False'])
  adjusted = sweep.match_arms(CONFIG, sweep.name_arms(arms), [], 'params', 'model.d_ff', 8)
  assert adjusted == {'mlp_gated=False': {'model.d_ff': 288}}   # 3/2 of 192: the 2/3 rule
  gated = non_embedding_from_module([])
  plain = non_embedding_from_module(['model.mlp_gated=False', 'model.d_ff=288'])
  assert abs(plain / gated - 1) <= 0.01
  # GQA vs MHA at equal parameters, matched through d_ff; FLOPs likewise.
  for kind in ('params', 'flops'):
    arms = sweep.name_arms(sweep.expand(['model.num_kv_heads=2,4']))
    value = sweep.match_arms(CONFIG, arms, [], kind, 'model.d_ff', 1)['num_kv_heads=4']
    cfg = configs.load(CONFIG, ['model.num_kv_heads=4', f'model.d_ff={value["model.d_ff"]}'])
    base = configs.load(CONFIG)
    measure = sweep.MATCH[kind]
    assert value['model.d_ff'] < 192 and abs(measure(cfg) / measure(base) - 1) <= 0.01
  # Out of reach: the multiples of 64 nearest 288 (256, 320) miss by 8%.
  workdir = tmp_path / 'w'
  assert errors.call(sweep.main, [
      '--config', CONFIG, '--workdir', str(workdir), '--sweep', 'model.mlp_gated=True,False',
      '--match', 'params', '--match_field', 'model.d_ff', '--match_multiple', '64']) == 2
  err = capsys.readouterr().err
  assert err.startswith('ablax: --match params') and 'within 1%' in err
  assert err.count('\n') == 1 and not workdir.exists()


def test_budget_flops_sets_steps_within_one_step(tmp_path):
  budget = 3e11
  runs = sweep.plan(CONFIG, str(tmp_path), sweep.expand(['model.d_ff=64,512']), TINY,
                    budget_flops=budget)
  steps = set()
  for run in runs:
    cfg = sweep.run_config(CONFIG, run, TINY)
    per_step = (cfg.train.global_batch_size * cfg.train.seq_len *
                float(__import__('model').flops_per_token(cfg.model, cfg.train.seq_len)))
    assert abs(cfg.train.steps * per_step - budget) <= per_step / 2
    steps.add(cfg.train.steps)
  assert len(steps) == 2                     # the wider MLP gets fewer steps
  with pytest.raises(sweep.SweepError, match='less than one step'):
    sweep.plan(CONFIG, str(tmp_path), [{}], TINY, budget_flops=1.0)


# ----------------------------------------------------------------------------
# Tuning: every arm at every value, then its seeds at its own best.


def test_tune_picks_each_arms_best(tmp_path, monkeypatch, capsys):
  # A stand-in trainer: final eval loss (log10 lr - best)^2, best -2.5 for
  # gelu and -3.5 for silu, so each arm has its own optimum.
  trained = []

  def fake_execute(config, run, base_overrides=(), **kwargs):
    cfg = sweep.run_config(config, run, base_overrides)
    best = -2.5 if cfg.model.mlp_activation == 'gelu' else -3.5
    loss = 3 + (math.log10(cfg.train.learning_rate) - best) ** 2 + cfg.train.seed / 100
    fake_run(run.workdir, {'eval/loss': [(cfg.train.steps, loss)]},
             [o for o in base_overrides] + run.override_args())
    trained.append(run.name)
    return 0
  monkeypatch.setattr(sweep, 'execute', fake_execute)
  root = str(tmp_path)
  results = sweep.sweep(CONFIG, root, sweep.expand(['model.mlp_activation=silu,gelu']),
                        ['train.steps=2'], seeds=[0, 1],
                        tune='train.learning_rate=1e-4,3e-4,1e-3,3e-3', tune_seeds=[0])
  out = capsys.readouterr().out
  assert len(trained) == 2 * 4 + 2 * 2 and set(results.values()) == {'done'}
  assert 'tune/mlp_activation=gelu/learning_rate=0.003/seed=0' in trained
  for arm, lr in (('silu', 3e-4), ('gelu', 3e-3)):
    for seed in (0, 1):
      saved = json.load(open(os.path.join(root, f'mlp_activation={arm}', f'seed={seed}',
                                          'config.json')))
      assert saved['train']['learning_rate'] == lr and saved['train']['seed'] == seed
  # gelu's best (3e-3) is the last grid value: a warning, at tuning and in compare.
  assert 'mlp_activation=gelu: best 0.003' in out and 'edge of the grid' in out
  rows = {r['arm']: r for r in compare.compare(root)}
  printed = capsys.readouterr().out
  assert rows['mlp_activation=gelu']['train.learning_rate'] == 3e-3
  assert 'WARNING: mlp_activation=gelu' in printed and 'tune/' not in printed


# ----------------------------------------------------------------------------
# A real seeded sweep: pairing, and what the statistics say.


@pytest.fixture(scope='module')
def seeded(tmp_path_factory):
  os.environ['ABLAX_NO_BAR'] = '1'
  root = str(tmp_path_factory.mktemp('seeded'))
  # Arm 2 differs from arm 1 only in a field that cannot change training;
  # arm 3 in a learning rate 100x smaller.
  arms = sweep.expand(zips=['train.learning_rate=3e-3,3e-3,3e-5',
                            'train.keep_checkpoints=3,2,3'])
  results = sweep.sweep(CONFIG, root, arms, TINY + ['train.steps=6', 'train.eval_every_steps=6',
                                                    'train.checkpoint_every_steps=6'],
                        seeds=[0, 1], in_process=True)
  return root, results


def test_seeded_sweep_is_paired_and_significant_where_it_should_be(seeded, capsys):
  root, results = seeded
  names = [f'learning_rate={lr},keep_checkpoints={k}/seed={s}'
           for (lr, k), s in itertools.product([(0.003, 3), (0.003, 2), (3e-05, 3)], range(2))]
  assert results == {n: 'done' for n in names}
  for name in names:
    saved = json.load(open(os.path.join(root, name, 'config.json')))
    seed = int(name[-1])
    assert saved['train']['seed'] == seed and saved['data']['shuffle_seed'] == seed
  rows = {r['arm']: r for r in compare.compare(root)}
  capsys.readouterr()
  same, slow = rows['learning_rate=0.003,keep_checkpoints=2'], rows[
      'learning_rate=3e-05,keep_checkpoints=3']
  # Paired seeds: same data order and initial weights, so the same losses.
  assert same['delta_vs_baseline'] == 0.0 and not same['significant']
  assert abs(same['delta_vs_baseline']) <= same['delta_ci95'] or same['delta_ci95'] == 0
  assert slow['significant'] and slow['delta_vs_baseline'] > 0 and slow['p_value'] < 0.05
  # Different seeds do differ (the interval is not degenerate).
  assert rows['learning_rate=0.003,keep_checkpoints=3']['eval/loss_std'] > 0


# ----------------------------------------------------------------------------
# Signals: a stopped sweep leaves no trainer behind.


def _wait(predicate, timeout=120.0):
  end = time.time() + timeout
  while time.time() < end:
    if predicate():
      return True
    time.sleep(0.2)
  return False


def test_stopping_a_sweep_stops_its_trainer(tmp_path):
  workdir = tmp_path / 'w'
  run_dir = str(workdir / 'base')
  command = [sys.executable, '-m', 'launch.sweep', '--config', CONFIG, '--workdir',
             str(workdir), *[f'--config.{o}' for o in TINY], '--config.train.steps=100000',
             '--config.train.checkpoint_every_steps=5', '--config.train.eval_every_steps=1000']
  env = {**os.environ, 'PYTHONPATH': REPO, 'ABLAX_NO_BAR': '1', 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_FLAGS', None)

  def child_pid():
    return (sweep.read_marker(run_dir, sweep.RUNNING) or {}).get('child')

  # SIGTERM: passed on; the trainer saves where it is, the sweep exits 143.
  sweep_proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, cwd=REPO)
  assert _wait(lambda: child_pid() and workdir_lib.steps(run_dir))
  child = child_pid()
  sweep_proc.send_signal(signal.SIGTERM)
  out = sweep_proc.communicate(timeout=120)[0].decode()
  assert sweep_proc.returncode == 128 + signal.SIGTERM, out
  assert not sweep.pid_alive(child)
  saved = workdir_lib.steps(run_dir)[-1]
  assert f'stopped by SIGTERM at checkpoint {saved}' in out
  assert not os.path.exists(os.path.join(run_dir, sweep.RUNNING))
  assert not os.path.exists(os.path.join(run_dir, sweep.FAILED))
  assert compare.summarize(run_dir)['status'] == 'stopped'
  # SIGKILL: the trainer gets SIGTERM from the kernel and stops too; the
  # RUNNING marker left behind is seen as stale.
  sweep_proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, cwd=REPO)
  assert _wait(lambda: child_pid() and child_pid() != child
               and workdir_lib.steps(run_dir)[-1] > saved)
  child = child_pid()
  sweep_proc.kill()
  sweep_proc.communicate(timeout=60)
  assert _wait(lambda: not sweep.pid_alive(child), timeout=60)
  assert sweep.running_state(run_dir) == 'stale'
  assert compare.summarize(run_dir)['status'] == 'crashed'


# ----------------------------------------------------------------------------
# Scaling laws.

LAW = dict(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28)   # Hoffmann et al.'s fit


def law_table(law, seed=0):
  """(C, N, D, loss) of 7 budgets x 9 sizes around the law's optimum, 0.5% noise."""
  rng = np.random.default_rng(seed)
  a = law['beta'] / (law['alpha'] + law['beta'])
  rows = []
  for c in np.geomspace(1e18, 1e21, 7):
    n_opt = fit.optimal_allocation({**law, 'a': a}, c)[0]
    for n in n_opt * np.geomspace(1 / 8, 8, 9):
      d = c / (6 * n)
      loss = law['E'] + law['A'] / n**law['alpha'] + law['B'] / d**law['beta']
      rows.append((c, n, d, loss * (1 + 0.005 * rng.standard_normal())))
  return rows


def test_fit_per_arm_predicts_the_gap(tmp_path, capsys):
  # Arm y is arm x's law plus 0.05 nats everywhere: the gap at 10x the compute.
  path = tmp_path / 'scaling.csv'
  with open(path, 'w', newline='') as f:
    csv.writer(f).writerows([('arm', 'budget', 'params', 'tokens', 'loss')] +
                            [('x', *r) for r in law_table(LAW, 1)] +
                            [('y', *r) for r in law_table({**LAW, 'E': LAW['E'] + 0.05}, 2)])
  result = fit.fit(str(path), budget=1e22, write=False)
  capsys.readouterr()
  losses = result['predicted_at_budget']['loss']
  assert abs(losses['y'] - losses['x'] - 0.05) < 0.02
  assert set(result['arms']) == {'x', 'y'}


def test_fit_recovers_a_known_law(tmp_path, capsys):
  a = LAW['beta'] / (LAW['alpha'] + LAW['beta'])
  path = tmp_path / 'scaling.csv'
  with open(path, 'w', newline='') as f:
    csv.writer(f).writerows([('budget', 'params', 'tokens', 'loss')] + law_table(LAW))
  assert fit.main([str(path), '--predict', '1e10,2e11']) == 0
  printed = capsys.readouterr().out
  result = json.load(open(tmp_path / 'fit.json'))
  assert {'E', 'A', 'alpha', 'B', 'beta', 'a', 'b', 'residuals'} <= set(result)
  assert abs(result['E'] / LAW['E'] - 1) < 0.05
  assert abs(result['alpha'] - LAW['alpha']) < 0.02 and abs(result['beta'] - LAW['beta']) < 0.02
  # 10x past the largest budget, at the law's optimum there.
  n, d = fit.optimal_allocation({**LAW, 'a': a}, 1e22)
  truth = LAW['E'] + LAW['A'] / n**LAW['alpha'] + LAW['B'] / d**LAW['beta']
  assert abs(float(fit.law(result, n, d)) / truth - 1) < 0.01
  assert abs(result['approach2']['a'] - a) < 0.03
  assert abs(result['approach2']['b'] - (1 - a)) < 0.03
  predicted = float(fit.law(result, 1e10, 2e11))
  assert f'predicted loss at N=1e+10, D=2e+11: {predicted:.4f}' in printed
  assert os.path.getsize(tmp_path / 'fit.png') > 10_000


# ----------------------------------------------------------------------------
# Length extrapolation: train.evaluate --lengths.


def test_evaluate_lengths_equals_strided_evaluation(tmp_path, capsys):
  os.environ['ABLAX_NO_BAR'] = '1'
  from train import evaluate
  from train import loop
  run_dir = str(tmp_path / 'runs' / 'tiny')
  loop.train_and_evaluate(configs.load(CONFIG, TINY + [
      'train.steps=2', 'train.eval_every_steps=2', 'train.checkpoint_every_steps=2']), run_dir)
  # Documents of 39 bytes: [BOS] + 39 + [EOS] = 41 tokens, max(L) + 1 for L = 40;
  # a shorter one is left out.
  rng = np.random.default_rng(0)
  docs = tmp_path / 'docs'
  os.makedirs(docs)
  for i in range(3):
    (docs / f'{i}.txt').write_text(''.join(rng.choice(list('abcdef ghij'), 39)))
  (docs / 'short.txt').write_text('too short')
  result = evaluate.evaluate_lengths(run_dir, ['40', '16', '8'], files=str(docs / '*.txt'))
  assert [r['length'] for r in result['lengths']] == [8, 16, 40]
  assert result['documents'] == 3 and result['tokens'] == 120
  # At each length: the strided evaluation with stride = context = L on the
  # same documents (the training length, 16, is today's evaluation).
  for r in result['lengths'][1:]:
    reference = evaluate.evaluate_strided(run_dir, context=r['length'], stride=r['length'],
                                          files=','.join(str(docs / f'{i}.txt')
                                                         for i in range(3)))
    np.testing.assert_allclose(r['loss'], reference['loss'], rtol=1e-5)
    np.testing.assert_allclose(r['perplexity'], math.exp(r['loss']), rtol=1e-6)
  assert json.load(open(os.path.join(run_dir, 'eval_lengths.json'))) == result
  rows = compare.compare(str(tmp_path / 'runs'), lengths=True)
  printed = capsys.readouterr().out
  assert rows[0]['loss@40'] == result['lengths'][2]['loss'] and 'loss@8' in printed
  with pytest.raises(configs.ConfigError, match='--lengths'):
    evaluate.evaluate_lengths(run_dir, ['x'])


def test_scaling_ladder_plan_and_table(tmp_path, capsys):
  from launch import scaling
  import model
  budgets = [1e11, 1e12]
  runs = scaling.plan(CONFIG, str(tmp_path), budgets, 3, base_overrides=['train.seq_len=64'])
  assert len(runs) == 6
  for budget in budgets:
    mine = [r for r in runs if r.info['budget'] == budget]
    sizes = []
    for run in mine:
      cfg = sweep.run_config(CONFIG, run, ['train.seq_len=64'])
      assert cfg.train.seq_len == 64
      per_step = (cfg.train.global_batch_size * 64 *
                  model.flops_per_token(cfg.model, 64))
      assert abs(cfg.train.steps * per_step - budget) <= per_step / 2
      sizes.append(non_embedding_from_module(['train.seq_len=64'] + run.override_args()))
    # Distinct sizes, smallest first, around N* = sqrt(C / 120).
    assert sizes == sorted(set(sizes))
    assert sizes[0] < math.sqrt(budget / 120) < sizes[-1]
  # The table compare --scaling writes from the ladder's runs (fake losses here).
  sweep.write_sweep_json(str(tmp_path), CONFIG, ['train.seq_len=64'], runs)
  for i, run in enumerate(runs):
    steps = sweep.run_config(CONFIG, run, ['train.seq_len=64']).train.steps
    fake_run(run.workdir, {'eval/loss': [(steps, 3.0 + i / 10)]},
             ['train.seq_len=64'] + run.override_args())
  compare.compare(str(tmp_path), scaling=True)
  capsys.readouterr()
  with open(tmp_path / 'scaling.csv') as f:
    table = list(csv.DictReader(f))
  assert len(table) == 6
  for i, run in enumerate(runs):
    row = next(r for r in table if r['run'] == run.name)
    cfg = sweep.run_config(CONFIG, run, ['train.seq_len=64'])
    assert float(row['budget']) == run.info['budget']
    assert int(row['params']) == non_embedding_from_module(
        ['train.seq_len=64'] + run.override_args())
    assert int(row['tokens']) == cfg.train.steps * cfg.train.global_batch_size * 64
    assert float(row['loss']) == pytest.approx(3.0 + i / 10, rel=1e-6)


def test_seeds_flag_and_running_markers(tmp_path, monkeypatch, capsys):
  assert sweep.parse_seeds('3') == [0, 1, 2] and sweep.parse_seeds('0,5,7') == [0, 5, 7]
  for bad in ('x', '0', '1,1', '-1,2'):
    with pytest.raises(sweep.SweepError, match='--seeds'):
      sweep.parse_seeds(bad)
  with pytest.raises(sweep.SweepError, match='train.seed'):
    sweep.plan(CONFIG, str(tmp_path), [{'train.seed': 3}], seeds=[0])
  # A run whose RUNNING marker names a live process is left alone; one whose
  # processes are gone is stale and trains (resumes).
  runs = sweep.plan(CONFIG, str(tmp_path), sweep.expand(['model.qk_norm=False,True']))
  for run, pid in zip(runs, (os.getpid(), 2**22 + 12345)):
    os.makedirs(run.workdir)
    json.dump({'pid': pid, 'host': __import__('socket').gethostname()},
              open(os.path.join(run.workdir, sweep.RUNNING), 'w'))
  trained = []
  monkeypatch.setattr(sweep, 'execute', lambda config, run, *a, **k: trained.append(run.name) or 0)
  results = sweep.train_all(CONFIG, runs, (), in_process=True, out=sys.stdout, stop=sweep.Stop())
  out = capsys.readouterr().out
  assert results == {'qk_norm=False': 'busy', 'qk_norm=True': 'done'}
  assert trained == ['qk_norm=True']
  assert f'running in process {os.getpid()}' in out and 'stale RUNNING marker' in out


def test_compare_scaling_fits_each_arms_ladder(tmp_path, capsys):
  # Two ladders whose losses follow LAW, arm alibi 0.05 nats above rope:
  # compare --scaling fits each and prints the gap at 10x the largest budget.
  from launch import scaling
  base = ['train.seq_len=64']
  runs = scaling.plan(CONFIG, str(tmp_path), [1e11, 1e12], 3,
                      sweep.expand(['model.position=rope,alibi']), base)
  sweep.write_sweep_json(str(tmp_path), CONFIG, base, runs)
  for run in runs:
    cfg = sweep.run_config(CONFIG, run, base)
    n = sweep.non_embedding_params(cfg.model)
    d = cfg.train.steps * cfg.train.global_batch_size * 64
    loss = float(fit.law(LAW, n, d)) + (0.05 if 'alibi' in run.name else 0.0)
    fake_run(run.workdir, {'eval/loss': [(cfg.train.steps, loss)]}, base + run.override_args())
  compare.compare(str(tmp_path), scaling=True)
  printed = capsys.readouterr().out
  with open(tmp_path / 'fit.json') as f:
    predicted = json.load(f)['predicted_at_budget']
  assert predicted['budget'] == 1e13
  gap = predicted['loss']['position=alibi'] - predicted['loss']['position=rope']
  assert abs(gap - 0.05) < 0.01, printed
  assert 'vs position=rope' in printed
