"""ablax's own attention kernels, behind `model.attention_core.dot_product_attention`.

`flash_attention` is exact flash attention (Dao et al. 2022; Dao 2023) written
in Pallas, forward and backward, with every mask the decoder has: causal,
sliding window (tiles outside it skipped), GQA/MQA, packed segments, ALiBi,
logit soft-capping and memory tokens; any head dim and any sequence length
(padding handled inside). It picks the kernel by backend:

- GPU: `gpu_mosaic` (Pallas on Mosaic GPU: warpgroup MMA and TMA) on Hopper
  (compute capability 9.x) for bfloat16/float16 inputs; `gpu_triton` (Pallas
  on the Triton lowering) otherwise, or when the environment variable
  `ABLAX_PALLAS_GPU=triton` asks for it (`=mosaic` insists on Mosaic GPU and
  fails with the reason where it cannot run);
- TPU: `tpu_mosaic` (Pallas Mosaic);
- CPU: the GPU kernel in Pallas interpret mode, slow, for tests; a warning says
  so once.

`cudnn.attention` is the cuDNN path through `jax.nn.dot_product_attention`.
Files: `flash.py` (shared tile math, padding, custom VJP), `gpu_triton.py`,
`tpu_mosaic.py`, `gpu_mosaic.py`, `cudnn.py`; docs/attention.md says how they fit.
"""

import importlib.util
import logging
import os
import warnings

import jax

import configs
from model.kernels import flash

_log = logging.getLogger(__name__)
_warned = set()

# jax>=0.11 marks the Pallas Triton lowering deprecated (in favour of Mosaic
# GPU) with a DeprecationWarning at every lowering; say it once instead.
warnings.filterwarnings('ignore', message=r'The Pallas Triton backend is deprecated',
                        category=DeprecationWarning)


def _warn_once(key, message):
  if key not in _warned:
    _warned.add(key)
    _log.warning(message)


def mosaic_gpu_unavailable(dtype, device=None, head_dim=None):
  """Why the Mosaic GPU kernel cannot serve this call, or None when it can.

  It needs the Mosaic GPU Pallas backend (jax.experimental.pallas.mosaic_gpu),
  a Hopper GPU (wgmma is an sm_90a instruction; Blackwell's tensor cores take
  tcgen05 instead), 16-bit inputs (the tiles are laid out for bf16/f16) and
  head dims up to 256 (its accumulators live in one warpgroup's registers).
  """
  try:
    from jax.experimental.pallas import mosaic_gpu  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    return f'the Mosaic GPU Pallas backend does not import ({e})'
  device = device or jax.devices()[0]
  capability = str(getattr(device, 'compute_capability', ''))
  if not capability.startswith('9.'):
    return (f'{device.device_kind} has compute capability {capability or "unknown"}; '
            'the kernel uses Hopper (9.x) warpgroup MMAs')
  if jax.numpy.dtype(dtype) not in (jax.numpy.bfloat16, jax.numpy.float16):
    return f'inputs are {jax.numpy.dtype(dtype).name}; the kernel takes bfloat16 or float16'
  if head_dim is not None and head_dim > 256:
    return f'head dim {head_dim} > 256 (the kernel keeps its accumulators in registers)'
  return None


def _gpu_kernel(dtype, head_dim=None):
  """'gpu_mosaic' or 'gpu_triton' for a call on this GPU (see the module docstring)."""
  choice = os.environ.get('ABLAX_PALLAS_GPU', 'auto')
  if choice not in ('auto', 'mosaic', 'triton'):
    raise configs.UserError(f'ABLAX_PALLAS_GPU={choice!r}: must be auto, mosaic or triton')
  if choice != 'triton':
    reason = mosaic_gpu_unavailable(dtype, head_dim=head_dim)
    if reason is None:
      return 'gpu_mosaic'
    if choice == 'mosaic':
      raise configs.UserError(f'ABLAX_PALLAS_GPU=mosaic: {reason}; unset it to use the Triton '
                       'kernel')
    _warn_once(f'triton:{reason}', f'attention_impl=pallas: Triton kernel, not Mosaic GPU: '
               f'{reason}.')
  if importlib.util.find_spec('jax.experimental.pallas.triton') is None:
    raise configs.UserError(f'attention_impl=pallas: jax {jax.__version__} ships no Pallas Triton '
                     'backend for this GPU and call; use attention_impl=cudnn or xla')
  if jax.__version_info__ >= (0, 11):
    _warn_once('triton', 'attention_impl=pallas on GPU: using the Pallas Triton '
               'lowering, deprecated since jax 0.11 in favour of Mosaic GPU '
               '(see docs/attention.md).')
  return 'gpu_triton'


