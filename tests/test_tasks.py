"""Evaluation tasks (train/tasks.py): batched, sharded scoring against a
one-example-at-a-time reference written here from the model's forward and
`train.sample.generate`; built-in tasks; bits per byte; the converters."""

import json
import math
import os

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

import configs
import model as model_lib
from data import sources
from data import tokenizers
from train import mesh as mesh_lib
from train import optim
from train import sample
from train import step as step_lib
from train import tasks

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'tasks')


@pytest.fixture(scope='module')
def tiny():
  """A random tiny LLaMA on a data x fsdp = 4 x 2 mesh, and its host model."""
  cfg = configs.load('configs/llama.py:tiny', ['model.num_layers=1'])
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(
      {'data': 4, 'fsdp': 2, 'tensor': 1, 'expert': 1}))
  optimizer, _ = optim.make_optimizer(cfg.train)
  graphdef, state, shardings = step_lib.create_train_state(
      lambda: model_lib.Decoder(cfg.model, rngs=nnx.Rngs(3)), optimizer, mesh, 0)
  host = nnx.merge(graphdef, jax.device_get(state['params']),
                   jax.device_get(state['model_state']))
  return cfg, mesh, graphdef, state, shardings, host


def _reference_logprob(host, ctx, cont, length):
  """Sum of log p(cont | ctx) from one unpadded forward of the last
  length + 1 tokens (the context cut from the left)."""
  seq = np.asarray(ctx + cont)[-(length + 1):]
  logits, _ = host(seq[None, :-1])
  logp = np.asarray(jax.nn.log_softmax(np.asarray(logits[0], np.float32), axis=-1))
  n = len(cont)
  targets = seq[-n:]
  return float(sum(logp[len(seq) - 1 - n + i, targets[i]] for i in range(n)))


def test_scoring_equals_one_at_a_time_reference(tiny):
  cfg, mesh, graphdef, state, shardings, host = tiny
  tok = tokenizers.get_tokenizer('bytes')
  rng = np.random.default_rng(0)
  words = ['alpha', 'be', 'gamma delta', 'x', 'return self', 'import os, sys']
  examples = []
  for k in range(11):       # 11 examples x 3 choices: the last call is padded
    context = ' '.join(rng.choice(words, size=int(rng.integers(2, 20))))
    choices = [' ' + ' '.join(rng.choice(words, size=int(rng.integers(1, 4))))
               for _ in range(3)]
    examples.append(tasks.Example([context] * 3, choices, k % 3))
  task = tasks.Task('mc', examples, max_len=64)
  rows, cut = tasks.task_rows(task, tok)
  length = rows['inputs'].shape[1]
  assert length == 64 and cut > 0          # some contexts are cut from the left
  scorer = tasks.Scorer(graphdef, shardings, mesh, rows_per_call=8)
  logprob, _ = scorer(state, rows)
  got = tasks.task_metrics(task, logprob, np.zeros(len(logprob), bool))

  ref_scores, correct, correct_norm = [], 0, 0
  for e in examples:
    ctx = [tok.bos_id] + tok.encode(e.contexts[0])
    s = np.asarray([_reference_logprob(host, ctx, tok.encode(c), length) for c in e.choices])
    ref_scores.extend(s)
    nbytes = np.asarray([len(c.encode()) for c in e.choices])
    correct += np.argmax(s) == e.label
    correct_norm += np.argmax(s / nbytes) == e.label
  np.testing.assert_allclose(logprob, ref_scores, rtol=1e-5, atol=1e-4)
  n = len(examples)
  assert got['accuracy'] == correct / n
  assert got['accuracy_norm'] == correct_norm / n
  assert got['centered_accuracy'] == pytest.approx((correct / n - 1 / 3) / (2 / 3))
  assert len({len(c) for e in examples for c in e.choices}) > 2   # unequal lengths


def test_exact_match_equals_greedy_generation(tiny):
  cfg, mesh, graphdef, state, shardings, host = tiny
  tok = tokenizers.get_tokenizer('bytes')
  contexts = [[tok.bos_id] + tok.encode(f'def f{k}(x):\n    return x * {k} + ' * (k + 1))
              for k in range(6)]
  # The KV-cache generator's greedy continuations (prompts of unequal length).
  answers = sample.generate(host, cfg.model, contexts, max_new_tokens=4)
  for k in (1, 3, 5):         # half the answers differ from greedy in one token
    answers[k][k % 4] = (answers[k][k % 4] + 1) % 256
  scorer = tasks.Scorer(graphdef, shardings, mesh, rows_per_call=8)
  _, greedy = scorer(state, tasks.make_rows(list(zip(contexts, answers)), 256)[0])
  assert greedy.tolist() == [True, False] * 3
