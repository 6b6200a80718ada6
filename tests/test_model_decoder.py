"""The whole decoder against a float64 NumPy decoder, and its masking invariants.

The NumPy reference below is written from the papers' definitions (complex
rotation for RoPE, repeated K/V heads for GQA, an explicit mask loop), not from
the JAX code. It is run on the preset layouts (llama, gpt2, gemma2, mpt, qwen3)
with random weights, memory tokens and packed sequences, and must match the
NNX decoder to 1e-5 in float32.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
import model
from model import scan as scan_lib

# ---------------------------------------------------------------------------
# NumPy reference (float64), one row at a time.


def np_norm(cfg, p, x):
  if cfg.norm_type == 'rmsnorm':
    return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + cfg.norm_eps) * p['scale']
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean)**2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + cfg.norm_eps) * p['scale'] + p['bias']


def np_act(name, x):
  if name == 'relu':
    return np.maximum(x, 0)
  if name == 'gelu':
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
  if name == 'gelu_tanh':
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
  return x / (1 + np.exp(-x))     # silu


def np_mlp(cfg, p, x):
  bias = lambda name: p[name] if cfg.use_bias else 0.0
  if cfg.mlp_gated:
    h = np_act(cfg.mlp_activation, x @ p['wi_gate'] + bias('bi_gate')) * (
        x @ p['wi_up'] + bias('bi_up'))
  else:
    h = np_act(cfg.mlp_activation, x @ p['wi'] + bias('bi'))
  return h @ p['wo'] + bias('bo')


def np_rope(x, pos, theta):
  """x [s, n, h]: pair (x_i, x_{i+h/2}) as a complex number turned by pos * theta^(-2i/h)."""
  half = x.shape[-1] // 2
  z = x[..., :half] + 1j * x[..., half:]
  z = z * np.exp(1j * pos[:, None, None] * theta ** (-2.0 * np.arange(half) / x.shape[-1]))
  return np.concatenate([z.real, z.imag], -1)


def np_slopes(n):
  """Press et al.'s slopes, written out: geometric from 2^(-8/n) (n a power of 2)."""
  def pow2(k):
    return [2.0 ** (-8.0 * (i + 1) / k) for i in range(k)]
  if n & (n - 1) == 0:
    return np.array(pow2(n))
  c = 2 ** int(math.log2(n))
  return np.array(pow2(c) + pow2(2 * c)[0::2][:n - c])


