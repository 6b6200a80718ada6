"""model.scan_layers: the scanned decoder against the unrolled one.

The unrolled decoder is the reference: same seed, the scanned decoder must
hold the same weights (after `model.scan.to_scanned`), give the same logits,
aux losses and gradients (to float32 rounding), and compile one block body
inside a loop instead of num_layers copies.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
import model
from model import scan as scan_lib


def small(preset, **fields):
  m = configs.load(f'configs/{preset}.py:tiny').model
  m.update(dict(d_model=16, num_heads=2, num_kv_heads=1, d_ff=32, vocab_size=64,
                num_layers=4, max_seq_len=64))
  m.update(fields)
  return m


PRESETS = {
    'llama': lambda: small('llama'),
    # window/global alternation with a window shorter than the sequence
    'gemma2': lambda: small('gemma2', sliding_window=3),
    # MoE every second layer: dense, MoE, dense, MoE -> period 2
    'mixtral': lambda: small('mixtral', moe_layer_interval=2, moe_d_ff=16,
                             num_experts=4),
    'memory': lambda: small('llama', num_memory_tokens=2, remat='full'),
}


def pair(m):
  """(unrolled, scanned) decoders from the same seed."""
  m = m.copy_and_resolve_references()
  m.scan_layers = False
  unrolled = model.Decoder(m, rngs=nnx.Rngs(0))
  m.scan_layers = True
  scanned = model.Decoder(m, rngs=nnx.Rngs(0))
  return m, unrolled, scanned


def params(decoder):
  return nnx.to_pure_dict(nnx.state(decoder, nnx.Param))


def assert_trees_close(a, b, tol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


@pytest.mark.parametrize('preset', sorted(PRESETS))
def test_same_weights_logits_losses_and_grads(preset):
  m, unrolled, scanned = pair(PRESETS[preset]())
  assert scanned.scan_period is not None
  # Same seed -> the same weights, stacked.
  conv = scan_lib.to_scanned(params(unrolled), m.num_layers, scanned.scan_prefix,
                             scanned.scan_period)
  assert_trees_close(conv, params(scanned), 0)

  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, m.vocab_size)
  segments = jnp.array([[1] * 5 + [2] * 3, [1] * 8])

  def loss(decoder):
    logits, aux = decoder(tokens, segments)
    logp = jax.nn.log_softmax(logits[:, :-1])
    ce = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()
    return ce + sum(jnp.sum(v) for v in aux.values()), (logits, aux)

  (lu, (xu, au)), gu = nnx.value_and_grad(loss, has_aux=True)(unrolled)
  (ls, (xs, as_)), gs = nnx.value_and_grad(loss, has_aux=True)(scanned)
  np.testing.assert_allclose(xs, xu, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ls, lu, rtol=1e-5)
  assert sorted(au) == sorted(as_)
  for key in au:
    np.testing.assert_allclose(as_[key], au[key], rtol=1e-5, atol=1e-6)
  gu = scan_lib.to_scanned(nnx.to_pure_dict(gu), m.num_layers, scanned.scan_prefix,
                           scanned.scan_period)
  assert_trees_close(gu, nnx.to_pure_dict(gs), 1e-5)


def test_layout_groups_by_structure():
  # gemma2: window/global alternate -> period 2, no prefix.
  assert scan_lib.layout(small('gemma2')) == (0, 2)
  assert scan_lib.layout(small('llama')) == (0, 1)
  assert scan_lib.layout(small('mixtral', moe_layer_interval=2)) == (0, 2)
  # A prefix that does not fit the period is unrolled.
  keys = ['d', 'm', 'm', 'm', 'm']
  assert scan_lib.find_layout(keys) == (1, 1)
  assert scan_lib.find_layout(['a', 'b', 'a', 'b', 'a', 'b']) == (0, 2)
  assert scan_lib.find_layout(['x', 'a', 'b', 'a', 'b']) == (1, 2)
  assert scan_lib.find_layout(['a', 'b', 'c']) == (3, None)


def test_layout_conversion_round_trips():
  m, unrolled, scanned = pair(PRESETS['gemma2']())
  pu, ps = params(unrolled), params(scanned)
  assert_trees_close(scan_lib.convert(ps, m, scanned=False), pu, 0)
  assert_trees_close(scan_lib.convert(pu, m, scanned=True), ps, 0)
  assert_trees_close(
      scan_lib.convert(scan_lib.convert(ps, m, scanned=False), m, scanned=True), ps, 0)
  # The stacked axis has a logical name that maps to no mesh axis.
  variable = jax.tree.leaves(nnx.state(scanned.scan_blocks, nnx.Param),
                             is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  assert variable.get_metadata()['logical_axes'][0] == 'layers'
  from train import sharding  # pylint: disable=import-outside-toplevel
  assert sharding.RULES['layers'] is None


def _dots(num_layers, scan_layers):
  m = small('llama', num_layers=num_layers, scan_layers=scan_layers)
  decoder = model.Decoder(m, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(decoder)
  tokens = jnp.zeros((1, 4), jnp.int32)
  text = jax.jit(lambda s: nnx.merge(graphdef, s)(tokens)[0]).lower(state).as_text()
  return text.count('dot_general'), text.count('stablehlo.while')


def test_scanned_program_holds_one_block():
  dots2, loops2 = _dots(2, True)
  dots6, loops6 = _dots(6, True)
  assert dots2 == dots6 and loops2 == loops6 == 1
  unrolled2, _ = _dots(2, False)
  unrolled6, _ = _dots(6, False)
  assert unrolled6 > unrolled2            # the reference: unrolled grows with depth


def test_cached_decoding_runs_scanned_params_unrolled():
  from model import kv_cache  # pylint: disable=import-outside-toplevel
  m, unrolled, scanned = pair(PRESETS['gemma2']())
  tokens = jax.random.randint(jax.random.key(2), (1, 7), 0, m.vocab_size)
  assert len(scanned.init_cache(1, 8)) == m.num_layers
  outs = []
  for decoder in (unrolled, scanned):
    cache = decoder.init_cache(1, 8)
    prefill = kv_cache.Chunk(jnp.arange(6, dtype=jnp.int32)[None], prefill=True)
    logits, _, cache = decoder(tokens[:, :6], cache=cache, chunk=prefill)
    step = kv_cache.Chunk(jnp.full((1, 1), 6, jnp.int32))
    last, _, _ = decoder(tokens[:, 6:], cache=cache, chunk=step)
    outs.append(jnp.concatenate([logits, last], axis=1))
  np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('saved_scanned', [True, False])
def test_checkpoint_restores_in_the_other_layout(tmp_path, saved_scanned):
  from train import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
  from train import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from train import optim  # pylint: disable=import-outside-toplevel
  from train import step as step_lib  # pylint: disable=import-outside-toplevel
  from train import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  overrides = ['model.num_layers=4', 'model.d_model=16', 'model.d_ff=32',
               'model.num_heads=2', 'model.num_kv_heads=1', 'model.vocab_size=64',
               'train.global_batch_size=1']
  cfg = configs.load('configs/gemma2.py:tiny', overrides)
  mesh = mesh_lib.make_mesh(cfg.mesh)

  def build(scan_layers):
    c = cfg.copy_and_resolve_references()
    c.model.scan_layers = scan_layers
    optimizer, _ = optim.make_optimizer(c.train, c.model)
    return c, step_lib.train_state_spec(
        lambda: model.Decoder(c.model, rngs=nnx.Rngs(0)), optimizer, mesh, 0)

  saved_cfg, (_, init, _, shardings) = build(saved_scanned)
  state = jax.jit(init, out_shardings=shardings)()
  state['params'] = jax.tree.map(lambda x: x * 1.5, state['params'])  # not the init
  workdir = str(tmp_path)
  with checkpoint_lib.Checkpointer(workdir, every_steps=1, keep=1) as ckpt:
    ckpt.save(3, state, force=True)
  workdir_lib.write_config(workdir, saved_cfg)

  run_cfg, (_, _, abstract, _) = build(not saved_scanned)
  step_dir = workdir_lib.step_dir(workdir, 3)
  params, _ = checkpoint_lib.load_init_params(run_cfg, step_dir, workdir, abstract,
                                              field='train.init_checkpoint')
  # Reference: the saved model with the saved params, against the run's
  # model (other layout, other seed) with the converted ones.
  saved_decoder = model.Decoder(saved_cfg.model, rngs=nnx.Rngs(1))
  nnx.update(saved_decoder, jax.device_get(state['params']))
  run_decoder = model.Decoder(run_cfg.model, rngs=nnx.Rngs(2))
  nnx.update(run_decoder, jax.device_get(params))
  tokens = jax.random.randint(jax.random.key(3), (1, 8), 0, 64)
  np.testing.assert_allclose(run_decoder(tokens)[0], saved_decoder(tokens)[0],
                             rtol=1e-5, atol=1e-5)
  # ... and the parameters themselves, exactly
  assert sum(x.size for x in jax.tree.leaves(params)) == sum(
      x.size for x in jax.tree.leaves(state['params']))
  # A resume with the other layout is accepted: the restore converts the
  # whole state (tests/test_scan_resume.py).
  checkpoint_lib.check_config(workdir, run_cfg)


SAMPLED = {
    'llama': lambda: small('llama'),                                    # KV cache
    'gemma2': lambda: small('gemma2', sliding_window=3),                # window/global
    'deepseek_v3': lambda: small('deepseek_v3', num_layers=3),          # MLA latents, MoE
    'qwen3_next': lambda: small('qwen3_next', num_layers=8),                       # GDN recurrent state
}


@pytest.mark.parametrize('preset', sorted(SAMPLED))
def test_sampling_is_the_same_in_both_layouts(preset):
  """`train.sample.generate` (prefill, then cached one-token steps) of the
  scanned decoder gives the unrolled decoder's tokens and step logits."""
  from train import sample  # pylint: disable=import-outside-toplevel
  m, unrolled, scanned = pair(SAMPLED[preset]())
  assert scanned.scan_period is not None
  prompts = [[1, 2, 3, 4, 5], [6, 7]]
  got = [sample.generate(d, m, prompts, max_new_tokens=4, full_output=True)
         for d in (unrolled, scanned)]
  assert got[1].tokens == got[0].tokens
  np.testing.assert_allclose(np.asarray(got[1].logits), np.asarray(got[0].logits),
                             rtol=1e-5, atol=1e-5)


