"""Meshes and sharding rules: the same 5 steps on every mesh give the losses of
one device, and parameters (and Adam moments) are split as the rules say."""

import functools
import logging

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import configs
import model
from data import pipeline
from train import mesh as mesh_lib
from train import optim
from train import sharding
from train import step as step_lib

STEPS = 5
# One layer: the rules and the reductions are the same as with more, at half
# the compile time.
OVERRIDES = ['train.seq_len=32', 'train.global_batch_size=8', 'data.source="builtin"',
             'model.num_layers=1']


def mesh_cfg(**axes):
  return ml_collections.ConfigDict({a: axes.get(a, 1) for a in mesh_lib.AXES})


def test_mesh_fills_minus_one_with_the_devices_left():
  mesh = mesh_lib.make_mesh(mesh_cfg(data=-1, tensor=2))
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 1, 'context': 1, 'tensor': 2, 'expert': 1}
  assert mesh.axis_names == ('data', 'fsdp', 'context', 'tensor', 'expert')


def test_mesh_that_does_not_match_the_devices_is_an_error_naming_the_axes():
  with pytest.raises(configs.ConfigError, match=r'data=2, fsdp=2, context=1, tensor=1, expert=1.*8 devices'):
    mesh_lib.make_mesh(mesh_cfg(data=2, fsdp=2))
  with pytest.raises(configs.ConfigError, match='at most one axis may be -1'):
    mesh_lib.make_mesh(mesh_cfg(data=-1, fsdp=-1))
  with pytest.raises(configs.ConfigError, match=r'multiply to 3.*mesh.data=-1'):
    mesh_lib.make_mesh(mesh_cfg(data=-1, tensor=3))


def test_dimension_that_does_not_divide_is_replicated_with_a_log(caplog):
  mesh = mesh_lib.make_mesh(mesh_cfg(data=2, tensor=4))
  with caplog.at_level(logging.DEBUG):
    # 2 KV heads on a tensor axis of 4: replicated; head_dim is never split.
    spec = sharding.logical_to_spec(('embed', 'kv_heads', 'head_dim'), (64, 2, 16),
                                    mesh, name='wk')
  assert spec == P(None, None, None)
  assert 'wk: kv_heads dimension 2 does not divide' in caplog.text
  assert sharding.logical_to_spec(('embed', 'heads', 'head_dim'), (64, 8, 16),
                                  mesh) == P(None, 'tensor', None)
  with pytest.raises(ValueError, match='unknown logical axis'):
    sharding.logical_to_spec(('embd',), (64,), mesh)


def test_batch_that_does_not_split_over_the_batch_axes_is_refused():
  mesh = mesh_lib.make_mesh(mesh_cfg(data=2, fsdp=2, tensor=2))
  with pytest.raises(configs.ConfigError, match='global_batch_size=6.*4 shards'):
    sharding.check_batch(mesh, 6)


@functools.cache
def batches(spec):
  cfg = configs.load(spec, OVERRIDES)
  it = pipeline.make_iterator(cfg, 'train')
  out = [next(it) for _ in range(STEPS)]
  it.close()
  return tuple(out)


def train(spec, axes, initial=None):
  """STEPS steps of `spec` on a mesh of `axes`; returns (losses, state, mesh).

  The state is made by the sharded jitted init, or, to save a compilation,
  `initial` (the one-device initial state) is placed by the rules.
  """
  cfg = configs.load(spec, OVERRIDES)
  size = int(np.prod(list(axes.values())))
  mesh = mesh_lib.make_mesh(mesh_cfg(**axes), jax.devices()[:size])
  optimizer, schedule = optim.make_optimizer(cfg.train)
  graphdef, init, _, shardings = step_lib.train_state_spec(
      lambda: model.Decoder(cfg.model, rngs=nnx.Rngs(0)), optimizer, mesh, seed=0)
  if initial is None:
    state = jax.jit(init, out_shardings=shardings)()
  else:
    state = jax.device_put(initial, shardings)
  start = jax.device_get(state['params'])
  train_step = step_lib.make_train_step(
      step_lib.lm_loss(cfg.train), optimizer, graphdef=graphdef,
      state_shardings=shardings, mesh=mesh, schedule=schedule)
  losses = []
  for batch in batches(spec):
    batch = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in batch.items()}
    state, metrics = train_step(state, batch)
    losses.append(float(metrics['loss']))
  return np.array(losses), state, mesh, start


@functools.cache
def one_device(spec):
  """(losses, final params, initial state) on one device."""
  cfg = configs.load(spec, OVERRIDES)
  mesh = mesh_lib.make_mesh(mesh_cfg(data=1), jax.devices()[:1])
  optimizer, _ = optim.make_optimizer(cfg.train)
  _, init, _, shardings = step_lib.train_state_spec(
      lambda: model.Decoder(cfg.model, rngs=nnx.Rngs(0)), optimizer, mesh, seed=0)
  initial = jax.device_get(jax.jit(init, out_shardings=shardings)())
  losses, state, _, _ = train(spec, {'data': 1}, initial)
  return losses, jax.device_get(state['params']), initial


def strip(spec):
  """PartitionSpec without trailing Nones, for comparison."""
  parts = list(spec)
  while parts and parts[-1] is None:
    parts.pop()
  return tuple(parts)


