"""The attention entry points users reach: `attention_impl` dispatch, block-size
choice, and the cuDNN path's flag mapping and refusals (on CPU).
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import attention_core
from model import kernels
from model import masking
from model.kernels import cudnn


def _qkv(rng, b, t, n, kvh, h, dtype=jnp.float32):
  return tuple(jnp.asarray(rng.standard_normal(shape), dtype)
               for shape in ((b, t, n, h), (b, t, kvh, h), (b, t, kvh, h)))


def test_pallas_on_cpu_runs_interpreted_with_one_warning(caplog):
  rng = np.random.default_rng(0)
  q, k, v = _qkv(rng, 1, 40, 4, 2, 16)
  kwargs = dict(causal=True, sliding_window=12, alibi_slopes=masking.alibi_slopes(4),
                num_memory_tokens=2)
  kernels._warned.discard('interpret')    # pylint: disable=protected-access
  with caplog.at_level(logging.WARNING, logger='model.kernels'):
    out = attention_core.dot_product_attention(q, k, v, impl='pallas', **kwargs)
    again = attention_core.dot_product_attention(q, k, v, impl='pallas', **kwargs)
  warnings = [r for r in caplog.records if 'interpret mode' in r.getMessage()]
  assert len(warnings) == 1 and '\n' not in warnings[0].getMessage()
  ref = attention_core.reference_attention(q, k, v, **kwargs)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
  np.testing.assert_array_equal(out, again)


def test_auto_is_the_reference_on_cpu_and_unknown_impls_are_refused():
  rng = np.random.default_rng(1)
  q, k, v = _qkv(rng, 1, 24, 2, 1, 8)
  auto = attention_core.dot_product_attention(q, k, v, impl='auto', causal=True)
  ref = attention_core.reference_attention(q, k, v, causal=True)
  np.testing.assert_array_equal(auto, ref)
  with pytest.raises(ValueError, match='attention_impl'):
    attention_core.dot_product_attention(q, k, v, impl='flash')


@pytest.mark.parametrize('backend', ['gpu_triton', 'tpu_mosaic'])
@pytest.mark.parametrize('h', [64, 128, 256])
@pytest.mark.parametrize('length', [16, 200, 4096])
def test_default_blocks_suit_the_backend(backend, h, length):
  for block in (b for pair in kernels.block_sizes(backend, h, length, length) for b in pair):
    if backend == 'tpu_mosaic':
      assert block % 128 == 0 and block <= max(128, -(-length // 128) * 128)
    else:
      assert block >= 16 and block & (block - 1) == 0
      assert block <= max(16, 1 << (length - 1).bit_length())


def test_explicit_blocks_are_used_or_refused():
  fwd, bwd = kernels.block_sizes('gpu_triton', 64, 1000, 1000, block_q=32, block_kv=128)
  assert fwd == bwd == (32, 128)
  with pytest.raises(ValueError, match='attention_block_q=48'):
    kernels.block_sizes('gpu_triton', 64, 1000, 1000, block_q=48)
  with pytest.raises(ValueError, match='attention_block_kv=8'):
    kernels.block_sizes('gpu_triton', 64, 1000, 1000, block_kv=8)
  with pytest.raises(ValueError, match='attention_block_q=192.*multiple of 128'):
    kernels.block_sizes('tpu_mosaic', 64, 1000, 1000, block_q=192)


def test_flash_attention_refuses_bad_shapes():
  rng = np.random.default_rng(2)
  q, k, v = _qkv(rng, 1, 32, 3, 2, 16)
  with pytest.raises(ValueError, match='multiple of num_kv_heads'):
    kernels.flash_attention(q, k, v)
  q, k, v = _qkv(rng, 1, 32, 4, 2, 16)
  with pytest.raises(ValueError, match='share a dtype'):
    kernels.flash_attention(q, k.astype(jnp.bfloat16), v)


# ---------------------------------------------------------------------- cuDNN


@pytest.mark.parametrize('flag, kwargs', [
    ('ALiBi', dict(alibi_slopes=np.ones(4, np.float32))),
    ('attn_logit_softcap=30.0', dict(logit_softcap=30.0)),
    ('num_memory_tokens=4', dict(num_memory_tokens=4)),
    ('sliding_window=8', dict(causal=False, sliding_window=8)),
    ('float32', dict(dtype=jnp.float32)),
])
def test_cudnn_refuses_what_it_cannot_do_naming_the_flag(flag, kwargs):
  dtype = kwargs.pop('dtype', jnp.bfloat16)
  q, k, v = _qkv(np.random.default_rng(3), 1, 16, 4, 2, 16, dtype)
  with pytest.raises(ValueError, match=flag):
    cudnn.attention_args(q, k, v, **kwargs)


def test_cudnn_needs_a_gpu():
  q, k, v = _qkv(np.random.default_rng(4), 1, 16, 4, 2, 16, jnp.bfloat16)
  with pytest.raises(ValueError, match='needs an NVIDIA GPU'):
    attention_core.dot_product_attention(q, k, v, impl='cudnn')


@pytest.mark.parametrize('causal, window', [(True, None), (True, 9), (False, None)])
def test_cudnn_arguments_mean_what_the_reference_means(causal, window):
  """The flags as translated for cuDNN, run by jax's XLA implementation of the
  same API, give the reference's attention (GQA, packed segments, windows).

  bf16 inputs (cuDNN's dtypes): jax's implementation rounds the probabilities
  to bf16 before the PV matmul and both round the output to bf16 (unit
  roundoff 2^-9); a misplaced window edge or segment boundary moves a whole
  softmax weight, far beyond the 2e-2 of the tensor scale allowed here.
  """
  rng = np.random.default_rng(5)
  q, k, v = _qkv(rng, 2, 48, 4, 2, 16, jnp.bfloat16)
  seg = jnp.asarray(np.repeat([[1] * 20 + [2] * 28], 2, axis=0).astype(np.int32))
  kwargs = dict(segment_ids=seg, causal=causal, sliding_window=window, scale=0.3)
  got = jax.nn.dot_product_attention(q, k, v, implementation='xla',
                                     **cudnn.attention_args(q, k, v, **kwargs))
  want = attention_core.reference_attention(q, k, v, **kwargs)
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())
