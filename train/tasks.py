"""Evaluation tasks: multiple choice by log-likelihood, exact match by greedy decoding.

    python -m train.evaluate --workdir DIR --tasks next_line,passkey@512,hs:/data/hs.jsonl
    python -m train.tasks convert hellaswag hellaswag_val.jsonl hs.jsonl
    python -m train --config configs/llama.py:tiny --workdir DIR --config.eval.tasks=next_line

A task file is JSONL, one example per line:
- `{"context": str, "choices": [str, ...], "label": int}` (optionally `"id"`):
  each choice is scored as the sum of the log-probabilities of its tokens
  after the context (the tokens of context + choice, the choice's scored; the
  context is cut from the left to fit the row), the way lm-evaluation-harness
  ranks choices. A trailing space of the context moves to the choice, and
  the choice's tokens are those of the whole text past the context's own
  tokens, so a BPE merge across the boundary is scored as the model saw it.
- `{"contexts": [str, ...], "continuation": str, "label": int}`: partial
  scoring (Winogrande): the context varies, the continuation is fixed and
  scored after each.
- one choice per example (every example): an exact-match task, e.g. LAMBADA's
  last word: the fraction of examples whose greedy continuation is the
  choice. The model's argmax at each choice token, fed the true previous
  ones, is what greedy decoding would produce, so one teacher-forced forward
  gives the greedy match exactly (`tests/test_tasks.py` checks it against
  `train.sample.generate`).

Multiple-choice metrics: `accuracy` (argmax of the summed log-probabilities),
`accuracy_norm` (argmax of the sum divided by the choice's UTF-8 bytes, the
tokenizer-independent length normalisation), and `centered_accuracy` =
(accuracy - chance) / (1 - chance) with chance the mean of 1 / #choices (0 at
chance, 1 when perfect; nanochat's CORE centring). A task with a neutral
prompt (`Task.neutral`; `next_line`'s is a newline) also reports
`accuracy_calibrated`: the argmax of log p(choice | context) - log p(choice |
neutral prompt), the pointwise mutual information of choice and context
(lm-evaluation-harness's `acc_mutual_info`; Holtzman et al. 2021, "Surface
Form Competition"), which takes out what a choice scores on its own.
Exact-match tasks report `exact_match` and `perplexity` (exp of minus the
mean summed log-probability of the answers: LAMBADA's two figures).
`eval/core` is the mean over tasks of `centered_accuracy` (`exact_match` for
exact-match tasks, whose chance is 0).

Built-in tasks, made deterministically from the eval split of the built-in
corpus (the stdlib files `data.builtin` holds out), so they need no download
and never overlap the training files:
- `next_line`: a passage of a file and four candidate next lines: the true
  one and the true next lines of passages of three other files (groups of
  four examples share their candidates, so a model blind to the passage
  scores exactly 1/4); calibrated by a newline as the neutral prompt;
- `passkey@N`: a five-digit number hidden at a random depth of about N
  tokens of corpus text ("The pass key is 48213. Remember it. 48213 is the
  pass key."), then "What is the pass key? The pass key is": exact match of
  the number (Mohtashami & Jaggi 2023, "Landmark Attention"); separates
  position schemes and windows at long context;
- `copy@N`: a random 12-character string shown once early in about N tokens
  of text, asked for again by its first 4 characters: exact match of the
  other 8 (induction: only copying can predict a random string).
`passkey` and `copy` without `@N` use `train.seq_len`.

Scoring (`Scorer`): every (example, choice) is a row of fixed length
(the task's longest row, rounded up to 16, at most `train.seq_len` for
multiple choice); rows go through one jitted forward at a time, a fixed number
of rows per call split over the mesh's batch axes, so a task compiles once.
"""

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import string

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import configs
from configs import cli
from configs import errors
from data import builtin
from data import pipeline
from data import sources
from data import tokenizers
from train import sharding


@dataclasses.dataclass
class Example:
  contexts: list[str]       # one per choice (a shared context is repeated)
  choices: list[str]
  label: int


