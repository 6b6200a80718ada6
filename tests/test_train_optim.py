"""The optimizer: schedules against their formulas, AdamW against a NumPy AdamW,
and the weight-decay rule against the decoder's parameter names."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

import configs
import model
from train import mesh as mesh_lib
from train import optim
from train import step as step_lib


def train_cfg(**kw):
  c = ml_collections.ConfigDict(dict(
      steps=40, learning_rate=1e-2, warmup_steps=5, lr_schedule='cosine',
      min_lr_ratio=0.1, decay_fraction=0.25, weight_decay=0.1, adam_b1=0.9,
      adam_b2=0.95, grad_clip_norm=1.0))
  c.update(kw)
  return c


def reference_lr(kind, n, *, peak=1e-2, low=1e-3, warmup=5, total=40, decay=10):
  """The formulas of train/optim.py's docstring, for update n = 1 .. total."""
  if n <= warmup:
    return peak * n / warmup
  if kind == 'cosine':
    return low + (peak - low) * (1 + np.cos(np.pi * (n - warmup) / (total - warmup))) / 2
  if kind == 'linear':
    return peak + (low - peak) * (n - warmup) / (total - warmup)
  if kind == 'constant':
    return peak
  if kind == 'wsd':
    start = total - decay
    return peak if n <= start else peak + (low - peak) * (n - start) / decay
  raise ValueError(kind)


