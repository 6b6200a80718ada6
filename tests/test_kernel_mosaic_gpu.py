"""The Mosaic GPU (Hopper) flash-attention kernel, checked on a CPU-only machine.

Three things are checkable without a GPU:

- numerics: jax >= 0.12 ships a Mosaic GPU interpreter
  (`plgpu.InterpretGPUParams`) that runs TMA copies, barriers and wgmma on the
  CPU; the forward and the gradients are compared with the XLA reference
  (`attention_core.reference_attention`). jax 0.10 has no such interpreter:
  those tests skip there, saying so.
- lowering: the forward and backward lower to Mosaic GPU custom calls for
  CUDA on a CPU host (jax 0.10 and 0.12), which runs the whole Pallas ->
  Mosaic GPU lowering including its layout inference; not the ptxas compile.
- dispatch: which kernel `attention_impl='pallas'` picks for a device and a
  dtype.

Tolerances, float32: outputs within 1e-5, gradients within 1e-4, relative to
the tensor's scale as in test_kernel_flash.py; bfloat16 (the dtype the kernel
runs on a GPU): 2e-2, the rounding of bf16 probabilities in the P.V matmul.
"""

import re

import jax
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
import pytest

from model import attention_core
from model import kernels
from model import masking
from model.kernels import flash

HAS_INTERPRETER = hasattr(plgpu, 'InterpretGPUParams')
needs_interpreter = pytest.mark.skipif(
    not HAS_INTERPRETER,
    reason=f'jax {jax.__version__} has no Mosaic GPU interpreter (plgpu.InterpretGPUParams, '
           'jax >= 0.12); the lowering tests below still run')


def _close(x, ref, tol):
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  bound = tol * (np.abs(ref) + np.abs(ref).max())
  assert np.all(np.abs(x - ref) <= bound), float(np.max(np.abs(x - ref) / bound * tol))


def _loss(fn, *args):
  out = fn(*args)
  # A fixed, non-uniform cotangent, so every output entry matters.
  return (out.astype(jnp.float32) * jnp.cos(jnp.arange(out.shape[-1]))).sum()


