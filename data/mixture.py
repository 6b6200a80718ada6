"""`config.data.mixture`: several sources drawn in fixed proportions.

    --config.data.mixture='web:/data/web_tok:0.7,code:/data/code_tok:0.2,math:/data/math/*.jsonl:0.1'

Each entry is `name:path:weight`. `name` (letters, digits, `_`, `-`) names the
source in TensorBoard (`data/tokens/<name>`, `eval/<name>/loss`); `path` is a
folder written by `python -m data.prepare` (read as `data.source='tokens'`)
or a glob of files read by their extension: `.parquet` as `parquet`,
`.jsonl`/`.json` as `jsonl`, `.arrayrecord` as `arrayrecord`, anything else
as `text`; `weight` is a positive number (the weights need not sum to 1).
A config file may also give a list of dicts, or a tuple of `(name, path,
weight)`: `c.data.mixture = [dict(name='web', path='/data/web_tok', weight=0.7), ...]`.

Documents are drawn from the sources in proportion to the weights (grain's
`MapDataset.mix`, a fixed interleaving), each source shuffled with its own
seed derived from `data.shuffle_seed`; see `data/pipeline.py`.
"""

import dataclasses
import os
import re

import ml_collections

from data import corpus
from data import sources

_NAME = re.compile(r'^[A-Za-z0-9_-]+$')


@dataclasses.dataclass(frozen=True)
class Source:
  name: str
  path: str
  weight: float
  kind: str          # a data.source value: tokens, parquet, jsonl, arrayrecord, text


def _kind(path: str) -> str:
  if sources.is_prepared(path):
    return 'tokens'
  if os.path.isdir(os.path.expanduser(path)):
    raise sources.DataError(f'data.mixture: {path!r} is a folder without '
                            f'{sources.PREPARED_METADATA}: not written by '
                            'python -m data.prepare, or that prepare did not finish')
  return corpus.format_of(path)


def _entries(spec):
  if isinstance(spec, str):
    for item in spec.split(','):
      if not item.strip():
        continue
      name, sep, rest = item.strip().partition(':')
      path, sep2, weight = rest.rpartition(':')
      if not (sep and sep2 and name and path):
        raise sources.DataError(f'data.mixture entry {item.strip()!r}: must be '
                                'name:path:weight')
      yield name, path, weight
  else:
    for item in spec:
      if isinstance(item, (dict, ml_collections.ConfigDict)):
        if set(item.keys()) != {'name', 'path', 'weight'}:
          raise sources.DataError(f'data.mixture entry {dict(item)}: needs exactly '
                                  'the keys name, path, weight')
        yield item['name'], item['path'], item['weight']
      elif isinstance(item, (tuple, list)) and len(item) == 3:
        yield tuple(item)
      else:
        raise sources.DataError(f'data.mixture entry {item!r}: must be a dict '
                                'with name, path, weight')


def parse(spec) -> list[Source]:
  """`data.mixture` (string or list) -> the sources; [] when it is empty."""
  if not spec:
    return []
  out = []
  for name, path, weight in _entries(spec):
    name, path = str(name).strip(), str(path).strip()
    if not _NAME.match(name):
      raise sources.DataError(f'data.mixture: source name {name!r}: use letters, '
                              'digits, _ and - (it becomes a TensorBoard tag)')
    if name in [s.name for s in out]:
      raise sources.DataError(f'data.mixture: source name {name!r} appears twice')
    try:
      weight = float(weight)
    except ValueError:
      raise sources.DataError(f'data.mixture: weight {weight!r} of {name!r} is not a '
                              'number') from None
    if not weight > 0:
      raise sources.DataError(f'data.mixture: weight of {name!r} is {weight}: must '
                              'be positive')
    out.append(Source(name, path, weight, _kind(path)))
  if not out:
    raise sources.DataError('data.mixture names no source')
  return out


def data_config(data_cfg, source: Source) -> ml_collections.ConfigDict:
  """`data_cfg` with one source's `source`, `train_files`, `eval_files`."""
  sub = ml_collections.ConfigDict(
      {k: v for k, v in data_cfg.to_dict().items() if k != 'mixture'})
  sub.source = source.kind
  sub.train_files = source.path
  sub.eval_files = ''
  return sub


def describe(entries: list[Source]) -> str:
  """One line: each source's document share and, for prepared folders, the
  token share to expect from their mean document length."""
  total = sum(e.weight for e in entries)
  lengths = {}
  for e in entries:
    if e.kind == 'tokens':
      train = sources.read_prepared(e.path)['splits']['train']
      lengths[e.name] = train['tokens'] / max(train['documents'], 1)
  expected = sum(e.weight * lengths[e.name] for e in entries) if len(lengths) == len(
      entries) else None
  parts = []
  for e in entries:
    text = f'{e.name} {100 * e.weight / total:.0f}% of documents'
    if expected:
      text += (f' (mean {lengths[e.name]:,.0f} tokens: ~'
               f'{100 * e.weight * lengths[e.name] / expected:.0f}% of tokens)')
    parts.append(text)
  return 'data.mixture: ' + ', '.join(parts)
