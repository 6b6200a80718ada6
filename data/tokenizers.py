"""Tokenizers behind `config.data.tokenizer`.

`get_tokenizer(spec)` turns the config string into an object with
`encode(text) -> list[int]` (no special tokens), `decode(ids) -> str`,
`vocab_size`, `bos_id` and `eos_id`:

* `bytes`: UTF-8 bytes are ids 0..255, BOS is 256, EOS is 257 (258 ids; the
  configs round `model.vocab_size` up to 320). Needs nothing and never meets an
  unknown character, which is why it is the default.
* `sentencepiece:PATH`: a local SentencePiece `.model` file (Kudo & Richardson,
  2018), read with the `sentencepiece` package. BOS/EOS are the model's own.
* `hf:PATH`: a Hugging Face `tokenizers` file, or a folder holding
  `tokenizer.json` (what `python -m data.train_tokenizer` writes). BOS/EOS
  come from a `tokenizer_config.json` or `special_tokens_map.json` beside it,
  else from the usual special-token names found in the vocabulary.

A tokenizer without an EOS token is refused (documents end with EOS); one
without a BOS token (GPT-2, Qwen) starts each document with its EOS token, the
way those models separate documents in training.

Every tokenizer also has `encode_array(text) -> np.ndarray[int32]`, the fast
path the data pipeline uses, `encode_batch(texts)` (many at once, in the
tokenizer's native threads where it has them), `fingerprint()` (a SHA-256 of
the vocabulary and special ids: prepared token folders record it, and
training refuses a folder made with another vocabulary), and pickles by path
so grain worker processes reload it rather than copying native objects.
"""

import hashlib
import json
import os

import numpy as np

from configs.errors import UserError


class TokenizerError(UserError):
  """A tokenizer spec or file that cannot be used; the message says why."""


class BytesTokenizer:
  """UTF-8 bytes as ids 0..255, BOS = 256, EOS = 257."""

  vocab_size = 258
  bos_id = 256
  eos_id = 257

  def encode(self, text: str) -> list[int]:
    return list(text.encode('utf-8'))

  def encode_array(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32)

  def encode_batch(self, texts) -> list[np.ndarray]:
    return [self.encode_array(t) for t in texts]

  def fingerprint(self) -> str:
    return _digest({'kind': 'bytes', 'vocab_size': self.vocab_size,
                    'bos_id': self.bos_id, 'eos_id': self.eos_id})

  def decode(self, ids) -> str:
    # Specials and ids past the byte range (a model's vocab is padded to 320)
    # have no text; dropping them lets samples print cleanly.
    data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
    return data.decode('utf-8', errors='replace')

  def __repr__(self):
    return 'BytesTokenizer()'


def _import(name: str, spec: str):
  try:
    return __import__(name)
  except ImportError:
    raise TokenizerError(
        f'data.tokenizer={spec!r} needs the {name!r} package, which is not '
        f'installed: pip install {name}') from None


def _digest(vocabulary) -> str:
  text = json.dumps(vocabulary, sort_keys=True, ensure_ascii=False)
  return 'sha256:' + hashlib.sha256(text.encode('utf-8')).hexdigest()


def _check_file(path: str, spec: str) -> str:
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise TokenizerError(f'data.tokenizer={spec!r}: file {path!r} not found')
  return path


class SentencePieceTokenizer:
  """A local SentencePiece model; BOS/EOS are the ids the model defines."""

  def __init__(self, path: str):
    self.spec = f'sentencepiece:{path}'
    self.path = _check_file(path, self.spec)
    spm = _import('sentencepiece', self.spec)
    self._sp = spm.SentencePieceProcessor(model_file=self.path)
    self.vocab_size = int(self._sp.get_piece_size())
    self.eos_id = int(self._sp.eos_id())
    if self.eos_id < 0:
      raise TokenizerError(
          f'{self.spec}: the model has no EOS token (trained with '
          '--eos_id=-1); documents end with EOS, so retrain it with one')
    # As for Hugging Face tokenizers: no BOS means documents start with EOS.
    self.bos_id = int(self._sp.bos_id()) if self._sp.bos_id() >= 0 else self.eos_id

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text, out_type=int))

  def encode_array(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text, out_type=int), np.int32)

  def encode_batch(self, texts) -> list[np.ndarray]:
    return [np.asarray(ids, np.int32)
            for ids in self._sp.encode(list(texts), out_type=int)]

  def fingerprint(self) -> str:
    pieces = [self._sp.id_to_piece(i) for i in range(self.vocab_size)]
    return _digest({'kind': 'sentencepiece', 'pieces': pieces,
                    'bos_id': self.bos_id, 'eos_id': self.eos_id})

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])

  def __getstate__(self):
    return {'path': self.path}

  def __setstate__(self, state):
    self.__init__(state['path'])

  def __repr__(self):
    return f'SentencePieceTokenizer({self.path!r})'


# Names of BOS/EOS tokens across common Hugging Face tokenizers, tried in
# order when no tokenizer_config.json says which ones they are.
_BOS_NAMES = ('<s>', '<bos>', '<|begin_of_text|>', '[BOS]', '<|startoftext|>')
_EOS_NAMES = ('</s>', '<eos>', '<|end_of_text|>', '<|endoftext|>', '[EOS]',
              '<|eot_id|>')


def _token_content(value):
  """tokenizer_config.json writes a token as a string or {'content': ...}."""
  if isinstance(value, dict):
    return value.get('content')
  return value


