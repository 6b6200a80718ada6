"""Gated DeltaNet (model/gdn.py) against the paper's recurrence.

The reference is the gated delta rule of Yang et al. 2024 ("Gated Delta
Networks", eq. for S_t) written as a plain loop over time in NumPy float64,
with the state S in R^{dv x dk}:

    S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,  o_t = S_t q_t

and S reset to zero where a new packed document starts. The whole layer's
reference adds the causal depthwise conv + SiLU, L2 norms, the decay
alpha = exp(-exp(A_log) softplus(x W_a + dt_bias)), beta = sigmoid(x W_b) and
RMSNorm(o) * SiLU(x W_g) W_o, from the same equations. Then: causality and
document isolation, a hybrid decoder trains, cached sampling equals the full
forward, gradients, counts and config refusals.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
import model as model_lib
from model import flops
from model import gdn
from model import kv_cache
from train import sample

D, N, DK, DV, KW = 16, 2, 8, 6, 4
SMALL = ['model.vocab_size=64', f'model.d_model={D}', 'model.num_heads=2',
         'model.num_kv_heads=2', 'model.d_ff=32', 'model.max_seq_len=256',
         f'model.gdn_num_heads={N}', f'model.gdn_head_dim={DK}',
         f'model.gdn_v_head_dim={DV}', f'model.gdn_conv_width={KW}',
         'model.attention_impl=xla']


def _cfg(*overrides):
  return configs.load('configs/base.py', SMALL + list(overrides)).model


def delta_rule_reference(q, k, v, alpha, beta, segment_ids):
  """NumPy float64 loop; q, k [b, t, n, dk], v [b, t, n, dv], alpha, beta [b, t, n]."""
  b, t, n, dk = q.shape
  dv = v.shape[-1]
  out = np.zeros((b, t, n, dv))
  for i in range(b):
    for h in range(n):
      s = np.zeros((dv, dk))
      for j in range(t):
        if j > 0 and segment_ids[i, j] != segment_ids[i, j - 1]:
          s = np.zeros((dv, dk))
        kj = k[i, j, h][:, None]
        s = alpha[i, j, h] * s @ (np.eye(dk) - beta[i, j, h] * kj @ kj.T) \
            + beta[i, j, h] * v[i, j, h][:, None] @ kj.T
        out[i, j, h] = s @ q[i, j, h]
  return out


def _random_inputs(rng, b, t):
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
  q = unit(rng.normal(size=(b, t, N, DK))) / math.sqrt(DK)
  k = unit(rng.normal(size=(b, t, N, DK)))
  v = rng.normal(size=(b, t, N, DV))
  alpha = rng.uniform(0.5, 1.0, size=(b, t, N))
  beta = rng.uniform(0.0, 1.0, size=(b, t, N))
  return q, k, v, alpha, beta


@pytest.mark.parametrize('t,boundaries', [(150, ()), (150, (37, 64, 100)), (20, (5,))])
def test_chunked_form_equals_the_recurrence(t, boundaries):
  # t = 150 is not a multiple of the chunk (64); boundaries at a chunk start
  # (64) and inside chunks; t = 20 is a single partial chunk.
  rng = np.random.default_rng(0)
  q, k, v, alpha, beta = _random_inputs(rng, 2, t)
  seg = np.ones((2, t), np.int32)
  for cut in boundaries:
    seg[0, cut:] += 1                      # row 0 packs documents, row 1 is one
  want = delta_rule_reference(q, k, v, alpha, beta, seg)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  got, state = jax.jit(gdn.chunked_delta_rule)(
      f32(q), f32(k), f32(v), f32(np.log(alpha)), f32(beta), jnp.asarray(seg))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
  # The final state is that of the last document alone: continuing from it
  # one token by token gives the reference on the extended sequence.
  q2, k2, v2, a2, b2 = _random_inputs(rng, 2, 3)
  seg2 = np.concatenate([seg, np.repeat(seg[:, -1:], 3, axis=1)], axis=1)
  cat = lambda x, y: np.concatenate([x, y], axis=1)
  want2 = delta_rule_reference(cat(q, q2), cat(k, k2), cat(v, v2), cat(alpha, a2),
                               cat(beta, b2), seg2)[:, t:]
  h = state
  for j in range(3):
    o, h = gdn.recurrent_step(h, f32(q2[:, j]), f32(k2[:, j]), f32(v2[:, j]),
                              f32(a2[:, j]), f32(b2[:, j]))
    np.testing.assert_allclose(np.asarray(o), want2[:, j], atol=1e-5, rtol=0)


def _layer(cfg_model, seed=0):
  """A GatedDeltaNet with N(0, 1)/sqrt(fan-in) weights (sharper than the init)."""
  layer = gdn.GatedDeltaNet(cfg_model, rngs=nnx.Rngs(0))
  rng = np.random.RandomState(seed)
  for path, var in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
    x = var.get_value()
    if x.ndim == 1:
      value = 1 + 0.3 * rng.normal(size=x.shape)
    else:
      value = 1.5 * rng.normal(size=x.shape) / np.sqrt(x.shape[0])
    var.set_value(jnp.asarray(value, x.dtype))
  return layer


def _call(layer, *args, **kwargs):
  graph, state = nnx.split(layer)
  fn = lambda state, *a: nnx.merge(graph, state)(*a, **kwargs)
  return jax.jit(fn)(state, *args)


def _p(layer, name):
  return np.asarray(getattr(layer, name).get_value(), np.float64)


def layer_reference(layer, x, seg):
  """The whole layer in NumPy float64 from the equations (module docstring)."""
  b, t, d = x.shape
  silu = lambda z: z / (1 + np.exp(-z))
  softplus = lambda z: np.log1p(np.exp(z))
  proj = lambda w: np.einsum('btd,dnh->btnh', x, _p(layer, w)).reshape(b, t, -1)
  pre = np.concatenate([proj('wq'), proj('wk'), proj('wv')], axis=-1)
  w = _p(layer, 'conv')                                   # [K, channels]
  conv = np.zeros_like(pre)
  for j in range(t):
    for i in range(KW):
      src = j - (KW - 1) + i
      if src >= 0 and seg[:, src].tolist() == seg[:, j].tolist():
        conv[:, j] += w[i] * pre[:, src]
      elif src >= 0:                                       # per row
        same = (seg[:, src] == seg[:, j])[:, None]
        conv[:, j] += same * w[i] * pre[:, src]
  y = silu(conv)
  q = y[..., :N * DK].reshape(b, t, N, DK)
  k = y[..., N * DK:2 * N * DK].reshape(b, t, N, DK)
  v = y[..., 2 * N * DK:].reshape(b, t, N, DV)
  q = q / np.sqrt(np.sum(q * q, -1, keepdims=True) + 1e-6) / math.sqrt(DK)
  k = k / np.sqrt(np.sum(k * k, -1, keepdims=True) + 1e-6)
  a = np.einsum('btd,dn->btn', x, _p(layer, 'wa')) + _p(layer, 'dt_bias')
  alpha = np.exp(-np.exp(_p(layer, 'a_log')) * softplus(a))
  beta = 1 / (1 + np.exp(-np.einsum('btd,dn->btn', x, _p(layer, 'wb'))))
  o = delta_rule_reference(q, k, v, alpha, beta, seg)
  o = o / np.sqrt(np.mean(o * o, -1, keepdims=True) + 1e-6) * _p(layer.o_norm, 'scale')
  o = o * silu(np.einsum('btd,dnh->btnh', x, _p(layer, 'wg')))
  return np.einsum('btnh,nhd->btd', o, _p(layer, 'wo'))


def test_layer_equals_its_equations_with_packed_documents():
  cfg = _cfg()
  layer = _layer(cfg)
  rng = np.random.default_rng(1)
  t = 70
  x = rng.normal(size=(2, t, D))
  seg = np.ones((2, t), np.int32)
  seg[0, 30:] = 2
  seg[1, 66:] = 2                                          # near the end, past a chunk
  got = _call(layer, jnp.asarray(x, jnp.float32), None, jnp.asarray(seg))
  want = layer_reference(layer, x, seg)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5 * np.abs(want).max(), rtol=0)


def test_causality_and_document_isolation():
  cfg = _cfg()
  layer = _layer(cfg)
  rng = np.random.default_rng(2)
  t = 80
  x = rng.normal(size=(1, t, D)).astype(np.float32)
  seg = np.ones((1, t), np.int32)
  seg[:, 40:] = 2
  base = np.asarray(_call(layer, jnp.asarray(x), None, jnp.asarray(seg)))
  # A future token changes nothing before it.
  x2 = x.copy()
  x2[:, 70] += 5.0
  out = np.asarray(_call(layer, jnp.asarray(x2), None, jnp.asarray(seg)))
  np.testing.assert_array_equal(out[:, :70], base[:, :70])
  assert np.abs(out[:, 70:] - base[:, 70:]).max() > 1e-3
  # Changing the first document leaves the second unchanged (the state and
  # the convolution both stop at the boundary), up to float rounding: the
  # chunk's cumulative log-decay runs through both documents, so its rounding
  # (float32 at |g| ~ 100s) depends on the first one.
  x3 = x.copy()
  x3[:, 10:40] += 3.0
  out = np.asarray(_call(layer, jnp.asarray(x3), None, jnp.asarray(seg)))
  np.testing.assert_allclose(out[:, 40:], base[:, 40:], atol=1e-4, rtol=0)
  # And the second document alone gives the same outputs as packed.
  alone = np.asarray(_call(layer, jnp.asarray(x[:, 40:]), None, None))
  np.testing.assert_allclose(alone, base[:, 40:], atol=1e-4, rtol=0)


def test_gradients_match_the_recurrences():
  # jax.grad of the chunked form equals jax.grad of the plain recurrence
  # (a scan of `recurrent_step`), with a segment boundary inside.
  rng = np.random.default_rng(3)
  t = 70
  q, k, v, alpha, beta = (jnp.asarray(a, jnp.float32) for a in _random_inputs(rng, 1, t))
  la = jnp.log(alpha)
  seg = jnp.asarray(np.r_[np.ones(25), 2 * np.ones(t - 25)][None].astype(np.int32))
  w = jnp.asarray(rng.normal(size=(1, t, N, DV)), jnp.float32)

  def chunked(q, k, v, la, beta):
    return jnp.sum(w * gdn.chunked_delta_rule(q, k, v, la, beta, seg)[0])

  def recurrent(q, k, v, la, beta):
    reset = jnp.concatenate([jnp.zeros((1, 1), bool), seg[:, 1:] != seg[:, :-1]], 1)

    def step(h, xs):
      qj, kj, vj, laj, bj, rj = xs
      h = jnp.where(rj[:, None, None, None], 0.0, h)
      o, h = gdn.recurrent_step(h, qj, kj, vj, jnp.exp(laj), bj)
      return h, o
    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, la, beta, reset))
    _, o = jax.lax.scan(step, jnp.zeros((1, N, DK, DV)), xs)
    return jnp.sum(w * jnp.moveaxis(o, 0, 1))

  args = (q, k, v, la, beta)
  g1 = jax.jit(jax.grad(chunked, argnums=(0, 1, 2, 3, 4)))(*args)
  g2 = jax.jit(jax.grad(recurrent, argnums=(0, 1, 2, 3, 4)))(*args)
  for a, b_ in zip(g1, g2):
    assert np.all(np.isfinite(np.asarray(a)))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=2e-4 * np.abs(b_).max())


def _tiny_hybrid(pattern='LA', seed=1, extra=()):
  cfg = configs.load('configs/llama.py:tiny', [
      'model.vocab_size=64', 'model.d_model=32', 'model.num_heads=4', 'model.d_ff=64',
      'model.max_seq_len=64', 'train.seq_len=16', f'model.layer_pattern={pattern}',
      'model.gdn_head_dim=8', 'model.num_layers=2', *extra])
  decoder = model_lib.Decoder(cfg.model, rngs=nnx.Rngs(seed))
  for _, var in nnx.to_flat_state(nnx.state(decoder, nnx.Param)):
    if var.get_value().ndim > 1:
      var.set_value(var.get_value() * 8.0)
  return cfg, decoder


def test_hybrid_decoder_layers_and_training_steps():
  import optax
  cfg, decoder = _tiny_hybrid('LA')
  assert isinstance(decoder.blocks[0].attn, gdn.GatedDeltaNet)
  assert not isinstance(decoder.blocks[1].attn, gdn.GatedDeltaNet)
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(decoder, nnx.Param)))
  assert n_params == flops.count_params(cfg.model)
  graph, params = nnx.split(decoder, nnx.Param)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 64, size=(2, 17)), jnp.int32)
  seg = jnp.asarray(np.r_[np.ones(9), 2 * np.ones(7)][None].repeat(2, 0).astype(np.int32))
  opt = optax.adam(1e-3)
  opt_state = opt.init(params)

  @jax.jit
  def train_step(params, opt_state):
    def loss_fn(p):
      logits = nnx.merge(graph, p)(tokens[:, :-1], seg)[0]
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  for _ in range(3):
    params, opt_state, loss, grads = train_step(params, opt_state)
    assert np.isfinite(float(loss))
  gdn_grads = jax.tree.leaves(grads['blocks'][0]['attn'])
  assert all(np.all(np.isfinite(np.asarray(g))) for g in gdn_grads)
  assert any(np.abs(np.asarray(g)).max() > 0 for g in gdn_grads)


def test_cached_sampling_equals_the_full_forward_at_every_step():
  # Prefill (two left-padded prompts: padding must not reach the state or
  # the conv buffer) then cached steps; at each step the logits equal the
  # plain decoder's on the sequence so far.
  # The short prompt (2 tokens) is under the conv's 3 kept inputs.
  cfg, decoder = _tiny_hybrid('LA', extra=['model.num_layers=3'])
  prompts = [[5, 17], [9, 2, 60, 33, 41, 7, 12]]
  got = sample.generate(decoder, cfg.model, prompts, max_new_tokens=6, full_output=True)
  graph, state = nnx.split(decoder)
  forward = jax.jit(lambda tokens: nnx.merge(graph, state)(tokens)[0])
  width = 7 + 6
  for s in range(6):
    for i, (p, new) in enumerate(zip(prompts, got.tokens)):
      seq = p + new[:s]
      buf = np.zeros((1, width), np.int32)
      buf[0, :len(seq)] = seq
      want = np.asarray(forward(jnp.asarray(buf)))[0, len(seq) - 1]
      np.testing.assert_allclose(got.logits[i, s], want, rtol=0,
                                 atol=1e-4 * np.abs(want).max())
  assert all(len(set(new)) > 1 for new in got.tokens)
  # The GDN layers keep a constant-size recurrent cache.
  layer_cache = got.cache[0]
  assert isinstance(layer_cache, kv_cache.RecurrentCache)
  assert layer_cache.state.shape == (2, 4, 8, 8)
  assert layer_cache.conv.shape == (2, 3, 4 * (8 + 8 + 8))


def test_counts_by_hand():
  cfg = _cfg('model.layer_pattern=L')
  # W_q, W_k: 16x2x8 each; W_v: 16x2x6; conv: 4 x 2(8+8+6); W_a, W_b: 16x2
  # each; A_log, dt_bias: 2 each; W_g: 16x2x6; norm scale 6; W_o: 2x6x16.
  hand = 256 + 256 + 192 + 176 + 32 + 32 + 2 + 2 + 192 + 6 + 192
  assert gdn.gdn_params(cfg) == hand
  layer = gdn.GatedDeltaNet(cfg, rngs=nnx.Rngs(0))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(layer, nnx.Param))) == hand


def test_layer_pattern_is_checked():
  for bad in ('LAX', 'la', 'A L'):
    with pytest.raises(configs.UserError, match='model.layer_pattern'):
      _cfg(f'model.layer_pattern={bad}')
  with pytest.raises(configs.UserError, match='num_memory_tokens'):
    _cfg('model.layer_pattern=LA', 'model.num_memory_tokens=2')


def test_flops_per_token_by_hand():
  cfg = _cfg('model.layer_pattern=L', 'model.num_layers=1')
  # Projections: W_q, W_k, W_v 16x2x(8+8+6) = 704, W_a + W_b 64, W_g 192,
  # W_o 192 -> 1152; gated MLP 3x16x32 = 1536; 2 FLOPs per weight.
  proj = 2 * (1152 + 1536)
  # Chunked delta rule per token and head, chunk c = 64 (seq 128): k k^T and
  # q k^T 4 c dk = 2048, the solve and the two products with (q k^T)
  # 3 c (dv + dk) = 2688, the three state matmuls 6 dk dv = 288; 2 heads.
  mixing = 2 * (2048 + 2688 + 288)
  head = 2 * 16 * 64
  assert flops.flops_per_token(cfg, 128) == 3 * (proj + mixing + head)


def test_padding_columns_leave_the_cache_alone():
  # A cached call whose column is padding (token index -1) for row 0 leaves
  # row 0's state and conv buffer as they were; row 1's change.
  cfg = _cfg('model.layer_pattern=L')
  layer = _layer(cfg)
  rng = np.random.default_rng(4)
  cache = layer.init_cache(2, 8)
  cache = cache.replace(state=jnp.asarray(rng.normal(size=cache.state.shape), jnp.float32),
                        conv=jnp.asarray(rng.normal(size=cache.conv.shape), jnp.float32))
  x = jnp.asarray(rng.normal(size=(2, 1, D)), jnp.float32)
  chunk = kv_cache.Chunk(jnp.asarray([[-1], [5]], jnp.int32))
  _, new = _call(layer, x, None, None, cache=cache, chunk=chunk)
  np.testing.assert_array_equal(np.asarray(new.state[0]), np.asarray(cache.state[0]))
  np.testing.assert_array_equal(np.asarray(new.conv[0]), np.asarray(cache.conv[0]))
  assert np.abs(np.asarray(new.state[1] - cache.state[1])).max() > 1e-3
  assert np.abs(np.asarray(new.conv[1] - cache.conv[1])).max() > 1e-3


def test_qwen3_next_preset_builds_and_counts():
  cfg = configs.load('configs/qwen3_next.py:tiny', ['model.num_layers=4'])
  assert cfg.model.layer_pattern == 'LLLA'
  decoder = model_lib.Decoder(cfg.model, rngs=nnx.Rngs(0))
  kinds = [isinstance(b.attn, gdn.GatedDeltaNet) for b in decoder.blocks]
  assert kinds == [True, True, True, False]
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(decoder, nnx.Param)))
  assert n_params == flops.count_params(cfg.model)
  graph, state = nnx.split(decoder)
  logits = jax.jit(lambda t: nnx.merge(graph, state)(t)[0])(jnp.ones((1, 8), jnp.int32))
  assert np.all(np.isfinite(np.asarray(logits)))


def test_stats_count_the_recurrent_state_once_whatever_the_length():
  # --stats: a Gated DeltaNet layer adds nothing per token; its state
  # (b x heads x dk x dv float32) and conv buffer (b x (width - 1) x q|k|v
  # channels) are counted once, the same for a short and a long generation.
  cfg, decoder = _tiny_hybrid('LA')
  prompts = [[5, 17], [9, 2, 60]]
  heads, dk, dv = 4, 8, 8                      # gdn defaults: d_model / head_dim heads
  recurrent = 2 * heads * dk * dv * 4 + 2 * (4 - 1) * heads * (dk + dk + dv) * 4
  per_token = model_lib.cache_numbers_per_token(cfg.model) * 4     # the one A layer
  for new in (3, 9):
    gen = sample.generate(decoder, cfg.model, prompts, max_new_tokens=new, full_output=True)
    st = sample.cache_stats(gen.cache)
    slots = gen.cache[1].ring.size
    assert st.bytes_per_token == per_token
    assert st.total_bytes == recurrent + 2 * slots * per_token
    assert f'{recurrent} bytes of recurrent state' in sample.stats_lines(cfg.model, gen)
