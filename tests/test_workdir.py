"""train.workdir: a workdir's config, steps, parameters and status, read in one place."""

import json
import os
import socket

import jax
import numpy as np
import pytest
import tensorstore as ts
from flax import nnx

import configs
import model as model_lib
from configs import base as base_config
from train import checkpoint as checkpoint_lib
from train import mesh as mesh_lib
from train import optim
from train import step as step_lib
from train import workdir as workdir_lib

TINY = ['model.num_layers=1', 'model.d_model=32', 'model.d_ff=64', 'model.num_heads=2',
        'model.num_kv_heads=1', 'train.steps=4']
GONE_PID = 2**22 + 12345     # above Linux's largest pid_max: never a live process


def _write_config(workdir, cfg):
  os.makedirs(workdir, exist_ok=True)
  workdir_lib.write_config(str(workdir), cfg)


# ----------------------------------------------------------------------------
# The config.


def test_config_round_trip_and_defaults_for_fields_added_later(tmp_path):
  cfg = configs.load('configs/llama.py:tiny', TINY)
  _write_config(tmp_path, cfg)
  assert workdir_lib.read_config_json(str(tmp_path)) == json.loads(
      cfg.to_json_best_effort())
  assert workdir_lib.load_config(str(tmp_path)).to_dict() == cfg.to_dict()
  # A workdir written before `model.moe_dispatch` existed reads as its default.
  saved = json.loads((tmp_path / 'config.json').read_text())
  del saved['model']['moe_dispatch']
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  assert workdir_lib.load_config(str(tmp_path)).model.moe_dispatch == (
      base_config.model_config().moe_dispatch)


@pytest.mark.parametrize('content,message', [
    (None, 'config.json not found'),
    ('{"model": {"num_layers": 2', 'is not valid JSON'),
    ('[1, 2]', 'holds no ablax config'),
    ('{"train": {"steps": 3}}', 'holds no ablax config'),
])
def test_a_missing_or_broken_config_is_one_user_error_naming_the_file(
    tmp_path, content, message):
  if content is not None:
    (tmp_path / 'config.json').write_text(content)
  path = str(tmp_path / 'config.json')
  for read in (workdir_lib.read_config_json, workdir_lib.load_config):
    with pytest.raises(configs.UserError) as e:
      read(str(tmp_path))
    assert path in str(e.value) and message in str(e.value)


@pytest.mark.parametrize('field,value,message', [
    ('norm_type', 'foo', "model.norm_type='foo'"),
    ('num_layers', 'two', 'num_layers'),
])
def test_a_bad_field_names_the_file_and_the_field(tmp_path, field, value, message):
  saved = json.loads(configs.load('configs/llama.py:tiny', TINY).to_json_best_effort())
  saved['model'][field] = value
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  with pytest.raises(configs.UserError) as e:
    workdir_lib.load_config(str(tmp_path))
  assert str(e.value).startswith(str(tmp_path / 'config.json')) and message in str(e.value)


# ----------------------------------------------------------------------------
# Steps and checkpoint folders.


def test_steps_are_the_numbered_folders_in_numeric_order(tmp_path):
  assert workdir_lib.steps(str(tmp_path)) == []
  directory = tmp_path / 'checkpoints'
  for name in ('10', '3', '2.orbax-checkpoint-tmp-1733', 'tmp', '0x5'):
    (directory / name / 'state').mkdir(parents=True)
  (directory / '7').write_text('a file, not a checkpoint')
  assert workdir_lib.steps(str(tmp_path)) == [3, 10]      # not ['10', '3']


def test_resolve_a_workdir_a_step_or_a_step_folder(tmp_path):
  directory = tmp_path / 'checkpoints'
  for name in ('3', '10'):
    (directory / name / 'state').mkdir(parents=True)
  root = str(tmp_path)
  assert workdir_lib.resolve(root) == (root, str(directory / '10'))
  assert workdir_lib.resolve(root, 3) == (root, str(directory / '3'))
  assert workdir_lib.resolve(str(directory / '3')) == (root, str(directory / '3'))
  with pytest.raises(workdir_lib.CheckpointNotFound, match='no checkpoint 4 .* there are: 3, 10'):
    workdir_lib.resolve(root, 4)
  with pytest.raises(configs.UserError, match='holds no checkpoint'):
    workdir_lib.resolve(str(tmp_path / 'checkpoints' / '3' / 'state'))
  with pytest.raises(configs.UserError, match='no such folder'):
    workdir_lib.resolve(str(tmp_path / 'nowhere'))


# ----------------------------------------------------------------------------
# Parameters only.


@pytest.fixture(scope='module')
def saved_run(tmp_path_factory):
  """A workdir with an AdamW train state saved at steps 2 and 4 (the params of
  step 4 differ from step 2's), and its config."""
  workdir = str(tmp_path_factory.mktemp('saved'))
  cfg = configs.load('configs/llama.py:tiny', TINY)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  optimizer, _ = optim.make_optimizer(cfg.train, cfg.model)
  _, init, _, shardings = step_lib.train_state_spec(
      lambda: model_lib.Decoder(cfg.model, rngs=nnx.Rngs(0)), optimizer, mesh, 0)
  state = jax.jit(init, out_shardings=shardings)()
  states = {}
  with checkpoint_lib.Checkpointer(workdir, every_steps=1, keep=3) as ckpt:
    for step in (2, 4):
      state['params'] = jax.tree.map(lambda x: x + 0.5, state['params'])
      states[step] = jax.device_get(state)
      ckpt.save(step, state, force=True)
  _write_config(workdir, cfg)
  return workdir, cfg, states, mesh


