"""Tokenizers: round trips, special tokens, and clear errors.

The sentencepiece and Hugging Face tokenizers are trained here on a few lines,
so nothing is downloaded.
"""

import json
import pickle
import sys

import pytest

from data import tokenizers

LINES = [
    'The quick brown fox jumps over the lazy dog.',
    'def add(a, b):\n    return a + b',
    'Packing puts several documents in one row of tokens.',
    'Caf\u00e9 cr\u00e8me, na\u00efve fa\u00e7ade, \u20ac5.',
    'import numpy as np  # arrays',
    'Every byte of the corpus appears exactly once per epoch.',
] * 4
TEXT = 'Caf\u00e9: the quick dog jumps over arrays.'


def test_bytes_round_trip_and_ids():
  tok = tokenizers.get_tokenizer('bytes')
  text = 'h\u00e9llo \u20ac\U0001F600\n\t'
  ids = tok.encode(text)
  assert ids == list(text.encode('utf-8'))   # the UTF-8 bytes, nothing added
  assert tok.decode(ids) == text
  assert tok.encode_array(text).tolist() == ids
  assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (258, 256, 257)
  # Specials and padded-vocab ids carry no text.
  assert tok.decode([tok.bos_id] + ids + [tok.eos_id, 300]) == text


def test_sentencepiece_trained_in_test(tmp_path):
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text('\n'.join(LINES).replace('\n    ', ' ') + '\n', encoding='utf-8')
  spm.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(tmp_path / 'sp'), vocab_size=60,
      model_type='bpe', character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
      pad_id=-1, hard_vocab_limit=False, minloglevel=2)
  tok = tokenizers.get_tokenizer(f'sentencepiece:{tmp_path / "sp.model"}')
  ids = tok.encode(TEXT)
  assert tok.decode(ids) == TEXT
  assert tok.encode_array(TEXT).tolist() == ids
  assert (tok.bos_id, tok.eos_id) == (1, 2)  # the ids it was trained with
  assert not {1, 2} & set(ids)                 # encode adds no specials
  assert all(0 <= i < tok.vocab_size for i in ids)
  assert tok.vocab_size == spm.SentencePieceProcessor(
      model_file=str(tmp_path / 'sp.model')).get_piece_size()
  assert pickle.loads(pickle.dumps(tok)).encode(TEXT) == ids  # grain workers


def _train_hf(path, specials):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=300, special_tokens=specials, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(LINES, trainer)
  path.parent.mkdir(parents=True, exist_ok=True)
  tok.save(str(path))
  return tok


def test_hf_tokenizer_built_in_test(tmp_path):
  path = tmp_path / 'tok' / 'tokenizer.json'
  ref = _train_hf(path, ['<s>', '</s>'])
  tok = tokenizers.get_tokenizer(f'hf:{path}')
  ids = tok.encode(TEXT)
  assert tok.decode(ids) == TEXT
  assert tok.encode_array(TEXT).tolist() == ids
  assert tok.bos_id == ref.token_to_id('<s>')
  assert tok.eos_id == ref.token_to_id('</s>')
  assert tok.bos_id not in ids and tok.eos_id not in ids
  assert tok.vocab_size == ref.get_vocab_size(with_added_tokens=True)
  assert pickle.loads(pickle.dumps(tok)).encode(TEXT) == ids  # grain workers


def test_hf_specials_from_tokenizer_config(tmp_path):
  # GPT-2 style: one <|endoftext|> token, no BOS; the config names the EOS.
  path = tmp_path / 'gpt' / 'tokenizer.json'
  ref = _train_hf(path, ['<|endoftext|>', '<|pad|>'])
  (path.parent / 'tokenizer_config.json').write_text(json.dumps(
      {'bos_token': None, 'eos_token': {'content': '<|endoftext|>'}}))
  tok = tokenizers.get_tokenizer(f'hf:{path}')
  assert tok.eos_id == ref.token_to_id('<|endoftext|>')
  assert tok.bos_id == tok.eos_id  # documents start with EOS, as in GPT-2


def test_hf_without_eos_is_refused(tmp_path):
  path = tmp_path / 'none' / 'tokenizer.json'
  _train_hf(path, ['<pad>'])
  with pytest.raises(tokenizers.TokenizerError, match='no EOS token'):
    tokenizers.get_tokenizer(f'hf:{path}')


def test_bad_specs_and_missing_files(tmp_path):
  with pytest.raises(tokenizers.TokenizerError, match='must be bytes'):
    tokenizers.get_tokenizer('wordpiece:x')
  with pytest.raises(tokenizers.TokenizerError, match='not found'):
    tokenizers.get_tokenizer(f'sentencepiece:{tmp_path / "missing.model"}')
  with pytest.raises(tokenizers.TokenizerError, match='not found'):
    tokenizers.get_tokenizer(f'hf:{tmp_path / "tokenizer.json"}')


def test_missing_package_is_a_clear_error(tmp_path, monkeypatch):
  model = tmp_path / 'x.model'
  model.write_bytes(b'')
  monkeypatch.setitem(sys.modules, 'sentencepiece', None)  # import fails
  with pytest.raises(tokenizers.TokenizerError, match='pip install sentencepiece'):
    tokenizers.get_tokenizer(f'sentencepiece:{model}')
