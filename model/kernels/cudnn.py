"""Attention through cuDNN's fused flash attention (`jax.nn.dot_product_attention`).

`attention_impl='cudnn'`: NVIDIA's kernel, for the flag combinations it
supports; the others are refused with a message naming the flag, so an
ablation never silently measures something else.

Supported: causal or not, a sliding window with causal masking, GQA/MQA,
`scale`, packed segments (passed as a boolean mask: cuDNN reads it as a bias,
so this costs a [b, 1, t, t] mask in memory), bfloat16/float16 inputs.
Refused: ALiBi, logit soft-capping, memory tokens, a window without causal
masking, float32 inputs, and any backend but a GPU.
"""

import jax
import jax.numpy as jnp


def _refuse(flag, why):
  raise ValueError(f"model.attention_impl='cudnn' does not support {flag}: {why}. "
                   "Use attention_impl='pallas' (or 'xla').")


def attention_args(q, k, v, *, segment_ids=None, causal=True, sliding_window=None,
                   alibi_slopes=None, logit_softcap=None, scale=None, num_memory_tokens=0):
  """The keyword arguments of `jax.nn.dot_product_attention` for these flags.

  Refuses what cuDNN cannot do. Separate from `attention` so that the mapping
  can be checked on any backend (with implementation='xla').
  """
  if alibi_slopes is not None:
    _refuse('ALiBi (model.position=alibi)', 'jax exposes no in-kernel ALiBi for cuDNN')
  if logit_softcap is not None:
    _refuse(f'logit soft-capping (model.attn_logit_softcap={logit_softcap})',
            'jax.nn.dot_product_attention has no soft-cap')
  if num_memory_tokens:
    _refuse(f'memory tokens (model.num_memory_tokens={num_memory_tokens})',
            'their always-visible mask is not a cuDNN mask type')
  if sliding_window is not None and not causal:
    _refuse(f'a sliding window without causal masking (sliding_window={sliding_window})',
            'cuDNN windows are left-sided')
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    _refuse(f'{q.dtype} inputs (model.dtype)', 'cuDNN flash attention runs in '
            'bfloat16 or float16')
  kwargs = dict(scale=scale, is_causal=bool(causal))
  if sliding_window is not None:
    # Our window w keeps q - kv < w: the query and w - 1 keys to its left.
    kwargs['local_window_size'] = (sliding_window - 1, 0)
  if segment_ids is not None:
    same = segment_ids[:, :, None] == segment_ids[:, None, :]   # [b, t, s]
    kwargs['mask'] = same[:, None, :, :]                         # [b, 1, t, s]
  return kwargs


def attention(q, k, v, **kwargs):
  """cuDNN flash attention; arguments and result as `reference_attention`."""
  if jax.default_backend() != 'gpu':
    raise ValueError("model.attention_impl='cudnn' needs an NVIDIA GPU; this backend "
                     f"is {jax.default_backend()!r}. Use 'auto', 'xla' or 'pallas'.")
  args = attention_args(q, k, v, **kwargs)
  return jax.nn.dot_product_attention(q, k, v, implementation='cudnn', **args)
