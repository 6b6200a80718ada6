"""launch.sweep and launch.compare: a 2x2 sweep of the tiny preset, end to end.

The sweep trains four tiny runs once (module fixture, in-process); the tests
check the runs, that re-running trains nothing, that an interrupted sweep
finishes only the unfinished run (and resumes it: the resumed losses equal
the uninterrupted ones), that bad overrides stop the sweep before any run,
and that compare's table equals the event files read here independently.
"""

import csv
import glob
import itertools
import json
import os
import shutil

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from configs import errors
from launch import compare
from launch import sweep
from train import workdir as workdir_lib

CONFIG = 'configs/llama.py:tiny'
BASE = ['train.steps=4', 'train.eval_every_steps=2', 'train.checkpoint_every_steps=2',
        'train.log_every_steps=1', 'train.eval_steps=1', 'train.seq_len=16',
        'train.warmup_steps=1', 'model.num_layers=1', 'model.d_model=32', 'model.d_ff=64']
AXES = ['model.norm_type=rmsnorm,layernorm', 'model.position=rope,alibi']
NAMES = [f'norm_type={n},position={p}'
         for n, p in itertools.product(('rmsnorm', 'layernorm'), ('rope', 'alibi'))]


def events(run_dir):
  """{tag: {step: value}} read straight from the event files."""
  out = {}
  for path in glob.glob(os.path.join(run_dir, 'events.out.tfevents.*')):
    acc = event_accumulator.EventAccumulator(path, size_guidance={'scalars': 0})
    acc.Reload()
    for tag in acc.Tags()['scalars']:
      for e in acc.Scalars(tag):
        out.setdefault(tag, {}).setdefault(e.step, []).append(e.value)
  return out


@pytest.fixture(scope='module')
def swept(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('sweep'))
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv('ABLAX_NO_BAR', '1')
    results = sweep.sweep(CONFIG, root, sweep.expand(AXES), BASE, in_process=True)
  return root, results


def test_expand_cross_product_zip_and_names():
  runs = sweep.expand(['model.norm_type=rmsnorm,layernorm'],
                      ['model.num_heads=2,4', 'model.num_kv_heads=1,2'])
  assert runs == [
      {'model.norm_type': 'rmsnorm', 'model.num_heads': 2, 'model.num_kv_heads': 1},
      {'model.norm_type': 'rmsnorm', 'model.num_heads': 4, 'model.num_kv_heads': 2},
      {'model.norm_type': 'layernorm', 'model.num_heads': 2, 'model.num_kv_heads': 1},
      {'model.norm_type': 'layernorm', 'model.num_heads': 4, 'model.num_kv_heads': 2}]
  assert sweep.run_name(runs[1]) == 'norm_type=rmsnorm,num_heads=4,num_kv_heads=2'
  # Same leaf name in two sections: the full paths keep the names apart.
  assert sweep.run_name({'train.seed': 1, 'data.seed': 2}) == 'train.seed=1,data.seed=2'
  with pytest.raises(sweep.SweepError, match='same length'):
    sweep.expand([], ['model.num_heads=2,4', 'model.num_kv_heads=1'])


def test_sweep_file(tmp_path):
  path = tmp_path / 'my_sweep.py'
  path.write_text('def sweep():\n'
                  '  return [{"model.sliding_window": None},\n'
                  '          {"model.sliding_window": 8, "model.global_layer_interval": 2}]\n')
  runs = sweep.expand(['model.qk_norm=False,True'], file_runs=sweep.load_sweep_file(str(path)))
  planned = sweep.plan(CONFIG, str(tmp_path / 'w'), runs, BASE)
  assert [r.name for r in planned] == [
      'qk_norm=False,sliding_window=None',
      'qk_norm=False,sliding_window=8,global_layer_interval=2',
      'qk_norm=True,sliding_window=None',
      'qk_norm=True,sliding_window=8,global_layer_interval=2']
  cfg = sweep.run_config(CONFIG, planned[3], BASE)
  assert (cfg.model.qk_norm, cfg.model.sliding_window, cfg.model.global_layer_interval) == (
      True, 8, 2)