def test_hf_export_of_a_scanned_decoder_loads_back(tmp_path):
  from model import hf  # pylint: disable=import-outside-toplevel
  cfg = configs.load('configs/gemma2.py:tiny', ['model.vocab_size=64', 'model.num_layers=4',
                                                'model.sliding_window=3',
                                                'model.scan_layers=true'])
  scanned = model.Decoder(cfg.model, rngs=nnx.Rngs(3))
  hf.save(cfg, scanned, str(tmp_path))
  loaded_cfg, loaded = hf.load(str(tmp_path))     # unrolled
  assert loaded.scan_period is None
  tokens = jax.random.randint(jax.random.key(4), (1, 8), 0, 64)
  np.testing.assert_allclose(loaded(tokens)[0], scanned(tokens)[0], rtol=1e-5, atol=1e-5)
  # ... and into the scanned layout again, exactly
  back = scan_lib.convert(params(loaded), cfg.model, scanned=True)
  assert_trees_close(back, params(scanned), 0)


def test_sharded_training_steps_match_unrolled():
  """An AdamW step of a mixtral-like model (MoE every second layer) on a
  data x fsdp x expert mesh: scanned and unrolled give the same losses, and the
  stacked parameters are split like the unrolled ones with the `layers` axis
  whole."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from train import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from train import optim  # pylint: disable=import-outside-toplevel
  from train import sharding  # pylint: disable=import-outside-toplevel
  from train import step as step_lib  # pylint: disable=import-outside-toplevel
  cfg = configs.load('configs/mixtral.py:tiny', [
      'model.num_layers=4', 'model.moe_layer_interval=2', 'model.num_experts=4',
      'model.d_model=16', 'model.d_ff=32', 'model.moe_d_ff=16', 'model.num_heads=2',
      'model.num_kv_heads=1', 'model.vocab_size=64', 'train.global_batch_size=8'])
  axes = {'data': 2, 'fsdp': 2, 'expert': 2}
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(
      {a: axes.get(a, 1) for a in mesh_lib.AXES}), jax.devices()[:8])
  tokens = jax.random.randint(jax.random.key(5), (8, 9), 0, 64)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
           'loss_mask': jnp.ones((8, 8), jnp.int32)}
  batch = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in batch.items()}
  out = {}
  for scan_layers in (False, True):
    c = cfg.copy_and_resolve_references()
    c.model.scan_layers = scan_layers
    optimizer, schedule = optim.make_optimizer(c.train, c.model)
    graphdef, init, _, shardings = step_lib.train_state_spec(
        lambda c=c: model.Decoder(c.model, rngs=nnx.Rngs(0)), optimizer, mesh, 0)
    state = jax.jit(init, out_shardings=shardings)()
    train_step = step_lib.make_train_step(
        step_lib.lm_loss(c.train), optimizer, graphdef=graphdef,
        state_shardings=shardings, mesh=mesh, schedule=schedule)
    losses = []
    for _ in range(1):
      state, metrics = train_step(state, batch)
      losses.append(float(metrics['loss']))
    out[scan_layers] = losses, state['params']
  np.testing.assert_allclose(out[True][0], out[False][0], rtol=2e-5)
  unrolled = nnx.to_pure_dict(out[False][1])
  stacked = nnx.to_pure_dict(out[True][1])
  for j, block in stacked['scan_blocks'].items():
    want = unrolled['blocks'][j]
    for (path, got), (_, ref) in zip(jax.tree_util.tree_flatten_with_path(block)[0],
                                     jax.tree_util.tree_flatten_with_path(want)[0]):
      pad = lambda x: tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
      assert pad(got) == (None, *pad(ref)), path
  # ... and the parameters after the step agree in the unrolled layout
  assert_trees_close(scan_lib.convert(jax.device_get(stacked), c.model, scanned=False),
                     jax.device_get(unrolled), 1e-5)
