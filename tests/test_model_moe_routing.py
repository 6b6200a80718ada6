"""DeepSeek-V3 routing in model/moe.py and aux-loss-free balancing.

- The router (softmax or sigmoid scores, group-limited choice, a selection
  bias, top-k renormalisation, routed scaling) and the whole layer's output
  against a NumPy float64 reference written from the DeepSeek-V3 report's
  equations 12-16 (s = sigmoid(u); choice by s + b among the experts of the
  groups whose two best s + b sum highest; g = s / sum(s over chosen) *
  scaling; y = sum_i g_i FFN_i(x) + shared(x)): float32, rtol 1e-5.
- The bias moves by rate * sign(mean load - load) for a hand-made load, and
  one train step moves each layer's bias by the load that layer measured.
- The bias changes which experts are chosen, never the weights they are
  combined with (those come from the unbiased scores).
- The expert-parallel (all_to_all) path equals the global one with the new
  router, a non-zero bias and a capacity factor.
- `moe_first_dense_layers`; config validation; a run killed and resumed with
  the bias moving is bitwise the straight run (bias included).
"""

import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import configs
import model
from configs import base
from model import decoder as decoder_lib
from model import moe
from tests import test_model_moe_ep as ep
from train import loop
from train import mesh as mesh_lib
from train import sharding
from train import step as step_lib

TOL = dict(rtol=1e-5, atol=1e-6)


def _cfg(**overrides):
  m = base.model_config()
  m.d_model, m.d_ff, m.moe_d_ff = 16, 32, 8
  m.num_experts, m.experts_per_token = 8, 3
  for key, value in overrides.items():
    m[key] = value
  return m


def _layer(cfg, bias=None):
  """A layer with O(1) router logits (so no near-ties) and a given bias."""
  layer = moe.MoE(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(3)
  layer.router[...] = jnp.asarray(rng.standard_normal(layer.router[...].shape) * 0.7,
                                  jnp.float32)
  if bias is not None:
    layer.bias[...] = jnp.asarray(bias, jnp.float32)
  return layer


def np_route(x, router, bias, *, kind, groups, kept_groups, k, renormalize, scaling):
  """DeepSeek-V3 routing in NumPy float64: (experts [n, k] sorted, weights [n, k])."""
  u = np.asarray(x, np.float64) @ np.asarray(router, np.float64)          # [n, E]
  if kind == 'softmax':
    s = np.exp(u - u.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
  else:
    s = 1.0 / (1.0 + np.exp(-u))
  c = s + np.asarray(bias, np.float64)
  n, e = c.shape
  per = e // groups
  experts, weights = [], []
  for t in range(n):
    group_score = [np.sort(c[t, g * per:(g + 1) * per])[::-1][:2].sum()
                   for g in range(groups)]
    best_groups = np.argsort(group_score)[::-1][:kept_groups]
    allowed = [i for g in best_groups for i in range(g * per, (g + 1) * per)]
    chosen = sorted(sorted(allowed, key=lambda i: -c[t, i])[:k])
    g = s[t, chosen]
    if renormalize:
      g = g / g.sum()
    experts.append(chosen)
    weights.append(g * scaling)
  return np.array(experts), np.array(weights)


def np_layer(layer, x, experts, weights):
  """y = sum_i g_i SwiGLU_i(x) (the experts named by `experts`), NumPy float64."""
  w = {n: np.asarray(getattr(layer, n)[...], np.float64) for n in ('w_gate', 'w_up', 'w_down')}
  silu = lambda a: a / (1 + np.exp(-a))
  xs = np.asarray(x, np.float64)
  y = np.zeros_like(xs)
  for t in range(xs.shape[0]):
    for e, g in zip(experts[t], weights[t]):
      h = silu(xs[t] @ w['w_gate'][e]) * (xs[t] @ w['w_up'][e])
      y[t] += g * (h @ w['w_down'][e])
  return y


def _sorted_by_expert(experts, weights):
  order = np.argsort(experts, axis=-1)
  return (np.take_along_axis(experts, order, -1), np.take_along_axis(weights, order, -1))


CASES = {
    'softmax_plain': dict(moe_router='softmax'),
    'sigmoid_plain': dict(moe_router='sigmoid', moe_routed_scaling=2.5),
    'sigmoid_groups': dict(moe_router='sigmoid', moe_num_groups=4, moe_topk_groups=2,
                           moe_routed_scaling=2.5),
    'sigmoid_groups_unnormalised': dict(moe_router='sigmoid', moe_num_groups=2,
                                        moe_topk_groups=1, moe_renormalize=False),
    'softmax_groups': dict(moe_router='softmax', moe_num_groups=4, moe_topk_groups=2),
}


@pytest.mark.parametrize('case', list(CASES))
def test_router_and_layer_match_the_numpy_reference(case):
  cfg = _cfg(**CASES[case])
  # Sigmoid layers carry a selection bias; softmax ones have none (0).
  bias = np.zeros(8)
  if cfg.moe_router == 'sigmoid':
    bias = np.random.default_rng(5).standard_normal(8) * 0.05
  layer = _layer(cfg, bias if cfg.moe_router == 'sigmoid' else None)
  x = jax.random.normal(jax.random.key(1), (2, 12, 16), jnp.float32)
  xf = x.reshape(-1, 16)
  _, _, weights, experts = layer._route(xf, layer.router[...], layer.selection_bias())
  want_e, want_w = np_route(
      xf, layer.router[...], bias, kind=cfg.moe_router, groups=cfg.moe_num_groups,
      kept_groups=cfg.moe_topk_groups, k=3, renormalize=cfg.moe_renormalize,
      scaling=cfg.moe_routed_scaling)
  got_e, got_w = _sorted_by_expert(np.asarray(experts), np.asarray(weights))
  np.testing.assert_array_equal(got_e, want_e)
  np.testing.assert_allclose(got_w, want_w, **TOL)
  if cfg.moe_num_groups > 1:
    # The group limit binds: the plain top-3 of s + b differs for some tokens.
    plain, _ = np_route(xf, layer.router[...], bias, kind=cfg.moe_router, groups=1,
                        kept_groups=1, k=3, renormalize=True, scaling=1.0)
    assert (plain != want_e).any()
  y, _ = layer(x)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 16),
                             np_layer(layer, xf, want_e, want_w), **TOL)


