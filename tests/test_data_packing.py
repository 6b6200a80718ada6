"""Packing: every byte once per epoch, consistent segments, no attention across documents.

The references are independent of the packer: documents are rebuilt from the
batches alone (BOS ... EOS runs of the bytes tokenizer) and compared with the
hand-made corpus; segment ids, positions and the loss mask are re-derived
from their definitions row by row.
"""

import collections

import configs
import numpy as np
import pytest

from data import pipeline

BOS, EOS = 256, 257
SEQ_LEN = 16
# Distinct documents: empty, one byte, shorter and longer than a row (17
# tokens), multi-byte UTF-8 that a row boundary may cut in the middle.
CORPUS = [
    '',
    'a',
    'short line',
    'exactly fifteen',   # 15 bytes + BOS + EOS = one full row
    'caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, \u20ac12 \U0001F600 and more text here',
    'def f(x):\n    return x * 2\n' * 3,
    'The quick brown fox jumps over the lazy dog. ' * 4,
    'z' * 40,
    '\n\n\tindented\n',
]


def _config(tmp_path, packing, batch=3, seq_len=SEQ_LEN, extra=()):
  for i, text in enumerate(CORPUS):
    (tmp_path / f'doc{i:02d}.txt').write_text(text, encoding='utf-8')
  return configs.load('configs/base.py', [
      'data.source=text', f'data.train_files={tmp_path}/*.txt',
      f'data.eval_files={tmp_path}/*.txt', f'data.packing={packing}',
      f'train.global_batch_size={batch}', f'train.seq_len={seq_len}',
      'data.shuffle_seed=7', *extra])


def _row_tokens(batch, i, packing):
  """A row's tokens (inputs plus the last target) without its padding."""
  row = np.concatenate([batch['inputs'][i], batch['targets'][i, -1:]])
  if packing:
    assert (batch['segment_ids'][i] > 0).all(), 'an endless packed stream has no padding'
    return row
  # Unpacked: padding trails; the last token is real iff its target counts.
  real = np.concatenate([batch['segment_ids'][i] > 0, [batch['loss_mask'][i, -1] == 1]])
  n = int(real.sum())
  assert real[:n].all()
  return row[:n]


def _documents(stream):
  """Complete BOS ... EOS documents of a token stream, decoded."""
  docs, current = [], None
  for t in stream:
    if current is None:
      assert t == BOS, 'every document starts with BOS'
      current = []
    elif t == EOS:
      docs.append(bytes(current).decode('utf-8'))
      current = None
    else:
      assert 0 <= t < 256
      current.append(int(t))
  return docs


@pytest.mark.parametrize('packing', [True, False])
def test_every_byte_once_per_epoch(tmp_path, packing):
  batch_size, n = 3, len(CORPUS)
  it = pipeline.make_iterator(_config(tmp_path, packing, batch_size), 'train')
  # Slot s packs documents s, s+3, s+6, ... of the shuffled document stream,
  # so document g of the stream is document g // 3 rebuilt from slot g % 3.
  need = [len(range(s, 2 * n, batch_size)) for s in range(batch_size)]
  streams = [[] for _ in range(batch_size)]
  for _ in range(300):
    batch = next(it)
    for s in range(batch_size):
      streams[s].extend(_row_tokens(batch, s, packing))
    docs = [_documents(stream) for stream in streams]
    if all(len(d) >= k for d, k in zip(docs, need)):
      break
  it.close()
  order = [docs[g % batch_size][g // batch_size] for g in range(2 * n)]
  for epoch in (order[:n], order[n:]):
    assert collections.Counter(epoch) == collections.Counter(CORPUS)
  assert order[:n] != order[n:], 'each epoch is shuffled anew'


def _check_row_layout(batch, packing, specials=True):
  inputs, targets = batch['inputs'], batch['targets']
  seg, pos, mask = batch['segment_ids'], batch['positions'], batch['loss_mask']
  b, t = inputs.shape
  np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])
  for i in range(b):
    s = seg[i]
    real = s > 0
    n = int(real.sum())
    assert real[:n].all(), 'padding only at the end of a row'
    if n:
      assert s[0] == 1 and set(np.diff(s[:n])) <= {0, 1}, 'segments count 1, 2, ...'
    if not packing:
      assert set(s[:n]) <= {1}, 'one document per row'
    for j in range(n):
      starts = j == 0 or s[j] != s[j - 1]
      assert pos[i, j] == (0 if starts else pos[i, j - 1] + 1)
      if specials and packing and starts and j > 0:
        assert inputs[i, j] == BOS, 'a later segment is a whole document start'
    for j in range(t - 1):
      assert mask[i, j] == float(s[j] > 0 and s[j + 1] == s[j])
    assert mask[i, -1] in (0.0, 1.0) and (mask[i, -1] == 0 or s[-1] > 0)
    if specials:
      assert not np.any(mask[i][targets[i] == BOS]), 'BOS is never a target'


@pytest.mark.parametrize('packing', [True, False])
def test_segment_ids_positions_and_loss_mask(tmp_path, packing):
  it = pipeline.make_iterator(_config(tmp_path, packing), 'train')
  for _ in range(12):
    _check_row_layout(next(it), packing)
  it.close()


def test_layout_on_builtin_and_synthetic():
  for source in ('builtin', 'synthetic'):
    cfg = configs.load('configs/base.py', [
        f'data.source={source}', 'train.global_batch_size=2', 'train.seq_len=32'])
    it = pipeline.make_iterator(cfg, 'train')
    for _ in range(5):
      batch = next(it)
      # Synthetic documents are random ids without BOS/EOS.
      _check_row_layout(batch, packing=True, specials=source == 'builtin')
      assert batch['inputs'].max() < cfg.model.vocab_size
    it.close()


def test_no_attention_across_documents_through_the_model(tmp_path):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import model  # pylint: disable=g-import-not-at-top

  cfg = _config(tmp_path, True, batch=2, seq_len=32, extra=[
      'model.d_model=32', 'model.num_layers=2', 'model.num_heads=2',
      'model.num_kv_heads=2', 'model.d_ff=64'])
  it = pipeline.make_iterator(cfg, 'train')
  batch = next(b for b in it if (b['segment_ids'][0] >= 2).any())
  it.close()
  decoder = model.Decoder(cfg.model, rngs=nnx.Rngs(0))
  seg = batch['segment_ids'][:1]
  first = seg[0] == 1
  perturbed = batch['inputs'][:1].copy()
  perturbed[0, first] = (perturbed[0, first] + 101) % 256  # rewrite document 1

  def logits(tokens, segment_ids):
    out, _ = decoder(jnp.asarray(tokens), segment_ids=segment_ids,
                     positions=jnp.asarray(batch['positions'][:1]))
    return np.asarray(out)

  base = logits(batch['inputs'][:1], jnp.asarray(seg))
  changed = logits(perturbed, jnp.asarray(seg))
  # Later documents in the row see nothing of document 1 ...
  np.testing.assert_allclose(changed[0, ~first], base[0, ~first], rtol=0, atol=1e-6)
  # ... which the perturbation would show if they could.
  assert np.abs(changed[0, first] - base[0, first]).max() > 1e-3
  unsegmented = np.ones_like(seg)
  leak = logits(perturbed, jnp.asarray(unsegmented)) - logits(
      batch['inputs'][:1], jnp.asarray(unsegmented))
  assert np.abs(leak[0, ~first]).max() > 1e-3