@dataclasses.dataclass
class Task:
  name: str
  examples: list[Example]
  max_len: int              # row length cap (tokens of input)
  # A context-free prompt: each distinct choice is also scored after it, and
  # `accuracy_calibrated` ranks by log p(choice | context) - log p(choice |
  # neutral). None: no calibration.
  neutral: str | None = None

  @property
  def exact_match(self) -> bool:
    return all(len(e.choices) == 1 for e in self.examples)

  def distinct_choices(self) -> list[str]:
    """Every distinct choice, in first-seen order (the calibration rows)."""
    return list(dict.fromkeys(c for e in self.examples for c in e.choices))


# ----------------------------------------------------------------------------
# Task files.


def parse_example(obj, where: str) -> Example:
  """One JSON object of a task file -> Example; DataError naming `where`."""
  def bad(why):
    raise sources.DataError(f'{where}: {why}')
  if not isinstance(obj, dict):
    bad('not a JSON object')
  label = obj.get('label', 0)
  if 'contexts' in obj:
    contexts, cont = obj['contexts'], obj.get('continuation')
    if not (isinstance(contexts, list) and contexts and all(isinstance(c, str) for c in contexts)
            and isinstance(cont, str)):
      bad('"contexts" must be a list of strings and "continuation" a string')
    choices = [cont] * len(contexts)
  else:
    context, choices = obj.get('context'), obj.get('choices')
    if not (isinstance(context, str) and isinstance(choices, list) and choices
            and all(isinstance(c, str) for c in choices)):
      bad('needs "context" (a string) and "choices" (a list of strings), or '
          '"contexts" and "continuation"')
    contexts = [context] * len(choices)
  if not (isinstance(label, int) and 0 <= label < len(choices)):
    bad(f'"label"={label!r} must be an index into the {len(choices)} choices')
  if not all(choices):
    bad('a choice (or the continuation) is empty')
  return Example(contexts, choices, label)


def read_task_file(path: str, limit: int = 0) -> list[Example]:
  """The first `limit` (0: all) examples of a JSONL task file."""
  if not os.path.isfile(path):
    raise sources.DataError(f'task file {path!r} not found')
  examples = []
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise sources.DataError(f'{path}:{n}: not JSON ({e.msg})') from None
      examples.append(parse_example(obj, f'{path}:{n}'))
      if limit and len(examples) == limit:
        break
  if not examples:
    raise sources.DataError(f'task file {path!r} holds no examples')
  if len({len(e.choices) == 1 for e in examples}) > 1:
    raise sources.DataError(f'{path}: some examples have one choice and others '
                            'several; an exact-match task has one choice in every line')
  return examples


# ----------------------------------------------------------------------------
# Built-in tasks.


def _hash(*parts) -> int:
  text = '\0'.join(str(p) for p in parts)
  return int.from_bytes(hashlib.sha256(text.encode('utf-8')).digest()[:8], 'big')


def _eval_texts() -> list[str]:
  return [builtin.read_file(p) for p in builtin.split_files('eval')]


def _is_content_line(line: str) -> bool:
  return len(line.strip()) >= 8


