"""Strided (sliding-window) evaluation of `train.evaluate` against direct forwards.

A workdir is written by hand (config.json + a step-0 checkpoint of a tiny
decoder whose weights are scaled up so that context visibly changes the
predictions); the references run the same decoder on the windows the method
prescribes and take a NumPy log-softmax of its logits.
"""

import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import configs
import model as model_lib
from train import checkpoint as checkpoint_lib
from train import evaluate
from train import mesh as mesh_lib
from train import optim
from train import step as step_lib
from train import workdir as workdir_lib

CONTEXT = 16
BOS, EOS = 256, 257
TEXTS = {
    'a_short.txt': 'tiny doc',                        # 10 tokens: shorter than CONTEXT
    'b_mid.txt': 'def f(x):\n    return x * 2 + 1\n',  # 34 tokens
    'c_long.txt': ('The quick brown fox jumps over the lazy dog; then it naps, '
                   'wakes, and jumps over the dog again.'),  # 101 tokens
}


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp('strided')
  for name, text in TEXTS.items():
    (root / name).write_text(text)
  cfg = configs.load('configs/llama.py:tiny', [
      'model.d_model=32', 'model.num_layers=2', 'model.num_heads=2',
      'model.num_kv_heads=1', 'model.d_ff=64', 'model.max_seq_len=64',
      f'train.seq_len={CONTEXT}', 'train.global_batch_size=8', 'data.source=text',
      f'data.train_files={root}/*.txt', f'data.eval_files={root}/*.txt'])
  workdir = str(root / 'work')
  mesh = mesh_lib.make_mesh(cfg.mesh)
  optimizer, _ = optim.make_optimizer(cfg.train)
  graphdef, init, _, shardings = step_lib.train_state_spec(
      lambda: model_lib.Decoder(cfg.model, rngs=nnx.Rngs(0)), optimizer, mesh, 0)
  state = jax.jit(init, out_shardings=shardings)()
  # Sharper attention than the small init: the window's context matters.
  state['params'] = jax.tree.map(lambda x: 6.0 * x, state['params'])
  workdir_lib.write_config(workdir, cfg)
  ckpt = checkpoint_lib.Checkpointer(workdir, every_steps=1, keep=1)
  ckpt.save(0, state, force=True)
  ckpt.close()
  decoder = nnx.merge(graphdef, jax.device_get(state['params']),
                      jax.device_get(state['model_state']))
  forward = jax.jit(lambda t: decoder(t)[0])
  return workdir, root, forward


def _tokens(text):
  return np.array([BOS, *text.encode('utf-8'), EOS], np.int32)


def _log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  top = logits.max(-1, keepdims=True)
  return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def _nll(forward, window):
  """NumPy -log softmax of the decoder's logits on one window: NLL of
  window[1:], [len(window) - 1]."""
  logp = _log_softmax(forward(window[None, :-1]))[0]                 # [t, v]
  return -logp[np.arange(len(window) - 1), window[1:]]


def _last_nll(forward, windows, width=128):
  """NLL of each window's last token given the rest, in one call: the windows
  are right-padded to `width` (a causal model never looks ahead)."""
  inputs = np.zeros((len(windows), width), np.int32)
  for r, w in enumerate(windows):
    inputs[r, :len(w) - 1] = w[:-1]
  logp = _log_softmax(forward(inputs))
  return np.array([-logp[r, len(w) - 2, w[-1]] for r, w in enumerate(windows)])


def test_stride_equal_to_context_is_the_chunked_loss(run):
  workdir, _, forward = run
  total, count = 0.0, 0
  for text in TEXTS.values():
    tokens = _tokens(text)
    for start in range(0, len(tokens) - 1, CONTEXT):
      chunk = tokens[start:start + CONTEXT + 1]    # CONTEXT inputs and their targets
      total += _nll(forward, chunk).sum()
      count += len(chunk) - 1
  got = evaluate.evaluate_strided(workdir, stride=CONTEXT)
  assert got['context'] == CONTEXT and got['documents'] == 3 and got['step'] == 0
  assert got['tokens'] == count
  np.testing.assert_allclose(got['loss'], total / count, rtol=1e-5)
  np.testing.assert_allclose(got['perplexity'], math.exp(total / count), rtol=1e-5)