def _case(t, n, kvh, h, hv, dtype, blocks, features, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.standard_normal(shape), dtype)
             for shape in ((1, t, n, h), (1, t, kvh, h), (1, t, kvh, hv)))
  seg = None
  if features.pop('segments', False):
    seg = jnp.asarray((np.arange(t) >= t // 3) + (np.arange(t) >= t // 2), jnp.int32)[None]

  def kernel(q, k, v, sinks):
    return flash.attention(q, k, v, segment_ids=seg, block_q=blocks[0], block_kv=blocks[1],
                           bwd_block_q=blocks[2], bwd_block_kv=blocks[3],
                           backend='gpu_mosaic', interpret=plgpu.InterpretGPUParams(),
                           head_dim_multiple=64, sink_logits=sinks, **features)

  def reference(q, k, v, sinks):
    up = lambda x: x.astype(jnp.float32)
    return attention_core.reference_attention(up(q), up(k), up(v), segment_ids=seg,
                                              sink_logits=sinks, **features)

  sinks = jnp.asarray(rng.standard_normal(n), jnp.float32)
  results = []
  for fn in (kernel, reference):
    grad = jax.grad(lambda *a, fn=fn: _loss(fn, *a), argnums=(0, 1, 2, 3))
    results.append(jax.jit(lambda *a, fn=fn, grad=grad: (fn(*a), grad(*a)))(q, k, v, sinks))
  return results


@needs_interpreter
@pytest.mark.parametrize('name, t, n, kvh, h, hv, blocks, features', [
    # Every mask at once: GQA with a group of 3, packed segments, causal
    # sliding window narrower than two blocks, ALiBi, soft-cap, memory tokens,
    # sinks; a length that is no multiple of the blocks.
    ('everything', 200, 6, 2, 64, 64, (64, 64, 64, 64),
     dict(segments=True, causal=True, sliding_window=80,
          alibi_slopes=masking.alibi_slopes(6), logit_softcap=20.0, num_memory_tokens=4)),
    # Causal without segments: the band's interior tiles take the unmasked
    # path (no mask arithmetic, bias and soft-cap still applied) in all three
    # kernels; memory tokens, ALiBi and soft-cap on top.
    ('full_tiles', 256, 2, 1, 64, 64, (64, 64, 64, 64),
     dict(causal=True, alibi_slopes=masking.alibi_slopes(2), logit_softcap=20.0,
          num_memory_tokens=4)),
    # Bidirectional window, MQA, q/k head dim 80 (padded to 128) != v head
    # dim 64 as in MLA, forward tiles of 128 rows and backward tiles of 64.
    ('mla_bidirectional', 150, 2, 1, 80, 64, (128, 64, 64, 64),
     dict(causal=False, sliding_window=40)),
])
def test_interpreted_kernel_matches_the_reference(name, t, n, kvh, h, hv, blocks, features):
  del name
  (out, grads), (ref_out, ref_grads) = _case(t, n, kvh, h, hv, jnp.float32, blocks,
                                             dict(features))
  _close(out, ref_out, 1e-5)
  for grad, ref_grad in zip(grads, ref_grads):    # dq, dk, dv, d sinks
    _close(grad, ref_grad, 1e-4)


@needs_interpreter
def test_interpreted_kernel_in_bfloat16():
  (out, grads), (ref_out, ref_grads) = _case(
      128, 2, 2, 64, 64, jnp.bfloat16, (128, 64, 64, 64), dict(causal=True))
  _close(out, ref_out, 2e-2)
  for grad, ref_grad in zip(grads[:3], ref_grads[:3]):
    _close(grad, ref_grad, 2e-2)


def _lowered_calls(t, n, kvh, h, hv, features):
  fwd, bwd = kernels.block_sizes('gpu_mosaic', max(h, hv), t, t)
  seg = jax.ShapeDtypeStruct((1, t), jnp.int32) if features.pop('segments', False) else None

  def loss(q, k, v, segment_ids):
    out = flash.attention(q, k, v, segment_ids=segment_ids, block_q=fwd[0], block_kv=fwd[1],
                          bwd_block_q=bwd[0], bwd_block_kv=bwd[1], backend='gpu_mosaic',
                          head_dim_multiple=64, **features)
    return out.astype(jnp.float32).sum()

  shapes = [jax.ShapeDtypeStruct(s, jnp.bfloat16)
            for s in ((1, t, n, h), (1, t, kvh, h), (1, t, kvh, hv))]
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  text = grad.trace(*shapes, seg).lower(lowering_platforms=('cuda',)).as_text()
  return len(re.findall(r'stablehlo\.custom_call @mosaic_gpu\w*\(', text))


@pytest.mark.parametrize('t, n, kvh, h, hv, features', [
    (1000, 6, 2, 128, 128, dict(segments=True, causal=True, sliding_window=256,
                                alibi_slopes=masking.alibi_slopes(6), logit_softcap=30.0,
                                num_memory_tokens=4)),
    (600, 4, 4, 192, 128, dict(causal=True, segments=True)),     # DeepSeek-V3 MLA dims
    (300, 4, 1, 64, 64, dict(causal=False)),
])
def test_kernels_lower_to_mosaic_gpu_for_cuda(t, n, kvh, h, hv, features):
  assert _lowered_calls(t, n, kvh, h, hv, dict(features)) == 3   # forward, dQ, dK/dV


class _Device:
  def __init__(self, kind, capability):
    self.device_kind, self.compute_capability = kind, capability


def test_mosaic_gpu_is_chosen_on_hopper_for_16_bit_inputs_only():
  h200 = _Device('NVIDIA H200', '9.0')
  assert kernels.mosaic_gpu_unavailable(jnp.bfloat16, h200) is None
  assert kernels.mosaic_gpu_unavailable(jnp.float16, h200) is None
  assert 'float32' in kernels.mosaic_gpu_unavailable(jnp.float32, h200)
  assert kernels.mosaic_gpu_unavailable(jnp.bfloat16, h200, head_dim=256) is None
  assert '512' in kernels.mosaic_gpu_unavailable(jnp.bfloat16, h200, head_dim=512)
  for kind, capability in (('NVIDIA A100', '8.0'), ('NVIDIA B200', '10.0')):
    assert capability in kernels.mosaic_gpu_unavailable(jnp.bfloat16, _Device(kind, capability))


def test_pallas_gpu_override(monkeypatch):
  monkeypatch.setenv('ABLAX_PALLAS_GPU', 'mosaic')
  with pytest.raises(ValueError, match='ABLAX_PALLAS_GPU=mosaic: .*compute capability'):
    kernels._gpu_kernel(jnp.bfloat16)   # pylint: disable=protected-access
  monkeypatch.setenv('ABLAX_PALLAS_GPU', 'triton')
  assert kernels._gpu_kernel(jnp.bfloat16) == 'gpu_triton'   # pylint: disable=protected-access
  monkeypatch.setenv('ABLAX_PALLAS_GPU', 'cuda')
  with pytest.raises(ValueError, match='auto, mosaic or triton'):
    kernels._gpu_kernel(jnp.bfloat16)   # pylint: disable=protected-access


def test_mosaic_gpu_blocks_are_multiples_of_64():
  for h in (64, 128, 192, 256):
    for length in (50, 1000, 16384):
      for block in (b for pair in kernels.block_sizes('gpu_mosaic', h, length, length)
                    for b in pair):
        assert block % 64 == 0 and block >= 64
  with pytest.raises(ValueError, match='multiple of 64'):
    kernels.block_sizes('gpu_mosaic', 64, 1000, 1000, block_q=32)


def test_pallas_on_a_gpu_runs_mosaic_gpu_where_it_can(monkeypatch):
  # What `attention_impl='pallas'` resolves to on a GPU, with the device
  # faked: Hopper for bf16 (head dims padded to 64), Triton for float32, for
  # head dims over 256 and on an A100 (head dims padded to a power of two).
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  monkeypatch.delenv('ABLAX_PALLAS_GPU', raising=False)
  for kind, capability, dtype, head_dim, expected in (
      ('NVIDIA H200', '9.0', jnp.bfloat16, 128, ('gpu_mosaic', False, 64)),
      ('NVIDIA H200', '9.0', jnp.float32, 128, ('gpu_triton', False, 0)),
      ('NVIDIA H200', '9.0', jnp.bfloat16, 512, ('gpu_triton', False, 0)),
      ('NVIDIA A100', '8.0', jnp.bfloat16, 128, ('gpu_triton', False, 0))):
    monkeypatch.setattr(jax, 'devices', lambda kind=kind, cap=capability: [_Device(kind, cap)])
    assert kernels._backend(dtype, head_dim) == expected   # pylint: disable=protected-access
