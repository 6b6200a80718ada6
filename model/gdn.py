"""Gated DeltaNet: a linear-attention layer with a gated delta-rule state.

Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks: Improving Mamba2 with
Delta Rule"; the layer's structure (short convolutions, decay and write-gate
projections, gated RMSNorm on the output) follows Qwen3-Next's linear layers.
Selected per layer by `model.layer_pattern` (`L` letters; see
`model.mla.attention_class`), with the same call signature as
`model.attention.Attention` so `model.decoder.Block` holds either.

Per head, with k_t, q_t in R^dk (L2-normalised, q scaled by 1/sqrt(dk)) and
v_t in R^dv, the state S_t in R^{dv x dk} follows the gated delta rule

    S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,   o_t = S_t q_t

with alpha_t = exp(-exp(A_log) softplus(x_t W_a + dt_bias)) in (0, 1) (the
decay, Mamba2's parameterisation) and beta_t = sigmoid(x_t W_b) (the write
strength). q, k, v come from x through a causal depthwise convolution of width
`gdn_conv_width` and SiLU; the output is RMSNorm(o) * SiLU(x W_g), projected
back to d_model.

Training runs the chunked form (chunk 64): inside a chunk the delta rule's
triangular system is solved at once (the WY / UT-transform form: a unit
lower-triangular solve), and a scan over chunks carries the state. The code
keeps the state transposed, H = S^T in [dk, dv], so that o = H^T q. Packed
documents (`segment_ids`) reset the state and the convolution at every
segment boundary.

Value heads (`gdn_num_v_heads`, Qwen3-Next: twice the q/k heads): with n_v =
r n q/k heads, q/k head j serves the r consecutive value heads j r .. j r + r - 1;
each value head has its own v, state, decay, write strength and output gate,
and q, k are repeated to the n_v heads before the delta rule.

Decoding keeps a `model.kv_cache.RecurrentCache` per layer (the state and the
last conv_width - 1 conv inputs): constant memory whatever the length.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from model import kv_cache as kv_cache_lib
from model import mlp as mlp_lib
from model import mup
from model import norms

CHUNK = 64


def dims(cfg_model):
  """(q/k heads, dk, dv, conv_width) of a GDN layer."""
  n = cfg_model.gdn_num_heads or cfg_model.num_heads
  dk = cfg_model.gdn_head_dim or cfg_model.d_model // n
  dv = cfg_model.gdn_v_head_dim or dk
  return n, dk, dv, cfg_model.gdn_conv_width


def num_v_heads(cfg_model) -> int:
  """Value heads of a GDN layer (`gdn_num_v_heads`; None: the q/k heads)."""
  return cfg_model.get('gdn_num_v_heads') or dims(cfg_model)[0]


def _l2norm(x, eps=1e-6):
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)


def causal_conv(x, w, segment_ids=None):
  """Depthwise causal convolution over time, not crossing segment boundaries.

  x [b, t, c], w [K, c]: out_t = sum_i w[i] x_{t-K+1+i}, where a term from
  another segment (or before the start) is zero.
  """
  kw = w.shape[0]
  out = x * w[kw - 1]
  for j in range(1, kw):
    shifted = jnp.pad(x, ((0, 0), (j, 0), (0, 0)))[:, :-j]
    if segment_ids is not None:
      seg_shifted = jnp.pad(segment_ids, ((0, 0), (j, 0)), constant_values=-1)[:, :-j]
      shifted = shifted * (seg_shifted == segment_ids)[..., None].astype(x.dtype)
    out = out + shifted * w[kw - 1 - j]
  return out


def unit_lower_inverse(a):
  """(I + a)^-1 for strictly lower-triangular a [..., c, c].

  Block inversion by doubling, [[P, 0], [R, Q]]^-1 = [[P^-1, 0],
  [-Q^-1 R P^-1, Q^-1]], from 1 x 1 blocks up: matmuls only. Not
  `lax.linalg.triangular_solve`, whose LAPACK call on CPU parallelises over
  the batch on XLA's intra-op pool and can deadlock there when two run at once
  (seen on a 2-core machine: both pool threads waiting inside `strsm`).
  """
  c = a.shape[-1]
  if c & (c - 1):                                         # pad to a power of two with I
    pad = (1 << c.bit_length()) - c
    a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, pad), (0, pad)])
    return unit_lower_inverse(a)[..., :c, :c]
  lead = a.shape[:-2]
  inv = jnp.ones((*lead, c, 1, 1), a.dtype)             # inverses of the 1 x 1 diagonal blocks
  s = 1
  while s < c:
    m = c // (2 * s)
    blocks = a.reshape(*lead, m, 2 * s, m, 2 * s)
    blocks = jnp.moveaxis(jnp.diagonal(blocks, axis1=-4, axis2=-2), -1, -3)  # [.., m, 2s, 2s]
    r = blocks[..., s:, :s]                               # [.., m, s, s]: the block under P
    p_inv, q_inv = inv[..., 0::2, :, :], inv[..., 1::2, :, :]
    low = -jnp.einsum('...ab,...bc,...cd->...ad', q_inv, r, p_inv)
    top = jnp.concatenate([p_inv, jnp.zeros_like(p_inv)], axis=-1)
    inv = jnp.concatenate([top, jnp.concatenate([low, q_inv], axis=-1)], axis=-2)
    s *= 2
  return inv[..., 0, :, :]


def chunked_delta_rule(q, k, v, log_alpha, beta, segment_ids=None, initial_state=None,
                       chunk=CHUNK):
  """The gated delta rule over a sequence, chunk by chunk (float32).

  q, k [b, t, n, dk]; v [b, t, n, dv]; log_alpha, beta [b, t, n];
  segment_ids int [b, t] or None; initial_state [b, n, dk, dv] (H = S^T) or
  None. Returns (o [b, t, n, dv], final state [b, n, dk, dv]).
  """
  f32 = jnp.float32
  q, k, v, log_alpha, beta = (a.astype(f32) for a in (q, k, v, log_alpha, beta))
  b, t, n, dk = k.shape
  dv = v.shape[-1]
  if segment_ids is None:
    segment_ids = jnp.zeros((b, t), jnp.int32)
  # A token starts afresh when its segment differs from its predecessor's.
  reset = jnp.concatenate(
      [jnp.zeros((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  # Pad to whole chunks with tokens that leave the state alone (alpha 1, beta 0).
  pad = (-t) % chunk
  if pad:
    p3 = ((0, 0), (0, pad), (0, 0))
    q, k, v = (jnp.pad(a, p3 + ((0, 0),)) for a in (q, k, v))
    log_alpha, beta = jnp.pad(log_alpha, p3), jnp.pad(beta, p3)
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), mode='edge')
    reset = jnp.pad(reset, ((0, 0), (0, pad)))
  nc = (t + pad) // chunk
  c = chunk

  # [b, nc, c, ...] -> [b, n, nc, c, ...]: heads before chunks.
  def split(a):
    a = a.reshape(b, nc, c, *a.shape[2:])
    return jnp.moveaxis(a, 3, 1) if a.ndim > 3 else a
  q, k, v, log_alpha, beta = (split(a) for a in (q, k, v, log_alpha, beta))
  seg = segment_ids.reshape(b, 1, nc, c)
  reset = reset.reshape(b, 1, nc, c)

  g = jnp.cumsum(log_alpha, axis=-1)                       # [b, n, nc, c]
  same = seg[..., :, None] == seg[..., None, :]            # [b, 1, nc, c, c]
  idx = jnp.arange(c)
  incl = (idx[:, None] >= idx[None, :]) & same             # s <= t, same segment
  strict = (idx[:, None] > idx[None, :]) & same
  diff = g[..., :, None] - g[..., None, :]                 # g_t - g_s
  decay = jnp.where(incl, jnp.exp(jnp.where(incl, diff, 0.0)), 0.0)
  # Tokens that still continue the state carried into the chunk.
  carry = jnp.cumprod(1.0 - reset.astype(f32), axis=-1)    # [b, 1, nc, c]
  gamma = jnp.exp(g) * carry                               # [b, n, nc, c]

  kk = jnp.einsum('bnctk,bncsk->bncts', k, k)
  a = jnp.where(strict, beta[..., :, None] * kk * decay, 0.0)
  # T = (I + A)^-1 applied to [beta v | beta gamma k]: a unit lower-triangular solve.
  rhs = jnp.concatenate([beta[..., None] * v, (beta * gamma)[..., None] * k], axis=-1)
  sol = jnp.einsum('bncts,bncsx->bnctx', unit_lower_inverse(a), rhs)
  u, w = sol[..., :dv], sol[..., dv:]                      # [.., c, dv], [.., c, dk]
  qk = jnp.einsum('bnctk,bncsk->bncts', q, k) * decay
  o_local = jnp.einsum('bncts,bncsv->bnctv', qk, u)
  q_state = gamma[..., None] * q - jnp.einsum('bncts,bncsk->bnctk', qk, w)
  # Decay from each token to the chunk's end, and of the carried state.
  end_decay = jnp.exp(g[..., -1:] - g) * (seg == seg[..., -1:])  # [b, n, nc, c]
  k_end = end_decay[..., None] * k
  state_decay = gamma[..., -1]                             # [b, n, nc]

  if initial_state is None:
    initial_state = jnp.zeros((b, n, dk, dv), f32)

  def step(h, xs):
    w_c, u_c, k_end_c, dec_c = xs
    delta = u_c - jnp.einsum('bnck,bnkv->bncv', w_c, h)
    h_next = dec_c[..., None, None] * h + jnp.einsum('bnck,bncv->bnkv', k_end_c, delta)
    return h_next, h

  xs = tuple(jnp.moveaxis(a, 2, 0) for a in (w, u, k_end, state_decay))
  final, h_in = jax.lax.scan(step, initial_state.astype(f32), xs)
  h_in = jnp.moveaxis(h_in, 0, 2)                          # [b, n, nc, dk, dv]
  o = o_local + jnp.einsum('bnctk,bnckv->bnctv', q_state, h_in)
  o = jnp.moveaxis(o, 1, 3).reshape(b, nc * c, n, dv)[:, :t]
  return o, final


def recurrent_step(h, q, k, v, alpha, beta):
  """One token of the delta rule: H [.., dk, dv], q, k [.., dk], v [.., dv],
  alpha, beta [..] -> (o [.., dv], H')."""
  h = alpha[..., None, None] * h
  pred = jnp.einsum('...kv,...k->...v', h, k)
  h = h + jnp.einsum('...k,...v->...kv', k, beta[..., None] * (v - pred))
  return jnp.einsum('...kv,...k->...v', h, q), h


class GatedDeltaNet(nnx.Module):
  """x [b, t, d] -> [b, t, d]; the call signature of `model.attention.Attention`."""

  def __init__(self, cfg_model, *, sliding_window: int | None = None, rngs: nnx.Rngs):
    del sliding_window                 # a recurrent layer has no window
    d = cfg_model.d_model
    n, dk, dv, kw = dims(cfg_model)
    nv = num_v_heads(cfg_model)
    self.num_heads, self.dk, self.dv, self.conv_width = n, dk, dv, kw
    self.num_v_heads = nv
    self.dtype = jnp.dtype(cfg_model.dtype)
    pdt = jnp.dtype(cfg_model.param_dtype)
    w_in = nnx.initializers.normal(mup.hidden_std(cfg_model, 0.02))
    w_out = nnx.initializers.normal(mup.hidden_std(cfg_model, mlp_lib.out_init_stddev(cfg_model)))
    self.wq = nnx.Param(w_in(rngs.params(), (d, n, dk), pdt),
                        logical_axes=('embed', 'heads', 'head_dim'))
    self.wk = nnx.Param(w_in(rngs.params(), (d, n, dk), pdt),
                        logical_axes=('embed', 'heads', 'head_dim'))
    self.wv = nnx.Param(w_in(rngs.params(), (d, nv, dv), pdt),
                        logical_axes=('embed', 'heads', 'head_dim'))
    # One depthwise filter per q/k/v channel; uniform(+-1/sqrt(K)), PyTorch
    # Conv1d's default, as the reference implementations use.
    self.channels = n * 2 * dk + nv * dv     # the conv runs over q | k | v
    bound = 1.0 / math.sqrt(kw)
    self.conv = nnx.Param(
        jax.random.uniform(rngs.params(), (kw, self.channels), pdt, -bound, bound),
        logical_axes=(None, None))
    self.wa = nnx.Param(w_in(rngs.params(), (d, nv), pdt), logical_axes=('embed', 'heads'))
    self.wb = nnx.Param(w_in(rngs.params(), (d, nv), pdt), logical_axes=('embed', 'heads'))
    # Mamba2's decay init: A in [1, 16], dt log-uniform in [1e-3, 1e-1].
    a = jax.random.uniform(rngs.params(), (nv,), jnp.float32, 1.0, 16.0)
    self.a_log = nnx.Param(jnp.log(a).astype(pdt), logical_axes=('heads',))
    dt = jnp.exp(jax.random.uniform(rngs.params(), (nv,), jnp.float32,
                                    math.log(1e-3), math.log(1e-1)))
    self.dt_bias = nnx.Param((dt + jnp.log(-jnp.expm1(-dt))).astype(pdt),
                             logical_axes=('heads',))
    self.wg = nnx.Param(w_in(rngs.params(), (d, nv, dv), pdt),
                        logical_axes=('embed', 'heads', 'head_dim'))
    # Gated RMSNorm over dv, shared by the heads (Qwen3-Next's norm).
    self.o_norm = norms.RMSNorm(dv, eps=cfg_model.norm_eps, param_dtype=pdt)
    self.wo = nnx.Param(w_out(rngs.params(), (nv, dv, d), pdt),
                        logical_axes=('heads', 'head_dim', 'embed'))

  def _inputs(self, x):
    """The pre-conv q|k|v channels [b, t, 2 n dk + nv dv], log alpha and beta [b, t, nv]."""
    x = x.astype(self.dtype)
    proj = lambda w: jnp.einsum('btd,dnh->btnh', x, w[...].astype(self.dtype))
    b, t, _ = x.shape
    qkv = jnp.concatenate([proj(self.wq).reshape(b, t, -1), proj(self.wk).reshape(b, t, -1),
                           proj(self.wv).reshape(b, t, -1)], axis=-1)
    a = jnp.einsum('btd,dn->btn', x, self.wa[...].astype(self.dtype)).astype(jnp.float32)
    a = a + self.dt_bias[...].astype(jnp.float32)
    log_alpha = -jnp.exp(self.a_log[...].astype(jnp.float32)) * jax.nn.softplus(a)
    beta = jax.nn.sigmoid(
        jnp.einsum('btd,dn->btn', x, self.wb[...].astype(self.dtype)).astype(jnp.float32))
    return qkv, log_alpha, beta

  def _qkv(self, conv_out):
    """Conv outputs [.., 2 n dk + nv dv] -> SiLU, split, L2-normalised q (scaled),
    k, each repeated to the nv value heads; v [.., nv, dv]."""
    y = jax.nn.silu(conv_out.astype(jnp.float32))
    n, dk = self.num_heads, self.dk
    lead = y.shape[:-1]
    q = y[..., :n * dk].reshape(*lead, n, dk)
    k = y[..., n * dk:2 * n * dk].reshape(*lead, n, dk)
    v = y[..., 2 * n * dk:].reshape(*lead, self.num_v_heads, self.dv)
    q, k = _l2norm(q) / math.sqrt(dk), _l2norm(k)
    if self.num_v_heads != n:
      r = self.num_v_heads // n
      q, k = jnp.repeat(q, r, axis=-2), jnp.repeat(k, r, axis=-2)
    return q, k, v

  def output(self, o, x):
    """RMSNorm(o) * SiLU(x W_g), then W_o: o [b, t, nv, dv] -> [b, t, d]."""
    gate = jnp.einsum('btd,dnh->btnh', x.astype(self.dtype), self.wg[...].astype(self.dtype))
    o = self.o_norm(o.astype(jnp.float32)) * jax.nn.silu(gate.astype(jnp.float32))
    return jnp.einsum('btnh,nhd->btd', o.astype(self.dtype), self.wo[...].astype(self.dtype))

  def init_cache(self, batch, length, *, num_memory_tokens=0, streaming=None):
    """An empty `RecurrentCache`; its size does not depend on `length`."""
    del length, num_memory_tokens, streaming
    return kv_cache_lib.RecurrentCache.empty(
        batch, self.num_v_heads, self.dk, self.dv, self.conv_width, self.channels,
        self.dtype)

  def __call__(self, x, positions, segment_ids=None, num_memory_tokens=0, *,
               cache=None, chunk=None):
    """x [b, t, d] -> [b, t, d]; with a cache, (output, updated cache)."""
    del positions, num_memory_tokens   # no positions; memory tokens are refused by configs
    if cache is not None and not chunk.prefill:
      return self._step(x, cache, chunk)
    with jax.named_scope('gdn_in'):
      qkv, log_alpha, beta = self._inputs(x)
      conv = causal_conv(qkv, self.conv[...].astype(self.dtype), segment_ids)
      q, k, v = self._qkv(conv)
    with jax.named_scope('delta_rule'):
      o, state = chunked_delta_rule(q, k, v, log_alpha, beta, segment_ids)
    with jax.named_scope('out'):
      y = self.output(o, x)
    if cache is None:
      return y
    return y, cache.after_prefill(state, qkv, chunk)

  def _step(self, x, cache, chunk):
    """Cached columns one at a time; padding columns (token -1) change nothing."""
    qkv, log_alpha, beta = self._inputs(x)
    w = self.conv[...].astype(jnp.float32)
    valid = chunk.tokens >= 0                                 # [b, c]

    def col(carry, xs):
      h, buf = carry
      xj, la, bt, ok = xs
      window = jnp.concatenate([buf, xj[:, None].astype(buf.dtype)], axis=1)  # [b, K, ch]
      conv = jnp.einsum('bkc,kc->bc', window.astype(jnp.float32), w)
      q, k, v = self._qkv(conv)
      o, h_new = recurrent_step(h, q, k, v, jnp.exp(la), bt)
      h = jnp.where(ok[:, None, None, None], h_new, h)
      buf = jnp.where(ok[:, None, None], window[:, 1:], buf)
      return (h, buf), o

    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (qkv, log_alpha, beta, valid))
    (h, buf), o = jax.lax.scan(col, (cache.state, cache.conv), xs)
    o = jnp.moveaxis(o, 0, 1)                                 # [b, c, nv, dv]
    return self.output(o, x), cache.replace(state=h, conv=buf)


