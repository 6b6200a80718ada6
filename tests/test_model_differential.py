"""Differential attention (model/differential.py) against the paper's equations.

The reference is written from Ye et al. 2024, "Differential Transformer",
section 2.1 (eqs. 1-3), in NumPy float64, one differential head at a time:
[Q1; Q2] and [K1; K2] are the two query/key heads of the pair, V the pair's
two value heads side by side (dim 2h), lambda = exp(l_q1.l_k1) - exp(l_q2.l_k2)
+ lambda_init with lambda_init = 0.8 - 0.6 exp(-0.3 (l - 1)) for the 1-based
layer l, then RMSNorm over the head's 2h outputs and the (1 - lambda_init)
scale; RoPE as complex rotations of the (i, i + h/2) feature pairs (ablax's
documented layout), GQA by query head i using K/V head i // (n / kv). Then:
the Pallas kernel (interpret mode) against XLA, causality and packed
documents, cached sampling against full forwards, counts by hand, refusals.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
import model
from model import differential
from train import sample

D, N, H = 32, 4, 8
SMALL = ['model.vocab_size=64', f'model.d_model={D}', f'model.num_heads={N}',
         'model.d_ff=64', 'model.max_seq_len=64', 'model.attention_type=differential',
         'model.attention_impl=xla']


def _cfg(*overrides):
  return configs.load('configs/base.py', SMALL + list(overrides)).model


def _layer(cfg_model, layer_index, seed=0):
  """A DifferentialAttention with N(0, 1.5^2)/fan-in weights (a sharp softmax)
  and lambda vectors N(0, 0.4^2), so that lambda differs from lambda_init."""
  layer = differential.DifferentialAttention(cfg_model, layer_index=layer_index,
                                             rngs=nnx.Rngs(0))
  rng = np.random.RandomState(seed)
  for _, var in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
    x = var.get_value()
    if x.ndim == 1:
      value = 0.4 * rng.normal(size=x.shape)
    else:
      value = 1.5 * rng.normal(size=x.shape) / np.sqrt(x.shape[0])
    var.set_value(jnp.asarray(value, x.dtype))
  return layer


def _call(layer, *args, **kwargs):
  """layer(*args, **kwargs) under jit (eager dispatch is slow on CPU)."""
  graph, state = nnx.split(layer)
  return jax.jit(lambda state, *a: nnx.merge(graph, state)(*a, **kwargs))(state, *args)


def _params(layer):
  return {'.'.join(map(str, path)): np.asarray(var.get_value(), np.float64)
          for path, var in nnx.to_flat_state(nnx.state(layer, nnx.Param))}


def _rope(x, pos, theta=10000.0):
  """x [t, h] rotated at int positions [t]: pairs (i, i + h/2) as complex numbers."""
  h = x.shape[-1]
  freq = theta ** (-np.arange(h // 2) * 2.0 / h)
  z = (x[:, :h // 2] + 1j * x[:, h // 2:]) * np.exp(1j * pos[:, None] * freq)
  return np.concatenate([z.real, z.imag], axis=-1)


def reference(p, x, layer, num_kv, seg=None, eps=1e-6, rope=True):
  """The paper's differential attention, float64; x [t, d], layer 1-based."""
  t = x.shape[0]
  n, h = p['wq'].shape[1], p['wq'].shape[2]
  g = n // num_kv
  pos = np.arange(t)
  seg = np.ones(t, int) if seg is None else np.asarray(seg)
  mask = (pos[:, None] >= pos[None, :]) & (seg[:, None] == seg[None, :])
  lam_init = 0.8 - 0.6 * math.exp(-0.3 * (layer - 1))
  lam = (math.exp(p['lambda_q1'] @ p['lambda_k1']) - math.exp(p['lambda_q2'] @ p['lambda_k2'])
         + lam_init)
  rot = (lambda a: _rope(a, pos)) if rope else (lambda a: a)

  def softmax_map(i):           # query head i and its K/V head
    q, k = rot(x @ p['wq'][:, i]), rot(x @ p['wk'][:, i // g])
    s = np.where(mask, q @ k.T / math.sqrt(h), -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  heads = []
  for j in range(n // 2):
    v = np.concatenate([x @ p['wv'][:, j // g], x @ p['wv'][:, (j + n // 2) // g]], axis=-1)
    o = (softmax_map(j) - lam * softmax_map(j + n // 2)) @ v                  # [t, 2h]
    o = o / np.sqrt(np.mean(o * o, -1, keepdims=True) + eps)
    heads.append((1 - lam_init) * o)
  return np.concatenate(heads, axis=-1) @ p['wo'].reshape(n * h, -1)


def _x(seed, t=12, b=1):
  return np.random.default_rng(seed).normal(size=(b, t, D))


@pytest.mark.parametrize('num_kv,layer_index', [(4, 0), (2, 1), (1, 5)])
def test_layer_matches_the_papers_equations(num_kv, layer_index):
  """MHA, GQA and MQA (kv odd: heads repeated), lambda_init of layers 1, 2, 6,
  with RoPE, causal and two packed documents."""
  cfg = _cfg(f'model.num_kv_heads={num_kv}')
  layer = _layer(cfg, layer_index, seed=layer_index)
  x = _x(layer_index)
  seg = np.array([1] * 5 + [2] * 7)
  pos = jnp.asarray([[*range(5), *range(7)]], jnp.int32)
  got = np.asarray(_call(layer, jnp.asarray(x, jnp.float32), pos,
                         jnp.asarray(seg[None], jnp.int32)))[0]
  p = _params(layer)
  # Each document is its own sequence from position 0.
  want = np.concatenate([reference(p, x[0, :5], layer_index + 1, num_kv, eps=cfg.norm_eps),
                         reference(p, x[0, 5:], layer_index + 1, num_kv, eps=cfg.norm_eps)])
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
  # And one sequence of two segments: segment ids isolate them with shared positions.
  want_seg = reference(p, x[0], layer_index + 1, num_kv, seg=seg, eps=cfg.norm_eps)
  got_seg = np.asarray(_call(layer, jnp.asarray(x, jnp.float32),
                             jnp.arange(12, dtype=jnp.int32)[None],
                             jnp.asarray(seg[None], jnp.int32)))[0]
  np.testing.assert_allclose(got_seg, want_seg, rtol=0, atol=2e-5 * np.abs(want_seg).max())


def test_decoder_layers_get_lambda_init_by_depth():
  """Block i (0-based) holds lambda_init of the paper's layer l = i + 1."""
  cfg = _cfg('model.num_layers=4')
  dec = model.Decoder(cfg, rngs=nnx.Rngs(0))
  got = [block.attn.lambda_init for block in dec.blocks]
  want = [0.8 - 0.6 * math.exp(-0.3 * (l - 1)) for l in (1, 2, 3, 4)]
  np.testing.assert_allclose(got, want, rtol=1e-12)
  assert got[0] == pytest.approx(0.2)


@pytest.mark.parametrize('extra', [
    [], ['model.attn_logit_softcap=5.0', 'model.attention_sinks=True', 'model.sliding_window=8']])
def test_pallas_kernel_matches_xla_through_the_layer(extra):
  """The flash kernel (interpret mode; q/k head dim 8, v head dim 16), forward
  and gradients of every parameter (the lambdas included), vs the XLA path."""
  cfg = _cfg('model.num_kv_heads=2', *extra)
  x = jnp.asarray(_x(10, t=24), jnp.float32)
  pos = jnp.arange(24, dtype=jnp.int32)[None]
  seg = jnp.asarray([[1] * 10 + [2] * 14], jnp.int32)
  results = []
  for impl in ('xla', 'pallas'):
    cfg.attention_impl = impl
    graph, params = nnx.split(_layer(cfg, 2, seed=11))
    loss = lambda prm: jnp.sum(jnp.sin(nnx.merge(graph, prm)(x, pos, seg)))
    results.append(jax.jit(jax.value_and_grad(loss))(params))
  (lx, gx), (lp, gp) = results
  np.testing.assert_allclose(float(lp), float(lx), rtol=1e-5, atol=1e-5)
  for (path, a), (_, e) in zip(nnx.to_flat_state(gp), nnx.to_flat_state(gx)):
    e = np.asarray(e.get_value())
    np.testing.assert_allclose(np.asarray(a.get_value()), e, rtol=0,
                               atol=1e-4 * max(1.0, np.abs(e).max()), err_msg=str(path))


def test_decoder_is_causal_and_keeps_documents_apart():
  """Later tokens and the other document of a packed row change nothing; the
  built parameter count equals `count_params` (memory tokens, windows)."""
  cfg = _cfg('model.num_kv_heads=2', 'model.num_memory_tokens=2', 'model.sliding_window=3',
             'model.global_layer_interval=2')
  dec = model.Decoder(cfg, rngs=nnx.Rngs(1))
  built = sum(v.size for v in jax.tree.leaves(nnx.state(dec, nnx.Param)))
  assert built == model.count_params(cfg)
  graph, state = nnx.split(dec)
  run = jax.jit(lambda tok, seg: nnx.merge(graph, state)(tok, seg)[0])
  tokens = jnp.asarray(np.random.default_rng(12).integers(0, 64, (1, 12)), jnp.int32)
  seg = jnp.asarray([[1] * 5 + [2] * 7], jnp.int32)
  a = np.asarray(run(tokens, seg))
  other_doc = np.asarray(run(tokens.at[0, :5].set((tokens[0, :5] + 7) % 64), seg))
  np.testing.assert_allclose(a[0, 5:], other_doc[0, 5:], rtol=1e-5, atol=1e-5)
  assert np.abs(a[0, :5] - other_doc[0, :5]).max() > 1e-3
  later = np.asarray(run(tokens.at[0, 8:].set((tokens[0, 8:] + 3) % 64), seg))
  np.testing.assert_allclose(a[0, :8], later[0, :8], rtol=1e-5, atol=1e-5)
  assert np.abs(a[0, 8:] - later[0, 8:]).max() > 1e-3


@pytest.mark.parametrize('overrides', [['model.num_kv_heads=2', 'model.sliding_window=6'],
                                       ['model.position=alibi', 'model.num_memory_tokens=2']])
def test_cached_sampling_logits_equal_full_forward(overrides):
  """train.sample through the standard KV cache: at every step the logits a
  token is drawn from equal a full forward of the sequence so far."""
  cfg = configs.load('configs/llama.py:tiny', SMALL[:5] + [
      f'model.num_heads={N}', 'model.attention_type=differential', 'train.seq_len=16']
      + overrides)
  dec = model.Decoder(cfg.model, rngs=nnx.Rngs(3))
  for _, var in nnx.to_flat_state(nnx.state(dec, nnx.Param)):
    if var.get_value().ndim > 1:
      var.set_value(var.get_value() * 8.0)
  prompts = [[5, 9, 2, 7, 1], [3, 3, 8]]
  steps = 12
  got = sample.generate(dec, cfg.model, prompts, max_new_tokens=steps, full_output=True,
                        temperature=1.0)
  graph, state = nnx.split(dec)
  run = jax.jit(lambda tok: nnx.merge(graph, state)(tok)[0])
  width = max(map(len, prompts)) + steps
  for i, (prompt, new) in enumerate(zip(prompts, got.tokens)):
    full = prompt + new
    buf = np.zeros((1, width), np.int32)
    buf[0, :len(full)] = full
    logits = np.asarray(run(jnp.asarray(buf)))[0]
    want = logits[len(prompt) - 1:len(prompt) - 1 + steps]
    np.testing.assert_allclose(got.logits[i], want, rtol=0, atol=2e-5 * np.abs(want).max())
  assert all(len(set(new)) > 3 for new in got.tokens)


def test_counts_by_hand():
  """Parameters and training FLOPs from the architecture, by hand."""
  cfg = _cfg('model.num_kv_heads=2')
  d, n, kv, h, v, ff, layers = D, N, 2, H, 64, 64, 2
  attn_weights = d * n * h + 2 * d * kv * h + n * h * d    # W_q, W_k, W_v, W_o
  attn = attn_weights + 4 * h                              # lambda_q1, k1, q2, k2
  mlp = 3 * d * ff
  assert model.count_params(cfg) == v * d + layers * (attn + mlp + 2 * d) + d
  t = 16
  pairs = t * (t + 1) // 2
  # n query heads: q.k over h, p.v over the pair's 2h values.
  per_pair = 2 * n * (h + 2 * h)
  forward = layers * (2 * (attn_weights + mlp) + per_pair * pairs / t) + 2 * d * v
  assert model.flops_per_token(cfg, t) == pytest.approx(3 * forward, rel=1e-12)
  assert model.cache_numbers_per_token(cfg) == 2 * kv * h


@pytest.mark.parametrize('override, names', [
    ('model.num_heads=3', 'model.num_heads'),
    ('model.attention_gate=headwise', "model.attention_gate='headwise'"),
    ('model.attention_impl=cudnn', "attention_impl='cudnn'"),
])
def test_config_refusals_name_the_field(override, names):
  extra = ['model.num_kv_heads=1', 'model.d_model=30'] if 'num_heads=3' in override else []
  with pytest.raises(configs.ConfigError, match=names.replace('.', r'\.')):
    configs.load('configs/base.py', SMALL + extra + [override])


def test_layer_matches_transformers_diffllama_attention():
  """A second implementation: transformers' DiffLlamaAttention (torch, eager,
  float64) with the same weights, GQA, RoPE, a causal mask, layer index 3."""
  torch = pytest.importorskip('torch')
  # pylint: disable=import-outside-toplevel
  from transformers import DiffLlamaConfig
  from transformers.models.diffllama import modeling_diffllama as hf_diff
  cfg = _cfg('model.num_kv_heads=2')
  layer = _layer(cfg, 3, seed=4)
  p = _params(layer)
  hf_cfg = DiffLlamaConfig(hidden_size=D, num_attention_heads=N, num_key_value_heads=2,
                           intermediate_size=64, vocab_size=64, rms_norm_eps=cfg.norm_eps,
                           rope_theta=cfg.rope_theta, max_position_embeddings=64)
  hf_cfg._attn_implementation = 'eager'  # pylint: disable=protected-access
  attn = hf_diff.DiffLlamaAttention(hf_cfg, layer_idx=3).double()
  t64 = lambda a: torch.tensor(a, dtype=torch.float64)
  with torch.no_grad():
    attn.q_proj.weight.copy_(t64(p['wq'].reshape(D, -1).T))
    attn.k_proj.weight.copy_(t64(p['wk'].reshape(D, -1).T))
    attn.v_proj.weight.copy_(t64(p['wv'].reshape(D, -1).T))
    attn.o_proj.weight.copy_(t64(p['wo'].reshape(-1, D).T))
    for name in ('lambda_q1', 'lambda_k1', 'lambda_q2', 'lambda_k2'):
      getattr(attn, name).copy_(t64(p[name]))
  x = _x(7, t=10)
  pos = torch.arange(10)[None]
  rotary = hf_diff.DiffLlamaRotaryEmbedding(hf_cfg)
  cos, sin = rotary(t64(x), pos)
  mask = torch.triu(torch.full((10, 10), -torch.inf, dtype=torch.float64), 1)[None, None]
  want = attn(t64(x), (cos.double(), sin.double()), mask)[0].detach().numpy()[0]
  got = np.asarray(_call(layer, jnp.asarray(x, jnp.float32),
                         jnp.arange(10, dtype=jnp.int32)[None]))[0]
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