def next_line_examples(limit: int, context_chars: int = 2048) -> list[Example]:
  """Examples in groups of four: four passages of four different eval files,
  each followed by the same four candidates, the true next lines of the
  four passages (in an order drawn per example). Every candidate is the
  true line of one example of its group, so a model that ignores the
  context (whatever it thinks of the lines themselves: length, rare words)
  scores exactly 1/4; only reading the passage beats chance."""
  files = [t.split('\n') for t in _eval_texts()]
  valid = [[i for i in range(1, len(lines)) if _is_content_line(lines[i])]
           for lines in files]
  usable = [f for f in range(len(files)) if valid[f]]
  examples = []
  for g in range(-(-limit // 4)):
    picked = []               # (context, true line) of four different files
    for j in range(len(usable)):
      f = usable[(4 * g + j * 7919) % len(usable)]
      lines = files[f]
      i = valid[f][_hash('line', g, f) % len(valid[f])]
      true = lines[i].rstrip()
      if any(f == other or true == line for other, _, line in picked):
        continue
      context = '\n'.join(lines[:i]) + '\n'
      if len(context) > context_chars:
        context = context[context.find('\n', len(context) - context_chars) + 1:]
      picked.append((f, context, true))
      if len(picked) == 4:
        break
    lines = [true for _, _, true in picked]
    for k, (_, context, true) in enumerate(picked):
      order = sorted(range(4), key=lambda c, k=k: _hash('order', g, k, c))
      choices = [lines[c] for c in order]
      examples.append(Example([context] * 4, choices, choices.index(true)))
  return examples[:limit]


def _filler(tokenizer, text: str, start: int, budget: int) -> str:
  """About `budget` tokens of `text` (wrapping around) from the line start
  at or after `start`."""
  start = text.find('\n', start) + 1
  need = 8 * budget + 64
  chunk = (text[start:] + '\n' + text * (1 + need // len(text)))[:need]
  return tokenizer.decode(tokenizer.encode(chunk)[:budget])


def _hide(filler: str, needle: str, depth: float) -> str:
  """`needle` (a line) put at the line start nearest `depth` of `filler`."""
  at = filler.rfind('\n', 0, int(depth * len(filler))) + 1
  return filler[:at] + needle + filler[at:]


def _needle_examples(tokenizer, kind: str, length: int, limit: int) -> list[Example]:
  corpus = '\n'.join(_eval_texts())
  examples = []
  for k in range(limit):
    rng = random.Random(_hash(kind, length, k))
    if kind == 'passkey':
      key = str(rng.randint(10000, 99999))
      needle = f'The pass key is {key}. Remember it. {key} is the pass key.\n'
      question, answer = '\nWhat is the pass key? The pass key is', ' ' + key
    else:
      key = ''.join(rng.choice(string.ascii_lowercase + string.digits) for _ in range(12))
      needle = f'copy this: {key}\n'
      question, answer = f'\ncopy this: {key[:4]}', key[4:]
    budget = length - 1 - len(tokenizer.encode(needle)) - len(tokenizer.encode(question))
    if budget < 8:
      raise configs.ConfigError(f'{kind}@{length}: too short for the question; use N >= 64')
    filler = _filler(tokenizer, corpus, rng.randrange(len(corpus)), budget)
    examples.append(Example([_hide(filler, needle, rng.random()) + question],
                            [answer], 0))
  return examples


def build_tasks(spec, limit: int, tokenizer, seq_len: int) -> list[Task]:
  """`eval.tasks` (a string or list) -> Tasks, reading files and the corpus."""
  tasks = []
  for name, length, path in configs.eval_task_specs(spec):
    base = name.partition('@')[0]
    n = limit or 1000           # built-ins: 0 means 1,000 examples
    if path is not None:
      tasks.append(Task(name, read_task_file(os.path.expanduser(path), limit), seq_len))
    elif base == 'next_line':
      tasks.append(Task(name, next_line_examples(n), seq_len, neutral='\n'))
    else:
      length = length or seq_len
      tasks.append(Task(name, _needle_examples(tokenizer, base, length, n),
                        length + 64))
  return tasks


# ----------------------------------------------------------------------------
# Rows.


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """(BOS + context tokens, continuation tokens), see the module docstring."""
  stripped = context.rstrip(' ')
  continuation = context[len(stripped):] + continuation
  ctx = tokenizer.encode(stripped)
  whole = tokenizer.encode(stripped + continuation)
  cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else tokenizer.encode(continuation)
  return [tokenizer.bos_id] + ctx, cont


def make_rows(pairs, max_len: int, multiple: int = 16):
  """Token pairs -> the row fields [R, L] (`inputs`, `targets`, `positions`,
  `segment_ids`, `loss_mask`) and the number of rows whose context was cut.

  L is the longest row (context + continuation - 1 tokens) rounded up to
  `multiple`, at most `max_len`; a longer row keeps its last L + 1 tokens.
  """
  longest = max(len(c) + len(x) - 1 for c, x in pairs)
  length = min(max_len, -(-longest // multiple) * multiple)
  rows = {k: np.zeros((len(pairs), length), np.int32)
          for k in ('inputs', 'targets', 'positions', 'segment_ids')}
  rows['loss_mask'] = np.zeros((len(pairs), length), np.float32)
  cut = 0
  for r, (ctx, cont) in enumerate(pairs):
    seq = (ctx + cont)[-(length + 1):]
    cut += len(ctx) + len(cont) > length + 1
    width = len(seq) - 1
    rows['inputs'][r, :width] = seq[:-1]
    rows['targets'][r, :width] = seq[1:]
    rows['positions'][r, :width] = np.arange(width)
    rows['segment_ids'][r, :width] = 1
    rows['loss_mask'][r, max(0, width - len(cont)):width] = 1.0
  return rows, cut


# ----------------------------------------------------------------------------
# Scoring.


def row_scores(model, batch):
  """(sum of log p(target) over `loss_mask` [b], all masked targets are the
  argmax [b]) of a batch of rows."""
  logits, _ = model(batch['inputs'], segment_ids=batch['segment_ids'],
                    positions=batch['positions'])
  logits = logits.astype(jnp.float32)                                 # [b, t, v]
  lse = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, batch['targets'][..., None], axis=-1)[..., 0]
  mask = batch['loss_mask'] > 0
  logprob = jnp.sum(jnp.where(mask, target - lse, 0.0), axis=-1)
  greedy = jnp.all(jnp.where(mask, jnp.argmax(logits, -1) == batch['targets'], True), -1)
  return logprob, greedy


class Scorer:
  """`row_scores` of a model state ({'params', 'model_state'}) over numpy
  rows, in jitted calls of a fixed number of rows split over the mesh."""

  def __init__(self, graphdef, state_shardings, mesh, rows_per_call: int):
    self.mesh = mesh
    shards = sharding.num_batch_shards(mesh)
    self.rows_per_call = max(shards, rows_per_call // shards * shards)
    self.batch_sharding = sharding.batch_sharding(mesh)
    shardings = {k: state_shardings[k] for k in ('params', 'model_state')}

    def score(state, batch):
      model = nnx.merge(graphdef, state['params'], state['model_state'])
      with sharding.activation_sharding(mesh):
        return row_scores(model, batch)

    replicated = NamedSharding(mesh, PartitionSpec())
    self._jitted = jax.jit(score, in_shardings=(shardings, self.batch_sharding),
                           out_shardings=replicated)

  def __call__(self, state, rows, tokens_per_call: int | None = None):
    """(logprob float64 [R], greedy bool [R]) of rows [R, L]."""
    state = {'params': state['params'], 'model_state': state['model_state']}
    total, length = rows['inputs'].shape
    step = self.rows_per_call
    if tokens_per_call:       # long rows: fewer per call, same tokens
      shards = sharding.num_batch_shards(self.mesh)
      step = max(shards, min(step, tokens_per_call // length) // shards * shards)
    logprob, greedy = np.zeros(total), np.zeros(total, bool)
    per_process = step // jax.process_count()
    lo = jax.process_index() * per_process
    for start in range(0, total, step):
      batch = {k: np.zeros((step, length), v.dtype) for k, v in rows.items()}
      n = min(step, total - start)
      for k, v in rows.items():
        batch[k][:n] = v[start:start + n]
      local = {k: v[lo:lo + per_process] for k, v in batch.items()}
      lp, g = self._jitted(state, sharding.global_batch(local, self.batch_sharding))
      logprob[start:start + n] = np.asarray(lp.addressable_data(0))[:n]
      greedy[start:start + n] = np.asarray(g.addressable_data(0))[:n]
    return logprob, greedy


def task_rows(task: Task, tokenizer):
  """The rows of every (example, choice) of a task, then with `task.neutral`
  one row per distinct choice after the neutral prompt; and the cut count."""
  pairs = [encode_pair(tokenizer, c, x) for e in task.examples
           for c, x in zip(e.contexts, e.choices)]
  if task.neutral is not None:
    pairs += [encode_pair(tokenizer, task.neutral, x) for x in task.distinct_choices()]
  return make_rows(pairs, task.max_len)


def wilson_ci95(p: float, n: int) -> list[float]:
  """The Wilson score 95% interval [lo, hi] of a proportion p of n (it
  stays inside [0, 1] and is not empty at p = 0 or 1)."""
  z = 1.96
  center = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return [max(0.0, center - half), min(1.0, center + half)]


def task_metrics(task: Task, logprob: np.ndarray, greedy: np.ndarray) -> dict:
  """The metrics of a task from its rows' scores (in `task_rows` order)."""
  n = len(task.examples)
  if task.exact_match:
    # LAMBADA's two figures, as lm-evaluation-harness reports them: the
    # greedy match, and the perplexity of the answers (exp of minus their
    # mean summed log-probability; per answer, not per token).
    em = float(np.mean(greedy[:n]))
    return {'exact_match': em, 'exact_match_ci95': wilson_ci95(em, n),
            'perplexity': float(np.exp(-np.mean(logprob[:n]))), 'examples': n}
  rows = sum(len(e.choices) for e in task.examples)
  neutral = {}
  if task.neutral is not None:
    neutral = dict(zip(task.distinct_choices(), logprob[rows:]))
  correct, correct_norm, correct_cal, chance, r = 0, 0, 0, 0.0, 0
  for e in task.examples:
    scores = logprob[r:r + len(e.choices)]
    r += len(e.choices)
    nbytes = np.asarray([max(1, len(c.encode('utf-8'))) for c in e.choices])
    correct += int(np.argmax(scores)) == e.label
    correct_norm += int(np.argmax(scores / nbytes)) == e.label
    if neutral:
      pmi = scores - np.asarray([neutral[c] for c in e.choices])
      correct_cal += int(np.argmax(pmi)) == e.label
    chance += 1 / len(e.choices)
  acc, chance = correct / n, chance / n
  out = {'accuracy': acc, 'accuracy_norm': correct_norm / n,
         'centered_accuracy': (acc - chance) / (1 - chance),
         'accuracy_ci95': wilson_ci95(acc, n)}
  if neutral:
    out['accuracy_calibrated'] = correct_cal / n
    out['accuracy_calibrated_ci95'] = wilson_ci95(correct_cal / n, n)
  return {**out, 'chance': chance, 'examples': n}


TAGGED = ('accuracy', 'accuracy_norm', 'accuracy_calibrated', 'centered_accuracy',
          'exact_match', 'perplexity')


class TaskSet:
  """Tasks with their rows made once; `__call__(state)` scores them all."""

  def __init__(self, tasks: list[Task], tokenizer, scorer: Scorer, tokens_per_call: int):
    self.tasks, self.scorer, self.tokens_per_call = tasks, scorer, tokens_per_call
    self.rows = []
    for task in tasks:
      rows, cut = task_rows(task, tokenizer)
      if cut:
        logging.info('task %s: %d of %d rows cut from the left to %d tokens',
                     task.name, cut, len(rows['inputs']), rows['inputs'].shape[1])
      self.rows.append(rows)

  def __call__(self, state) -> dict[str, dict]:
    """{task name: metrics}."""
    return {task.name: task_metrics(task, *self.scorer(state, rows, self.tokens_per_call))
            for task, rows in zip(self.tasks, self.rows)}


def scalars(results: dict[str, dict]) -> dict[str, float]:
  """TensorBoard scalars `eval/<task>/<metric>` and `eval/core`."""
  out = {f'eval/{name}/{k}': float(v) for name, m in results.items()
         for k, v in m.items() if k in TAGGED}
  if results:
    out['eval/core'] = float(np.mean([m.get('centered_accuracy', m.get('exact_match'))
                                      for m in results.values()]))
  return out


def make_taskset(cfg, spec, limit, graphdef, state_shardings, mesh) -> TaskSet:
  tokenizer = tokenizers.get_tokenizer(cfg.data.tokenizer)
  seq_len = cfg.train.seq_len
  tasks = build_tasks(spec, limit, tokenizer, seq_len)
  batch = cfg.train.global_batch_size
  scorer = Scorer(graphdef, state_shardings, mesh, batch)
  taskset = TaskSet(tasks, tokenizer, scorer, batch * seq_len)
  for task, rows in zip(tasks, taskset.rows):
    if cfg.model.position == 'learned' and rows['inputs'].shape[1] > cfg.model.max_seq_len:
      raise configs.ConfigError(
          f'task {task.name} needs {rows["inputs"].shape[1]} positions, past '
          f'model.max_seq_len={cfg.model.max_seq_len} with learned positions')
  return taskset


# ----------------------------------------------------------------------------
# Bits per byte.


def eval_bytes(cfg, source: str | None = None) -> tuple[float, float] | None:
  """(target tokens, their UTF-8 bytes) over the eval batches (every
  process's rows) of the data, or with `data.mixture` of its `source`; None
  for the synthetic source, which has no text."""
  if cfg.data.source == 'synthetic' and not cfg.data.get('mixture'):
    return None
  table = tokenizers.token_bytes(tokenizers.get_tokenizer(cfg.data.tokenizer),
                                 cfg.model.vocab_size)
  tokens = nbytes = 0.0
  for batch in pipeline.make_iterator(cfg, 'eval', jax.process_index(), jax.process_count(),
                                      source=source):
    mask = batch['loss_mask'] > 0
    tokens += float(mask.sum())
    nbytes += float(table[batch['targets']][mask].sum())
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    tokens, nbytes = (float(x) for x in np.sum(multihost_utils.process_allgather(
        np.asarray([tokens, nbytes])), axis=0))
  return tokens, nbytes


def bits_per_byte(loss: float, tokens: float, nbytes: float) -> float:
  """Mean NLL in nats per token over `tokens` targets -> bits per byte."""
  return loss * tokens / max(nbytes, 1.0) / math.log(2)


def bits_per_byte_scalars(cfg, eval_scalars: dict, counts: dict) -> dict[str, float]:
  """`eval/bits_per_byte` from `eval/loss`; with `data.mixture` also
  `eval/<name>/bits_per_byte` from each `eval/<name>/loss`, and
  `eval/bits_per_byte` their mean weighted by the mixture weights (as
  `eval/loss` is of the losses). `counts` caches `eval_bytes` per source."""
  out = {}
  sources = pipeline.eval_sources(cfg)
  for name, _ in sources:
    tag = 'eval/loss' if name is None else f'eval/{name}/loss'
    if tag not in eval_scalars:
      return {}
    if name not in counts:
      counts[name] = eval_bytes(cfg, name)
    if counts[name] is None:
      return {}
    out[tag.replace('/loss', '/bits_per_byte')] = bits_per_byte(eval_scalars[tag],
                                                               *counts[name])
  if sources[0][0] is not None:
    out['eval/bits_per_byte'] = sum(w * out[f'eval/{name}/bits_per_byte']
                                    for name, w in sources) / sum(w for _, w in sources)
  return out


# ----------------------------------------------------------------------------
# The training loop's hook.


def loop_hook(cfg, graphdef, state_shardings, mesh):
  """`hook(state, eval_scalars) -> extra eval scalars` for the loop's eval
  (`eval_scalars`: its `eval/loss`, and `eval/<name>/loss` per mixture
  source): bits per byte and, with `eval.tasks`, the task metrics.

  Task rows are made here, at the start of the run (a bad task file stops
  it before the first step); the eval's byte counts are read once, at the
  first call (the eval batches are the same at every eval).
  """
  spec = cfg.eval.tasks if 'eval' in cfg else ''
  if spec and not pipeline.has_eval(cfg):
    logging.warning('eval.tasks=%r will not run: tasks run with the eval, and this '
                    'run has no eval data (data.eval_files)', spec)
  taskset = make_taskset(cfg, spec, cfg.eval.task_limit, graphdef, state_shardings,
                         mesh) if spec else None
  counts = {}

  def hook(state, eval_scalars) -> dict[str, float]:
    out = bits_per_byte_scalars(cfg, eval_scalars, counts)
    if taskset is not None:
      out.update(scalars(taskset(state)))
      logging.info('eval tasks: %s', ' | '.join(
          f'{k.removeprefix("eval/")} {v:.4g}' for k, v in out.items()))
    return out

  return hook


# ----------------------------------------------------------------------------
# `train.evaluate --tasks` (`train.evaluate.evaluate_tasks`).


def format_results(out: dict) -> str:
  lines = [f'step {out["step"]}: core {out["core"]:.4f}']
  for name, m in out['tasks'].items():
    if 'exact_match' in m:
      lo, hi = m['exact_match_ci95']
      lines.append(f'  {name:24s} exact_match {m["exact_match"]:.4f} [{lo:.3f}, {hi:.3f}]'
                   f' | perplexity {m["perplexity"]:.4g}  ({m["examples"]} examples)')
    else:
      lo, hi = m['accuracy_ci95']
      calibrated = ''
      if 'accuracy_calibrated' in m:
        clo, chi = m['accuracy_calibrated_ci95']
        calibrated = f'| calibrated {m["accuracy_calibrated"]:.4f} [{clo:.3f}, {chi:.3f}] '
      lines.append(f'  {name:24s} accuracy {m["accuracy"]:.4f} [{lo:.3f}, {hi:.3f}] '
                   f'| norm {m["accuracy_norm"]:.4f} {calibrated}| centered '
                   f'{m["centered_accuracy"]:.4f} | chance {m["chance"]:.4f}  '
                   f'({m["examples"]} examples)')
  return '\n'.join(lines)


# ----------------------------------------------------------------------------
# Converters: `python -m train.tasks convert FORMAT IN.jsonl OUT.jsonl`.


def _hellaswag_clean(text: str) -> str:
  # WikiHow items carry bracketed markup ("[title]", "[step]"): a title
  # becomes a sentence end, other tags go, double spaces collapse.
  text = re.sub(r'\[[^\]]*\]', '', text.strip().replace(' [title]', '. '))
  return text.replace('  ', ' ')


def convert_hellaswag(obj):
  """rowanz/hellaswag `hellaswag_{train,val}.jsonl`: `activity_label`,
  `ctx_a`, `ctx_b`, `endings` (4), `label` (int, or a string in the Hugging
  Face export)."""
  ctx = obj['ctx_a'] + ' ' + obj['ctx_b'].capitalize()
  return {'context': _hellaswag_clean(obj['activity_label'] + ': ' + ctx),
          'choices': [' ' + _hellaswag_clean(e) for e in obj['endings']],
          'label': int(obj['label'])}


def convert_arc(obj):
  """AI2 ARC `ARC-{Easy,Challenge}-{Train,Dev,Test}.jsonl`: `question` is
  {`stem`, `choices`: [{`text`, `label`}]}, `answerKey` a label (A-E or
  1-5); the Hugging Face export's `question` string with `choices` {`text`:
  [...], `label`: [...]} reads too."""
  q = obj['question']
  if isinstance(q, dict):
    stem, texts, labels = q['stem'], [c['text'] for c in q['choices']], [
        c['label'] for c in q['choices']]
  else:
    stem, texts, labels = q, obj['choices']['text'], obj['choices']['label']
  return {'context': f'Question: {stem}\nAnswer:', 'choices': [' ' + t for t in texts],
          'label': labels.index(obj['answerKey']), 'id': obj.get('id')}


def convert_piqa(obj):
  """PIQA `{train,valid}.jsonl`: `goal`, `sol1`, `sol2`; the label (0 or 1)
  is the same line of `{train,valid}-labels.lst` (`--labels`, found beside
  the input by default), or a `label` field (the Hugging Face export)."""
  return {'context': f'Question: {obj["goal"]}\nAnswer:',
          'choices': [' ' + obj['sol1'], ' ' + obj['sol2']], 'label': int(obj['label'])}


def convert_winogrande(obj):
  """WinoGrande `{train_*,dev}.jsonl`: `sentence` with one `_`, `option1`,
  `option2`, `answer` ("1" or "2"). Partial scoring (Trinh & Le 2018): each
  option fills the blank in the context; the rest of the sentence is the
  continuation scored after each."""
  sentence = obj['sentence']
  i = sentence.index('_')
  return {'contexts': [sentence[:i] + obj['option1'], sentence[:i] + obj['option2']],
          'continuation': ' ' + sentence[i + 1:].strip(),
          'label': int(obj['answer']) - 1, 'id': obj.get('qID')}


def convert_lambada(obj):
  """LAMBADA as OpenAI published it (`lambada_test.jsonl`): `text`, a
  passage whose last word the model must produce; one choice (the last
  word with its space), so the task reports exact match."""
  context, word = obj['text'].rstrip().rsplit(' ', 1)
  return {'context': context, 'choices': [' ' + word], 'label': 0}


CONVERTERS = {'hellaswag': convert_hellaswag, 'arc': convert_arc, 'piqa': convert_piqa,
              'winogrande': convert_winogrande, 'lambada': convert_lambada}


def convert(fmt: str, src: str, dst: str, labels: str | None = None) -> int:
  """Converts a published JSONL file into a task file; returns the count."""
  if fmt not in CONVERTERS:
    raise sources.DataError(f'unknown format {fmt!r}: one of {", ".join(CONVERTERS)}')
  if not os.path.isfile(src):
    raise sources.DataError(f'{src!r} not found')
  label_lines = None
  if fmt == 'piqa':
    labels = labels or re.sub(r'\.jsonl$', '-labels.lst', src)
    if os.path.isfile(labels):
      with open(labels, encoding='utf-8') as f:
        label_lines = [line.strip() for line in f if line.strip()]
  count = 0
  with open(src, encoding='utf-8') as f, open(dst, 'w', encoding='utf-8') as out:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f'{src}:{n}'
      try:
        obj = json.loads(line)
        if label_lines is not None:
          obj['label'] = label_lines[count]
        example = CONVERTERS[fmt](obj)
      except json.JSONDecodeError as e:
        raise sources.DataError(f'{where}: not JSON ({e.msg})') from None
      except (KeyError, ValueError, IndexError, TypeError) as e:
        raise sources.DataError(f'{where}: not a line of the {fmt} layout ({type(e).__name__}: '
                                f'{e}); see docs/evaluation.md for the layout') from None
      example = {k: v for k, v in example.items() if v is not None}
      parse_example(example, where)
      out.write(json.dumps(example, ensure_ascii=False) + '\n')
      count += 1
  if label_lines is not None and len(label_lines) != count:
    raise sources.DataError(f'{labels}: {len(label_lines)} labels for {count} lines')
  return count


_COMMAND_DOC = """`python -m train.tasks convert FORMAT IN OUT`: a published file -> a task file.

    python -m train.tasks convert hellaswag hellaswag_val.jsonl hs.jsonl
    python -m train.evaluate --workdir DIR --tasks hs:hs.jsonl

FORMAT is one of hellaswag, arc, piqa, winogrande, lambada: the JSONL files
those benchmarks publish (lambada: one {"text": ...} per line, its last word
is the answer). OUT is a task file (one {"context", "choices", "label"} per
line; docs/evaluation.md) for `--tasks NAME:OUT` or `config.eval.tasks`.
"""

FLAGS = flags.FlagValues()
flags.DEFINE_string('labels', None, 'piqa: the labels file (default: IN-labels.lst beside '
                    'IN.jsonl, if there)', flag_values=FLAGS)


def main(argv=None) -> int:
  """`python -m train.tasks convert FORMAT IN OUT` (argv without the program name)."""
  args = cli.parse(FLAGS, argv, doc=_COMMAND_DOC, prog='python -m train.tasks',
                   positional={'COMMAND': 'convert (the only command)',
                               'FORMAT': ' | '.join(CONVERTERS),
                               'IN': 'the published JSONL file',
                               'OUT': 'the task file to write'})
  if args.COMMAND != 'convert':
    raise cli.UsageError(f'unknown command {args.COMMAND!r}: the command is convert '
                         '(python -m train.tasks convert FORMAT IN OUT)')
  try:
    count = convert(args.FORMAT, args.IN, args.OUT, args.labels)
  except OSError as e:
    raise sources.DataError(f'{e.filename or args.OUT}: {e.strerror or e}') from e
  print(f'{args.OUT}: {count} {args.FORMAT} examples')
  return 0


if __name__ == '__main__':
  errors.run(main, absl_flags=False)