def test_bias_update_follows_its_rule_for_a_hand_made_load():
  layer = _layer(_cfg(num_experts=4, experts_per_token=2, moe_router='sigmoid'))
  load = jnp.array([0.5, 0.25, 0.25, 0.0])            # mean 0.25
  layer.update_bias(load, 0.01)
  np.testing.assert_array_equal(np.asarray(layer.bias[...]),
                                np.float32([-0.01, 0.0, 0.0, 0.01]))
  # Steps add up: signs (+, -, -, +) against the mean 0.25.
  layer.update_bias(jnp.array([0.1, 0.4, 0.3, 0.2]), 0.01)
  np.testing.assert_allclose(np.asarray(layer.bias[...]), [0.0, -0.01, -0.01, 0.02],
                             rtol=0, atol=1e-8)


def test_bias_changes_the_choice_not_the_combine_weights():
  cfg = _cfg(moe_router='sigmoid', moe_routed_scaling=1.5)
  x = jax.random.normal(jax.random.key(2), (1, 16, 16), jnp.float32)
  xf = x.reshape(-1, 16)
  plain = _layer(cfg)
  boosted = _layer(cfg, bias=[0, 0, 0, 0, 0, 0, 0, 10.0])       # expert 7 always
  shifted = _layer(cfg, bias=np.full(8, 0.7))                   # the same for all
  _, _, w0, e0 = plain._route(xf, plain.router[...], plain.bias[...])
  _, _, w1, e1 = boosted._route(xf, boosted.router[...], boosted.bias[...])
  _, _, w2, e2 = shifted._route(xf, shifted.router[...], shifted.bias[...])
  # A constant bias changes nothing; a large one on expert 7 puts it in every
  # token's choice, which then differs for the tokens that had not chosen it.
  np.testing.assert_array_equal(np.asarray(e2), np.asarray(e0))
  np.testing.assert_array_equal(np.asarray(w2), np.asarray(w0))
  assert (np.asarray(e1) == 7).any(-1).all()
  assert ((np.asarray(e0) == 7).any(-1) == False).any()  # pylint: disable=g-explicit-bool-comparison
  # The weights are the unbiased sigmoid scores of the chosen experts.
  s = jax.nn.sigmoid(xf @ boosted.router[...])
  chosen = jnp.take_along_axis(s, e1, -1)
  np.testing.assert_allclose(np.asarray(w1),
                             np.asarray(1.5 * chosen / chosen.sum(-1, keepdims=True)), **TOL)
  # ... and the layer combines the experts with them.
  y, _ = boosted(x)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 16),
                             np_layer(boosted, xf, np.asarray(e1), np.asarray(w1)), **TOL)