def np_attention(cfg, p, x, pos, seg, window, m):
  """One row: x [s, d] with s = m memory tokens + real tokens."""
  s = x.shape[0]
  n, kv = cfg.num_heads, cfg.num_kv_heads
  h = cfg.head_dim or cfg.d_model // n
  bias = lambda name: p[name] if cfg.use_bias else 0.0
  q = np.einsum('sd,dnh->snh', x, p['wq']) + bias('bq')
  k = np.einsum('sd,dnh->snh', x, p['wk']) + bias('bk')
  v = np.einsum('sd,dnh->snh', x, p['wv']) + bias('bv')
  if cfg.qk_norm:
    q, k = np_norm(cfg, p['q_norm'], q), np_norm(cfg, p['k_norm'], k)
  if cfg.position == 'rope':
    q, k = np_rope(q, pos, cfg.rope_theta), np_rope(k, pos, cfg.rope_theta)
  k = np.repeat(k, n // kv, axis=1)
  v = np.repeat(v, n // kv, axis=1)
  scale = cfg.attn_scale or h ** -0.5
  logits = np.einsum('qnh,knh->nqk', q, k) * scale
  if cfg.attn_logit_softcap:
    logits = cfg.attn_logit_softcap * np.tanh(logits / cfg.attn_logit_softcap)
  if cfg.position == 'alibi':
    slopes = np_slopes(n)
    for i in range(s):
      for j in range(m, s):
        logits[:, i, j] -= slopes * abs(i - j)
  visible = np.zeros((s, s), bool)
  for i in range(s):
    for j in range(s):
      if j < m:
        visible[i, j] = True          # memory: visible to all
      elif i < m:
        visible[i, j] = False         # memory queries read only memory
      else:
        visible[i, j] = (j <= i and seg[i] == seg[j]
                         and (window is None or i - j < window))
  logits = np.where(visible, logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum('nqk,knh->qnh', probs, v)
  return np.einsum('qnh,nhd->qd', out, p['wo']) + bias('bo')


def np_decoder(cfg, params, tokens, segment_ids):
  # The reference walks the layers one by one: a scanned decoder's stacks
  # (model.scan_layers, the default) are read per layer.
  params = scan_lib.convert(params, cfg, scanned=False)
  d, m = cfg.d_model, cfg.num_memory_tokens
  rows = []
  for toks, seg in zip(tokens, segment_ids):
    pos = np.zeros(len(toks))
    for t in range(1, len(toks)):
      pos[t] = pos[t - 1] + 1 if seg[t] == seg[t - 1] else 0
    x = params['embed']['embedding'][toks]
    if cfg.embedding_scale:
      x = x * math.sqrt(d)
    if cfg.position == 'learned':
      x = x + params['position_embed']['table'][pos.astype(int)]
    if m:
      x = np.concatenate([params['memory'], x])
    full_pos = np.concatenate([np.zeros(m), pos])
    full_seg = np.concatenate([np.full(m, -1), seg])
    for i in range(cfg.num_layers):
      p = params['blocks'][i]
      is_global = cfg.sliding_window is None or (
          cfg.global_layer_interval is not None and (i + 1) % cfg.global_layer_interval == 0)
      window = None if is_global else cfg.sliding_window
      attn = lambda y: np_attention(cfg, p['attn'], y, full_pos, full_seg, window, m)
      ffn = lambda y: np_mlp(cfg, p['mlp'], y)
      if cfg.norm_position == 'pre':
        x = x + attn(np_norm(cfg, p['attn_norm'], x))
        x = x + ffn(np_norm(cfg, p['mlp_norm'], x))
      elif cfg.norm_position == 'post':
        x = np_norm(cfg, p['attn_norm'], x + attn(x))
        x = np_norm(cfg, p['mlp_norm'], x + ffn(x))
      else:
        x = x + np_norm(cfg, p['attn_out_norm'], attn(np_norm(cfg, p['attn_norm'], x)))
        x = x + np_norm(cfg, p['mlp_out_norm'], ffn(np_norm(cfg, p['mlp_norm'], x)))
    x = x[m:]
    if cfg.norm_position != 'post':
      x = np_norm(cfg, params['final_norm'], x)
    logits = x @ (params['embed']['embedding'].T if cfg.tie_embeddings else params['head'])
    if cfg.final_logit_softcap:
      logits = cfg.final_logit_softcap * np.tanh(logits / cfg.final_logit_softcap)
    rows.append(logits)
  return np.stack(rows)


# ---------------------------------------------------------------------------
# Helpers.


def _draw(rng, path, x):
  """A random value for one parameter, at a scale that exercises it."""
  name = str(path[-1].key)
  noise = rng.normal(size=x.shape)
  if name == 'scale':
    value = 1.0 + 0.2 * noise
  elif len(x.shape) == 1 or name.startswith('b'):
    value = 0.2 * noise
  elif name in ('embedding', 'table', 'memory'):
    value = 0.5 * noise
  else:
    fan_in = x.shape[0] * (x.shape[1] if name == 'wo' and len(x.shape) == 3 else 1)
    value = noise / math.sqrt(fan_in)
  return jnp.asarray(value, x.dtype)


def build(spec, overrides=(), seed=1):
  """The decoder of a preset with overrides, every parameter drawn at random.

  The module is built abstractly (`nnx.eval_shape`) and filled from NumPy,
  which is much faster on CPU than running each initialiser; the random
  values also make biases and norm scales matter. (The real initialisers are
  run by test_model_presets.py.)
  """
  cfg = configs.load(spec, list(overrides)).model
  # Drawn per layer (a stacked [layers, d] bias is no matrix), then put in
  # the decoder's layout (model.scan_layers).
  unrolled = cfg.copy_and_resolve_references()
  unrolled.scan_layers = False
  _, state = nnx.split(nnx.eval_shape(lambda: model.Decoder(unrolled, rngs=nnx.Rngs(0))))
  rng = np.random.RandomState(seed)
  pure = jax.tree_util.tree_map_with_path(lambda p, x: _draw(rng, p, x),
                                          nnx.to_pure_dict(state))
  pure = scan_lib.convert(pure, cfg, scanned=bool(cfg.scan_layers))
  graphdef, state = nnx.split(nnx.eval_shape(lambda: model.Decoder(cfg, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, pure)
  return cfg, nnx.merge(graphdef, state)


@jax.jit
def _forward(graphdef, state, tokens, segment_ids, positions):
  return nnx.merge(graphdef, state)(tokens, segment_ids=segment_ids, positions=positions)


def forward(decoder, tokens, segment_ids=None, positions=None):
  graphdef, state = nnx.split(decoder)
  as_int = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
  return _forward(graphdef, state, as_int(tokens), as_int(segment_ids), as_int(positions))


def f64_params(decoder):
  return jax.tree.map(lambda x: np.asarray(x, np.float64),
                      nnx.to_pure_dict(nnx.state(decoder, nnx.Param)))


TOKENS = np.random.RandomState(0).randint(0, 320, (2, 12))
PACKED = np.array([[1] * 5 + [2] * 5 + [0] * 2, [3] * 12])

REFERENCE_CASES = {
    'llama': ('configs/llama.py', []),
    'gpt2': ('configs/gpt2.py', []),
    # Small caps and window so that soft-capping and the local layer matter.
    'gemma2': ('configs/gemma2.py', ['model.sliding_window=3', 'model.attn_logit_softcap=2.0',
                                      'model.final_logit_softcap=3.0']),
    'mpt_post_memory': ('configs/mpt.py', ['model.norm_position="post"',
                                           'model.num_memory_tokens=2', 'model.num_heads=2',
                                           'model.num_kv_heads=2']),
    'qwen3_mqa_relu': ('configs/qwen3.py', ['model.num_kv_heads=1', 'model.mlp_gated=False',
                                            'model.mlp_activation="relu"',
                                            'model.attn_scale=0.1']),
}


@pytest.mark.parametrize('case', sorted(REFERENCE_CASES))
def test_decoder_matches_numpy_reference(case):
  spec, overrides = REFERENCE_CASES[case]
  cfg, decoder = build(spec, overrides)
  logits, aux = forward(decoder, TOKENS, PACKED)
  assert logits.dtype == jnp.float32 and logits.shape == (2, 12, 320)
  assert aux == {}
  want = np_decoder(cfg, f64_params(decoder), TOKENS, PACKED)
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Masking invariants.


def _changed_at(tokens, t):
  out = np.array(tokens)
  out[:, t] = (out[:, t] + 7) % 320
  return out


def test_changing_a_token_never_changes_earlier_logits():
  # Memory tokens, GQA and sandwich norms included: no path may leak forward.
  cfg, decoder = build('configs/gemma2.py', ['model.num_memory_tokens=2',
                                             'model.sliding_window=4'])
  base, _ = forward(decoder, TOKENS)
  for t in (0, 5, 11):
    logits, _ = forward(decoder, _changed_at(TOKENS, t))
    np.testing.assert_allclose(logits[:, :t], base[:, :t], rtol=0, atol=1e-6)
    assert np.abs(logits[:, t] - base[:, t]).max() > 1e-3


def test_sliding_window_hides_tokens_further_back_than_the_window():
  w = 3
  cfg, decoder = build('configs/mistral.py', [f'model.sliding_window={w}', 'model.num_layers=1'])
  base, _ = forward(decoder, TOKENS)
  t = 10
  for s in range(t - w + 1):          # distance t - s >= w: invisible
    logits, _ = forward(decoder, _changed_at(TOKENS, s))
    np.testing.assert_allclose(logits[:, t], base[:, t], rtol=0, atol=1e-6)
  logits, _ = forward(decoder, _changed_at(TOKENS, t - w + 1))   # distance w - 1: visible
  assert np.abs(logits[:, t] - base[:, t]).max() > 1e-3


def test_global_layer_interval_makes_every_kth_layer_global():
  _, decoder = build('configs/gemma2.py', ['model.num_layers=6', 'model.sliding_window=3',
                                           'model.global_layer_interval=3'])
  windows = [block.attn.sliding_window for block in decoder.layers()]
  assert windows == [3, 3, None, 3, 3, None]
  # With a global second layer, far tokens reach the last position.
  cfg, decoder = build('configs/gemma2.py', ['model.sliding_window=2'])
  base, _ = forward(decoder, TOKENS)
  logits, _ = forward(decoder, _changed_at(TOKENS, 0))
  assert np.abs(logits[:, 11] - base[:, 11]).max() > 1e-4


@pytest.mark.parametrize('spec', ['configs/llama.py', 'configs/gpt2.py'])
def test_packed_documents_do_not_see_each_other_and_positions_restart(spec):
  _, decoder = build(spec)
  seg = np.array([[1] * 4 + [2] * 8])
  tokens = TOKENS[:1]
  packed, _ = forward(decoder, tokens, seg)
  # Changing the first document leaves the second one's logits alone.
  other = np.array(tokens)
  other[0, :4] = (other[0, :4] + 11) % 320
  changed, _ = forward(decoder, other, seg)
  np.testing.assert_allclose(changed[:, 4:], packed[:, 4:], rtol=0, atol=1e-6)
  # The second document gets the logits it would get alone at the start of a
  # row (positions restart), here followed by padding.
  alone_tokens = np.concatenate([tokens[:, 4:], tokens[:, :4]], axis=1)
  alone_seg = np.array([[1] * 8 + [0] * 4])
  alone, _ = forward(decoder, alone_tokens, alone_seg)
  np.testing.assert_allclose(packed[:, 4:], alone[:, :8], rtol=1e-5, atol=1e-5)


def test_positions_argument_overrides_segment_default():
  _, decoder = build('configs/llama.py')
  seg = np.array([[1] * 6 + [2] * 6])
  default, _ = forward(decoder, TOKENS[:1], seg)
  explicit, _ = forward(decoder, TOKENS[:1], seg, [list(range(6)) * 2])
  np.testing.assert_allclose(explicit, default, rtol=1e-5, atol=1e-5)
  # RoPE is relative: spread the second document's positions apart instead.
  spread, _ = forward(decoder, TOKENS[:1], seg, [list(range(6)) + list(range(0, 12, 2))])
  np.testing.assert_allclose(spread[:, :6], default[:, :6], rtol=1e-5, atol=1e-5)
  assert np.abs(spread[:, 6:] - default[:, 6:]).max() > 1e-4


# ---------------------------------------------------------------------------
# Numerics, remat, MoE wiring.


def _loss_and_grads(decoder, tokens):
  graphdef, state = nnx.split(decoder, nnx.Param)

  def loss(state):
    logits, _ = nnx.merge(graphdef, state)(tokens)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
        logits, tokens[..., None], -1)[..., 0])

  return jax.jit(jax.value_and_grad(loss))(state)


def test_remat_policies_give_the_same_gradients():
  tokens = jnp.asarray(TOKENS, jnp.int32)
  results = {}
  for remat in ('none', 'full', 'dots'):
    _, decoder = build('configs/llama.py', [f'model.remat="{remat}"', 'model.num_layers=1',
                                            'model.num_memory_tokens=2'])
    graphdef, state = nnx.split(decoder)
    jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens)[0])(state))
    assert ('checkpoint' in jaxpr or 'remat' in jaxpr) == (remat != 'none')
    results[remat] = _loss_and_grads(decoder, tokens)
  loss, grads = results['none']
  assert float(jnp.abs(grads['memory'][...]).max()) > 0    # memory tokens train
  for remat in ('full', 'dots'):
    other_loss, other_grads = results[remat]
    np.testing.assert_allclose(other_loss, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 other_grads, grads)


