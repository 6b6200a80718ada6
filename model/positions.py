"""Position information: rotary, learned and sinusoidal; ALiBi slopes.

`model.position` picks one:
- `rope`: rotary embeddings applied to queries and keys (Su et al. 2021,
  "RoFormer"), in the half-split ("rotate_half", GPT-NeoX / Hugging Face)
  layout: feature i pairs with feature i + head_dim/2. Context-extension
  scalings in `model.rope_scaling`:
  - `linear`: position interpolation (Chen et al. 2023), positions / factor.
  - `ntk`: dynamic NTK-aware scaling (bloc97 2023; Hugging Face "dynamic"):
    when the input runs past `original_max_seq_len` positions, the base grows
    to theta * (factor * L / original - (factor - 1))^(d / (d - 2)), L the
    longest position seen + 1; shorter inputs use plain RoPE.
  - `yarn`: Peng et al. 2023, "YaRN": per-frequency blend of interpolation and
    extrapolation between the `beta_fast` and `beta_slow` rotation counts
    (rounded out to whole pairs unless `truncate` is False, as in GPT-OSS), and
    cos/sin scaled by the attention factor 0.1 ln(factor) + 1.
  - `llama3`: Llama 3.1's wavelength-banded interpolation (`low_freq_factor`,
    `high_freq_factor`).
  Partial rotary (`model.rope_fraction` < 1; GPT-NeoX, Qwen3-Next): only the
  first `rotary_dim` features of each head rotate, with the frequencies of a
  head of that width (`rope_cos_sin(positions, rotary_dim, ...)`), in the same
  half-split layout within them; `apply_rope` passes the rest through.
- `alibi`: a per-head linear distance bias added inside attention (Press et al.
  2021); the slopes are `model.masking.alibi_slopes`, passed by the attention
  layer to the kernel, so nothing here.
- `learned`: a trained [max_seq_len, d_model] table added to the embeddings
  (GPT-2).
- `sinusoidal`: the fixed sin/cos table of Vaswani et al. 2017, added to the
  embeddings; no length limit.
- `none`: no position signal besides the causal mask (Haviv et al. 2022).
"""

import math

from jax import lax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model import partitioning


def _scaling_get(scaling, key, default=None):
  return scaling.get(key, default) if scaling is not None else default


