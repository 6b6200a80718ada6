"""Context parallelism (`model/context_parallel.py`, `mesh.context`) on 8 fake
CPU devices: the split attention equals the single-device reference, and the
decoder's loss and gradients equal the single-device run."""

import functools

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


MODES = ['allgather', 'ring', 'ring_contiguous']


def _split_attention(mode, mesh, **kwargs):
  def split(q, k, v):
    with sharding.activation_sharding(mesh):
      return context_parallel.dot_product_attention(q, k, v, mode=mode, **kwargs)
  return split


# Every mask is causal; heads split over `tensor` on the second mesh. Both
# masks go through one jit per (mode, mesh): one compile each.
@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('axes', [dict(data=2, context=4), dict(data=2, context=2, tensor=2)],
                         ids=['data2_context4', 'data2_context2_tensor2'])
def test_attention_equals_the_reference(mode, axes):
  mesh = _mesh(**axes)
  cases = [_attention_inputs(MASKS[name]) for name in MASKS]

  def each(f):
    return lambda inputs: [f(kwargs)(*qkv) for qkv, kwargs in zip(inputs, (c[1] for c in cases))]

  split = each(lambda kwargs: _split_attention(mode, mesh, **kwargs))
  full = each(lambda kwargs: functools.partial(attention_core.reference_attention, **kwargs))
  inputs = [c[0] for c in cases]
  for got, want in zip(jax.jit(split)(inputs), full(inputs)):
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
  square = lambda f: lambda inputs: sum(jnp.sum(o ** 2) for o in f(inputs))
  got = jax.jit(jax.grad(square(split)))(inputs)
  want = jax.grad(square(full))(inputs)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
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


# Every mask type the decoder has, two presets: LLaMA (RoPE, GQA) with a
# sliding window, soft-capped logits, attention sinks and packed segments;
# GPT-2 with ALiBi, memory tokens, a window and packed segments.
LLAMA_ALL = ('configs/llama.py:tiny', ['model.sliding_window=5', 'model.attn_logit_softcap=30.0',
                                       'model.attention_sinks=True'])
GPT2_ALL = ('configs/gpt2.py:tiny', ['model.position=alibi', 'model.num_memory_tokens=3',
                                     'model.sliding_window=6'])
DATA_CONTEXT, FSDP_CONTEXT = dict(data=2, context=4), dict(fsdp=2, context=4)
# (mode, model case, mesh): the ring (load-balanced) on both meshes with both
# presets; all-gather and the contiguous ring once each.
DECODER_CASES = {
    'ring_llama_data2_context4': ('ring', LLAMA_ALL, DATA_CONTEXT),
    'ring_gpt2_data2_context4': ('ring', GPT2_ALL, DATA_CONTEXT),
    'ring_llama_fsdp2_context4': ('ring', LLAMA_ALL, FSDP_CONTEXT),
    'ring_gpt2_fsdp2_context4': ('ring', GPT2_ALL, FSDP_CONTEXT),
    'allgather_llama_data2_context4': ('allgather', LLAMA_ALL, DATA_CONTEXT),
    'allgather_gpt2_fsdp2_context4': ('allgather', GPT2_ALL, FSDP_CONTEXT),
    'ring_contiguous_gpt2_fsdp2_context4': ('ring_contiguous', GPT2_ALL, FSDP_CONTEXT),
}


@functools.lru_cache(maxsize=None)
def _one_device(preset, overrides):
  """The single-device loss and gradients (one compile per preset)."""
  cfg = configs.load(preset, ['model.num_layers=2', 'train.seq_len=16',
                              'train.global_batch_size=4', *overrides])
  batch = _batch(cfg, segments=True)
  return batch, _loss_and_grads(cfg, None, batch)


@pytest.mark.parametrize('name', list(DECODER_CASES))
def test_decoder_loss_and_grads_equal_one_device(name):
  mode, (preset, overrides), axes = DECODER_CASES[name]
  batch, (loss_1, grads_1) = _one_device(preset, tuple(overrides))
  cfg = configs.load(preset, ['model.num_layers=2', 'train.seq_len=16',
                              'train.global_batch_size=4', f'model.context_parallel={mode}',
                              *overrides])
  loss_c, grads_c = _loss_and_grads(cfg, _mesh(**axes), batch)
  np.testing.assert_allclose(loss_c, loss_1, rtol=1e-6)
  # Relative to the largest gradient: some entries are exactly zero in exact
  # arithmetic (they come out as 1e-12 noise either way).
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_1))
  sharded = dict(jax.tree_util.tree_leaves_with_path(grads_c))
  for path, g1 in jax.tree_util.tree_leaves_with_path(grads_1):
    np.testing.assert_allclose(sharded[path], g1, atol=1e-5 * scale, rtol=0, err_msg=str(path))