def _delete_optimizer_state(step_dir):
  """Removes every `opt_state.*` array from the checkpoint's OCDBT database."""
  kv = ts.KvStore.open({'driver': 'ocdbt',
                        'base': f'file://{os.path.join(step_dir, "state")}/'}).result()
  before = len(kv.list().result())
  kv.delete_range(ts.KvStore.KeyRange(b'opt_state', b'opt_state\xff')).result()
  keys = kv.list().result()
  assert len(keys) < before and not any(k.startswith(b'opt_state') for k in keys)


def _assert_equal_trees(got, want):
  got, want = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got) == len(want) > 0
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_params_restore_never_reads_the_optimizer_state(saved_run, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  source, cfg, states, mesh = saved_run
  workdir = str(tmp_path / 'copy')
  shutil.copytree(source, workdir)
  for step in (2, 4):
    _delete_optimizer_state(workdir_lib.step_dir(workdir, step))
  # The optimizer state is gone (every opt_state.* array deleted: a whole-state
  # restore would fail); the parameters still load, equal to those saved, at
  # the newest step or the one asked for.
  _, state, _, step = workdir_lib.restore_model(workdir, cfg, mesh)
  assert step == 4
  _assert_equal_trees(state['params'], states[4]['params'])
  _, abstract, _ = workdir_lib.abstract_model_state(
      lambda: model_lib.Decoder(cfg.model, rngs=nnx.Rngs(0)), mesh)
  params, step = workdir_lib.restore_params(workdir, abstract['params'], step=2)
  assert step == 2
  _assert_equal_trees(params, states[2]['params'])
  # A decoder for sampling and export, from the config and the newest params.
  loaded_cfg, decoder = workdir_lib.load_decoder(workdir)
  assert loaded_cfg.model.to_dict() == cfg.model.to_dict()
  _assert_equal_trees(nnx.state(decoder, nnx.Param), states[4]['params'])


# ----------------------------------------------------------------------------
# Status.


def _lock(workdir, pid, host=None):
  with open(os.path.join(workdir, 'LOCK'), 'w') as f:
    json.dump({'host': host or socket.gethostname(), 'pid': pid,
               'started': '2026-12-03T04:00:00+00:00', 'command': 'train'}, f)


def _run_files(workdir, *, steps=4, saved=(2,)):
  cfg = configs.load('configs/llama.py:tiny', TINY + [f'train.steps={steps}'])
  _write_config(workdir, cfg)
  for step in saved:
    os.makedirs(os.path.join(workdir, 'checkpoints', str(step), 'state'))


def test_status_of_each_kind_of_workdir(tmp_path):
  def status(name):
    return workdir_lib.status(str(tmp_path / name))

  os.makedirs(tmp_path / 'empty')
  assert status('empty').state == 'empty'

  _run_files(str(tmp_path / 'finished'), saved=(2, 4))
  assert (status('finished').state, status('finished').step) == ('finished', 4)

  # Checkpoints short of train.steps and no lock: it exited early.
  _run_files(str(tmp_path / 'stopped'), saved=(2,))
  assert (status('stopped').state, status('stopped').step,
          status('stopped').steps) == ('stopped', 2, 4)

  # A lock whose process is gone: killed without a chance to release it.
  _run_files(str(tmp_path / 'crashed'), saved=(2,))
  _lock(str(tmp_path / 'crashed'), GONE_PID)
  assert status('crashed').state == 'crashed'
  assert status('crashed').detail['pid'] == GONE_PID

  # A live lock (this process) wins over the files; so does another host's.
  _run_files(str(tmp_path / 'running'), saved=(2, 4))
  _lock(str(tmp_path / 'running'), os.getpid())
  assert status('running').state == 'running'
  _lock(str(tmp_path / 'running'), GONE_PID, host='another-host.example')
  assert status('running').state == 'running'

  os.makedirs(tmp_path / 'no_start')
  (tmp_path / 'no_start' / 'start_failed.json').write_text(json.dumps(
      {'stage': 'train', 'type': 'DataError', 'message': 'data.train_files: no such file'}))
  assert status('no_start').state == 'failed to start'
  assert status('no_start').detail['message'] == 'data.train_files: no such file'


def test_status_follows_the_workdir_lock(tmp_path):
  workdir = str(tmp_path)
  _run_files(workdir, saved=(2,))
  with workdir_lib.WorkdirLock(workdir, 'train'):
    assert workdir_lib.status(workdir).state == 'running'
    with pytest.raises(configs.UserError, match='in use by another run'):
      workdir_lib.WorkdirLock(workdir, 'align').acquire()
  assert workdir_lib.status(workdir).state == 'stopped'
  # A stale lock is taken over by the next run.
  _lock(workdir, GONE_PID)
  assert workdir_lib.status(workdir).state == 'crashed'
  with workdir_lib.WorkdirLock(workdir, 'train'):
    assert workdir_lib.read_lock(workdir)['pid'] == os.getpid()


def test_compare_reads_the_trainers_lock(tmp_path):
  """A run started by `python -m train` (no sweep markers): compare's status
  comes from the workdir's lock."""
  from launch import compare  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  _run_files(workdir, saved=(2,))
  assert compare.summarize(workdir)['status'] == 'stopped'
  _lock(workdir, os.getpid())
  assert compare.summarize(workdir)['status'] == 'running'
  _lock(workdir, GONE_PID)
  assert compare.summarize(workdir)['status'] == 'crashed'