def rope_inv_freq(head_dim: int, theta: float, scaling=None):
  """Static RoPE inverse frequencies [head_dim // 2] and the cos/sin factor.

  Covers plain RoPE and the `linear`, `yarn` and `llama3` scalings, whose
  frequencies do not depend on the input; `ntk` is dynamic and handled in
  `rope_cos_sin`.
  """
  inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  kind = _scaling_get(scaling, 'type')
  if kind is None or kind == 'ntk':
    return inv_freq, 1.0
  factor = float(scaling['factor'])
  if kind == 'linear':
    return inv_freq / factor, 1.0
  original = scaling['original_max_seq_len']
  if kind == 'yarn':
    beta_fast = _scaling_get(scaling, 'beta_fast', 32.0)
    beta_slow = _scaling_get(scaling, 'beta_slow', 1.0)

    def correction_dim(rotations):
      # The feature pair index whose wavelength fits `rotations` turns into
      # the original context.
      return (head_dim * math.log(original / (rotations * 2 * math.pi))
              / (2 * math.log(theta)))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if _scaling_get(scaling, 'truncate', True):
      # Round the range to whole pairs (YaRN's code); GPT-OSS keeps it exact.
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
      high += 0.001
    ramp = np.clip((np.arange(head_dim // 2) - low) / (high - low), 0.0, 1.0)
    # High-frequency pairs (index < low) keep their frequency (extrapolate);
    # low-frequency pairs (index > high) are interpolated by `factor`.
    extrapolate = 1.0 - ramp
    inv_freq = inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate
    attention_factor = _scaling_get(scaling, 'attention_factor')
    if attention_factor is None:
      attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, float(attention_factor)
  if kind == 'llama3':
    low_freq_factor = _scaling_get(scaling, 'low_freq_factor', 1.0)
    high_freq_factor = _scaling_get(scaling, 'high_freq_factor', 4.0)
    low_freq_wavelen = original / low_freq_factor
    high_freq_wavelen = original / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled), 1.0
  raise ValueError(f'model.rope_scaling.type={kind!r}: must be one of '
                   'linear, ntk, yarn, llama3')


def rope_cos_sin(positions, head_dim: int, theta: float, scaling=None):
  """cos and sin, float32 [batch, seq, head_dim // 2], for int positions [batch, seq]."""
  pos = positions.astype(jnp.float32)[..., None]
  if _scaling_get(scaling, 'type') == 'ntk':
    factor = float(scaling['factor'])
    original = scaling['original_max_seq_len']
    length = (jnp.max(positions) + 1).astype(jnp.float32)
    grown = theta * (factor * length / original - (factor - 1)) ** (head_dim / (head_dim - 2))
    base = jnp.where(length > original, grown, theta)
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    angles = pos * (1.0 / base ** exponents)
    return jnp.cos(angles), jnp.sin(angles)
  inv_freq, attention_factor = rope_inv_freq(head_dim, theta, scaling)
  angles = pos * jnp.asarray(inv_freq, jnp.float32)
  return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def rotary_dim(head_dim: int, fraction: float = 1.0) -> int:
  """Features of a head that RoPE rotates: int(head_dim * fraction)
  (`model.rope_fraction`; transformers' partial_rotary_factor counts alike)."""
  return head_dim if fraction == 1 else int(head_dim * fraction)


def apply_rope(x, cos, sin):
  """Rotates x [batch, seq, heads, head_dim] by the angles of cos/sin [batch, seq, r//2]:
  the first r features in the half-split layout (feature i with i + r/2); the
  features after r (partial rotary) pass through unchanged."""
  half = cos.shape[-1]
  rot = 2 * half
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., :half], xf[..., half:rot]
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
  if rot < x.shape[-1]:
    parts.append(xf[..., rot:])
  out = jnp.concatenate(parts, axis=-1)
  return out.astype(x.dtype)


def sinusoidal(positions, dim: int, base: float = 10000.0):
  """Vaswani et al.'s table at int positions [batch, seq]: float32 [batch, seq, dim].

  Feature 2i is sin(pos / base^(2i/dim)), feature 2i+1 the matching cos.
  """
  half = (dim + 1) // 2
  inv_freq = 1.0 / base ** (jnp.arange(half, dtype=jnp.float32) * 2 / dim)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq     # [b, t, half]
  table = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)   # [b, t, half, 2]
  return table.reshape(*positions.shape, 2 * half)[..., :dim]


class LearnedPositions(nnx.Module):
  """A trained position table [max_seq_len, d_model] (GPT-2's wpe)."""

  def __init__(self, cfg_model, *, rngs: nnx.Rngs):
    self.max_seq_len = cfg_model.max_seq_len
    init = nnx.initializers.normal(0.02)
    self.table = nnx.Param(
        init(rngs.params(), (cfg_model.max_seq_len, cfg_model.d_model),
             jnp.dtype(cfg_model.param_dtype)),
        logical_axes=(None, 'embed'))

  def __call__(self, positions):
    """Rows of the table for int positions [batch, seq] -> [batch, seq, d_model]."""
    if positions.shape[-1] > self.max_seq_len:
      raise ValueError(
          f'sequence length {positions.shape[-1]} exceeds model.max_seq_len='
          f'{self.max_seq_len}, the size of the learned position table')
    # Gather the FSDP-split `embed` dimension first (see `model.partitioning`).
    table = partitioning.constrain(self.table[...], (None, None))
    return jnp.take(table, positions, axis=0)


def segment_positions(segment_ids):
  """Positions that restart at 0 at each change of segment id, int32 [batch, seq]."""
  t = segment_ids.shape[-1]
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], bool),
       segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  # The latest segment start at or before each index.
  start_idx = lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return idx - start_idx