@pytest.mark.parametrize('capacity_factor', [None, 1.0], ids=['dropless', 'capacity'])
def test_all_to_all_equals_global_path_with_the_deepseek_router(capacity_factor):
  kw = dict(moe_router='sigmoid', moe_num_groups=4, moe_topk_groups=2,
            moe_routed_scaling=2.5, moe_capacity_factor=capacity_factor,
            num_shared_experts=1, moe_d_ff=16)
  bias = jnp.asarray(np.random.default_rng(9).standard_normal(8) * 0.05, jnp.float32)
  x = ep._inputs()
  glob = ep._layer(ep._cfg(moe_dispatch='global', **kw))
  glob.bias[...] = bias
  want = ep._value_and_grads(glob, x)
  layer = ep._layer(ep._cfg(moe_dispatch='all_to_all', **kw))
  layer.bias[...] = bias
  got = ep._value_and_grads(layer, x, ep._mesh(dict(data=2, expert=4)))
  ep._assert_same(got, want)
  # The bias is no parameter of the loss: zero gradient, on both paths.
  assert not np.asarray(got[2]['bias'][...]).any()


def test_first_dense_layers_then_the_interval():
  m = _cfg(num_layers=6, moe_first_dense_layers=2, moe_layer_interval=2)
  assert [decoder_lib.is_moe_layer(m, i) for i in range(6)] == [
      False, False, False, True, False, True]
  m = _cfg(num_layers=3, moe_first_dense_layers=1, d_model=16, num_heads=2,
           num_kv_heads=2, moe_router='sigmoid', scan_layers=False)   # per-layer view
  decoder = nnx.eval_shape(lambda: model.Decoder(m, rngs=nnx.Rngs(0)))
  assert [b.is_moe for b in decoder.blocks] == [False, True, True]
  n = sum(x.size for x in jax.tree.leaves(nnx.state(decoder, nnx.Param)))
  assert n == model.count_params(m)
  # Only sigmoid routers carry the bias: a softmax model's state is its
  # parameters alone (code that splits off nnx.Param exhaustively keeps working).
  assert len(jax.tree.leaves(nnx.state(decoder, moe.ExpertBias))) == 2
  m.moe_router = 'softmax'
  softmax = nnx.eval_shape(lambda: model.Decoder(m, rngs=nnx.Rngs(0)))
  assert not jax.tree.leaves(nnx.state(softmax, nnx.Not(nnx.Param)))


@pytest.mark.parametrize('override,message', [
    ('model.moe_num_groups=3', 'moe_num_groups=3: must be a positive divisor'),
    ('model.moe_topk_groups=5', 'moe_topk_groups=5: must be in [1, moe_num_groups=4]'),
    ('model.experts_per_token=9', 'more than the 8 experts of the moe_topk_groups=2'),
    ('model.moe_router=cosine', 'model.moe_router'),
    ('model.moe_first_dense_layers=2', 'moe_first_dense_layers=2: must be an integer in [0, num_layers=2)'),
    ('train.moe_bias_update_rate=-1.0', 'train.moe_bias_update_rate=-1.0'),
    ('model.moe_routed_scaling=0.0', 'model.moe_routed_scaling=0.0'),
    ('model.moe_router=softmax', "needs an MoE model with the sigmoid router"),
])
def test_bad_routing_fields_are_refused(override, message):
  with pytest.raises(configs.ConfigError) as err:
    configs.load('configs/deepseek.py:tiny', [override])      # validates
  assert message in str(err.value)