def test_a_document_shorter_than_the_context_is_one_forward_at_any_stride(run):
  workdir, root, forward = run
  tokens = _tokens(TEXTS['a_short.txt'])
  assert len(tokens) - 1 < CONTEXT
  want = _nll(forward, tokens).mean()
  for stride in (1, 7):
    got = evaluate.evaluate_strided(workdir, stride=stride, context=CONTEXT,
                                    files=str(root / 'a_short.txt'))
    assert got['tokens'] == len(tokens) - 1 and got['windows'] == 1
    np.testing.assert_allclose(got['loss'], want, rtol=1e-5)


def test_every_target_is_scored_exactly_once(run):
  for n in (1, 5, 16, 17, 40, 101):
    for context in (1, 4, 16):
      for stride in sorted({1, 3, context // 2 or 1, context}):
        if stride > context:
          continue
        windows = evaluate.strided_windows(n, context, stride)
        scored = [i for _, end, first in windows for i in range(first, end)]
        assert scored == list(range(n)), (n, context, stride)
        for begin, end, first in windows:
          assert end - begin <= context and begin <= first < end
        # Hugging Face's loop: one window, then one per stride until the end.
        assert len(windows) == 1 + math.ceil(max(0, n - context) / stride)
  workdir, _, _ = run
  predicted = sum(len(_tokens(t)) - 1 for t in TEXTS.values())
  got = evaluate.evaluate_strided(workdir, stride=5)
  assert got['tokens'] == predicted and got['documents'] == len(TEXTS)
  assert got['windows'] == sum(len(evaluate.strided_windows(len(_tokens(t)) - 1, CONTEXT, 5))
                               for t in TEXTS.values())


def test_each_token_is_scored_with_the_context_of_its_window(run):
  workdir, root, forward = run
  cfg = workdir_lib.load_config(workdir)
  mesh = workdir_lib.fitting_mesh(cfg)
  graphdef, state, shardings, _ = evaluate.restore(workdir, cfg, mesh)
  score = evaluate.make_score_fn(graphdef, state, shardings, mesh)
  docs = [_tokens(TEXTS['c_long.txt']), _tokens(TEXTS['a_short.txt'])]
  stride = 5
  out = dict(evaluate.strided_token_nll(score, docs, context=CONTEXT, stride=stride,
                                        batch_size=8))
  assert sorted(out) == [0, 1]
  tokens = docs[0]
  n = len(tokens) - 1
  windows, prefixes = [], []
  for i in range(n):          # input position i predicts tokens[i + 1]
    # The first window (starting at k * stride) whose end passes i scores it.
    k = max(0, (i - CONTEXT) // stride + 1)
    windows.append(tokens[k * stride:i + 2])
    prefixes.append(tokens[:i + 2])
    assert len(windows[-1]) - 1 <= CONTEXT
    assert i < CONTEXT or len(windows[-1]) - 1 > CONTEXT - stride
  want = _last_nll(forward, windows)
  np.testing.assert_allclose(out[0], want, rtol=1e-5, atol=1e-5)
  # With the whole prefix instead, later tokens would get other values: the
  # check above can tell the context rule apart.
  whole = _last_nll(forward, prefixes)
  assert np.all(whole[:CONTEXT] == want[:CONTEXT])
  assert np.abs(whole[CONTEXT:] - want[CONTEXT:]).max() > 1e-2
  np.testing.assert_allclose(out[1], _nll(forward, docs[1]), rtol=1e-5, atol=1e-5)


def test_bad_strides_are_refused(run):
  workdir, _, _ = run
  with pytest.raises(configs.ConfigError, match='stride'):
    evaluate.evaluate_strided(workdir, stride=CONTEXT + 1)
  with pytest.raises(configs.ConfigError, match='stride'):
    evaluate.evaluate_strided(workdir, stride=0, context=8)


def test_command_line(run):
  workdir, root, _ = run
  want = evaluate.evaluate_strided(workdir, stride=8, context=CONTEXT,
                                   files=str(root / 'c_*.txt'))
  out = subprocess.run(
      [sys.executable, '-m', 'train.evaluate', '--workdir', workdir, '--stride', '8',
       '--files', str(root / 'c_*.txt')], capture_output=True, text=True, check=True,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert f'loss {want["loss"]:.4f}' in out.stdout, out.stdout + out.stderr
  assert f'{want["tokens"]:,} tokens in 1 documents' in out.stdout
  assert 'context 16 stride 8' in out.stdout