@pytest.mark.parametrize('axis,field', [
    ('model.norm_typ=rmsnorm,layernorm', 'model.norm_typ'),        # unknown field
    ('model.norm_type=rmsnorm,batchnorm', 'model.norm_type'),      # refused value, 2nd run
    ('train.steps=4,-1', 'train.steps'),
])
def test_bad_override_fails_before_any_run(tmp_path, capsys, axis, field):
  workdir = tmp_path / 'w'
  status = errors.call(sweep.main, ['--config', CONFIG, '--workdir', str(workdir),
                                    '--sweep', axis, '--sweep', 'model.position=rope,alibi'])
  assert status == 2
  assert field in capsys.readouterr().err
  assert not workdir.exists()         # nothing trained, nothing written


def test_dry_run_prints_commands_and_trains_nothing(tmp_path, capsys):
  workdir = tmp_path / 'w'
  assert sweep.main(['--config', CONFIG, '--workdir', str(workdir), '--dry-run',
                     *[f'--sweep={a}' for a in AXES], '--config.train.steps=4']) == 0
  out = capsys.readouterr().out
  for name in NAMES:
    assert name in out
  assert '--config.model.position=alibi' in out and '--config.train.steps=4' in out
  assert not workdir.exists()


def test_sweep_runs_every_run_to_the_end(swept):
  root, results = swept
  assert results == {name: 'done' for name in NAMES}
  for name in NAMES:
    run_dir = os.path.join(root, name)
    assert json.load(open(os.path.join(run_dir, sweep.DONE)))['step'] == 4
    assert workdir_lib.steps(run_dir)[-1] == 4
    saved = json.load(open(os.path.join(run_dir, 'config.json')))
    norm, position = (part.split('=')[1] for part in name.split(','))
    assert (saved['model']['norm_type'], saved['model']['position']) == (norm, position)
    assert saved['train']['steps'] == 4 and saved['model']['d_model'] == 32
    assert sorted(events(run_dir)['train/loss']) == [1, 2, 3, 4]
  assert [r['name'] for r in json.load(open(os.path.join(root, 'sweep.json')))['runs']] == NAMES


def test_rerun_trains_nothing(swept, capsys):
  root, _ = swept
  before = sorted(glob.glob(os.path.join(root, '*', 'events.out.tfevents.*')))
  assert sweep.main(['--config', CONFIG, '--workdir', root, *[f'--sweep={a}' for a in AXES],
                     *[f'--config.{o}' for o in BASE]]) == 0
  out = capsys.readouterr().out
  assert out.count('done, skipping') == 4 and 'training in' not in out
  assert sorted(glob.glob(os.path.join(root, '*', 'events.out.tfevents.*'))) == before


def test_interrupted_sweep_finishes_only_the_unfinished_run(swept, tmp_path, capsys):
  root = str(tmp_path / 'copy')
  shutil.copytree(swept[0], root)
  # The state a kill after checkpoint 2 of the last run leaves: no DONE marker,
  # no checkpoint 4, a RUNNING marker of a process that is gone.
  victim = os.path.join(root, NAMES[-1])
  uninterrupted = {s: v[-1] for s, v in events(victim)['train/loss'].items()}
  os.remove(os.path.join(victim, sweep.DONE))
  shutil.rmtree(os.path.join(victim, 'checkpoints', '4'))
  json.dump({'pid': 2**22 + 12345}, open(os.path.join(victim, sweep.RUNNING), 'w'))
  assert compare.summarize(victim)['status'] == 'crashed'
  # Re-run as a user would: a subprocess `python -m train` per run.
  assert sweep.main(['--config', CONFIG, '--workdir', root, *[f'--sweep={a}' for a in AXES],
                     *[f'--config.{o}' for o in BASE]]) == 0
  out = capsys.readouterr().out
  assert out.count('done, skipping') == 3
  assert f'{NAMES[-1]}: training in' in out
  assert os.path.exists(os.path.join(victim, sweep.DONE))
  assert not os.path.exists(os.path.join(victim, sweep.RUNNING))
  assert workdir_lib.steps(victim)[-1] == 4
  # It resumed from checkpoint 2 (the new event file starts at step 3), and
  # the resumed steps reproduce the uninterrupted losses.
  newest = max(glob.glob(os.path.join(victim, 'events.out.tfevents.*')), key=os.path.getmtime)
  acc = event_accumulator.EventAccumulator(newest, size_guidance={'scalars': 0})
  acc.Reload()
  resumed = {e.step: e.value for e in acc.Scalars('train/loss')}
  assert sorted(resumed) == [3, 4]
  for s in (3, 4):
    np.testing.assert_allclose(resumed[s], uninterrupted[s], rtol=1e-5)


