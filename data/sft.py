"""Supervised fine-tuning (SFT) examples: records, the chat template, tokenizing.

`data.source='sft'` reads examples whose loss counts only the response, the
step between pretraining and DPO (Ouyang et al. 2022; Rafailov et al. 2023
fine-tune the reference on preferred responses before DPO). Each JSONL line is
one example, in one of two forms:

    {"prompt": "...", "response": "..."}
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}

An example becomes a list of *segments* `(text, counts)`, tokenized one by one
and joined between BOS and EOS, so a segment boundary is exact whatever the
tokenizer would merge across it (the DPO stage tokenizes prompt and responses
the same way, through `join_segments`):

* prompt/response: `[BOS] prompt response [EOS]`, no template (the layout of a
  DPO sequence); the response and the EOS count.
* messages: each message is rendered as `<|role|>\\n{content}\\n` (the role
  markers are plain text, not special tokens), then EOS. The contents of
  assistant messages and the newline closing each of them count (every
  assistant turn of a multi-turn chat), and the EOS; role markers, system and
  user messages do not. The last message must be the assistant's.

`join_segments` returns the tokens and a per-token weight: 1 where that token
is a target the loss counts. The packer (`data/packing.py`) carries the
weights through its rows, and a batch's `loss_mask` at position i is the
weight of token i + 1 (the target of position i): the first response token's
loss sits at the last prompt position.

Malformed lines (bad JSON, missing or mistyped fields, an unknown role, an
empty response) stop the pipeline with `file:line`, or with
`data.skip_bad_lines=True` are skipped with a warning. `data.train_files=builtin`
makes examples offline from the built-in corpus: the prompt and the chosen
continuation of the built-in DPO pairs (`data.builtin.BuiltinPairs`), with
`seq_len // 2` characters of prompt and the rest of a row of response.
"""

import numpy as np

from data import builtin
from data import packing

ROLES = ('system', 'user', 'assistant')


def marker(role: str) -> str:
  """The plain-text line that opens a message of `role` in the template."""
  return f'<|{role}|>\n'


def render_messages(messages) -> list[tuple[str, bool]]:
  """Validated messages -> segments `(text, counts)` of the template.

  Also the way to write a DPO prompt for a model fine-tuned on messages: join
  the texts of the segments of the conversation so far plus
  `marker('assistant')`.
  """
  segments = []
  for message in messages:
    role, content = message['role'], message['content']
    segments.append((marker(role), False))
    if role == 'assistant':
      # The closing newline counts: it is how the model learns to end a turn.
      segments.append((content + '\n', True))
    else:
      segments.append((content + '\n', False))
  return segments


def _check_messages(messages):
  """None if `messages` is a valid conversation, else the reason."""
  if not isinstance(messages, list) or not messages:
    return 'field \'messages\' must be a non-empty list'
  for i, message in enumerate(messages):
    if not isinstance(message, dict):
      return f'messages[{i}] is {type(message).__name__}, not an object'
    for field in ('role', 'content'):
      if not isinstance(message.get(field), str):
        return f'messages[{i}] has no string {field!r}'
    if message['role'] not in ROLES:
      return (f'messages[{i}] has role {message["role"]!r}, not one of '
              f'{", ".join(ROLES)}')
  if messages[-1]['role'] != 'assistant':
    return 'the last message must be the assistant\'s (its response is trained)'
  return None


def parse_record(record):
  """A JSON value of one line -> segments `(text, counts)`, or a reason string."""
  if not isinstance(record, dict):
    return f'not a JSON object but {type(record).__name__}'
  has_pair = 'prompt' in record or 'response' in record
  if has_pair and 'messages' in record:
    return 'give either prompt/response or messages, not both'
  if 'messages' in record:
    reason = _check_messages(record['messages'])
    return reason or render_messages(record['messages'])
  for field in ('prompt', 'response'):
    if field not in record:
      return (f'missing field {field!r} (an SFT line holds prompt and response, '
              'or messages)')
    if not isinstance(record[field], str):
      return f'field {field!r} is {type(record[field]).__name__}, not a string'
  if not record['response'].strip():
    return 'empty response'
  return [(record['prompt'], False), (record['response'], True)]


def join_segments(pieces, *, bos_id: int, eos_id: int):
  """Token-id pieces `(ids, counts)` -> (tokens, weights), each [n + 2].

  `tokens` is `[BOS] + ids of every piece + [EOS]` (int32); `weights[j]`
  (float32) is 1 where token j counts as a target: the tokens of counted
  pieces, and the EOS when the last piece counts. BOS never counts.
  """
  ids = [np.asarray(p, np.int32).reshape(-1) for p, _ in pieces]
  n = sum(len(x) for x in ids)
  tokens = np.empty(n + 2, np.int32)
  weights = np.zeros(n + 2, np.float32)
  tokens[0], tokens[-1] = bos_id, eos_id
  start = 1
  for piece, (_, counts) in zip(ids, pieces):
    tokens[start:start + len(piece)] = piece
    weights[start:start + len(piece)] = float(counts)
    start += len(piece)
  weights[-1] = float(bool(pieces) and pieces[-1][1])
  return tokens, weights


class TokenizeExample:
  """segments -> `{'tokens': int32 [n], 'loss_weights': float32 [n]}` for the packer."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def __call__(self, segments):
    pieces = [(self.tokenizer.encode_array(text), counts) for text, counts in segments]
    tokens, weights = join_segments(pieces, bos_id=self.tokenizer.bos_id,
                                    eos_id=self.tokenizer.eos_id)
    return {packing.TOKENS: tokens, packing.LOSS_WEIGHTS: weights}


class BuiltinExamples:
  """Prompt/response examples from the built-in corpus (see module docstring)."""

  def __init__(self, split: str, seq_len: int):
    prompt_chars = seq_len // 2
    self.pairs = builtin.BuiltinPairs(split, prompt_chars=prompt_chars,
                                      response_chars=seq_len - prompt_chars)

  def __len__(self):
    return len(self.pairs)

  def __getitem__(self, index):
    prompt, chosen, _ = self.pairs[index]
    return [(prompt, False), (chosen, True)]
