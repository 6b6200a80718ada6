"""Context parallelism (`model/context_parallel.py`, `mesh.context`) on 8 fake
CPU devices: the split attention equals the single-device reference, and the
decoder's loss and gradients equal the single-device run."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import configs
import model as model_lib
from model import attention_core
from model import context_parallel
from model import masking
from train import mesh as mesh_lib
from train import sharding
from train import step as step_lib


def _mesh(**axes):
  sizes = dict(data=1, fsdp=1, context=1, tensor=1, expert=1)
  sizes.update(axes)
  return mesh_lib.make_mesh(ml_collections.ConfigDict(sizes))


MASKS = {
    'window_segments': dict(sliding_window=5, segments=True),
    'alibi_memory_softcap_sinks': dict(alibi=True, num_memory_tokens=2, logit_softcap=3.0,
                                       sinks=True, segments=True),
}


def _attention_inputs(mask):
  rng = np.random.default_rng(0)
  b, t, n, kv, h = 2, 14, 4, 2, 8          # 14 positions do not divide by 4: padded
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, heads, h)), jnp.float32)
             for heads in (n, kv, kv))
  kwargs = {}
  if mask.get('segments'):
    kwargs['segment_ids'] = jnp.asarray([[0] * 6 + [1] * 8, [0] * 3 + [1] * 5 + [2] * 6])
  if mask.get('alibi'):
    kwargs['alibi_slopes'] = masking.alibi_slopes(n)
  if mask.get('sinks'):
    kwargs['sink_logits'] = jnp.asarray([0.5, -1.0, 2.0, 0.0])
  for key in ('sliding_window', 'num_memory_tokens', 'logit_softcap'):
    if key in mask:
      kwargs[key] = mask[key]
  return (q, k, v), kwargs


# Every mask is causal; heads split over `tensor` on the second mesh.
ATTENTION_CASES = [('window_segments', dict(data=2, context=4)),
                   ('alibi_memory_softcap_sinks', dict(data=2, context=4)),
                   ('alibi_memory_softcap_sinks', dict(data=2, context=2, tensor=2))]


@pytest.mark.parametrize('mode', ['allgather', 'ring'])
@pytest.mark.parametrize('mask,axes', ATTENTION_CASES,
                         ids=['window_segments', 'alibi_memory_softcap_sinks',
                              'all_masks_with_tensor2'])
def test_attention_equals_the_reference(mode, mask, axes):
  (q, k, v), kwargs = _attention_inputs(MASKS[mask])
  mesh = _mesh(**axes)

  def split(q, k, v):
    with sharding.activation_sharding(mesh):
      return context_parallel.dot_product_attention(q, k, v, mode=mode, **kwargs)

  def full(q, k, v):
    return attention_core.reference_attention(q, k, v, **kwargs)

  np.testing.assert_allclose(jax.jit(split)(q, k, v), full(q, k, v), atol=2e-6, rtol=0)
  square = lambda f: lambda *a: jnp.sum(f(*a) ** 2)
  got = jax.jit(jax.grad(square(split), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(square(full), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)


def _loss_and_grads(cfg, mesh, batch):
  """The trainer's loss (`step.lm_loss`) and its gradient, jitted over `mesh`
  with the trainer's activation rules (None: one device, no rules)."""
  decoder = model_lib.Decoder(cfg.model, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(decoder, nnx.Param, ...)
  loss_fn = step_lib.lm_loss(cfg.train)

  def mean_loss(p, batch):
    total, metrics = loss_fn(nnx.merge(graphdef, p, rest), batch, jax.random.PRNGKey(0))
    return total / metrics['weight']

  if mesh is None:
    return jax.jit(jax.value_and_grad(mean_loss))(params, batch)

  def f(p, batch):
    with sharding.activation_sharding(mesh):
      return jax.value_and_grad(mean_loss)(p, batch)

  shardings = sharding.state_shardings(mesh, params)
  return jax.jit(f, in_shardings=(shardings, sharding.batch_sharding(mesh)))(params, batch)


def _batch(cfg, segments: bool):
  rng = np.random.default_rng(1)
  b, t = cfg.train.global_batch_size, cfg.train.seq_len
  tokens = rng.integers(0, cfg.model.vocab_size, (b, t + 1)).astype(np.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
           'loss_mask': np.ones((b, t), np.float32)}
  if segments:
    cut = rng.integers(3, t - 3, b)
    seg = (np.arange(t)[None, :] >= cut[:, None]).astype(np.int32)
    batch['segment_ids'] = seg
    batch['positions'] = np.where(seg == 0, np.arange(t), np.arange(t) - cut[:, None]
                                  ).astype(np.int32)
  return batch


LLAMA_WINDOW_SEGMENTS = ('configs/llama.py:tiny', ['model.sliding_window=5'], True)
GPT2_ALIBI_MEMORY = ('configs/gpt2.py:tiny', ['model.position=alibi',
                                              'model.num_memory_tokens=3'], True)
DATA_CONTEXT, FSDP_CONTEXT = dict(data=2, context=4), dict(fsdp=2, context=4)
# (mode, model case, mesh): each mode and each mesh sees each case once.
DECODER_CASES = [('allgather', LLAMA_WINDOW_SEGMENTS, DATA_CONTEXT),
                 ('allgather', GPT2_ALIBI_MEMORY, FSDP_CONTEXT),
                 ('ring', GPT2_ALIBI_MEMORY, DATA_CONTEXT),
                 ('ring', LLAMA_WINDOW_SEGMENTS, FSDP_CONTEXT)]


@pytest.mark.parametrize('mode,case,axes', DECODER_CASES, ids=[
    'allgather_llama_window_segments_data2_context4', 'allgather_gpt2_alibi_memory_fsdp2_context4',
    'ring_gpt2_alibi_memory_data2_context4', 'ring_llama_window_segments_fsdp2_context4'])
def test_decoder_loss_and_grads_equal_one_device(mode, case, axes):
  preset, overrides, segments = case
  cfg = configs.load(preset, ['model.num_layers=2', 'train.seq_len=16',
                              'train.global_batch_size=4', f'model.context_parallel={mode}',
                              *overrides])
  batch = _batch(cfg, segments)
  loss_1, grads_1 = _loss_and_grads(cfg, None, batch)
  loss_c, grads_c = _loss_and_grads(cfg, _mesh(**axes), batch)
  np.testing.assert_allclose(loss_c, loss_1, rtol=1e-6)
  # Relative to the largest gradient: some entries are exactly zero in exact
  # arithmetic (they come out as 1e-12 noise either way).
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_1))
  sharded = dict(jax.tree_util.tree_leaves_with_path(grads_c))
  for path, g1 in jax.tree_util.tree_leaves_with_path(grads_1):
    np.testing.assert_allclose(sharded[path], g1, atol=1e-5 * scale, rtol=0, err_msg=str(path))


