"""The all-to-all expert-parallel MoE dispatch (`model.moe_dispatch`) against the global path.

On meshes of the 8 fake CPU devices (tests/conftest.py), inside the trainer's
activation-sharding context, the expert-parallel layer must compute what the
global path computes on one device: outputs, the three aux entries and the
gradients of an objective that uses them all (float32, rtol=1e-5, atol=1e-6).
Parameter gradients are sums over all tokens, added in another order when the
tokens are split over devices, so their error scales with the array's largest
entries rather than with each entry: they are compared norm-wise,
max|got - want| <= 1e-5 * max|want| + 1e-6 per array. The global path is itself
checked against NumPy in tests/test_model_moe.py.
The capacity cases are chosen so that a per-device capacity rule would drop
other assignments than the global one (checked in NumPy), so equality shows
that the global drop order is kept.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import configs
from configs import base
from model import moe
from train import mesh as mesh_lib
from train import sharding

TOL = dict(rtol=1e-5, atol=1e-6)
X_SHAPE = (8, 6, 32)        # 48 tokens: 8 rows split over up to 8 batch shards


def _cfg(**overrides):
  m = base.model_config()
  m.d_model, m.d_ff = 32, 48
  m.num_experts, m.experts_per_token = 8, 2
  for key, value in overrides.items():
    m[key] = value
  return m


CASES = {
    'mixtral': dict(),
    'deepseek_shared_bias': dict(num_shared_experts=2, moe_d_ff=16, use_bias=True,
                                 moe_renormalize=False),
}
MESHES = {
    'data2_expert4': dict(data=2, expert=4),
    'expert8': dict(expert=8),
    'fsdp2_expert2_tensor2': dict(fsdp=2, expert=2, tensor=2),
}


def _mesh(axes):
  mesh_cfg = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1, expert=1))
  mesh_cfg.update(axes)
  return mesh_lib.make_mesh(mesh_cfg, jax.devices())


def _layer(cfg, impl='auto'):
  """An MoE layer with O(1) weights (N(0, 1/fan_in) matrices, N(0, 0.01) biases)."""
  layer = moe.MoE(cfg, rngs=nnx.Rngs(0), grouped_matmul=impl)
  rng = np.random.default_rng(7)
  for _, p in sorted(nnx.to_flat_state(nnx.state(layer, nnx.Param)), key=lambda kv: str(kv[0])):
    shape = p[...].shape
    is_bias = len(shape) == 1 or p.logical_axes[-2] == 'experts'
    scale = 0.1 if is_bias else shape[-2] ** -0.5
    p[...] = jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)
  return layer


def _inputs(seed=1):
  return jax.random.normal(jax.random.key(seed), X_SHAPE, jnp.float32)


def _value_and_grads(layer, x, mesh=None):
  """(y, aux, d objective / d params, d objective / d x), jitted; on `mesh` inside
  the trainer's context with parameters and batch placed by the rule table."""
  graphdef, state = nnx.split(layer)
  r = jax.random.normal(jax.random.key(5), x.shape, jnp.float32)

  def objective(state, x):
    y, aux = nnx.merge(graphdef, state)(x)
    # Every output the trainer uses, with weights that keep each term visible.
    value = (jnp.sum(y * r) + 3.0 * aux['moe_aux_loss'] + 0.5 * aux['moe_router_z_loss'])
    return value, (y, aux)

  def f(state, x):
    grad_fn = jax.grad(objective, argnums=(0, 1), has_aux=True)
    if mesh is None:
      return grad_fn(state, x)
    with sharding.activation_sharding(mesh):
      return grad_fn(state, x)

  if mesh is not None:
    state = jax.device_put(state, sharding.state_shardings(mesh, state))
    x = jax.device_put(x, sharding.batch_sharding(mesh, 3))
  (g_state, g_x), (y, aux) = jax.device_get(jax.jit(f)(state, x))
  return y, aux, g_state, g_x


