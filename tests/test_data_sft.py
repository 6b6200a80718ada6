"""SFT data: loss only on response tokens, packed with segment ids, exact resume.

The expected rows are built by hand from the documented layout (bytes
tokenizer: a byte is its id, BOS 256, EOS 257; the messages template
`<|role|>\\n{content}\\n`, assistant contents and their closing newline count),
not with `data/sft.py`: a position's loss counts when its target (the next
token) is a counted token of the same document piece.
"""

import json
import re

import numpy as np
import pytest

import configs
from data import builtin
from data import pipeline
from data import sources
from data import tokenizers

BOS, EOS = 256, 257
PAIR = {'prompt': 'Q?', 'response': 'Yes'}
CHAT = {'messages': [
    {'role': 'system', 'content': 'be brief'},
    {'role': 'user', 'content': 'hi'},
    {'role': 'assistant', 'content': 'yo'},
    {'role': 'user', 'content': 'ok?'},
    {'role': 'assistant', 'content': 'k'},
]}


def _hand_tokens(pieces):
  """[(text, counts)] -> (tokens, counted) of [BOS] + pieces + [EOS]."""
  tokens, counted = [BOS], [0]
  for text, counts in pieces:
    ids = list(text.encode('utf-8'))
    tokens += ids
    counted += [int(counts)] * len(ids)
  return tokens + [EOS], counted + [int(pieces[-1][1])]


# The documented layouts, written out by hand.
PAIR_TOKENS, PAIR_COUNTED = _hand_tokens([('Q?', False), ('Yes', True)])
CHAT_TOKENS, CHAT_COUNTED = _hand_tokens([
    ('<|system|>\nbe brief\n', False), ('<|user|>\nhi\n', False),
    ('<|assistant|>\n', False), ('yo\n', True),
    ('<|user|>\nok?\n', False), ('<|assistant|>\n', False), ('k\n', True)])


def _write(path, records):
  path.write_text(''.join(json.dumps(r) + '\n' for r in records), encoding='utf-8')
  return path


def _cfg(path, *overrides):
  return configs.load('configs/base.py', [
      'data.source=sft', f'data.train_files={path}', f'data.eval_files={path}',
      'train.global_batch_size=1', 'train.eval_steps=8', *overrides])


def _expected_rows(stream, counted, segments, row_len, n_rows):
  """Rows cut from a hand-made token stream: inputs, targets, loss_mask."""
  rows = []
  for r in range(n_rows):
    sl = slice(r * row_len, (r + 1) * row_len)
    tok, cnt, seg = np.array(stream[sl]), np.array(counted[sl]), np.array(segments[sl])
    same = seg[1:] == seg[:-1]
    rows.append({'inputs': tok[:-1], 'targets': tok[1:],
                 'loss_mask': (same & (cnt[1:] == 1)).astype(np.float32)})
  return rows


def test_packed_row_with_two_documents(tmp_path):
  path = _write(tmp_path / 'sft.jsonl', [PAIR, CHAT])
  # One row holds the pair, the whole chat and the first 3 tokens of the
  # pair again (the eval split reads documents in order).
  row_len = len(PAIR_TOKENS) + len(CHAT_TOKENS) + 3
  batch = next(pipeline.make_iterator(_cfg(path, f'train.seq_len={row_len - 1}'), 'eval'))
  b = {k: v[0] for k, v in batch.items()}
  row = PAIR_TOKENS + CHAT_TOKENS + PAIR_TOKENS[:3]
  np.testing.assert_array_equal(b['inputs'], row[:-1])
  np.testing.assert_array_equal(b['targets'], row[1:])
  n_pair, n_chat = len(PAIR_TOKENS), len(CHAT_TOKENS)
  np.testing.assert_array_equal(
      b['segment_ids'], [1] * n_pair + [2] * n_chat + [3] * 2)
  np.testing.assert_array_equal(
      b['positions'], list(range(n_pair)) + list(range(n_chat)) + [0, 1])
  mask = b['loss_mask']
  # The pair: targets Q ? Y e s EOS, then the boundary EOS -> BOS.
  np.testing.assert_array_equal(mask[:n_pair], [0, 0, 1, 1, 1, 1, 0])
  # The chat: position i of the chat counts iff chat token i + 1 counts.
  chat_mask = mask[n_pair:n_pair + n_chat - 1]
  np.testing.assert_array_equal(chat_mask, CHAT_COUNTED[1:])
  text = bytes(t for t, c in zip(CHAT_TOKENS[1:], CHAT_COUNTED[1:]) if c and t < 256)
  assert text == b'yo\nk\n' and CHAT_COUNTED[-1] == 1   # both turns and the EOS
  assert mask[n_pair + n_chat - 1] == 0                 # EOS -> BOS of the next
  np.testing.assert_array_equal(mask[n_pair + n_chat:], [0, 0])  # the prompt again
  # No position whose target is a prompt, system, user or marker token counts.
  assert mask.sum() == sum(PAIR_COUNTED[1:]) + sum(CHAT_COUNTED[1:])