def test_compare_table_equals_event_files(swept, capsys):
  root, _ = swept
  assert compare.main([root]) == 0
  printed = capsys.readouterr().out
  with open(os.path.join(root, 'compare.csv')) as f:
    rows = {r['run']: r for r in csv.DictReader(f)}
  assert sorted(rows) == sorted(NAMES)
  import configs
  import model
  for name in NAMES:
    assert name in printed
    ev = events(os.path.join(root, name))
    row = rows[name]
    assert row['status'] == 'done'
    norm, position = (part.split('=')[1] for part in name.split(','))
    assert row['overrides'] == f'model.norm_type={norm} model.position={position}'
    assert int(row['step']) == 4
    last_step = max(ev['train/loss'])
    assert float(row['final_train_loss']) == pytest.approx(ev['train/loss'][last_step][-1],
                                                           rel=1e-6)
    evals = {s: v[-1] for s, v in ev['eval/loss'].items()}
    best_step = min(evals, key=evals.get)
    assert float(row['best_eval_loss']) == pytest.approx(evals[best_step], rel=1e-6)
    assert int(row['best_eval_step']) == best_step
    tps = [v[-1] for v in ev['train/tokens_per_second'].values()]
    assert float(row['tokens_per_second']) == pytest.approx(float(np.median(tps)), rel=1e-6)
    cfg = configs.load(CONFIG, BASE + [f'model.norm_type={norm}', f'model.position={position}'])
    assert int(row['parameters']) == model.count_params(cfg.model)
    assert row['moe_aux_loss'] == ''          # dense runs
  md = open(os.path.join(root, 'compare.md')).read()
  assert md.count('\n') == 2 + len(NAMES) and all(name in md for name in NAMES)
  # The figure: a real PNG with curves in more than one colour.
  from PIL import Image
  png = os.path.join(root, 'compare.png')
  assert os.path.getsize(png) > 10_000
  pixels = np.asarray(Image.open(png).convert('RGB')).reshape(-1, 3)
  colours = {tuple(p) for p in np.unique(pixels, axis=0)}
  assert len(colours) > 20
  # The curve colours of the default cycle: at least four runs drawn.
  cycle = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
  assert all(c in colours or any(np.abs(np.subtract(c, p)).max() < 8 for p in colours)
             for c in cycle)


def test_compare_marks_running_and_crashed(swept, tmp_path, capsys):
  root = str(tmp_path / 'copy')
  shutil.copytree(swept[0], root)
  running, failed = (os.path.join(root, NAMES[0]), os.path.join(root, NAMES[1]))
  for d in (running, failed):
    os.remove(os.path.join(d, sweep.DONE))
  json.dump({'pid': os.getpid()}, open(os.path.join(running, sweep.RUNNING), 'w'))
  json.dump({'status': 1}, open(os.path.join(failed, sweep.FAILED), 'w'))
  rows = {r['run']: r['status'] for r in compare.compare(root)}
  capsys.readouterr()
  assert rows == {NAMES[0]: 'running', NAMES[1]: 'crashed', NAMES[2]: 'done',
                  NAMES[3]: 'done'}