# Expected placement, written out per mesh from the rules in train/sharding.py
# (fsdp splits `embed`, tensor splits heads/kv_heads/mlp/vocab, expert splits
# experts, norms and head_dim stay whole). Leaf name -> spec without trailing
# Nones. llama tiny: d_model 64, 4 heads, 2 KV heads, d_ff 192, vocab 320.
LLAMA = {
    'data8': {},
    'fsdp8': {'wq': ('fsdp',), 'wk': ('fsdp',), 'wv': ('fsdp',), 'wo': (None, None, 'fsdp'),
              'wi_gate': ('fsdp',), 'wi_up': ('fsdp',), 'head': ('fsdp',),
              'embedding': (None, 'fsdp')},
    'mixed': {'wq': ('fsdp', 'tensor'), 'wk': ('fsdp', 'tensor'), 'wv': ('fsdp', 'tensor'),
              'wo': ('tensor', None, 'fsdp'), 'wi_gate': ('fsdp', 'tensor'),
              'wi_up': ('fsdp', 'tensor'), 'head': ('fsdp', 'tensor'),
              'embedding': ('tensor', 'fsdp')},
}
LLAMA['mixed']['mlp/wo'] = ('tensor', 'fsdp')
LLAMA['fsdp8']['mlp/wo'] = (None, 'fsdp')
# mixtral tiny: 8 experts on an expert axis of 4; everything else replicated.
MIXTRAL_EXPERT = {'w_gate': ('expert',), 'w_up': ('expert',), 'w_down': ('expert',)}

# (name, preset, mesh, expected placement, state made by the sharded init?)
MESHES = [
    ('data8', 'configs/llama.py:tiny', {'data': 8}, LLAMA['data8'], False),
    ('fsdp8', 'configs/llama.py:tiny', {'fsdp': 8}, LLAMA['fsdp8'], False),
    ('mixed', 'configs/llama.py:tiny', {'data': 2, 'fsdp': 2, 'tensor': 2},
     LLAMA['mixed'], True),
    ('expert', 'configs/mixtral.py:tiny', {'data': 2, 'expert': 4}, MIXTRAL_EXPERT, True),
]


@pytest.mark.parametrize('name,spec,axes,expected,sharded_init', MESHES,
                         ids=[m[0] for m in MESHES])
def test_same_losses_as_one_device_and_parameters_sharded_by_the_rules(
    name, spec, axes, expected, sharded_init, capfd):
  del name
  want_losses, want_params, initial = one_device(spec)
  capfd.readouterr()
  losses, state, mesh, start = train(spec, axes, None if sharded_init else initial)
  # The activation constraints (model/partitioning.py) leave the partitioner
  # no sharding it can only reach by replicating a whole tensor; XLA logs
  # that case on stderr while compiling.
  assert 'Involuntary full rematerialization' not in capfd.readouterr().err
  # The sharded init makes the very parameters of the one-device init.
  for got, want in zip(jax.tree.leaves(start), jax.tree.leaves(initial['params'])):
    np.testing.assert_array_equal(got, want)
  # Float32 reductions split over devices add in another order.
  np.testing.assert_allclose(losses, want_losses, rtol=2e-5)
  assert losses[-1] < losses[0]

  flat_params = jax.tree_util.tree_flatten_with_path(state['params'])[0]
  # Each parameter group keeps its own Adam state (the others masked out).
  flat_mu = {}
  for s in jax.tree.leaves(state['opt_state'], is_leaf=lambda x: hasattr(x, 'mu')):
    if hasattr(s, 'mu'):
      flat_mu.update((jax.tree_util.keystr(p), x)
                     for p, x in jax.tree_util.tree_flatten_with_path(s.mu)[0])
  for path, array in flat_params:
    keys = [str(getattr(k, 'key', k)) for k in path if hasattr(k, 'key')]
    leaf = keys[-1]
    want = expected.get('/'.join(keys[-2:]), expected.get(leaf, ()))
    assert strip(array.sharding.spec) == want, '/'.join(keys)
    # Real placement: each device holds its slice, not the whole array.
    split = [1] * array.ndim
    for dim, axes_of_dim in enumerate(array.sharding.spec):
      for a in (axes_of_dim if isinstance(axes_of_dim, tuple) else (axes_of_dim,)):
        if a is not None:
          split[dim] *= mesh.shape[a]
    shard_shape = tuple(s // k for s, k in zip(array.shape, split))
    assert {s.data.shape for s in array.addressable_shards} == {shard_shape}
    # Adam's first moment lives where its parameter lives.
    assert flat_mu[jax.tree_util.keystr(path)].sharding.spec == array.sharding.spec

  got_params = jax.device_get(state['params'])
  for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(got_params)[0],
                               jax.tree.leaves(want_params)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


def test_activation_constraints_follow_the_rules_and_only_inside_the_context():
  from model import partitioning
  mesh = mesh_lib.make_mesh(mesh_cfg(data=2, fsdp=2, tensor=2), jax.devices())
  x = np.zeros((8, 4, 64), np.float32)

  def f(x):
    return (partitioning.constrain(x, ('batch', None, 'embed')),
            partitioning.constrain(x, ('batch', None, 'vocab')))

  def in_context(x):
    with sharding.activation_sharding(mesh):
      return f(x)

  residual, logits = jax.jit(in_context)(x)
  # `embed` would reuse fsdp, which already splits the batch: it stays whole.
  assert strip(residual.sharding.spec) == (('data', 'fsdp'),)
  assert strip(logits.sharding.spec) == (('data', 'fsdp'), None, 'tensor')
  # Without the context the hints are the identity: nothing is constrained.
  plain = jax.jit(f)(jax.device_put(x, jax.devices()[0]))
  assert all(len(a.sharding.device_set) == 1 for a in plain)