def _np_keep(experts, num_experts, capacity_factor, shards=1):
  """NumPy capacity rule: choice-major, then token order; C slots per expert,
  over all tokens (shards=1) or per contiguous token shard with its own C."""
  n, k = experts.shape
  keep = np.zeros((n, k), bool)
  per = n // shards
  for s in range(shards):
    block = experts[s * per:(s + 1) * per]
    c = min(math.ceil(capacity_factor * per * k / num_experts), per)
    used = np.zeros(num_experts, int)
    for j in range(k):
      for t in range(per):
        if used[block[t, j]] < c:
          keep[s * per + t, j] = True
          used[block[t, j]] += 1
  return keep


def _np_experts(layer, x):
  """Top-k experts of each token [n, k], from the router in float64."""
  xf = np.asarray(x, np.float64).reshape(-1, layer.d_model)
  logits = xf @ np.asarray(layer.router[...], np.float64)
  experts = np.argsort(-logits, axis=-1, kind='stable')[:, :layer.experts_per_token]
  return experts


def _assert_same(got, want):
  y, aux, g_state, g_x = got
  np.testing.assert_allclose(y, want[0], **TOL)
  for key in ('moe_aux_loss', 'moe_router_z_loss', 'moe_expert_load'):
    np.testing.assert_allclose(aux[key], want[1][key], **TOL, err_msg=key)
  np.testing.assert_allclose(g_x, want[3], **TOL)
  flat_want = dict(nnx.to_flat_state(want[2]))
  for path, value in nnx.to_flat_state(g_state):
    got, ref = np.asarray(value[...]), np.asarray(flat_want[path][...])
    err = np.max(np.abs(got - ref))
    assert err <= TOL['rtol'] * np.max(np.abs(ref)) + TOL['atol'], (path, err)


@functools.cache
def _global_reference(case, capacity_factor):
  kw = dict(CASES[case], moe_capacity_factor=capacity_factor)
  return _value_and_grads(_layer(_cfg(moe_dispatch='global', **kw)), _inputs())


# mixtral-like on the expert and data x expert meshes; shared experts and
# biases (a bias added after the tensor psum) on the mesh that splits everything.
@pytest.mark.parametrize('capacity_factor', [None, 1.0], ids=['dropless', 'capacity'])
@pytest.mark.parametrize('mesh_name,case', [
    ('data2_expert4', 'mixtral'), ('expert8', 'mixtral'),
    ('fsdp2_expert2_tensor2', 'deepseek_shared_bias')])
def test_all_to_all_equals_global_path_on_one_device(mesh_name, case, capacity_factor):
  kw = dict(CASES[case], moe_capacity_factor=capacity_factor)
  x = _inputs()
  want = _global_reference(case, capacity_factor)
  layer = _layer(_cfg(moe_dispatch='all_to_all', **kw))
  mesh = _mesh(MESHES[mesh_name])
  assert layer.expert_parallel_plan(X_SHAPE) is None           # no context: global
  with sharding.activation_sharding(mesh):
    plan = layer.expert_parallel_plan(X_SHAPE)
  assert plan.mlp_axes == (('tensor',) if mesh.shape['tensor'] > 1 else ())
  _assert_same(_value_and_grads(layer, x, mesh), want)
  if capacity_factor is not None:
    experts = _np_experts(layer, x)
    shards = math.prod(mesh.shape[a] for a in plan.batch_axes)
    keep = _np_keep(experts, layer.num_experts, capacity_factor)
    # The case drops assignments, and other ones than a per-device rule would.
    assert not keep.all()
    assert (keep != _np_keep(experts, layer.num_experts, capacity_factor, shards)).any()


def test_ragged_grouped_matmul_under_all_to_all():
  # The 'ragged' (TPU) matmul on the received buffer, whose padding rows
  # belong to no group.
  x = _inputs(seed=2)
  want = _value_and_grads(_layer(_cfg(moe_dispatch='global'), impl='ragged'), x)
  layer = _layer(_cfg(moe_dispatch='all_to_all'), impl='ragged')
  _assert_same(_value_and_grads(layer, x, _mesh(dict(data=2, expert=4))), want)


