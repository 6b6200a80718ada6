"""model.hf: export to transformers, and HF -> ablax -> HF without a bit changed."""

import numpy as np
import pytest
import jax.numpy as jnp
from flax import nnx
from safetensors.numpy import load_file

import configs
import model as model_lib
from model import hf
from tests import hf_families

transformers = pytest.importorskip(
    'transformers', reason='needs transformers (the Hugging Face reference)')


@pytest.mark.parametrize('family', ['llama', 'qwen2', 'gemma2', 'gpt2', 'qwen3_moe'])
def test_hf_ablax_hf_is_bitwise_identical(family, tmp_path):
  model = hf_families.make_hf_model(family, quantize_norms=True)
  model.save_pretrained(tmp_path / 'in')
  cfg, decoder = hf.load(str(tmp_path / 'in'))
  hf.save(cfg, decoder, str(tmp_path / 'out'))
  before = load_file(str(tmp_path / 'in' / 'model.safetensors'))
  after = load_file(str(tmp_path / 'out' / 'model.safetensors'))
  assert sorted(before) == sorted(after)
  for name in before:
    assert before[name].dtype == after[name].dtype, name
    np.testing.assert_array_equal(before[name], after[name], err_msg=name)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / 'out', attn_implementation='eager')
  assert type(reloaded).__name__ == type(model).__name__


@pytest.mark.parametrize('preset,overrides', [
    ('configs/llama.py:tiny', ['model.vocab_size=128', 'model.num_layers=2']),
    ('configs/gemma2.py:tiny', ['model.vocab_size=128', 'model.num_layers=2',
                                'model.sliding_window=8']),
    ('configs/mixtral.py:tiny', ['model.vocab_size=128', 'model.num_layers=2']),
])
def test_ablax_to_transformers_logits(preset, overrides, tmp_path):
  cfg = configs.load(preset, overrides)
  decoder = model_lib.Decoder(cfg.model, rngs=nnx.Rngs(3))
  # Random norm scales too, so that their mapping is checked.
  for path, var in nnx.to_flat_state(nnx.state(decoder, nnx.Param)):
    if 'norm' in '.'.join(map(str, path)):
      var.set_value(1.0 + 0.3 * np.random.RandomState(len(path)).randn(*var.get_value().shape).astype(np.float32))
  hf.save(cfg, decoder, str(tmp_path))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, attn_implementation='eager').float().eval()
  tokens = hf_families.random_tokens(5, (2, 20))
  want, _ = decoder(jnp.asarray(tokens))
  want = np.asarray(want)
  got = hf_families.hf_logits(reloaded, tokens)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.max(np.abs(want)))