def test_one_train_step_moves_each_layers_bias_by_its_own_load():
  cfg = configs.load('configs/deepseek.py:tiny', [
      'model.num_layers=3', 'model.d_model=32', 'train.moe_bias_update_rate=0.01'])
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=1)), jax.devices()[:1])
  optimizer = optax.sgd(0.1)
  graphdef, state, shardings = step_lib.create_train_state(
      lambda: model.Decoder(cfg.model, rngs=nnx.Rngs(0)), optimizer, mesh, seed=0)
  tokens = jax.random.randint(jax.random.key(0), (4, 17), 0, 256)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
           'loss_mask': jnp.ones((4, 16), jnp.float32)}
  # The loads each MoE layer measures on this batch, before the step.
  decoder = nnx.merge(graphdef, state['params'], state['model_state'])
  _, aux = decoder(batch['inputs'])
  loads = np.asarray(aux['moe_layer_loads'])                     # [2 MoE layers, 16]
  assert loads.shape == (2, 16) and not np.allclose(loads[0], loads[1])
  params0 = jax.device_get(state['params'])
  step = step_lib.make_train_step(step_lib.lm_loss(cfg.train), optimizer, graphdef=graphdef,
                                  state_shardings=shardings, mesh=mesh, donate=False)
  new, metrics = step(state, batch)
  assert 'moe_layer_loads' not in metrics
  biases = [np.asarray(layer.bias[...]) for layer in
            nnx.merge(graphdef, new['params'], new['model_state']).moe_layers()]
  for layer_bias, load in zip(biases, loads):
    want = 0.01 * np.sign(load.mean() - load)
    np.testing.assert_allclose(layer_bias, want, rtol=0, atol=1e-7)
  # The optimizer saw the parameters only (SGD: new = old - 0.1 grad; no bias).
  assert 'bias' not in str(jax.tree_util.tree_structure(params0))
  assert not any(np.asarray(b).any() for b in jax.tree.leaves(state['model_state']))


def test_resume_with_a_moving_bias_is_bitwise_the_straight_run(tmp_path):
  # One run of 3 steps checkpointing every step; a copy of its workdir cut
  # back to the step-1 checkpoint resumes to step 3: same state, bias included.
  flags = ['model.num_layers=2', 'model.d_model=32', 'train.seq_len=32',
           'train.global_batch_size=8', 'train.lr_schedule=constant', 'train.warmup_steps=1',
           'train.eval_steps=0', 'train.moe_bias_update_rate=0.01', 'data.source=synthetic',
           'train.steps=3', 'train.checkpoint_every_steps=1', 'train.keep_checkpoints=3']
  cfg = configs.load('configs/deepseek.py:tiny', flags)
  straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
  first = loop.train_and_evaluate(cfg, str(straight))
  shutil.copytree(straight, resumed)
  for step in ('2', '3'):
    shutil.rmtree(resumed / 'checkpoints' / step)
  second = loop.train_and_evaluate(cfg, str(resumed))
  assert sorted(second['losses']) == [2, 3]
  assert [second['losses'][s] for s in (2, 3)] == [first['losses'][s] for s in (2, 3)]
  read = lambda w: ocp.StandardCheckpointer().restore(os.path.join(w, 'checkpoints', '3', 'state'))
  a, b = read(straight), read(resumed)
  biases = [np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(a)[0]
            if 'model_state' in jax.tree_util.keystr(path)]
  assert len(biases) == 1 and np.abs(biases[0]).max() > 0.005   # it moved
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('override', ['model.moe_router=sigmoid', 'model.moe_num_groups=2',
                                      'model.moe_first_dense_layers=1',
                                      'model.moe_routed_scaling=2.0'])
def test_hf_export_refuses_the_deepseek_router_fields(override):
  from model import hf  # pylint: disable=g-import-not-at-top
  cfg = configs.load('configs/mixtral.py:tiny', [override])
  with pytest.raises(hf.HFError, match=override.split('.')[1].split('=')[0]):
    hf.model_config_to_hf(cfg.model)