def test_compute_dtype_and_parameter_dtype():
  one = 'model.num_layers=1'
  _, f32 = build('configs/llama.py', [one])
  _, bf16 = build('configs/llama.py', [one, 'model.dtype="bfloat16"'])
  _, bf16_params = build('configs/llama.py', [one, 'model.param_dtype="bfloat16"'])
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
  assert all(x.dtype == jnp.bfloat16
             for x in jax.tree.leaves(nnx.state(bf16_params, nnx.Param)))
  want, _ = forward(f32, TOKENS)
  got, _ = forward(bf16, TOKENS)
  assert got.dtype == jnp.float32
  # Same function, computed in bfloat16 (8 bits of mantissa): close, not equal.
  err = float(np.abs(np.asarray(got) - np.asarray(want)).max())
  assert 1e-6 < err < 0.02 * float(np.abs(want).max())
  graphdef, state = nnx.split(bf16)
  jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(jnp.asarray(TOKENS))[0])(state)
  assert 'bf16' in str(jaxpr)


def test_moe_with_one_expert_and_top1_equals_the_dense_decoder():
  one = 'model.num_layers=1'
  moe_cfg, moe_decoder = build('configs/mixtral.py', [one, 'model.num_experts=1',
                                                      'model.experts_per_token=1'])
  _, dense = build('configs/mixtral.py', [one, 'model.num_experts=0'])
  pure = nnx.to_pure_dict(nnx.state(moe_decoder, nnx.Param))
  for i in range(moe_cfg.num_layers):
    e = pure['blocks'][i]['mlp']
    pure['blocks'][i]['mlp'] = {'wi_gate': e['w_gate'][0], 'wi_up': e['w_up'][0],
                                'wo': e['w_down'][0]}
  state = nnx.state(dense, nnx.Param)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(dense, state)
  want, dense_aux = forward(dense, TOKENS)
  got, aux = forward(moe_decoder, TOKENS)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert dense_aux == {}
  np.testing.assert_allclose(aux['moe_expert_load'], [1.0])
  np.testing.assert_allclose(aux['moe_aux_loss'], 1.0, rtol=1e-6)