def _compiled_text(layer, mesh, x):
  graphdef, state = nnx.split(layer)

  def f(state, x):
    with sharding.activation_sharding(mesh):
      return nnx.merge(graphdef, state)(x)
  state = jax.device_put(state, sharding.state_shardings(mesh, state))
  x = jax.device_put(x, sharding.batch_sharding(mesh, 3))
  return jax.jit(f).lower(state, x).compile().as_text()


def _largest_all_gather(hlo: str) -> int:
  """Elements in the largest result of an all-gather in compiled HLO text."""
  largest = 0
  for line in hlo.splitlines():
    if ' all-gather(' not in line or '=' not in line:
      continue
    shape = line.split('=', 1)[1].split('all-gather(')[0]
    for dims in shape.split('[')[1:]:
      dims = dims.split(']')[0]
      largest = max(largest, math.prod(int(d) for d in dims.split(',') if d))
  return largest


def test_hlo_all_to_all_instead_of_gathering_every_token():
  mesh = _mesh(dict(data=2, expert=4))
  x = _inputs()
  tokens = X_SHAPE[0] * X_SHAPE[1] * X_SHAPE[2]      # the whole activation
  for capacity_factor in (None, 1.0):
    ep = _compiled_text(_layer(_cfg(moe_capacity_factor=capacity_factor)), mesh, x)   # auto
    assert 'all-to-all' in ep
    # Only small things are gathered (the [k, E] counts of the capacity rule).
    assert _largest_all_gather(ep) < tokens // 8
  glob = _compiled_text(_layer(_cfg(moe_dispatch='global')), mesh, x)
  assert 'all-to-all' not in glob
  assert _largest_all_gather(glob) >= tokens


def test_auto_falls_back_and_all_to_all_refuses_what_it_cannot_run():
  x_shape = X_SHAPE
  # 6 experts do not split over an expert axis of 4.
  mesh = _mesh(dict(data=2, expert=4))
  with sharding.activation_sharding(mesh):
    assert _layer(_cfg(num_experts=6, moe_dispatch='auto')).expert_parallel_plan(x_shape) is None
    with pytest.raises(ValueError, match=r"moe_dispatch='all_to_all'.*num_experts=6"):
      _layer(_cfg(num_experts=6, moe_dispatch='all_to_all')).expert_parallel_plan(x_shape)
    # A batch of 4 rows does not split over 8 batch shards.
    with pytest.raises(ValueError, match=r"moe_dispatch='all_to_all'.*batch of 4 rows"):
      _layer(_cfg(moe_dispatch='all_to_all')).expert_parallel_plan((4, 6, 32))
    assert _layer(_cfg(moe_dispatch='global')).expert_parallel_plan(x_shape) is None
    assert _layer(_cfg()).expert_parallel_plan(x_shape).batch_axes == ('data', 'expert')
  with sharding.activation_sharding(_mesh(dict(data=8))):
    assert _layer(_cfg()).expert_parallel_plan(x_shape) is None
    with pytest.raises(ValueError, match=r"moe_dispatch='all_to_all'.*expert=1"):
      _layer(_cfg(moe_dispatch='all_to_all')).expert_parallel_plan(x_shape)


def test_config_field_is_validated():
  with pytest.raises(configs.ConfigError, match='model.moe_dispatch'):
    configs.load('configs/mixtral.py:tiny', ['model.moe_dispatch="sorted"'])
  with pytest.raises(configs.ConfigError, match=r'num_experts=8 must be a multiple of mesh.expert=3'):
    configs.load('configs/mixtral.py:tiny', ['model.moe_dispatch="all_to_all"',
                                             'mesh.expert=3', 'mesh.data=1'])
  with pytest.raises(configs.ConfigError, match=r"moe_dispatch='all_to_all' needs"):
    configs.load('configs/llama.py:tiny', ['model.moe_dispatch="all_to_all"'])
  cfg = configs.load('configs/mixtral.py:tiny', ['model.moe_dispatch="all_to_all"',
                                                 'mesh.expert=4', 'mesh.data=-1'])
  assert cfg.model.moe_dispatch == 'all_to_all'