@pytest.mark.parametrize('kind', ['cosine', 'linear', 'constant', 'wsd'])
def test_schedule_matches_formula(kind):
  schedule = optim.make_schedule(train_cfg(lr_schedule=kind))
  got = np.array([float(schedule(count)) for count in range(40)])
  want = np.array([reference_lr(kind, n) for n in range(1, 41)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
  assert got[4] == pytest.approx(1e-2)                   # peak at the end of warmup
  if kind != 'constant':
    assert got[-1] == pytest.approx(1e-3, rel=1e-5)      # min_lr_ratio * peak


def test_schedule_without_warmup_starts_at_peak():
  schedule = optim.make_schedule(train_cfg(warmup_steps=0, lr_schedule='linear'))
  assert float(schedule(0)) == pytest.approx(1e-2 + (1e-3 - 1e-2) / 40, rel=1e-6)


class Toy(nnx.Module):
  """One parameter of each kind the decay rule must tell apart."""

  def __init__(self, rngs):
    normal = lambda *shape: jax.random.normal(rngs.params(), shape)
    self.kernel = nnx.Param(normal(4, 3), logical_axes=('embed', 'mlp'))
    self.bias = nnx.Param(normal(3), logical_axes=('mlp',))
    self.head_bias = nnx.Param(normal(2, 3), logical_axes=('heads', 'head_dim'))
    self.scale = nnx.Param(normal(4), logical_axes=('norm',))
    self.embedding = nnx.Param(normal(5, 4), logical_axes=('vocab', 'embed'))
    self.experts = nnx.Param(normal(2, 4, 3), logical_axes=('experts', 'embed', 'mlp'))


DECAYED = {'kernel', 'experts'}


def numpy_adamw(params, grads_per_step, cfg, schedule):
  """AdamW (Loshchilov & Hutter) with global-norm clipping, in NumPy."""
  p = {k: np.array(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, grads in enumerate(grads_per_step, start=1):
    norm = np.sqrt(sum(np.sum(np.square(g)) for g in grads.values()))
    # grad_clip_norm = 0 switches clipping off.
    factor = min(1.0, cfg.grad_clip_norm / norm) if cfg.grad_clip_norm else 1.0
    lr = schedule(t)
    for k in p:
      g = grads[k] * factor
      m[k] = cfg.adam_b1 * m[k] + (1 - cfg.adam_b1) * g
      v[k] = cfg.adam_b2 * v[k] + (1 - cfg.adam_b2) * g * g
      mhat = m[k] / (1 - cfg.adam_b1**t)
      vhat = v[k] / (1 - cfg.adam_b2**t)
      decay = cfg.weight_decay * p[k] if k in DECAYED else 0.0
      p[k] = p[k] - lr * (mhat / (np.sqrt(vhat) + 1e-8) + decay)
  return p


@pytest.mark.parametrize('clip', [1.0, 0.0])
def test_train_step_is_adamw_with_clipping_and_masked_decay(clip):
  """Three steps of the real train step, with a loss whose gradient is given."""
  cfg = train_cfg(steps=3, warmup_steps=1, lr_schedule='linear', weight_decay=0.5,
                  grad_clip_norm=clip)
  optimizer, schedule = optim.make_optimizer(cfg)
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=1)), jax.devices()[:1])
  graphdef, state, shardings = step_lib.create_train_state(
      lambda: Toy(nnx.Rngs(0)), optimizer, mesh, seed=0)
  names = ('kernel', 'bias', 'head_bias', 'scale', 'embedding', 'experts')
  initial = {k: np.asarray(state['params'][k][...]) for k in names}

  def linear_loss(toy, batch, rng):
    del rng                     # d loss / d param = batch[param][0]
    total = sum(jnp.sum(getattr(toy, k)[...] * batch[k][0]) for k in names)
    return total, {'weight': jnp.ones(()), 'loss': total}

  train_step = step_lib.make_train_step(linear_loss, optimizer, graphdef=graphdef,
                                        state_shardings=shardings, mesh=mesh,
                                        schedule=schedule)
  rng = np.random.default_rng(1)
  # Scale 3 puts the global norm above the clip at every step.
  grads = [{k: 3 * rng.standard_normal(v.shape).astype(np.float32)
            for k, v in initial.items()} for _ in range(3)]
  lrs = []
  for g in grads:
    state, metrics = train_step(state, {k: v[None] for k, v in g.items()})
    lrs.append(float(metrics['learning_rate']))
    norm = np.sqrt(sum(np.sum(np.square(x.astype(np.float64))) for x in g.values()))
    assert float(metrics['grad_norm']) == pytest.approx(norm, rel=1e-5)

  ref_schedule = lambda n: reference_lr('linear', n, peak=1e-2, low=1e-3, warmup=1, total=3)
  np.testing.assert_allclose(lrs, [ref_schedule(n) for n in (1, 2, 3)], rtol=1e-6)
  want = numpy_adamw(initial, grads, cfg, ref_schedule)
  for k in names:
    np.testing.assert_allclose(np.asarray(state['params'][k][...]), want[k],
                               rtol=1e-5, atol=1e-6, err_msg=k)
  # The optimizer moments are float32 and the step counter advanced.
  assert int(state['step']) == 3


# Leaf names of the decoder's parameters (model/*.py), by what they are.
KERNELS = {'wq', 'wk', 'wv', 'wo', 'wi', 'wi_gate', 'wi_up', 'head', 'router',
           'w_gate', 'w_up', 'w_down'}
NOT_DECAYED = {'scale', 'bias', 'bq', 'bk', 'bv', 'bo', 'bi', 'bi_gate', 'bi_up',
               'b_gate', 'b_up', 'b_down', 'embedding', 'table', 'memory'}


@pytest.mark.parametrize('spec,overrides,present', [
    ('configs/llama.py:tiny', [], {'embedding', 'head', 'scale'}),
    ('configs/gpt2.py:tiny', ['model.num_memory_tokens=2', 'model.qk_norm=True'],
     {'bias', 'bq', 'bo', 'table', 'memory', 'embedding'}),
    ('configs/deepseek.py:tiny', ['model.use_bias=True'],
     {'router', 'w_gate', 'w_down', 'b_down', 'b_gate', 'wi_up', 'bi_up'}),
])
def test_weight_decay_skips_norms_biases_and_embeddings(spec, overrides, present):
  cfg = configs.load(spec, overrides)
  abstract = nnx.eval_shape(lambda: model.Decoder(cfg.model, rngs=nnx.Rngs(0)))
  _, params, _ = nnx.split(abstract, nnx.Param, ...)
  mask = optim.decay_mask(params)
  names = {}
  for path, decayed in jax.tree_util.tree_flatten_with_path(mask)[0]:
    name = str(path[-1].key)
    names.setdefault(name, set()).add(bool(decayed))
  unknown = set(names) - KERNELS - NOT_DECAYED
  assert not unknown, f'parameters this test does not classify: {unknown}'
  for name, decisions in names.items():
    assert decisions == {name in KERNELS}, name
  assert present <= names.keys()


def test_optimizer_moments_are_float32_for_bfloat16_params():
  cfg = configs.load('configs/llama.py:tiny', ['model.param_dtype="bfloat16"'])
  optimizer, _ = optim.make_optimizer(cfg.train)
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=1)), jax.devices()[:1])
  _, _, abstract, _ = step_lib.train_state_spec(
      lambda: model.Decoder(cfg.model, rngs=nnx.Rngs(0)), optimizer, mesh, seed=0)
  param_dtypes = {x.dtype for x in jax.tree.leaves(abstract['params'])}
  assert param_dtypes == {jnp.dtype(jnp.bfloat16)}
  adam = [s for s in jax.tree.leaves(abstract['opt_state'],
                                     is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)]
  assert adam and all(x.dtype == jnp.float32 for x in jax.tree.leaves(adam[0].mu))