@jax.jit
def _moe_layer_stats(graphdef, state, tokens):
  """Each MoE layer's statistics, recomputed from its own input (pre-norm blocks)."""
  decoder = nnx.merge(graphdef, state)
  x = decoder.embed(tokens)
  pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  stats = []
  for block in decoder.layers():
    if block.is_moe:
      h = x + block.attn(block.attn_norm(x), pos)
      stats.append(block.mlp(block.mlp_norm(h))[1])
    x, _ = block(x, pos)
  return stats


def test_moe_statistics_are_averaged_over_moe_layers():
  cfg, decoder = build('configs/deepseek.py', ['model.num_layers=4', 'model.num_experts=4',
                                               'model.experts_per_token=2',
                                               'model.moe_layer_interval=2'])
  assert [b.is_moe for b in decoder.layers()] == [False, True, False, True]
  _, aux = forward(decoder, TOKENS)
  per_layer = _moe_layer_stats(*nnx.split(decoder), jnp.asarray(TOKENS, jnp.int32))
  assert len(per_layer) == 2
  for key in ('moe_aux_loss', 'moe_router_z_loss', 'moe_expert_load'):
    np.testing.assert_allclose(aux[key], (per_layer[0][key] + per_layer[1][key]) / 2,
                               rtol=1e-5, atol=1e-6)
  assert aux['moe_expert_load'].shape == (cfg.num_experts,)
  np.testing.assert_allclose(aux['moe_expert_load'].sum(), 1.0, rtol=1e-6)