def _visible_chunk_pairs(chunks_of, c, num_chunks):
  """Per device, the (query chunk, key chunk) pairs that hold a visible causal
  pair, counted from the full causal mask in NumPy (one position per chunk)."""
  causal = np.tril(np.ones((num_chunks, num_chunks), bool))
  return [int(sum(causal[a].sum() for a in chunks_of(d))) for d in range(c)]


def test_ring_order_balances_the_causal_work():
  c = 8
  mesh = _mesh(context=c)
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(1, 4 * c, heads, 8)), jnp.float32) for heads in (2, 1, 1))
  folds = {}
  for mode in ('ring', 'ring_contiguous'):
    def split(q, k, v, mode=mode):
      with sharding.activation_sharding(mesh):
        return context_parallel._sharded(  # pylint: disable=protected-access
            q, k, v, mode=mode, mesh=mesh, c=c, segment_ids=None, causal=True,
            sliding_window=None, alibi_slopes=None, logit_softcap=None, scale=None,
            num_memory_tokens=0, sink_logits=None, count_folds=True)[1]
    folds[mode] = list(np.asarray(jax.jit(split)(q, k, v)))
  # Zigzag: device d holds chunks d and 2c-1-d of 2c; every device folds the
  # same number of half-size pairs (2c + 1), against d + 1 whole blocks in
  # the contiguous order.
  assert folds['ring'] == _visible_chunk_pairs(lambda d: (d, 2 * c - 1 - d), c, 2 * c)
  assert folds['ring'] == [2 * c + 1] * c
  assert folds['ring_contiguous'] == _visible_chunk_pairs(lambda d: (d,), c, c)
  # The slowest device's work in units of (t/c)^2 score tiles: (2c+1)/4 against c.
  assert max(folds['ring']) / 4 < 0.6 * max(folds['ring_contiguous'])


@pytest.mark.parametrize('mode,present,absent', [('ring', 'collective-permute', 'all-gather'),
                                                 ('ring_contiguous', 'collective-permute',
                                                  'all-gather'),
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
  permutes = hlo.count('collective-permute(') + hlo.count('collective-permute-start(')
  if mode == 'ring_contiguous':   # one hand-on per step but the last, for K, V and segment ids
    assert permutes >= 3 * 3
  if mode == 'ring':   # and the zigzag layout: 2 per array in (q, k, v, segments), 2 out
    assert permutes >= 3 * 3 + 2 * 4 + 2


def test_config_refuses_a_context_that_does_not_split_the_sequence():
  with pytest.raises(configs.ConfigError, match='mesh.context=3'):
    configs.load('configs/llama.py:tiny', ['mesh.context=3', 'train.seq_len=16'])
  with pytest.raises(configs.ConfigError, match='model.context_parallel'):
    configs.load('configs/llama.py:tiny', ['model.context_parallel=ulysses'])
  with pytest.raises(configs.ConfigError, match='model.attention_impl=xla'):
    configs.load('configs/llama.py:tiny', ['mesh.context=2', 'model.attention_impl=pallas',
                                           'model.sliding_window=4'])
  configs.load('configs/llama.py:tiny', ['mesh.context=2', 'model.attention_impl=pallas',
                                         'model.context_parallel=ring'])


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


@pytest.mark.parametrize('mode', ['ring', 'allgather'])
def test_flash_kernel_per_chunk_equals_the_xla_path(mode):
  """attention_impl='pallas' (the kernel in interpret mode on CPU, one call per
  chunk pair, merged by lse): output and q, k, v and sink gradients equal the
  XLA context-parallel path, with GQA, packed segments, soft-capping and sinks."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 16, heads, 8)), jnp.float32) for heads in (4, 2, 2))
  sinks = jnp.asarray([0.5, -1.0, 2.0, 0.0])
  kwargs = dict(segment_ids=jnp.asarray([[0] * 6 + [1] * 10, [0] * 3 + [1] * 5 + [2] * 8]),
                logit_softcap=3.0)
  mesh = _mesh(data=2, context=4)

  def run(impl):
    def loss(q, k, v, sinks):
      with sharding.activation_sharding(mesh):
        out = context_parallel.dot_product_attention(q, k, v, mode=mode, impl=impl,
                                                     sink_logits=sinks, **kwargs)
      return jnp.sum(out ** 2), out
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, sinks)

  (_, out_kernel), grads_kernel = run('pallas')
  (_, out_xla), grads_xla = run('xla')
  np.testing.assert_allclose(out_kernel, out_xla, atol=2e-6, rtol=0)
  for g, w in zip(grads_kernel, grads_xla):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)


def test_flash_kernel_refuses_masks_with_global_offsets():
  q = k = v = jnp.zeros((2, 16, 2, 8), jnp.float32)
  mesh = _mesh(data=2, context=4)
  with sharding.activation_sharding(mesh):
    with pytest.raises(ValueError, match='attention_impl=xla'):
      context_parallel.dot_product_attention(q, k, v, mode='ring', impl='pallas',
                                             sliding_window=4)