class HFTokenizer:
  """A Hugging Face `tokenizer.json` (or a folder holding one) read with the
  `tokenizers` package."""

  def __init__(self, path: str):
    self.spec = f'hf:{path}'
    if os.path.isdir(os.path.expanduser(path)):
      path = os.path.join(path, 'tokenizer.json')
    self.path = _check_file(path, self.spec)
    tokenizers = _import('tokenizers', self.spec)
    try:
      self._tok = tokenizers.Tokenizer.from_file(self.path)
    except Exception as e:  # The Rust side raises a bare Exception.
      raise TokenizerError(f'{self.spec}: cannot read tokenizer: {e}') from None
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    named = self._configured_specials()
    self.eos_id = self._find('EOS', named.get('eos_token'), _EOS_NAMES)
    try:
      self.bos_id = self._find('BOS', named.get('bos_token'), _BOS_NAMES)
    except TokenizerError:
      self.bos_id = self.eos_id

  def _configured_specials(self) -> dict:
    folder = os.path.dirname(self.path)
    for name in ('tokenizer_config.json', 'special_tokens_map.json'):
      path = os.path.join(folder, name)
      if os.path.isfile(path):
        with open(path, encoding='utf-8') as f:
          config = json.load(f)
        found = {k: _token_content(config.get(k)) for k in ('bos_token', 'eos_token')}
        if any(found.values()):
          return found
    return {}

  def _find(self, name: str, configured, candidates) -> int:
    if configured:
      token_id = self._tok.token_to_id(configured)
      if token_id is None:
        raise TokenizerError(f'{self.spec}: the configured {name} token '
                             f'{configured!r} is not in the vocabulary')
      return int(token_id)
    for token in candidates:
      token_id = self._tok.token_to_id(token)
      if token_id is not None:
        return int(token_id)
    raise TokenizerError(
        f'{self.spec}: no {name} token found (no tokenizer_config.json beside '
        f'it names one, and none of {", ".join(candidates)} is in the '
        'vocabulary); documents are wrapped in BOS ... EOS')

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def encode_array(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids,
                      np.int32)

  def encode_batch(self, texts) -> list[np.ndarray]:
    encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, np.int32) for e in encodings]

  def fingerprint(self) -> str:
    # The vocabulary and the merges decide the ids; normalizer and
    # pre-tokenizer settings travel in the same JSON.
    model = json.loads(self._tok.to_str())
    return _digest({'kind': 'hf', 'model': model.get('model'),
                    'added_tokens': model.get('added_tokens'),
                    'normalizer': model.get('normalizer'),
                    'pre_tokenizer': model.get('pre_tokenizer'),
                    'bos_id': self.bos_id, 'eos_id': self.eos_id})

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def __getstate__(self):
    return {'path': self.path}

  def __setstate__(self, state):
    self.__init__(state['path'])

  def __repr__(self):
    return f'HFTokenizer({self.path!r})'


def get_tokenizer(spec: str):
  """`bytes`, `sentencepiece:PATH` or `hf:PATH` (a tokenizer.json or its
  folder) -> tokenizer."""
  if spec == 'bytes':
    return BytesTokenizer()
  kind, sep, path = spec.partition(':')
  if sep and path and kind == 'sentencepiece':
    return SentencePieceTokenizer(path)
  if sep and path and kind == 'hf':
    return HFTokenizer(path)
  raise TokenizerError(f'data.tokenizer={spec!r}: must be bytes, '
                       'sentencepiece:PATH or hf:PATH (a tokenizer.json or its folder)')


def _json_types(node) -> set:
  """Every `type` named in a tokenizer.json component (Sequence included)."""
  if isinstance(node, dict):
    return {node.get('type')} | set().union(*map(_json_types, node.values()))
  if isinstance(node, list):
    return set().union(*map(_json_types, node)) if node else set()
  return set()


def token_bytes(tokenizer, size: int | None = None) -> np.ndarray:
  """int32 [size]: the UTF-8 bytes of text each token id stands for.

  Summed over the target tokens of a text this is the text's byte count,
  which turns a loss in nats per token into bits per byte, a figure that
  compares models with different tokenizers. Special tokens (BOS, EOS,
  control, unknown) and ids past the tokenizer's vocabulary count 0 bytes.
  - bytes: 1 per byte id;
  - sentencepiece: a byte-fallback piece `<0xNN>` is 1, any other piece its
    UTF-8 length with the word-boundary mark `▁` read as one space (so the
    dummy space SentencePiece puts before a text's first word counts too);
  - hf: byte-level BPE (GPT-2, Llama 3, Qwen) maps each character of a token
    to one byte, so the length of its string; other models read as
    SentencePiece pieces, with WordPiece's `##` continuation mark dropped.
  """
  size = tokenizer.vocab_size if size is None else size
  out = np.zeros(size, np.int32)
  if isinstance(tokenizer, BytesTokenizer):
    out[:min(256, size)] = 1
    return out

  def piece_bytes(piece: str) -> int:
    if len(piece) == 6 and piece.startswith('<0x') and piece.endswith('>'):
      return 1
    return len(piece.removeprefix('##').replace('\u2581', ' ').encode('utf-8'))

  if isinstance(tokenizer, SentencePieceTokenizer):
    sp = tokenizer._sp  # pylint: disable=protected-access
    for i in range(min(size, tokenizer.vocab_size)):
      if not (sp.is_control(i) or sp.is_unknown(i)):
        out[i] = 1 if sp.is_byte(i) else piece_bytes(sp.id_to_piece(i))
    return out
  tok = tokenizer._tok  # pylint: disable=protected-access
  spec = json.loads(tok.to_str())
  byte_level = 'ByteLevel' in _json_types(spec.get('decoder')) | _json_types(
      spec.get('pre_tokenizer'))
  special = {int(i) for i, t in tok.get_added_tokens_decoder().items() if t.special}
  for token, i in tok.get_vocab(with_added_tokens=True).items():
    if i < size and i not in special:
      out[i] = len(token) if byte_level else piece_bytes(token)
  return out