@pytest.mark.parametrize('mode,present,absent', [('ring', 'collective-permute', 'all-gather'),
                                                 ('allgather', 'all-gather', 'collective-permute')])
def test_hlo_collectives(mode, present, absent):
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 16, heads, 8)), jnp.float32) for heads in (4, 2, 2))
  mesh = _mesh(data=2, context=4)

  def split(q, k, v):
    with sharding.activation_sharding(mesh):
      return context_parallel.dot_product_attention(q, k, v, mode=mode, sliding_window=5)

  # Inputs and output split as the residual stream is: no resharding around.
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data', 'context'))
  hlo = jax.jit(split, in_shardings=rows, out_shardings=rows).lower(q, k, v).compile().as_text()
  assert present in hlo and absent not in hlo
  if mode == 'ring':      # one hand-on per step but the last, for K, V and segment ids
    assert hlo.count('collective-permute(') + hlo.count('collective-permute-start(') >= 3 * 3


def test_config_refuses_a_context_that_does_not_split_the_sequence():
  with pytest.raises(configs.ConfigError, match='mesh.context=3'):
    configs.load('configs/llama.py:tiny', ['mesh.context=3', 'train.seq_len=16'])
  with pytest.raises(configs.ConfigError, match='model.context_parallel'):
    configs.load('configs/llama.py:tiny', ['model.context_parallel=ulysses'])


@pytest.mark.parametrize('mode', ['allgather', 'ring'])
def test_per_device_temporaries_fall_with_context(mode):
  from train import plan as plan_lib  # pylint: disable=g-import-not-at-top
  temps = {}
  for c in (1, 4):
    cfg = configs.load('configs/llama.py:tiny', [
        'train.seq_len=512', 'model.max_seq_len=512', 'train.global_batch_size=1',
        'mesh.data=1', f'mesh.context={c}', f'model.context_parallel={mode}'])
    temps[c] = plan_lib.plan(cfg, c, 'cpu')['temp']
  # 1/4 of the activations, plus what every device keeps whole (gradients of
  # the replicated parameters).
  assert temps[4] < 0.35 * temps[1], temps


def test_switching_the_mode_is_a_runtime_change_on_resume():
  import json  # pylint: disable=g-import-not-at-top
  from train import checkpoint  # pylint: disable=g-import-not-at-top
  from train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  saved = json.loads(workdir_lib.config_json(configs.load('configs/llama.py:tiny')))
  shape, runtime = checkpoint.model_differences(
      saved, configs.load('configs/llama.py:tiny', ['model.context_parallel=ring']))
  assert shape == [] and len(runtime) == 1 and 'context_parallel' in runtime[0]
