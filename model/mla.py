"""Multi-head latent attention (MLA; DeepSeek-AI 2024, "DeepSeek-V2", section 2.1).

`model.attention_type='mla'` puts `MLAttention` in every block instead of
`model.attention.Attention`. With x [b, t, d] a layer's input, n heads, the
latent rank r = `mla_kv_lora_rank`, query rank r_q = `mla_q_lora_rank`, and
head dims d_n = `mla_qk_nope_head_dim`, d_r = `mla_qk_rope_head_dim`,
d_v = `mla_v_head_dim`:

  queries   c_q = norm(x W_dq)  [b, t, r_q]        (r_q = 0: no compression,
            q   = c_q W_uq      [b, t, n, d_n + d_r]     q = x W_q)
  keys and  [c_kv, k_r] = x W_dkv   [b, t, r + d_r]
  values    c_kv = norm(c_kv);  k_n = c_kv W_uk [b, t, n, d_n];  v = c_kv W_uv [b, t, n, d_v]
  rope      q_r = RoPE(q[..., d_n:]),  k_r = RoPE(k_r) (one rope key shared by all heads)
  attention o_i = softmax_j(scale (q_n,i . k_n,j + q_r,i . k_r,j)) v_j,
            o W_o with W_o [n, d_v, d]

The softmax scale is 1/sqrt(d_n + d_r) (or `attn_scale`, or muP's), times
YaRN's attention factor squared when `rope_scaling` is yarn: standard
attention gets that factor through its rotated q and k, but here only the rope
part is rotated, so DeepSeek (and this module) put mscale^2 on the whole
logit instead and rotate with unscaled cos/sin.

RoPE layout: `model.positions.apply_rope`'s half-split pairs (feature i with
i + d_r/2), as every other ablax layer. DeepSeek's checkpoints are trained
with interleaved pairs (2i, 2i+1); an importer must permute the rope columns
of W_uq (per head) and of W_dkv's last d_r outputs by [0, 2, 4, ..., 1, 3,
5, ...] to run them here (transformers' `rope_interleave` does the same
permutation on the activations).

What the rest of attention does is inherited from `Attention`: the attention
call (`attend`: sliding window, segment ids, memory tokens, soft-cap, ALiBi,
sinks, xla or pallas with a q/k head dim d_n + d_r different from d_v), the
output gate and the output projection. The KV-cache form of the paper
(section 2.1.2, "weight absorption") is `latent` + `absorbed_attend`: the
cache holds c_kv and the rotated k_r only (r + d_r numbers per token per
layer), W_uk is absorbed into the query and W_uv into the output, which makes
decode an MQA of head dim r + d_r over values of dim r. `init_cache` gives
`train.sample` that cache (`model.kv_cache.LatentCache`): a prefill runs the
naive form over its own columns and writes c_kv and k_r, each decode step
runs `absorbed_attend` over the cache.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from model import attention as attention_lib
from model import attention_core
from model import differential
from model import kv_cache as kv_cache_lib
from model import gdn
from model import masking
from model import mlp as mlp_lib
from model import mup
from model import norms
from model import positions as positions_lib


def yarn_mscale(cfg_model) -> float:
  """YaRN's attention factor (1.0 without yarn scaling) for an MLA layer."""
  scaling = cfg_model.rope_scaling
  if cfg_model.position != 'rope' or scaling is None or scaling.get('type') != 'yarn':
    return 1.0
  return positions_lib.rope_inv_freq(cfg_model.mla_qk_rope_head_dim, cfg_model.rope_theta,
                                     dict(scaling))[1]


def softmax_scale(cfg_model) -> float:
  """1/sqrt(d_n + d_r) (or `attn_scale`, or muP's) times YaRN's mscale^2."""
  dqk = cfg_model.mla_qk_nope_head_dim + cfg_model.mla_qk_rope_head_dim
  scale = mup.attention_scale(cfg_model, dqk)
  scale = dqk ** -0.5 if scale is None else scale
  return float(scale * yarn_mscale(cfg_model) ** 2)


