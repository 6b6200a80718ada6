"""Bits per byte of a `data.mixture` run: per source and their weighted mean."""

import json
import math
import os

import pytest
from tensorboard.backend.event_processing import event_accumulator

import configs
from data import pipeline
from data import prepare


@pytest.fixture(scope='module')
def mixture_run(tmp_path_factory):
  """One step of the tiny loop on two prepared sources whose tokens per byte
  differ: `short` (short documents of 2-byte characters, many EOS targets)
  and `long` (long ASCII documents)."""
  root = tmp_path_factory.mktemp('bpb_mixture')
  docs = {'short': ['\u00e9\u00e8' * (k % 4 + 1) for k in range(200)],
          'long': [f'line {k} of a longer ascii document. ' * 6 for k in range(200)]}
  folders = {}
  for name, texts in docs.items():
    with open(root / f'{name}.jsonl', 'w', encoding='utf-8') as f:
      f.writelines(json.dumps({'text': t}) + '\n' for t in texts)
    folders[name] = str(root / f'tok_{name}')
    prepare.prepare(str(root / f'{name}.jsonl'), folders[name], format='jsonl',
                    eval_fraction=0.2, progress_stream=open(os.devnull, 'w'))
  workdir = str(root / 'run')
  from train import loop  # pylint: disable=g-import-not-at-top
  cfg = configs.load('configs/llama.py:tiny', [
      'model.num_layers=1', 'train.steps=1', 'train.eval_every_steps=1',
      'train.eval_steps=1', 'train.seq_len=64', 'train.log_every_steps=1',
      f'data.mixture=short:{folders["short"]}:0.25,long:{folders["long"]}:0.75'])
  summary = loop.train_and_evaluate(cfg, workdir)
  acc = event_accumulator.EventAccumulator(workdir, size_guidance={'scalars': 0})
  acc.Reload()
  return cfg, summary, set(acc.Tags()['scalars'])


def test_mixture_logs_bits_per_byte_per_source_and_their_weighted_mean(mixture_run):
  cfg, summary, tags = mixture_run
  ev = summary['eval']
  assert {'eval/bits_per_byte', 'eval/short/bits_per_byte', 'eval/long/bits_per_byte'} <= tags
  got, counts = {}, {}
  for name in ('short', 'long'):
    # Counted here from the batches: a byte token is one byte, BOS/EOS none.
    tokens = nbytes = 0
    for batch in pipeline.make_iterator(cfg, 'eval', 0, 1, source=name):
      mask = batch['loss_mask'] > 0
      tokens += int(mask.sum())
      nbytes += int((mask & (batch['targets'] < 256)).sum())
    counts[name] = tokens, nbytes
    got[name] = ev[f'eval/{name}/loss'] * tokens / nbytes / math.log(2)
    assert ev[f'eval/{name}/bits_per_byte'] == pytest.approx(got[name], rel=1e-6)
  # Not the mixture's eval/loss over the pooled counts (the sources differ
  # in tokens per byte).
  tokens, nbytes = (sum(c[i] for c in counts.values()) for i in (0, 1))
  pooled = ev['eval/loss'] * tokens / nbytes / math.log(2)
  assert abs(pooled - ev['eval/bits_per_byte']) > 0.01
  assert ev['eval/bits_per_byte'] == pytest.approx(0.25 * got['short'] + 0.75 * got['long'],
                                                   rel=1e-6)
