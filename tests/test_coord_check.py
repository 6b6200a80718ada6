"""The muP coordinate check: flat activations across widths under muP, growing
ones under SP (Yang et al. 2022, Section 4), on the LLaMA preset.

Widths 64 and 512 (not 1024: a 1024-wide model takes too long on the CI's
CPU for one test); 5 Adam steps on 2 x 32 tokens, one layer.
"""

import math

import jax
import numpy as np
from flax import nnx

import configs
import model
from train import coord_check

OVERRIDES = ['model.num_layers=1', 'train.global_batch_size=2', 'train.seq_len=32']


def test_walk_reads_the_decoders_own_forward():
  cfg = configs.load('configs/llama.py:tiny', OVERRIDES)
  decoder = model.Decoder(cfg.model, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, 320)
  _, logits = coord_check.activation_rms(decoder, tokens)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(decoder(tokens)[0]),
                             rtol=1e-6, atol=1e-6)


def test_mup_keeps_activations_flat_and_sp_does_not():
  cfg = configs.load('configs/llama.py:tiny', OVERRIDES)
  rows = coord_check.coord_check(cfg, [64, 512], steps=5)
  last = {(r['parametrisation'], r['width']): r for r in rows if r['step'] == 5}
  for layer in coord_check.LAYER_TYPES:
    ratio = last['mup', 512][layer] / last['mup', 64][layer]
    assert abs(math.log(ratio)) < math.log(1.5), (layer, ratio)
  # SP: the logits and both residual branches grow well past 1.5x.
  for layer in ('attention', 'mlp', 'logits'):
    assert last['sp', 512][layer] > 1.5 * last['sp', 64][layer], layer
  # Both start from the same model at the base width.
  for layer in coord_check.LAYER_TYPES:
    assert last['sp', 64][layer] == last['mup', 64][layer], layer
