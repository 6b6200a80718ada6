"""python -m model.hf import / export: HF folder -> ablax workdir -> HF folder."""

import json
import os

import numpy as np
import jax.numpy as jnp
from safetensors.numpy import load_file

from model import hf
from tests import hf_families


def test_import_workdir_then_export(tmp_path):
  # 320 ids: the workdir's default bytes tokenizer (258 ids) must fit.
  model = hf_families.make_hf_model('qwen3', vocab_size=320)
  model.save_pretrained(tmp_path / 'hf')
  hf.main(['import', str(tmp_path / 'hf'), '--workdir', str(tmp_path / 'work')])
  with open(tmp_path / 'work' / 'config.json') as f:
    saved = json.load(f)
  assert saved['model']['qk_norm'] is True
  assert os.path.isdir(tmp_path / 'work' / 'checkpoints' / '0')

  cfg, decoder = hf.load_workdir(str(tmp_path / 'work'))
  tokens = hf_families.random_tokens(0, (1, 16))
  got, _ = decoder(jnp.asarray(tokens))
  want = hf_families.hf_logits(model, tokens)
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-4 * np.abs(want).max())

  hf.main(['export', str(tmp_path / 'work'), '--out', str(tmp_path / 'back')])
  before = load_file(str(tmp_path / 'hf' / 'model.safetensors'))
  after = load_file(str(tmp_path / 'back' / 'model.safetensors'))
  assert sorted(before) == sorted(after)
  for name in before:
    np.testing.assert_array_equal(before[name], after[name], err_msg=name)
