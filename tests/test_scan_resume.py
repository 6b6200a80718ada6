"""A run resumes in the other block layout (`model.scan_layers`).

The uninterrupted reference is a 4-step scanned run of an MoE model with a
dense first layer (an unrolled prefix before the scanned group) and the
sigmoid router's selection bias moving each step (model_state). A 2-step run
in one layout, resumed to step 4 in the other, must continue with the same
losses (to float32 rounding: the layouts sum the same terms, in a loop or
not) and end with the same parameters, optimizer moments and biases: the
checkpoint's params, optimizer state and model_state are converted on
restore. The unrolled-first case also drops `scan_layers` from config.json,
as a workdir written before layouts were recorded has it.
"""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

import configs
import model
from model import scan as scan_lib
from train import loop
from train import mesh as mesh_lib
from train import optim
from train import step as step_lib
from train import workdir as workdir_lib

RUN = ['model.num_layers=3', 'model.moe_first_dense_layers=1', 'model.num_experts=4',
       'model.moe_router=sigmoid', 'train.moe_bias_update_rate=0.01',
       'train.seq_len=16', 'train.lr_schedule=constant', 'train.global_batch_size=8', 'train.warmup_steps=1',
       'train.log_every_steps=1', 'train.eval_steps=0', 'train.checkpoint_every_steps=2',
       'train.keep_checkpoints=3']


def config(steps, scan_layers):
  return configs.load('configs/mixtral.py:tiny',
                      RUN + [f'train.steps={steps}', f'model.scan_layers={scan_layers}'])


def final_state(workdir, cfg):
  """The whole train state of the newest checkpoint, in the scanned layout
  (the converting restore; the states compared below are the runs' own)."""
  from train import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
  cfg = cfg.copy_and_resolve_references()
  cfg.model.scan_layers = True
  mesh = mesh_lib.make_mesh(cfg.mesh)
  optimizer, _ = optim.make_optimizer(cfg.train, cfg.model)
  _, _, abstract, _ = step_lib.train_state_spec(
      lambda: model.Decoder(cfg.model, rngs=nnx.Rngs(0)), optimizer, mesh, 0)
  with checkpoint_lib.Checkpointer(workdir, every_steps=1, keep=3) as ckpt:
    state, _ = ckpt.restore_latest(abstract)
  return jax.device_get(state)


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('straight'))
  summary = loop.train_and_evaluate(config(4, True), workdir)
  return workdir, summary


@pytest.mark.parametrize('first', [False, True])
def test_resume_in_the_other_layout_continues_the_run(straight, tmp_path, first):
  straight_dir, want = straight
  workdir = str(tmp_path)
  loop.train_and_evaluate(config(2, first), workdir)
  # The saved checkpoint is in the first run's layout.
  params = workdir_lib.saved_layout(os.path.join(workdir_lib.step_dir(workdir, 2), 'state'))
  assert (params[2] is not None) == first
  if not first:
    path = workdir_lib.config_path(workdir)
    with open(path) as f:
      saved = json.load(f)
    del saved['model']['scan_layers']          # a workdir from before layouts
    with open(path, 'w') as f:
      json.dump(saved, f)
  got = loop.train_and_evaluate(config(4, not first), workdir)
  assert got['status'] == 'done' and sorted(got['losses']) == [3, 4]
  for step in (3, 4):
    np.testing.assert_allclose(got['losses'][step], want['losses'][step], rtol=1e-5)
  # The whole final state: parameters, both Adam moments, the moved biases.
  cfg = config(4, True)
  ours, ref = final_state(workdir, cfg), final_state(straight_dir, cfg)
  assert jax.tree.structure(ours) == jax.tree.structure(ref)
  for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                               rtol=1e-4, atol=1e-5)
  bias = nnx.to_pure_dict(ref['model_state'])
  assert np.abs(np.asarray(jax.tree.leaves(bias['scan_blocks'])[0])).max() > 0


def test_state_conversion_round_trips_and_matches_the_parameter_conversion():
  """`convert_state` on a whole train state (optax named tuples, masked
  nodes, nnx.State) gives, for the parameters, `to_scanned` of the pure
  dicts, and converting back is the identity."""
  cfg = config(4, False)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  optimizer, _ = optim.make_optimizer(cfg.train, cfg.model)
  _, init, _, shardings = step_lib.train_state_spec(
      lambda: model.Decoder(cfg.model, rngs=nnx.Rngs(0)), optimizer, mesh, 0)
  state = jax.device_get(jax.jit(init, out_shardings=shardings)())
  layout = (3, *scan_lib.layout(cfg.model))
  assert layout == (3, 1, 1)
  scanned = scan_lib.convert_state(state, layout, scanned=True)
  want = scan_lib.to_scanned(nnx.to_pure_dict(state['params']), *layout)
  got = nnx.to_pure_dict(scanned['params'])
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(x, y)
  back = scan_lib.convert_state(scanned, layout, scanned=False)
  assert jax.tree.structure(back) == jax.tree.structure(state)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
    np.testing.assert_array_equal(x, y)
