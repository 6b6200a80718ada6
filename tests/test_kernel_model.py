"""A whole training step of the decoder with attention_impl='pallas' equals one with 'xla'.

The kernels reach the model through `model.attention`'s call of
`dot_product_attention`: this checks that plumbing (ALiBi slopes, the window
of local layers and none on global ones, soft-cap, memory tokens, packed
segments, the config's block sizes) end to end, forward and backward. The
loss is a plain masked cross-entropy, differentiated with `nnx.value_and_grad`.
Tolerances as the kernel tests: loss 1e-5, gradients 1e-4, relative to each
tensor's scale.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import configs
import model


def _train_step_grads(impl):
  cfg = configs.load('configs/llama.py:tiny', [
      'model.num_layers=2', 'model.position=alibi', 'model.sliding_window=12',
      'model.global_layer_interval=2', 'model.attn_logit_softcap=20.0',
      'model.num_memory_tokens=2', f'model.attention_impl={impl}',
      'model.attention_block_q=32', 'model.attention_block_kv=16'])
  decoder = model.Decoder(cfg.model, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.model.vocab_size, (2, 48)), jnp.int32)
  targets = jnp.roll(tokens, -1, axis=1)
  segment_ids = jnp.asarray([[1] * 20 + [2] * 22 + [0] * 6, [1] * 48], jnp.int32)
  weights = (segment_ids > 0).astype(jnp.float32)

  def loss_fn(decoder):
    logits, _ = decoder(tokens, segment_ids=segment_ids)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * weights) / jnp.sum(weights)

  loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(decoder)
  return loss, nnx.to_flat_state(grads)


def test_pallas_training_step_equals_xla():
  loss_x, grads_x = _train_step_grads('xla')
  loss_p, grads_p = _train_step_grads('pallas')
  np.testing.assert_allclose(loss_p, loss_x, rtol=1e-5)
  grads_x, grads_p = dict(grads_x), dict(grads_p)
  assert grads_x.keys() == grads_p.keys() and ('memory',) in grads_x
  for path, gx in grads_x.items():
    gx, gp = np.asarray(gx[...]), np.asarray(grads_p[path][...])
    assert np.abs(gx).max() > 0, path          # every parameter is reached
    np.testing.assert_allclose(gp, gx, rtol=1e-4, atol=1e-4 * np.abs(gx).max(),
                               err_msg=str(path))
