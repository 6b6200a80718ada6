"""Gated attention and learned attention sinks (docs/attention.md).

References are written from the definitions, in NumPy float64:
- gate (Qiu et al. 2025): Y = SDPA(Q, K, V) * sigmoid(X W_g), with W_g [d, n]
  (one gate per head) or [d, n, h] (one per channel), before W_O;
- sinks (GPT-OSS): p_j = exp(l_j) / (exp(s) + sum_k exp(l_k)) with a learned s
  per head and no value, so dY/ds = -p_sink * Y.
Then the invariants every attention layer keeps (causality, packed documents),
the exact parameter count, and the KV-cache sampler against the full forward.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
import model
from model import attention as attention_lib
from model import attention_core
from model import hf
from train import sample

SMALL = ['model.vocab_size=64', 'model.d_model=32', 'model.num_heads=4',
         'model.num_kv_heads=2', 'model.d_ff=64', 'model.max_seq_len=64',
         'train.seq_len=16']


def _cfg(overrides):
  return configs.load('configs/llama.py:tiny', SMALL + list(overrides))


def _randomise(module, seed, scale=1.0):
  """Every parameter drawn N(0, 1) / sqrt(fan-in) (vectors N(0, 1)) times scale."""
  rng = np.random.RandomState(seed)
  for _, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    x = var.get_value()
    fan_in = x.shape[0] if x.ndim > 1 else 1
    var.set_value(jnp.asarray(scale * rng.normal(size=x.shape) / np.sqrt(fan_in), x.dtype))


def np_layer(p, x, seg, gate, num_kv):
  """One attention layer, position 'none', from the equations; x [t, d] float64."""
  q = np.einsum('td,dnh->tnh', x, p['wq'])
  k = np.einsum('td,dkh->tkh', x, p['wk'])
  v = np.einsum('td,dkh->tkh', x, p['wv'])
  t, n, h = q.shape
  k, v = np.repeat(k, n // num_kv, axis=1), np.repeat(v, n // num_kv, axis=1)
  logits = np.einsum('qnh,knh->nqk', q, k) / np.sqrt(h)
  visible = np.array([[j <= i and seg[i] == seg[j] for j in range(t)] for i in range(t)])
  e = np.where(visible, np.exp(logits), 0.0)            # small logits: no max shift needed
  denom = e.sum(-1, keepdims=True)
  if 'sinks' in p:
    denom = denom + np.exp(p['sinks'])[:, None, None]    # the null key: in Z, no value
  probs = e / denom
  y = np.einsum('nqk,knh->qnh', probs, v)                 # [t, n, h]
  if gate == 'headwise':
    y = y * (1 / (1 + np.exp(-np.einsum('td,dn->tn', x, p['wg']))))[..., None]
  elif gate == 'elementwise':
    y = y * (1 / (1 + np.exp(-np.einsum('td,dnh->tnh', x, p['wg']))))
  p_sink = None
  if 'sinks' in p:
    p_sink = (np.exp(p['sinks'])[:, None] / denom[..., 0]).T   # [t, n]
  return np.einsum('tnh,nhd->td', y, p['wo']), y, p_sink


LAYER_CASES = {
    'headwise': ['model.attention_gate=headwise'],
    'elementwise': ['model.attention_gate=elementwise'],
    'sinks': ['model.attention_sinks=True'],
    'elementwise_sinks': ['model.attention_gate=elementwise', 'model.attention_sinks=True'],
}
SEG = np.array([[1] * 5 + [2] * 4, [1] * 9])


@pytest.mark.parametrize('case', sorted(LAYER_CASES))
def test_layer_matches_numpy_definition(case):
  cfg = _cfg(['model.position=none'] + LAYER_CASES[case]).model
  layer = attention_lib.Attention(cfg, rngs=nnx.Rngs(0))
  _randomise(layer, seed=3)
  x = np.random.RandomState(4).normal(size=(2, 9, 32))
  got = layer(jnp.asarray(x, jnp.float32), None, jnp.asarray(SEG))
  p = {k: np.asarray(v, np.float64) for k, v in nnx.to_pure_dict(nnx.state(layer, nnx.Param)).items()}
  for row in range(2):
    want, _, _ = np_layer(p, x[row], SEG[row], cfg.attention_gate, cfg.num_kv_heads)
    np.testing.assert_allclose(got[row], want, rtol=1e-5, atol=1e-5)


def test_sink_logit_gradient_matches_the_definition():
  # L = sum(c * Y) with Y the pre-W_O output: dL/ds_n = -sum_t p_sink[t, n] (c . Y)[t, n].
  cfg = _cfg(['model.position=none', 'model.attention_sinks=True']).model
  layer = attention_lib.Attention(cfg, rngs=nnx.Rngs(0))
  _randomise(layer, seed=5)
  x = np.random.RandomState(6).normal(size=(1, 9, 32))
  c = np.random.RandomState(7).normal(size=(1, 9, 4, 8))
  q, k, v = layer.project(jnp.asarray(x, jnp.float32), None)

  def loss(sinks):
    y = attention_core.dot_product_attention(q, k, v, impl='xla', sink_logits=sinks,
                                             segment_ids=jnp.asarray(SEG[:1]))
    return jnp.sum(jnp.asarray(c, jnp.float32) * y)

  grad = jax.grad(loss)(layer.sink_logits())
  p = {k: np.asarray(v, np.float64) for k, v in nnx.to_pure_dict(nnx.state(layer, nnx.Param)).items()}
  _, y, p_sink = np_layer(p, x[0], SEG[0], 'none', 2)
  want = -np.einsum('tn,tnh->n', p_sink, c[0] * y)
  assert np.abs(want).min() > 1e-3      # every head's sink matters
  np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6)


@jax.jit
def _jit_forward(graphdef, state, tokens, seg):
  return nnx.merge(graphdef, state)(tokens, segment_ids=seg)[0]


def _forward(decoder, tokens, seg=None):
  as_int = lambda a: None if a is None else jnp.asarray(a, jnp.int32)
  return np.asarray(_jit_forward(*nnx.split(decoder), as_int(tokens), as_int(seg)))


VARIANTS = ['model.attention_gate=elementwise', 'model.attention_sinks=True']


def test_causality_and_document_isolation_with_gate_and_sinks():
  cfg = _cfg(VARIANTS + ['model.num_layers=2'])
  decoder = model.Decoder(cfg.model, rngs=nnx.Rngs(1))
  _randomise(decoder, seed=2, scale=2.0)
  tokens = np.random.RandomState(0).randint(0, 64, (1, 12))
  one = np.ones((1, 12))                  # one document; every call has one shape
  base = _forward(decoder, tokens, one)
  for t in (3, 8):
    changed = tokens.copy()
    changed[0, t] = (changed[0, t] + 5) % 64
    out = _forward(decoder, changed, one)
    np.testing.assert_allclose(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
    assert np.abs(out[:, t] - base[:, t]).max() > 1e-3
  seg = np.array([[1] * 5 + [2] * 7])
  packed = _forward(decoder, tokens, seg)
  other = tokens.copy()
  other[0, :5] = (other[0, :5] + 11) % 64
  np.testing.assert_allclose(_forward(decoder, other, seg)[:, 5:], packed[:, 5:],
                             rtol=0, atol=1e-6)
  # The second document alone at the start of a row (then padding) gives the
  # same logits.
  alone = _forward(decoder, np.concatenate([tokens[:, 5:], tokens[:, :5]], axis=1),
                   np.array([[1] * 7 + [0] * 5]))
  np.testing.assert_allclose(packed[:, 5:], alone[:, :7], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('gate', ['none', 'headwise', 'elementwise'])
def test_count_params_is_exact(gate):
  cfg = _cfg([f'model.attention_gate={gate}', 'model.attention_sinks=True']).model
  abstract = nnx.eval_shape(lambda: model.Decoder(cfg, rngs=nnx.Rngs(0)))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert n == model.count_params(cfg)


def test_cached_greedy_sampling_equals_the_full_forward():
  # The gate reads only the current token's input and the sink is a per-head
  # constant, so the KV cache path must reproduce the full forward.
  cfg = _cfg(VARIANTS + ['model.sliding_window=6'])
  decoder = model.Decoder(cfg.model, rngs=nnx.Rngs(1))
  _randomise(decoder, seed=9, scale=4.0)
  prompts = [[3, 9, 27, 17], [5, 1, 44, 8, 30, 2, 61]]
  n = 12
  got = sample.generate(decoder, cfg.model, prompts, max_new_tokens=n, full_output=True)
  graphdef, state = nnx.split(decoder)
  # Right-padded to one width, so one compiled forward serves every step
  # (causal: logits at a position ignore later tokens).
  full = jax.jit(lambda tokens: nnx.merge(graphdef, state)(tokens)[0])
  width = max(map(len, prompts)) + n
  seqs = [list(p) for p in prompts]
  for step in range(n):
    buf = np.zeros((2, width), np.int32)
    for row, s in enumerate(seqs):
      buf[row, :len(s)] = s
    out = np.asarray(full(jnp.asarray(buf)))
    for row, s in enumerate(seqs):
      logits = out[row, len(s) - 1]
      # float32 with weights at 4x their init scale (logits up to ~30): the
      # cached and full paths sum in different orders; jax 0.12's CPU backend
      # rounds them 4.5e-5 apart (relative to the largest logit), jax 0.10.2
      # under 2e-5. The greedy tokens below must still be identical.
      np.testing.assert_allclose(got.logits[row, step], logits, rtol=0,
                                 atol=1e-4 * np.abs(logits).max())
      s.append(int(np.argmax(logits)))
  assert [s[len(p):] for s, p in zip(seqs, prompts)] == got.tokens
  assert all(len(set(new)) > 2 for new in got.tokens)


def test_unsupported_combinations_are_user_errors():
  with pytest.raises(configs.ConfigError, match='attention_impl=.cudnn. has no attention-sink'):
    _cfg(['model.attention_sinks=True', 'model.attention_impl=cudnn'])
  with pytest.raises(configs.ConfigError, match='attention_gate=.sigmoid.: must be one of'):
    _cfg(['model.attention_gate=sigmoid'])
  # A llama with one variant flag has no exported HF family: the export that
  # the flag selects (GPT-OSS for sinks, Qwen3-Next for the elementwise
  # gate) or the generic one refuses, naming the field that does not fit.
  for flag in VARIANTS:
    with pytest.raises(hf.HFError, match=r'model\.\w+=.*no Hugging Face counterpart'):
      hf.model_config_to_hf(_cfg([flag]).model)


# ---------------------------------------------------------------------------
# The Pallas kernels with sinks, in interpret mode, against the XLA reference.


@pytest.mark.parametrize('backend', ['gpu_triton', 'tpu_mosaic'])
def test_flash_kernels_with_sinks_equal_the_reference(backend):
  # GQA, packed segments with padding, a window: forward and every gradient,
  # the sink logits' included. Large sinks (up to 3) so that they matter.
  from jax.experimental.pallas import tpu as pltpu   # pylint: disable=import-outside-toplevel
  from model.kernels import flash                    # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(11)
  b, t, n, kvh, h = 2, 128, 4, 2, 64
  q, do = (jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32) for _ in range(2))
  k, v = (jnp.asarray(rng.standard_normal((b, t, kvh, h)), jnp.float32) for _ in range(2))
  sinks = jnp.asarray([-1.0, 0.5, 2.0, 3.0], jnp.float32)
  seg = np.ones((b, t), np.int32)
  seg[0, 50:] = 2
  seg[0, 120:] = 0
  kwargs = dict(segment_ids=jnp.asarray(seg), causal=True, sliding_window=40)
  if backend == 'gpu_triton':
    blocks = dict(block_q=32, block_kv=32, interpret=True)
  else:
    blocks = dict(block_q=128, block_kv=128, interpret=pltpu.InterpretParams())

  def run(fn):
    @jax.jit
    def go(q, k, v, s):
      out, vjp = jax.vjp(fn, q, k, v, s)
      return (out, *vjp(do))
    return go(q, k, v, sinks)

  got = run(lambda q, k, v, s: flash.attention(q, k, v, backend=backend, sink_logits=s,
                                               **blocks, **kwargs))
  want = run(lambda q, k, v, s: attention_core.reference_attention(q, k, v, sink_logits=s,
                                                                   **kwargs))
  for name, a, e in zip(('out', 'dq', 'dk', 'dv', 'dsinks'), got, want):
    a, e = np.asarray(a), np.asarray(e)
    assert np.isfinite(a).all(), name
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4 * np.abs(e).max(), err_msg=name)
  assert np.abs(np.asarray(want[4])).min() > 1e-2   # the sink gradient is not trivially 0


def test_decoder_with_sinks_and_gate_has_the_same_gradients_with_pallas():
  # attention_impl is a performance switch: the kernel path (interpret mode on
  # CPU) gives the XLA path's loss and gradients, the sink logits' included.
  tokens = jnp.asarray(np.random.RandomState(3).randint(0, 64, (2, 16)), jnp.int32)
  seg = jnp.asarray([[1] * 6 + [2] * 10, [1] * 13 + [0] * 3], jnp.int32)

  def loss_and_grads(impl):
    cfg = _cfg(VARIANTS + ['model.sliding_window=8', f'model.attention_impl={impl}'])
    decoder = model.Decoder(cfg.model, rngs=nnx.Rngs(1))
    _randomise(decoder, seed=2, scale=2.0)
    graphdef, params, rest = nnx.split(decoder, nnx.Param, ...)

    def loss(params):
      logits = nnx.merge(graphdef, params, rest)(tokens, segment_ids=seg)[0]
      return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
          logits, jnp.roll(tokens, -1, axis=1)[..., None], -1)[..., 0])
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return value, nnx.to_flat_state(grads)

  want_loss, want = loss_and_grads('xla')
  got_loss, got = loss_and_grads('pallas')
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  names = [path for path, _ in want]
  assert any(path[-1] == 'sinks' for path in names)
  for (path, e), (_, a) in zip(want, got):
    e, a = np.asarray(e.get_value()), np.asarray(a.get_value())
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4 * np.abs(e).max(), err_msg=str(path))