def gdn_params(cfg_model) -> int:
  """Parameter count of one `GatedDeltaNet` (for `model.flops`)."""
  d = cfg_model.d_model
  n, dk, dv, kw = dims(cfg_model)
  nv = num_v_heads(cfg_model)
  return (d * (2 * n * dk + nv * dv)     # W_q, W_k, W_v
          + kw * (2 * n * dk + nv * dv)  # depthwise conv
          + 2 * d * nv + 2 * nv          # W_a, W_b, A_log, dt_bias
          + d * nv * dv + dv             # W_g, the gated norm's scale
          + nv * dv * d)                 # W_o


def gdn_matmul_weights(cfg_model) -> int:
  """Weights one position multiplies through in the projections of a GDN layer."""
  d = cfg_model.d_model
  n, dk, dv, _ = dims(cfg_model)
  nv = num_v_heads(cfg_model)
  return d * (2 * n * dk + nv * dv) + 2 * d * nv + d * nv * dv + nv * dv * d


def gdn_mixing_flops(cfg_model, seq_len: int, chunk: int = CHUNK) -> float:
  """Forward FLOPs per token of the chunked delta rule (matmuls only).

  Per chunk of c tokens and head: k k^T and q k^T (2 c^2 dk each), the
  triangular solve on [v | k] (c^2 (dv + dk)), (q k^T) u and (q k^T) w
  (2 c^2 (dv + dk)), and against the carried state: w h, q h and the state
  update k^T delta (2 c dk dv each). Divided by c: per token.
  """
  _, dk, dv, _ = dims(cfg_model)
  n = num_v_heads(cfg_model)           # the rule runs per value head
  c = min(chunk, seq_len)
  per_chunk = 4 * c * c * dk + c * c * (dv + dk) + 2 * c * c * (dv + dk) + 6 * c * dk * dv
  return n * per_chunk / c