class MLAttention(attention_lib.Attention):
  """x [b, t, d] -> [b, t, d]; the call signature and `attend`/`output` of `Attention`.

  `project` returns q, k [b, t, n, d_n + d_r] (k's rope part the same for every
  head) and v [b, t, n, d_v], so every consumer of `Attention.project` (the
  attention kernels, a KV cache of per-head keys) sees ordinary MHA with a
  value head dim of its own.
  """

  # pylint: disable=super-init-not-called
  def __init__(self, cfg_model, *, sliding_window: int | None = None, rngs: nnx.Rngs):
    d, n = cfg_model.d_model, cfg_model.num_heads
    r_q, r = cfg_model.mla_q_lora_rank, cfg_model.mla_kv_lora_rank
    d_n, d_r, d_v = (cfg_model.mla_qk_nope_head_dim, cfg_model.mla_qk_rope_head_dim,
                     cfg_model.mla_v_head_dim)
    self.num_heads, self.num_kv_heads = n, n
    self.head_dim = d_n + d_r              # of q and k; v has v_head_dim
    self.v_head_dim = d_v
    self.q_lora_rank, self.kv_lora_rank = r_q, r
    self.nope_dim, self.rope_dim = d_n, d_r
    self.dtype = jnp.dtype(cfg_model.dtype)
    self.sliding_window = sliding_window
    self.position = cfg_model.position
    self.rope_theta = cfg_model.rope_theta
    scaling = cfg_model.rope_scaling
    if scaling is not None and scaling.get('type') == 'yarn':
      # The yarn factor goes into the softmax scale, not into cos/sin.
      scaling = {**scaling, 'attention_factor': 1.0}
    self.rope_scaling = None if scaling is None else tuple(sorted(scaling.items()))
    self.scale = softmax_scale(cfg_model)
    self.logit_softcap = cfg_model.attn_logit_softcap
    self.impl = cfg_model.attention_impl
    self.block_q = cfg_model.get('attention_block_q')
    self.block_kv = cfg_model.get('attention_block_kv')
    self.context_parallel = cfg_model.get('context_parallel', 'allgather')
    self.use_bias = False                   # refused with MLA by configs.validate_model
    self.qk_norm = False                    # likewise: the latents are normed instead

    pdt = jnp.dtype(cfg_model.param_dtype)
    w_in = nnx.initializers.normal(mup.hidden_std(cfg_model, 0.02))
    w_out = nnx.initializers.normal(mup.hidden_std(cfg_model, mlp_lib.out_init_stddev(cfg_model)))
    # The latent ranks are width axes: logical name `embed`, so FSDP splits
    # them like d_model and the optimizer groups (train/optim.py) read the
    # up-projections as hidden matrices with the latent as fan-in.
    if r_q:
      self.wq_a = nnx.Param(w_in(rngs.params(), (d, r_q), pdt), logical_axes=('embed', None))
      self.q_a_norm = norms.make_norm(cfg_model, r_q)
      self.wq_b = nnx.Param(w_in(rngs.params(), (r_q, n, d_n + d_r), pdt),
                            logical_axes=('embed', 'heads', 'head_dim'))
    else:
      self.wq = nnx.Param(w_in(rngs.params(), (d, n, d_n + d_r), pdt),
                          logical_axes=('embed', 'heads', 'head_dim'))
    self.wkv_a = nnx.Param(w_in(rngs.params(), (d, r + d_r), pdt), logical_axes=('embed', None))
    self.kv_a_norm = norms.make_norm(cfg_model, r)
    self.wk_b = nnx.Param(w_in(rngs.params(), (r, n, d_n), pdt),
                          logical_axes=('embed', 'heads', 'head_dim'))
    self.wv_b = nnx.Param(w_in(rngs.params(), (r, n, d_v), pdt),
                          logical_axes=('embed', 'heads', 'head_dim'))
    self.wo = nnx.Param(w_out(rngs.params(), (n, d_v, d), pdt),
                        logical_axes=('heads', 'head_dim', 'embed'))
    self.gate = cfg_model.get('attention_gate', 'none')
    if self.gate == 'headwise':
      self.wg = nnx.Param(w_in(rngs.params(), (d, n), pdt), logical_axes=('embed', 'heads'))
    elif self.gate == 'elementwise':
      self.wg = nnx.Param(w_in(rngs.params(), (d, n, d_v), pdt),
                          logical_axes=('embed', 'heads', 'head_dim'))
    if cfg_model.get('attention_sinks', False):
      self.sinks = nnx.Param(jnp.zeros((n,), pdt), logical_axes=('heads',))
    else:
      self.sinks = None

  def _w(self, name):
    return getattr(self, name)[...].astype(self.dtype)

  def _rope(self, x, positions):
    """RoPE over all of x's last axis, x [b, t, heads, d_r]; x itself without rope."""
    if self.position != 'rope' or positions is None:
      return x
    scaling = None if self.rope_scaling is None else dict(self.rope_scaling)
    cos, sin = positions_lib.rope_cos_sin(positions, self.rope_dim, self.rope_theta, scaling)
    return positions_lib.apply_rope(x, cos, sin)

  def rotate(self, x, positions):
    """RoPE on the last d_r features of q or k [b, t, heads, d_n + d_r] (the rope part)."""
    if self.position != 'rope' or self.rope_dim == 0:
      return x
    nope, rope = x[..., :self.nope_dim], x[..., self.nope_dim:]
    return jnp.concatenate([nope, self._rope(rope, positions)], axis=-1)

  def queries(self, x, positions):
    """q [b, t, n, d_n + d_r], its rope part rotated at positions [b, t] (None: not)."""
    x = x.astype(self.dtype)
    if self.q_lora_rank:
      c_q = self.q_a_norm(jnp.einsum('btd,dr->btr', x, self._w('wq_a')))
      q = jnp.einsum('btr,rnh->btnh', c_q, self._w('wq_b'))
    else:
      q = jnp.einsum('btd,dnh->btnh', x, self._w('wq'))
    return self.rotate(q, positions)

  def latent(self, x, positions):
    """What MLA's KV cache stores per token: the normed latent c_kv [b, t, r]
    and the shared rope key k_r [b, t, d_r], rotated at positions [b, t]
    (None: not rotated)."""
    ckv = jnp.einsum('btd,dr->btr', x.astype(self.dtype), self._w('wkv_a'))
    c_kv = self.kv_a_norm(ckv[..., :self.kv_lora_rank])
    k_rope = self._rope(ckv[..., self.kv_lora_rank:][:, :, None, :], positions)[:, :, 0]
    return c_kv, k_rope

  def project(self, x, positions):
    """q, k [b, t, n, d_n + d_r] and v [b, t, n, d_v] (the naive, training form)."""
    q = self.queries(x, positions)
    return (q, *self.expand(*self.latent(x, positions)))

  def expand(self, c_kv, k_rope):
    """The per-head k [b, t, n, d_n + d_r] and v [b, t, n, d_v] of a latent
    c_kv [b, t, r] and rope key k_rope [b, t, d_r] (the naive form)."""
    k_nope = jnp.einsum('btr,rnh->btnh', c_kv, self._w('wk_b'))
    v = jnp.einsum('btr,rnh->btnh', c_kv, self._w('wv_b'))
    k_rope = jnp.broadcast_to(k_rope[:, :, None, :], (*k_nope.shape[:3], self.rope_dim))
    return jnp.concatenate([k_nope, k_rope.astype(k_nope.dtype)], axis=-1), v

  def init_cache(self, batch, length, *, num_memory_tokens=0, streaming=None):
    """An empty `LatentCache` (c_kv and k_r only) for up to `length` tokens;
    the same ring as `Attention.init_cache` (this layer's window, memory
    tokens, streaming sinks)."""
    ring = kv_cache_lib.ring_for(self.sliding_window, length, num_memory_tokens, streaming)
    return kv_cache_lib.LatentCache.empty(batch, ring, self.kv_lora_rank, self.rope_dim,
                                          self.dtype, streaming)

  def _cached(self, x, positions, segment_ids, num_memory_tokens, cache, chunk):
    """The cached call (`Attention.__call__` with `cache=`): the chunk's latents
    go into the `LatentCache`; a prefill attends over its own columns in the
    naive form (the training path), a decode step over the cache in the
    absorbed form. In streaming mode k_r is cached before RoPE and rotated by
    the slots' cache positions at each step, as `Attention` does with keys."""
    late = cache.rotate_late
    with jax.named_scope('qkv'):
      q = self.queries(x, positions)
      c_kv, k_rope = self.latent(x, None if late else positions)
    cache = cache.write(c_kv, k_rope, chunk)
    with jax.named_scope('attention'):
      if chunk.prefill:
        if late:
          k_rope = self._rope(k_rope[:, :, None, :], positions)[:, :, 0]
        k, v = self.expand(c_kv, k_rope)
        o = self.attend(q, k, v, segment_ids=segment_ids,
                        num_memory_tokens=num_memory_tokens)
      else:
        q_idx, kv_idx, kv_seg, kv_pos = cache.attention_indices(chunk)
        k_rope = cache.k_rope
        if late:
          k_rope = self._rope(k_rope[:, :, None, :], kv_pos)[:, :, 0]
        o = self.absorbed_attend(q, cache.c_kv, k_rope, q_idx=q_idx, kv_idx=kv_idx,
                                 segment_ids=jnp.ones_like(q_idx), kv_segment_ids=kv_seg,
                                 num_memory_tokens=num_memory_tokens)
    with jax.named_scope('out'):
      return self.output(o, x), cache

  def absorbed_attend(self, q, c_kv, k_rope, *, q_idx=None, kv_idx=None, segment_ids=None,
                      kv_segment_ids=None, num_memory_tokens=0):
    """Attention of q [b, t, n, d_n + d_r] (from `queries`) over a latent cache.

    c_kv [b, s, r], k_rope [b, s, d_r] (from `latent`); q_idx [t] / kv_idx [s]
    the attention-sequence indices (memory first), as
    `attention_core.reference_attention`, whose masks, soft-cap, ALiBi and
    sinks apply. W_uk is absorbed into the query, q_n W_uk^T [b, t, n, r], so
    the scores are q_n W_uk^T . c_kv + q_r . k_r: an MQA of head dim r + d_r
    with c_kv as the one value head; W_uv then maps the latent output
    [b, t, n, r] to the heads' d_v. Returns o [b, t, n, d_v], which `output`
    takes as it takes `attend`'s. Equal to `attend` over `project`'s k, v.
    """
    q_nope, q_rope = q[..., :self.nope_dim], q[..., self.nope_dim:]
    q_lat = jnp.einsum('btnh,rnh->btnr', q_nope, self._w('wk_b'))
    q_abs = jnp.concatenate([q_lat, q_rope.astype(q_lat.dtype)], axis=-1)
    k_abs = jnp.concatenate([c_kv, k_rope.astype(c_kv.dtype)], axis=-1)[:, :, None, :]
    slopes = masking.alibi_slopes(self.num_heads) if self.position == 'alibi' else None
    o_lat = attention_core.reference_attention(
        q_abs, k_abs, c_kv[:, :, None, :], segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids, causal=True, sliding_window=self.sliding_window,
        alibi_slopes=slopes, logit_softcap=self.logit_softcap, scale=self.scale,
        num_memory_tokens=num_memory_tokens, q_idx=q_idx, kv_idx=kv_idx,
        sink_logits=self.sink_logits())
    return jnp.einsum('btnr,rnh->btnh', o_lat, self._w('wv_b'))


