"""DPO data: prompt-token identity, BOS/EOS, truncation, masks, bad lines, builtin pairs."""

import json

import numpy as np
import pytest

import configs
from align import data
from data import tokenizers


def _bpe_tokenizer(tmp_path):
  """A tiny byte-pair model without a pre-tokenizer, so merges cross any boundary."""
  from tokenizers import Tokenizer, models, trainers  # pylint: disable=g-import-not-at-top
  tok = Tokenizer(models.BPE(unk_token='[UNK]'))
  trainer = trainers.BpeTrainer(vocab_size=40, special_tokens=['[UNK]', '<s>', '</s>'])
  tok.train_from_iterator(['abcabcabc abc xyzabc', 'abcab cab bcab'] * 50, trainer)
  path = tmp_path / 'tokenizer.json'
  tok.save(str(path))
  return tokenizers.get_tokenizer(f'hf:{path}')


def test_prompt_ids_identical_when_merges_cross_the_boundary(tmp_path):
  tok = _bpe_tokenizer(tmp_path)
  prompt, chosen, rejected = 'xyzab', 'cabc', 'c ab'
  # The premise: tokenizing prompt + response together re-tokenises the prompt's end.
  joint = tok.encode(prompt + chosen)
  assert joint[:len(tok.encode(prompt))] != tok.encode(prompt)
  rows = data.TokenizePair(tok, max_prompt_len=16, max_len=32)((prompt, chosen, rejected))
  p = [tok.bos_id] + tok.encode(prompt)
  for side, response in (('chosen', chosen), ('rejected', rejected)):
    full = p + tok.encode(response) + [tok.eos_id]
    n = len(full) - 1
    np.testing.assert_array_equal(rows[f'{side}_inputs'][:n], full[:-1])
    np.testing.assert_array_equal(rows[f'{side}_targets'][:n], full[1:])
    # Only targets that are response tokens (or the final EOS) count.
    want_mask = np.zeros(32, np.float32)
    want_mask[len(p) - 1:n] = 1
    np.testing.assert_array_equal(rows[f'{side}_loss_mask'], want_mask)
    np.testing.assert_array_equal(rows[f'{side}_segment_ids'][:n], 1)
    np.testing.assert_array_equal(rows[f'{side}_segment_ids'][n:], 0)
  np.testing.assert_array_equal(rows['chosen_inputs'][:len(p)], rows['rejected_inputs'][:len(p)])


