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
