"""The built-in corpus: the running Python's standard library.

A real corpus that every machine has offline (no hub to reach): the `.py` files
under `sysconfig.get_paths()['stdlib']` (source with its docstrings and
comments), one document per file. Left out: `site-packages` (not the standard
library, and different on every machine), test folders (`test`, `tests`,
`idle_test`: mostly generated fixtures), and the machine-generated
`_sysconfigdata*.py`. On CPython 3.11 that is about 730 files and 12 MB.

Train and eval are split by file, deterministically, on a stable hash of the
file's path relative to the stdlib root (`/`-separated, so the split is the
same on every machine with the same Python version): a file whose SHA-256
falls in the first 1/20th goes to eval (~5%). Files are listed in hash order
rather than alphabetically, so the first eval batches already sample many
corners of the library.

`BuiltinPairs` cuts (prompt, chosen, rejected) passages from the files of a
split: the built-in preference pairs of the DPO stage, whose (prompt, chosen)
halves are also the built-in SFT examples.
"""

import functools
import hashlib
import os
import sysconfig

EVAL_MODULUS = 20  # 1 file in 20 (~5%) is held out for eval.
_SKIP_DIRS = frozenset({'site-packages', 'dist-packages', '__pycache__',
                        'test', 'tests', 'idle_test'})


def stdlib_root() -> str:
  return sysconfig.get_paths()['stdlib']


def _hash(relpath: str) -> int:
  return int.from_bytes(hashlib.sha256(relpath.encode('utf-8')).digest()[:8], 'big')


def is_eval_file(relpath: str) -> bool:
  """Whether a stdlib path (relative, `/`-separated) belongs to eval."""
  return _hash(relpath) % EVAL_MODULUS == 0


@functools.lru_cache(maxsize=None)
def list_files(root: str | None = None) -> tuple[str, ...]:
  """Relative `/`-separated paths of the corpus files, in hash order."""
  root = root or stdlib_root()
  found = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
    rel_folder = os.path.relpath(folder, root)
    for name in files:
      if not name.endswith('.py') or name.startswith('_sysconfigdata'):
        continue
      rel = name if rel_folder == '.' else os.path.join(rel_folder, name)
      found.append(rel.replace(os.sep, '/'))
  if not found:
    raise FileNotFoundError(f'no .py files under the standard library {root!r}')
  return tuple(sorted(found, key=lambda p: (_hash(p), p)))


def split_files(split: str, root: str | None = None) -> list[str]:
  """Absolute paths of the `train` or `eval` files, in hash order."""
  if split not in ('train', 'eval'):
    raise ValueError(f'split={split!r}: must be train or eval')
  root = root or stdlib_root()
  want_eval = split == 'eval'
  return [os.path.join(root, *p.split('/')) for p in list_files(root)
          if is_eval_file(p) == want_eval]


def read_file(path: str) -> str:
  # The stdlib is UTF-8 (PEP 3120); `replace` keeps the corpus usable even
  # on a distribution that patched a file into another encoding.
  with open(path, encoding='utf-8', errors='replace') as f:
    return f.read()


def _pair_hash(*parts) -> int:
  text = '\0'.join(str(p) for p in parts)
  return int.from_bytes(hashlib.sha256(text.encode('utf-8')).digest()[:8], 'big')


def _line_start(text: str, lo: int, hi: int, key: int) -> int:
  """A line start in [lo, hi) picked by `key` (lo if none)."""
  pos = lo + key % max(hi - lo, 1)
  nl = text.rfind('\n', lo, pos)
  return nl + 1 if nl >= lo else lo


class BuiltinPairs:
  """(prompt, chosen, rejected) passages from the stdlib files of one split.

  Pair k takes file k mod F (of the F files long enough), cuts it at a line
  start chosen by a hash of k: the prompt is the `prompt_chars` before the
  cut, `chosen` the `response_chars` after it (the true continuation),
  `rejected` as many characters after a line start of another file of the
  same split. Deterministic.
  """

  def __init__(self, split: str, prompt_chars: int, response_chars: int,
               pairs_per_file: int = 16):
    self.prompt_chars, self.response_chars = prompt_chars, response_chars
    need = prompt_chars + 2 * response_chars
    self.texts = [t for t in (read_file(p) for p in split_files(split))
                  if len(t) > need]
    if len(self.texts) < 2:
      # Imported here: sources imports this module.
      from data.sources import DataError  # pylint: disable=g-import-not-at-top
      raise DataError(f'builtin pairs: the {split} split has fewer than 2 '
                      'files long enough')
    self.length = len(self.texts) * pairs_per_file

  def __len__(self):
    return self.length

  def __getitem__(self, k: int):
    n = len(self.texts)
    text = self.texts[k % n]
    cut = _line_start(text, self.prompt_chars, len(text) - self.response_chars,
                      _pair_hash('cut', k))
    other_index = (k % n + 1 + _pair_hash('other', k) % (n - 1)) % n
    other = self.texts[other_index]
    start = _line_start(other, 0, len(other) - self.response_chars,
                        _pair_hash('start', k))
    return (text[cut - self.prompt_chars:cut],
            text[cut:cut + self.response_chars],
            other[start:start + self.response_chars])