def mla_matmul_weights(cfg_model) -> int:
  """Weights one position multiplies through in an MLA layer (naive form)."""
  d, n = cfg_model.d_model, cfg_model.num_heads
  r_q, r = cfg_model.mla_q_lora_rank, cfg_model.mla_kv_lora_rank
  d_n, d_r, d_v = (cfg_model.mla_qk_nope_head_dim, cfg_model.mla_qk_rope_head_dim,
                   cfg_model.mla_v_head_dim)
  q = (d * r_q + r_q * n * (d_n + d_r)) if r_q else d * n * (d_n + d_r)
  gate = {'none': 0, 'headwise': d * n,
          'elementwise': d * n * d_v}[cfg_model.get('attention_gate', 'none')]
  return q + d * (r + d_r) + r * n * (d_n + d_v) + n * d_v * d + gate


def mla_params(cfg_model) -> int:
  """Parameter count of one `MLAttention`."""
  count = mla_matmul_weights(cfg_model)
  count += norms.norm_params(cfg_model.norm_type, cfg_model.mla_kv_lora_rank)
  if cfg_model.mla_q_lora_rank:
    count += norms.norm_params(cfg_model.norm_type, cfg_model.mla_q_lora_rank)
  if cfg_model.get('attention_sinks', False):
    count += cfg_model.num_heads
  return count


def is_mla(cfg_model) -> bool:
  return cfg_model.get('attention_type', 'standard') == 'mla'


def is_linear_layer(cfg_model, layer_index: int) -> bool:
  """Whether `model.layer_pattern` makes layer `layer_index` a Gated DeltaNet (L)."""
  pattern = cfg_model.get('layer_pattern', '') or 'A'
  return pattern[layer_index % len(pattern)] == 'L'


def attention_class(cfg_model, layer_index: int | None = None):
  """The token mixer of layer `layer_index` (0-based): `model.gdn.GatedDeltaNet`
  where `model.layer_pattern` says L, else the attention `model.attention_type`
  names (differential attention needs the layer index for its lambda_init)."""
  if layer_index is not None and is_linear_layer(cfg_model, layer_index):
    return gdn.GatedDeltaNet
  if is_mla(cfg_model):
    return MLAttention
  if differential.is_differential(cfg_model):
    return functools.partial(differential.DifferentialAttention, layer_index=layer_index or 0)
  return attention_lib.Attention