@pytest.mark.parametrize('packing', [True, False])
def test_documents_split_across_rows_keep_their_mask(tmp_path, packing):
  path = _write(tmp_path / 'sft.jsonl', [PAIR, CHAT])
  seq_len = 8
  row_len = seq_len + 1
  it = pipeline.make_iterator(_cfg(path, f'train.seq_len={seq_len}',
                                   f'data.packing={packing}'), 'eval')
  batches = [{k: v[0] for k, v in b.items()} for b in it]
  if packing:
    # Documents end to end, cut every row_len tokens; a piece of a document
    # cut by a row boundary is a segment of its own.
    stream, counted, segs = [], [], []
    for i in range(4):
      tokens, cnt = (PAIR_TOKENS, PAIR_COUNTED) if i % 2 == 0 else (CHAT_TOKENS, CHAT_COUNTED)
      stream += tokens
      counted += cnt
      segs += [i] * len(tokens)
    expected = _expected_rows(stream, counted, segs, row_len, len(batches))
  else:
    # One document per row: a long one is cut into rows, the last padded.
    expected = []
    for tokens, cnt in ((PAIR_TOKENS, PAIR_COUNTED), (CHAT_TOKENS, CHAT_COUNTED)):
      n_rows = -(-len(tokens) // row_len)
      pad = n_rows * row_len - len(tokens)
      expected += _expected_rows(tokens + [0] * pad, cnt + [0] * pad,
                                 [1] * len(tokens) + [0] * pad, row_len, n_rows)
    expected = (expected * 8)[:len(batches)]
  assert len(batches) == 8
  for got, want in zip(batches, expected):
    for k in ('inputs', 'targets', 'loss_mask'):
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert sum(b['loss_mask'].sum() for b in batches) > 0


@pytest.mark.parametrize('line, reason', [
    ('{"prompt": "a", "response": "b"', 'malformed JSON'),
    ('{"prompt": "a"}', "missing field 'response'"),
    ('{"prompt": "a", "response": 3}', "field 'response' is int"),
    ('{"prompt": "a", "response": "  "}', 'empty response'),
    ('[1, 2]', 'not a JSON object'),
    ('{"messages": []}', 'non-empty list'),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "role 'bot'"),
    ('{"messages": [{"role": "user"}]}', "no string 'content'"),
    ('{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}',
     "last message must be the assistant"),
    ('{"prompt": "a", "response": "b", "messages": []}', 'not both'),
])
def test_bad_line_names_file_and_line(tmp_path, line, reason):
  path = tmp_path / 'bad.jsonl'
  path.write_text(json.dumps(PAIR) + '\n\n' + line + '\n' + json.dumps(CHAT) + '\n')
  it = pipeline.make_iterator(_cfg(path, 'train.seq_len=16'), 'eval')
  with pytest.raises(sources.DataError, match=re.escape(f'{path}:3: ') + '.*' + re.escape(reason)):
    for _ in it:
      pass


def test_skip_bad_lines(tmp_path):
  path = tmp_path / 'some_bad.jsonl'
  path.write_text('{"prompt": 1}\n' + json.dumps(PAIR) + '\nnot json\n')
  docs = sources.documents(_cfg(path, 'data.skip_bad_lines=True').data, 'train',
                           vocab_size=320, seq_len=16)
  assert [docs[i] for i in range(len(docs))] == [
      None, [('Q?', False), ('Yes', True)], None]
  # The pipeline skips them: every row is the pair, again and again.
  cfg = _cfg(path, 'data.skip_bad_lines=True', f'train.seq_len={len(PAIR_TOKENS) - 1}')
  for batch in pipeline.make_iterator(cfg, 'eval'):
    np.testing.assert_array_equal(batch['inputs'][0], PAIR_TOKENS[:-1])
  all_bad = tmp_path / 'all_bad.jsonl'
  all_bad.write_text('{"prompt": 1}\nnot json\n')
  with pytest.raises(sources.DataError, match='every line of .*all_bad.jsonl is malformed'):
    next(pipeline.make_iterator(_cfg(all_bad, 'data.skip_bad_lines=True'), 'eval'))


@pytest.mark.parametrize('packing', [True, False])
def test_get_state_set_state_resumes_exactly(tmp_path, packing):
  records = [PAIR, CHAT] + [
      {'prompt': f'prompt {i} ' * (i % 3), 'response': f'answer number {i}' * (1 + i % 4)}
      for i in range(10)]
  path = _write(tmp_path / 'sft.jsonl', records)
  cfg = _cfg(path, 'train.seq_len=16', 'train.global_batch_size=2',
             f'data.packing={packing}')
  it = pipeline.make_iterator(cfg, 'train')
  for steps in (1, 3, 2):
    for _ in range(steps):
      next(it)
    state = json.loads(json.dumps(it.get_state()))   # as a checkpoint stores it
    expected = [next(it) for _ in range(4)]
    resumed = pipeline.make_iterator(cfg, 'train')
    resumed.set_state(state)
    for want in expected:
      got = next(resumed)
      for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    resumed.close()
  it.close()


def test_builtin_examples_are_passages_and_true_continuations():
  seq_len = 32
  cfg = configs.load('configs/sft.py:tiny', [
      f'train.seq_len={seq_len}', 'train.global_batch_size=2', 'train.eval_steps=1'])
  docs = sources.documents(cfg.data, 'eval', vocab_size=320, seq_len=seq_len)
  texts = [builtin.read_file(p) for p in builtin.split_files('eval')]
  for i in range(3):
    (prompt, p_counts), (response, r_counts) = docs[i]
    assert (p_counts, r_counts) == (False, True)
    assert len(prompt) == seq_len // 2 and len(response) == seq_len - seq_len // 2
    assert any(prompt + response in t for t in texts)   # the true continuation
  # Tokenized, the loss falls exactly on the response bytes and the EOS.
  batch = next(pipeline.make_iterator(cfg, 'eval'))
  tok = tokenizers.get_tokenizer('bytes')
  (prompt, _), (response, _) = docs[0]
  n_prompt = len(tok.encode(prompt))
  mask = batch['loss_mask'][0]
  first = 1 + n_prompt                     # row index of the first response token
  assert mask[:first - 1].sum() == 0
  np.testing.assert_array_equal(mask[first - 1:seq_len], 1)  # response + EOS targets
