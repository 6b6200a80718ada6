"""Block-skipping predicates of `model.masking` against brute force over `visible`.

A kernel skips a tile when `tile_visible` is False and bounds its loops with
`kv_span` / `q_span`; a wrong bound would drop visible pairs (wrong results)
or visit dead tiles (lost speed). Each predicate is checked against the
element mask it summarises, on every tile of small random layouts.
"""

import itertools

import numpy as np
import pytest

from model import masking

LAYOUTS = [  # (causal, window, num_memory, length, block_q, block_kv)
    (True, None, 0, 96, 16, 16),
    (True, 7, 0, 96, 16, 8),
    (True, 20, 3, 100, 16, 32),
    (False, None, 0, 64, 16, 16),
    (False, 9, 0, 100, 32, 16),
    (False, 30, 5, 100, 16, 16),
    (True, 1, 2, 64, 8, 16),
]


def _mask(causal, window, num_memory, length):
  idx = np.arange(length)
  return np.asarray(masking.visible(idx[:, None], idx[None, :], causal=causal,
                                    window=window, num_memory=num_memory))


@pytest.mark.parametrize('layout', LAYOUTS)
def test_tile_visible_is_exact_or_conservative(layout):
  causal, window, num_memory, length, bq, bk = layout
  mask = _mask(causal, window, num_memory, length)
  for q0, k0 in itertools.product(range(0, length, bq), range(0, length, bk)):
    q1, k1 = min(q0 + bq, length), min(k0 + bk, length)
    any_visible = bool(mask[q0:q1, k0:k1].any())
    predicted = bool(masking.tile_visible(q0, q1, k0, k1, causal=causal, window=window,
                                          num_memory=num_memory))
    assert predicted or not any_visible, ('skipped a visible tile', q0, k0)
    if not num_memory:
      # Without memory tokens the causal/window band is the whole rule, so the
      # predicate is exact: no dead tile is visited.
      assert predicted == any_visible, ('visited a dead tile', q0, k0)


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('kv_len_cut', [0, 5])
def test_tile_full_is_exact_or_conservative(layout, kv_len_cut):
  causal, window, num_memory, length, bq, bk = layout
  kv_len = length - kv_len_cut          # keys at and past kv_len are padding
  mask = _mask(causal, window, num_memory, length) & (np.arange(length) < kv_len)
  for q0, k0 in itertools.product(range(0, length, bq), range(0, length, bk)):
    q1, k1 = min(q0 + bq, length), min(k0 + bk, length)
    all_visible = bool(mask[q0:q1, k0:k1].all())
    predicted = bool(masking.tile_full(q0, q1, k0, k1, causal=causal, window=window,
                                       num_memory=num_memory, kv_len=kv_len))
    assert all_visible or not predicted, ('unmasked a tile with hidden pairs', q0, k0)
    if not num_memory:
      assert predicted == all_visible, ('masked a full tile', q0, k0)


@pytest.mark.parametrize('layout', LAYOUTS)
def test_spans_bound_the_band_tightly(layout):
  causal, window, num_memory, length, bq, bk = layout
  band = _mask(causal, window, 0, length)    # the rule the spans summarise
  for q0 in range(0, length, bq):
    q1 = min(q0 + bq, length)
    lo, hi = (int(x) for x in masking.kv_span(q0, q1, causal=causal, window=window,
                                              kv_len=length))
    cols = np.flatnonzero(band[q0:q1].any(axis=0))
    assert (lo, hi) == (cols.min(), cols.max() + 1)
  for k0 in range(0, length, bk):
    k1 = min(k0 + bk, length)
    lo, hi = (int(x) for x in masking.q_span(k0, k1, causal=causal, window=window,
                                             q_len=length))
    rows = np.flatnonzero(band[:, k0:k1].any(axis=1))
    assert (lo, hi) == (rows.min(), rows.max() + 1)


def _as_span(flags):
  """[lo, hi) of the True entries (which must be contiguous); (0, 0) if none."""
  idx = np.flatnonzero(flags)
  if not idx.size:
    return 0, 0
  assert idx.size == idx[-1] - idx[0] + 1
  return idx[0], idx[-1] + 1


def _check_span(got, want):
  if want == (0, 0):
    assert got[1] <= got[0], got      # empty
  else:
    assert got == want


@pytest.mark.parametrize('layout', LAYOUTS)
def test_full_spans_are_the_pairs_seen_by_all(layout):
  causal, window, _, length, bq, bk = layout
  band = _mask(causal, window, 0, length)
  for q0 in range(0, length, bq):
    q1 = min(q0 + bq, length)
    lo, hi = (int(x) for x in masking.kv_full_span(q0, q1, causal=causal, window=window,
                                                   kv_len=length))
    _check_span((lo, hi), _as_span(band[q0:q1].all(axis=0)))
  for k0 in range(0, length, bk):
    k1 = min(k0 + bk, length)
    lo, hi = (int(x) for x in masking.q_full_span(k0, k1, causal=causal, window=window,
                                                  q_len=length))
    _check_span((lo, hi), _as_span(band[:, k0:k1].all(axis=1)))
