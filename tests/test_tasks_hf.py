"""`train.evaluate --tasks` on an imported Hugging Face model: its accuracies
equal a ranking computed here from transformers' own logits."""

import json

import numpy as np

from data import tokenizers
from train import hf_workdir
from tests import hf_families
from train import evaluate


def test_tasks_on_an_imported_hf_model_match_transformers(tmp_path):
  model = hf_families.make_hf_model('llama', vocab_size=320)
  model.save_pretrained(tmp_path / 'hf')
  workdir = str(tmp_path / 'work')
  hf_workdir.import_to_workdir(str(tmp_path / 'hf'), workdir)
  tok = tokenizers.get_tokenizer('bytes')      # an import's default tokenizer

  def scores(context, choices):
    """Summed log p(choice | BOS + context) from one transformers forward each."""
    out = []
    for choice in choices:
      ids = [tok.bos_id] + tok.encode(context) + tok.encode(choice)
      logits = hf_families.hf_logits(model, np.asarray([ids]))[0].astype(np.float64)
      top = logits.max(-1, keepdims=True)
      logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
      n = len(tok.encode(choice))
      out.append(sum(logp[len(ids) - 1 - n + i, ids[len(ids) - n + i]] for i in range(n)))
    return np.asarray(out)

  rng = np.random.default_rng(0)
  lines, norm_correct = [], 0
  for k in range(8):
    context = ' '.join(rng.choice(['the', 'cat', 'sat', 'on', 'a', 'mat'], size=5))
    # Near lengths: the ranking follows the logits, not the choices' lengths.
    choices = [' ' + w for w in rng.choice(['dog', 'cats', 'sun', 'maps', 'hat', 'runs'],
                                           size=4, replace=False)]
    s = scores(context, choices)
    best = int(np.argmax(s))
    label = best if k % 2 == 0 else (best + 1) % 4     # right on half of them
    norm_correct += int(np.argmax(s / np.asarray([len(c) for c in choices]))) == label
    lines.append(json.dumps({'context': context, 'choices': choices, 'label': label}))
  (tmp_path / 'mine.jsonl').write_text('\n'.join(lines) + '\n')

  out = evaluate.evaluate_tasks(workdir, f'mine:{tmp_path / "mine.jsonl"}')
  got = out['tasks']['mine']
  assert got['accuracy'] == 0.5 and got['examples'] == 8
  assert got['accuracy_norm'] == norm_correct / 8
