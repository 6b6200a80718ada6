"""The flash kernels lower for real GPUs and TPUs, checked on a CPU-only machine.

Interpret mode (test_kernel_flash.py) checks the numerics but not what the
hardware lowerings demand: Triton's power-of-two tile shapes and supported
primitives, Mosaic's block-shape and memory-space rules. Here the forward and
backward of every feature are exported with `jax.export` for CUDA and for
TPU (an abstract device stands in for the missing hardware), which runs the
Pallas Triton and Mosaic lowerings of all three kernels. What this cannot
check: the Triton -> PTX compile and Mosaic's layout passes, which run inside
XLA on the device (see docs/attention.md for the GPU run still to do).
"""

import jax
import jax.numpy as jnp
import pytest

from model import kernels
from model import masking
from model.kernels import flash


def _export(backend, b, t, n, kvh, h, dtype, features, v_head_dim=None):
  if backend == 'gpu_triton':
    device = jax.sharding.AbstractDevice(device_kind='NVIDIA H100 80GB HBM3',
                                         num_cores=132, platform='cuda')
    platform, target = 'cuda', '__gpu$xla.gpu.triton'
    # The Triton custom call has no serialisation-compatibility guarantee;
    # we only lower, never serialise for later.
    checks = [jax.export.DisabledSafetyCheck.custom_call(target)]
    extra = dict(head_dim_multiple=0)
  else:
    device = jax.sharding.AbstractDevice(device_kind='TPU v5 lite', num_cores=1,
                                         platform='tpu')
    platform, target, checks, extra = 'tpu', 'tpu_custom_call', [], {}
  fwd, bwd = kernels.block_sizes(backend, max(h, v_head_dim or h), t, t)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32) if features.get('segments') else None
  kwargs = {key: val for key, val in features.items() if key != 'segments'}

  def loss(q, k, v, segment_ids):
    out = flash.attention(q, k, v, segment_ids=segment_ids, block_q=fwd[0],
                          block_kv=fwd[1], bwd_block_q=bwd[0], bwd_block_kv=bwd[1],
                          backend=backend, **extra, **kwargs)
    return out.astype(jnp.float32).sum()

  q = jax.ShapeDtypeStruct((b, t, n, h), dtype)
  k = jax.ShapeDtypeStruct((b, t, kvh, h), dtype)
  v = jax.ShapeDtypeStruct((b, t, kvh, v_head_dim or h), dtype)
  mesh = jax.sharding.AbstractMesh((1,), ('x',), abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    exported = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))),
                                 platforms=[platform], disabled_checks=checks)(q, k, v, seg)
  return exported.mlir_module().count(f'@{target}(')


EVERYTHING = dict(segments=True, causal=True, sliding_window=256,
                  alibi_slopes=masking.alibi_slopes(6), logit_softcap=30.0,
                  num_memory_tokens=4)


@pytest.mark.parametrize('backend', ['gpu_triton', 'tpu_mosaic'])
@pytest.mark.parametrize('h, dtype, features', [
    (128, jnp.bfloat16, EVERYTHING),
    (64, jnp.float32, dict(causal=False)),
    (256, jnp.bfloat16, dict(causal=False, sliding_window=100, num_memory_tokens=4)),
])
def test_kernels_lower_for_the_hardware(backend, h, dtype, features):
  # GQA with 3 query heads per kv head (a group that is not a power of two),
  # a length that is no multiple of the blocks, default block sizes.
  calls = _export(backend, b=2, t=1000, n=6, kvh=2, h=h, dtype=dtype, features=features)
  assert calls == 3    # forward, dQ, dK/dV


def test_gpu_lowering_pads_odd_head_dims():
  # 80 is no power of two; the wrapper pads it to 128 for the Triton tiles.
  assert _export('gpu_triton', 1, 300, 4, 4, 80, jnp.bfloat16, dict(causal=True)) == 3


@pytest.mark.parametrize('backend', ['gpu_triton', 'tpu_mosaic'])
def test_kernels_lower_with_mla_head_dims(backend):
  # DeepSeek-V3's MLA: q/k head dim 192 (128 + 64 rope), v head dim 128, MHA;
  # Triton pads 192 to 256 and keeps 128.
  calls = _export(backend, b=1, t=600, n=4, kvh=4, h=192, dtype=jnp.bfloat16,
                  features=dict(causal=True, segments=True), v_head_dim=128)
  assert calls == 3
