"""train.sample on imported models: greedy tokens equal transformers' generate."""

import numpy as np
import pytest

from model import hf
from train import sample
from tests import hf_families

torch = pytest.importorskip(
    'torch', reason='needs torch and transformers (the Hugging Face reference)')


# qwen3_next: its 'LLLA' layers decode from ablax's RecurrentCache (delta-rule
# state + conv buffer) and the A layer from its KV cache, against
# transformers' Qwen3-Next cache (recurrent steps after a chunked prefill).
# gpt_oss: sinks with the window's ring cache (window 8; gpt_oss_mqa: 4).
@pytest.mark.parametrize('family', ['mistral', 'gemma2', 'mpt', 'bloom', 'qwen3_next',
                                    'gpt_oss', 'gpt_oss_mqa'])
def test_greedy_matches_transformers_generate(family, tmp_path):
  model = hf_families.make_hf_model(family)
  model.save_pretrained(tmp_path)
  cfg, decoder = hf.load(str(tmp_path))
  prompts = hf_families.random_tokens(3, (2, 6))
  n = 8  # 6 + 8 slots run past the sliding window of 8
  with torch.no_grad():
    ids = torch.tensor(prompts, dtype=torch.long)
    # An explicit all-ones mask: no prompt token is read as padding.
    want = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                          pad_token_id=0)[:, prompts.shape[1]:].numpy()
  got = sample.generate(decoder, cfg.model, prompts.tolist(), max_new_tokens=n)
  np.testing.assert_array_equal(np.asarray(got), want)