def test_truncation_keeps_prompt_end_and_cuts_response_end():
  tok = tokenizers.BytesTokenizer()
  rows = data.TokenizePair(tok, max_prompt_len=4, max_len=10)(
      ('0123456789', 'abcdefghij', 'xy'))
  # Chosen: BOS + '6789' + 'abcdef' = 11 tokens, cut to max_len + 1 = 11; no EOS.
  want = [tok.bos_id] + list(b'6789abcdef')
  np.testing.assert_array_equal(rows['chosen_inputs'], want[:-1])
  np.testing.assert_array_equal(rows['chosen_targets'], want[1:])
  np.testing.assert_array_equal(rows['chosen_loss_mask'], [0, 0, 0, 0] + [1] * 6)
  # Rejected fits: BOS + '6789' + 'xy' + EOS, then padding.
  want = [tok.bos_id] + list(b'6789xy') + [tok.eos_id]
  np.testing.assert_array_equal(rows['rejected_inputs'][:7], want[:-1])
  np.testing.assert_array_equal(rows['rejected_targets'][:7], want[1:])
  np.testing.assert_array_equal(rows['rejected_loss_mask'], [0, 0, 0, 0, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(rows['rejected_positions'][:7], np.arange(7))


def _write(path, lines):
  path.write_text('\n'.join(lines) + '\n')
  return str(path)


GOOD = json.dumps({'prompt': 'p', 'chosen': 'yes', 'rejected': 'no'})


def test_bad_lines_name_file_and_line(tmp_path):
  cases = {
      '{"prompt": "p", "chosen": "a"': 'bad JSON',
      '["p", "a", "b"]': 'not a JSON object',
      json.dumps({'prompt': 'p', 'chosen': 'a'}): "missing field 'rejected'",
      json.dumps({'prompt': 'p', 'chosen': ' ', 'rejected': 'b'}): "empty response 'chosen'",
      json.dumps({'prompt': 1, 'chosen': 'a', 'rejected': 'b'}): "'prompt' is int",
  }
  for i, (bad, reason) in enumerate(cases.items()):
    path = _write(tmp_path / f'p{i}.jsonl', [GOOD, '', GOOD, bad, GOOD])
    with pytest.raises(data.DataError, match=f'{path}:4: .*{reason}'):
      data.read_jsonl_pairs([path])


def test_skipping_bad_lines_counts_them(tmp_path):
  a = _write(tmp_path / 'a.jsonl', [GOOD, '{oops', GOOD, ''])
  b = _write(tmp_path / 'b.jsonl', [json.dumps({'prompt': 'p', 'chosen': 'c', 'rejected': ''}),
                                    GOOD, '3'])
  pairs, skipped = data.read_jsonl_pairs([a, b], skip_bad_lines=True)
  assert skipped == 3
  assert pairs == [('p', 'yes', 'no')] * 3


def _cfg(**dpo):
  cfg = configs.load('configs/dpo.py:tiny', ['train.global_batch_size=4',
                                             'dpo.max_prompt_len=16', 'dpo.max_len=32',
                                             'train.eval_steps=2'])
  for k, v in dpo.items():
    cfg.dpo[k] = v
  return cfg


def test_jsonl_iterator_batches_and_resumes(tmp_path):
  lines = [json.dumps({'prompt': f'q{i}', 'chosen': f'good {i}', 'rejected': f'bad {i}'})
           for i in range(10)]
  path = _write(tmp_path / 'pairs.jsonl', lines)
  cfg = _cfg(train_files=path, eval_files=path)
  it = data.make_iterator(cfg, 'train')
  first = next(it)
  assert first['chosen_inputs'].shape == (4, 32)
  state = it.get_state()
  second = next(it)
  it2 = data.make_iterator(cfg, 'train')
  it2.set_state(state)
  np.testing.assert_array_equal(next(it2)['chosen_inputs'], second['chosen_inputs'])
  evals = list(data.make_iterator(cfg, 'eval'))
  assert len(evals) == 2
  # Eval reads the file in order: pair 0 first.
  tok = tokenizers.BytesTokenizer()
  row = evals[0]['chosen_inputs'][0][evals[0]['chosen_segment_ids'][0] > 0]
  assert tok.decode(row) == 'q0good 0'


def test_builtin_pairs_are_real_passages_and_deterministic():
  pairs = data.BuiltinPairs('eval', prompt_chars=40, response_chars=30)
  again = data.BuiltinPairs('eval', prompt_chars=40, response_chars=30)
  for k in (0, 1, 7, len(pairs) - 1):
    prompt, chosen, rejected = pairs[k]
    assert (prompt, chosen, rejected) == again[k]
    assert len(prompt) == 40 and len(chosen) == 30 and len(rejected) == 30
    source = pairs.texts[k % len(pairs.texts)]
    assert prompt + chosen in source            # the true continuation
    assert chosen != rejected
    assert prompt.endswith('\n')                # cut at a line start
  # Prompts across pairs differ (they are spread over files and positions).
  assert len({pairs[k][0] for k in range(20)}) == 20


def test_pair_index_follows_each_pair_through_shuffling_and_processes(tmp_path):
  lines = [json.dumps({'prompt': f'q{i}|', 'chosen': f'good {i}', 'rejected': f'bad {i}'})
           for i in range(10)]
  path = _write(tmp_path / 'pairs.jsonl', lines)
  cfg = _cfg(train_files=path, eval_files=path)
  tok = tokenizers.BytesTokenizer()

  def prompt_number(batch, r):
    text = tok.decode(batch['chosen_inputs'][r][batch['chosen_segment_ids'][r] > 0])
    return int(text.split('|')[0][1:])

  it = data.make_iterator(cfg, 'train')
  seen = []
  for _ in range(6):                    # 24 rows: more than two epochs of 10 pairs
    batch = next(it)
    assert batch['pair_index'].shape == (4,) and batch['pair_index'].dtype == np.int32
    for r in range(4):
      assert batch['pair_index'][r] == prompt_number(batch, r)
      seen.append(int(batch['pair_index'][r]))
  assert seen[:10] != list(range(10)) and sorted(seen[:10]) == list(range(10))
  # Two processes read the first batch's pairs between them (process p the
  # stream's items p, p + 2, ...), with the same indices.
  for p in (0, 1):
    half = next(data.make_iterator(cfg, 'train', p, 2))
    np.testing.assert_array_equal(half['pair_index'], seen[p:4:2])
    assert [prompt_number(half, r) for r in range(2)] == seen[p:4:2]
  evals = [b['pair_index'] for b in data.make_iterator(cfg, 'eval')]
  np.testing.assert_array_equal(np.concatenate(evals), np.arange(8))
  # Once over the pairs, in order, the last batch filled with empty rows.
  ordered = list(data.ordered_batches(cfg, 'train', 4))
  np.testing.assert_array_equal(np.concatenate([b['pair_index'] for b in ordered]),
                                list(range(10)) + [-1, -1])
  assert prompt_number(ordered[2], 1) == 9
  assert not ordered[2]['chosen_loss_mask'][2:].any()
  assert not ordered[2]['chosen_segment_ids'][2:].any()