def _backend(dtype=jax.numpy.bfloat16, head_dim=None):
  """(kernel module name, interpret, head_dim multiple) for the default backend."""
  platform = jax.default_backend()
  if platform == 'tpu':
    return 'tpu_mosaic', False, 1
  if platform == 'gpu':
    if _gpu_kernel(dtype, head_dim) == 'gpu_mosaic':
      return 'gpu_mosaic', False, 64     # rows of 64 bf16: one 128-byte swizzle
    return 'gpu_triton', False, 0      # Triton tiles: head dim a power of two
  _warn_once('interpret', f'attention_impl=pallas on {platform}: running the flash '
             'attention kernel in Pallas interpret mode (slow; meant for tests).')
  return 'gpu_triton', True, 1


def _check_block(name, value, backend):
  if backend == 'tpu_mosaic':
    if value < 128 or value % 128:
      raise configs.UserError(f'model.attention_{name}={value}: the TPU kernel needs a '
                       'multiple of 128')
  elif backend == 'gpu_mosaic':
    if value < 64 or value % 64:
      raise configs.UserError(f'model.attention_{name}={value}: the Mosaic GPU kernel needs '
                       'a multiple of 64')
  elif value < 16 or value & (value - 1):
    raise configs.UserError(f'model.attention_{name}={value}: the GPU kernel needs a power '
                     'of two >= 16')


def block_sizes(backend, head_dim, q_len, kv_len, block_q=None, block_kv=None):
  """((block_q, block_kv) forward, (block_q, block_kv) backward) for a call.

  Explicit sizes (the config's `attention_block_q/kv`) are used for both passes
  as given; defaults come from the backend's table for the head dim, shrunk to
  the (padded) sequence so short sequences are not padded to a long block.
  """
  fwd, bwd = flash.backend_module(backend).default_blocks(head_dim)
  if backend in ('tpu_mosaic', 'gpu_mosaic'):
    unit = 128 if backend == 'tpu_mosaic' else 64
    fit = lambda block, n: min(block, -(-n // unit) * unit)
  else:
    fit = lambda block, n: min(block, max(16, 1 << (n - 1).bit_length()))
  fwd = (fit(fwd[0], q_len), fit(fwd[1], kv_len))
  bwd = (fit(bwd[0], q_len), fit(bwd[1], kv_len))
  if block_q is not None:
    _check_block('block_q', block_q, backend)
    fwd, bwd = (block_q, fwd[1]), (block_q, bwd[1])
  if block_kv is not None:
    _check_block('block_kv', block_kv, backend)
    fwd, bwd = (fwd[0], block_kv), (bwd[0], block_kv)
  return fwd, bwd


def flash_attention(q, k, v, *, segment_ids=None, causal=True, sliding_window=None,
                    alibi_slopes=None, logit_softcap=None, scale=None,
                    num_memory_tokens=0, block_q=None, block_kv=None, sink_logits=None):
  """Flash attention on this backend; arguments and result as
  `model.attention_core.reference_attention` (q [b, t, n, h], k [b, s, kv, h],
  v [b, s, kv, hv], hv may differ from h).

  block_q, block_kv: tile sizes (None: per backend and head dim); powers of two
  >= 16 for the Triton kernel (and CPU), multiples of 64 for Mosaic GPU, of
  128 on TPU.
  """
  # Tiles sized for the wider of the q/k and v head dims (they differ in MLA).
  head_dim = max(q.shape[-1], v.shape[-1])
  backend, interpret, head_dim_multiple = _backend(q.dtype, head_dim)
  fwd, bwd = block_sizes(backend, head_dim, q.shape[1], k.shape[1], block_q, block_kv)
  return flash.attention(
      q, k, v, segment_ids=segment_ids, causal=causal, sliding_window=sliding_window,
      alibi_slopes=alibi_slopes, logit_softcap=logit_softcap, scale=scale,
      num_memory_tokens=num_memory_tokens, block_q=fwd[0], block_kv=fwd[1],
      bwd_block_q=bwd[0], bwd_block_kv=bwd[1], backend=backend, interpret=interpret,
      head_dim_multiple=head_dim_multiple, sink_logits=sink_logits)

