"""Loss and perplexity of a workdir's checkpoint: `python -m train.evaluate`.

    python -m train.evaluate --workdir /tmp/ablax_tiny
    python -m train.evaluate --workdir /tmp/ablax_tiny --checkpoint 100 --eval_steps 20
    python -m train.evaluate --workdir /tmp/ablax_tiny --stride 64 [--context 128]
    python -m train.evaluate --workdir /tmp/ablax_tiny --stride 64 --files 'books/*.txt'
    python -m train.evaluate --workdir /tmp/ablax_tiny --lengths 128,256,512
    python -m train.evaluate --workdir /tmp/ablax_tiny --tasks next_line,passkey@512,hs:hs.jsonl

Reads `DIR/config.json` (the model and the data it was trained with) and
restores only the parameters of the newest checkpoint (or `--checkpoint STEP`).

Packed (the default): runs the trainer's eval step over `train.eval_steps`
batches of the eval split (`--split train` for the training data): the same
numbers as the run's `eval/loss` and `eval/perplexity` at that step.

Strided (`--stride S`, optionally `--context L`): the sliding-window
perplexity of fixed-length models (the method of Hugging Face's "Perplexity
of fixed-length models" guide), for texts longer than the context. Each
document, unpacked and tokenized as in training (`[BOS] + text + [EOS]`), is
cut into windows of L input tokens that start every S tokens; a window scores
only the targets that no earlier window scored, so every target is scored
exactly once, with at least L - S tokens of context (all the preceding
tokens while the document is shorter than L). S = L is plain non-overlapping
chunks; S = 1 gives every token the full L tokens of context, at L times the
cost. The result is the token-weighted mean NLL over all scored targets and its
exponential. Documents: those of the run's eval split (`--split train` for
training data; e.g. each file of the built-in eval split), or `--files GLOB`
(comma-separated globs) read with the run's `data.source` when it is `text`,
`jsonl` or `arrayrecord`, otherwise as JSONL for `*.jsonl` and plain text
(one document per file) for anything else. `--max_documents N` stops early.

Lengths (`--lengths L1,L2,...`): the strided loss with stride = context = L
at each length, on the same documents (those at least max(L) + 1 tokens
long, cut to that), written to `DIR/eval_lengths.json`: a model trained
short, read long (`launch.compare --lengths` tables it per run).
Tasks (`--tasks`, the syntax of `eval.tasks`; `--task_limit N` examples per
task, default `eval.task_limit`): multiple-choice and exact-match scores
(`train/tasks.py`), printed and written to `DIR/eval_tasks.json`.
"""

import json
import os
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app
from absl import flags
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import configs
from configs import errors
from data import pipeline
from data import sources
from data import tokenizers
from train import metrics
from train import sharding
from train import step as step_lib
from train import tasks
from train import workdir as workdir_lib

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir.')
_CHECKPOINT = flags.DEFINE_integer('checkpoint', None,
                                   'Step to evaluate (default: the newest).')
_EVAL_STEPS = flags.DEFINE_integer('eval_steps', None,
                                   'Batches to average (default: train.eval_steps).')
_SPLIT = flags.DEFINE_enum('split', 'eval', ['eval', 'train'], 'Data split.')
_STRIDE = flags.DEFINE_integer(
    'stride', None, 'Strided (sliding-window) evaluation: windows start every '
    'STRIDE tokens of each unpacked document; each scores only new tokens.')
_CONTEXT = flags.DEFINE_integer(
    'context', None, 'Window length in input tokens for the strided evaluation '
    '(default: train.seq_len); alone, it means --stride=CONTEXT.')
_FILES = flags.DEFINE_string(
    'files', None, 'Comma-separated globs of documents for the strided '
    'evaluation, instead of the run\'s data.eval_files.')
_MAX_DOCUMENTS = flags.DEFINE_integer(
    'max_documents', None, 'Strided evaluation: at most this many documents.')
_LENGTHS = flags.DEFINE_list(
    'lengths', None, 'L1,L2,...: loss at each context length on the same documents '
    '(the first max(L) + 1 tokens of those that long); writes DIR/eval_lengths.json.')
_TASKS = flags.DEFINE_string(
    'tasks', None, 'Evaluation tasks (next_line,passkey@512,NAME:PATH.jsonl); '
    'writes DIR/eval_tasks.json.')
_TASK_LIMIT = flags.DEFINE_integer('task_limit', None, 'Examples per task (0: all).')


def restore(workdir: str, cfg, mesh, checkpoint: int | None = None):
  """(graphdef, {'params', 'model_state'}, their shardings, step) of a
  checkpoint of `workdir`, restored onto `mesh` (`workdir.restore_model`: the
  optimizer state is not read)."""
  return workdir_lib.restore_model(workdir, cfg, mesh, checkpoint)


def evaluate(workdir: str, checkpoint: int | None = None, eval_steps: int | None = None,
             split: str = 'eval') -> dict:
  """{'step', 'loss', 'perplexity', 'tokens'} of a checkpoint of `workdir`."""
  cfg = workdir_lib.load_config(workdir)
  if eval_steps is not None:
    cfg.train.eval_steps = eval_steps
  if split == 'eval' and not pipeline.has_eval(cfg):
    raise configs.ConfigError(f'{workdir} was trained without eval data '
                              '(data.eval_files); use --split train or --stride '
                              'with --files')
  mesh = workdir_lib.fitting_mesh(cfg)
  sharding.check_batch(mesh, cfg.train.global_batch_size)
  graphdef, state, state_shardings, step = restore(workdir, cfg, mesh, checkpoint)
  eval_step = step_lib.make_eval_step(
      step_lib.lm_loss(cfg.train), graphdef=graphdef, state_shardings=state_shardings,
      mesh=mesh)

  batch_sharding = sharding.batch_sharding(mesh)
  process = (jax.process_index(), jax.process_count())
  if split == 'eval':
    batches = pipeline.make_iterator(cfg, 'eval', *process)
  else:
    train_iter = pipeline.make_iterator(cfg, 'train', *process)
    batches = [next(train_iter) for _ in range(cfg.train.eval_steps)]
    train_iter.close()
  means = step_lib.eval_metrics(
      eval_step, state, (sharding.global_batch(b, batch_sharding) for b in batches))
  return {'step': step, 'loss': means['loss'], 'perplexity': means['perplexity'],
          'tokens': int(means['weight'])}


# ----------------------------------------------------------------------------
# Strided (sliding-window) evaluation.


def strided_windows(num_targets: int, context: int, stride: int) -> list[tuple[int, int, int]]:
  """The windows over a document of `num_targets` + 1 tokens.

  Window (begin, end, first) feeds tokens[begin:end] (at most `context`) and
  scores the targets tokens[i + 1] for input positions i in [first, end):
  those after the previous window's end. Windows start every `stride` tokens
  until one reaches the last target.
  """
  if not 1 <= stride <= context:
    raise configs.ConfigError(f'stride={stride}: must be in [1, context={context}]')
  windows, scored, begin = [], 0, 0
  while scored < num_targets:
    end = min(begin + context, num_targets)
    windows.append((begin, end, scored))
    scored, begin = end, begin + stride
  return windows


def window_rows(tokens: np.ndarray, context: int, stride: int):
  """One document's windows as rows [num_windows, context] (the batch fields
  of the pipeline; `loss_mask` marks the targets a window scores) and the
  windows themselves."""
  tokens = np.asarray(tokens, np.int32)
  windows = strided_windows(len(tokens) - 1, context, stride)
  rows = {k: np.zeros((len(windows), context), np.int32)
          for k in ('inputs', 'targets', 'positions', 'segment_ids')}
  rows['loss_mask'] = np.zeros((len(windows), context), np.float32)
  for r, (begin, end, first) in enumerate(windows):
    width = end - begin
    rows['inputs'][r, :width] = tokens[begin:end]
    rows['targets'][r, :width] = tokens[begin + 1:end + 1]
    rows['positions'][r, :width] = np.arange(width)   # each window is a fresh sequence
    rows['segment_ids'][r, :width] = 1
    rows['loss_mask'][r, first - begin:width] = 1.0
  return rows, windows


def token_nll(model, batch):
  """-log p(target) per token [b, t] where `loss_mask` is set, else 0."""
  logits, _ = model(batch['inputs'], segment_ids=batch['segment_ids'],
                    positions=batch['positions'])
  logits = logits.astype(jnp.float32)                                 # [b, t, v]
  lse = jax.nn.logsumexp(logits, axis=-1)                             # [b, t]
  target = jnp.take_along_axis(logits, batch['targets'][..., None], axis=-1)[..., 0]
  # `where`, not a product: a padding row's logits may be anything.
  return jnp.where(batch['loss_mask'] > 0, lse - target, 0.0)


def strided_token_nll(score: Callable[[dict], np.ndarray], documents: Iterable,
                      *, context: int, stride: int, batch_size: int):
  """Per-target NLL of each document under the strided windows.

  Args:
    score: batch of rows (numpy, [batch_size, context] each) -> per-token NLL
      [batch_size, context] (`token_nll`; 0 where `loss_mask` is 0).
    documents: token arrays ([BOS] + ids + [EOS]), read one at a time.
    context, stride: the window length and step (`strided_windows`).
    batch_size: rows per call of `score`; the last batch is padded with
      empty rows.

  Yields:
    (document index, float32 [len(tokens) - 1]): NLL of tokens[1:], each
    from the one window that scored it, in document order.
  """
  pending = []            # rows not yet scored: (doc, begin, first, end, row)
  results, done, next_out = {}, {}, 0
  rows_left = {}          # doc -> windows not yet scored

  def flush():
    batch = {k: np.zeros((batch_size, context), v.dtype)
             for k, v in pending[0][4].items()}
    for r, (_, _, _, _, row) in enumerate(pending):
      for k, v in row.items():
        batch[k][r] = v
    nll = np.asarray(score(batch))
    for r, (doc, begin, first, end, _) in enumerate(pending):
      # Input position i predicts target i + 1, stored at index i.
      results[doc][first:end] = nll[r, first - begin:end - begin]
      rows_left[doc] -= 1
      if not rows_left[doc]:
        done[doc] = results.pop(doc)
    pending.clear()

  for doc, tokens in enumerate(documents):
    rows, windows = window_rows(tokens, context, stride)
    results[doc] = np.zeros(len(tokens) - 1, np.float32)
    rows_left[doc] = len(windows)
    if not windows:           # a lone token: nothing to predict
      done[doc] = results.pop(doc)
    for r, (begin, end, first) in enumerate(windows):
      pending.append((doc, begin, first, end, {k: v[r] for k, v in rows.items()}))
      if len(pending) == batch_size:
        flush()
    while next_out in done:
      yield next_out, done.pop(next_out)
      next_out += 1
  if pending:
    flush()
  while next_out in done:
    yield next_out, done.pop(next_out)
    next_out += 1


def strided_documents(cfg, split: str = 'eval', files: str | None = None):
  """The token arrays of the documents to score (`[BOS] + ids + [EOS]`), as a
  sequence read lazily (see the module docstring for `files`)."""
  data_cfg = ml_collections.ConfigDict(cfg.data.to_dict())
  if files is not None:
    if data_cfg.source not in ('text', 'jsonl', 'arrayrecord'):
      data_cfg.source = 'jsonl' if all(
          p.strip().endswith('.jsonl') for p in files.split(',') if p.strip()) else 'text'
    split = 'eval'
    data_cfg.eval_files = files
  elif data_cfg.source not in ('builtin', 'text', 'jsonl', 'arrayrecord', 'synthetic'):
    raise configs.ConfigError(f'data.source={data_cfg.source!r} holds no plain '
                              'documents to score: give --files GLOB')
  elif not sources.has_split(data_cfg, split):
    raise configs.ConfigError(f'data.{split}_files is empty: give --files GLOB')
  docs = sources.documents(data_cfg, split, vocab_size=cfg.model.vocab_size,
                           seq_len=cfg.train.seq_len)
  if data_cfg.source == 'synthetic':
    return docs
  tokenizer = tokenizers.get_tokenizer(data_cfg.tokenizer)
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise sources.DataError(f'data.tokenizer={data_cfg.tokenizer!r} has '
                            f'{tokenizer.vocab_size} ids but model.vocab_size='
                            f'{cfg.model.vocab_size}')
  tokenize = pipeline.TokenizeDocument(tokenizer)
  return docs.map(lambda text: tokenize(text)['tokens'])


def make_score_fn(graphdef, state, state_shardings, mesh) -> Callable[[dict], np.ndarray]:
  """`token_nll` of the restored model, jitted over the mesh: numpy rows of the
  global batch in, the global per-token NLL out (every process gets all of it)."""
  batch_sharding = sharding.batch_sharding(mesh)

  def nll(state, batch):
    return token_nll(nnx.merge(graphdef, state['params'], state['model_state']), batch)

  jitted = jax.jit(nll, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=NamedSharding(mesh, PartitionSpec()))

  def score(batch):
    rows = batch['inputs'].shape[0] // jax.process_count()
    lo = jax.process_index() * rows
    local = {k: v[lo:lo + rows] for k, v in batch.items()}
    out = jitted(state, sharding.global_batch(local, batch_sharding))
    return np.asarray(out.addressable_data(0))

  return score


def evaluate_strided(workdir: str, *, stride: int | None = None,
                     context: int | None = None, files: str | None = None,
                     split: str = 'eval', checkpoint: int | None = None,
                     max_documents: int | None = None) -> dict:
  """Sliding-window NLL of a checkpoint of `workdir` over whole documents.

  Returns {'step', 'loss' (mean NLL per scored token), 'perplexity', 'tokens'
  (targets scored), 'documents', 'windows', 'context', 'stride'}.
  """
  cfg = workdir_lib.load_config(workdir)
  context = int(cfg.train.seq_len if context is None else context)
  stride = int(context if stride is None else stride)
  if context < 1:
    raise configs.ConfigError(f'--context={context}: must be positive')
  if not 1 <= stride <= context:
    raise configs.ConfigError(f'--stride={stride}: must be in [1, --context={context}]')
  if context > cfg.model.max_seq_len:
    if cfg.model.position == 'learned':
      raise configs.ConfigError(
          f'--context={context} exceeds model.max_seq_len={cfg.model.max_seq_len}, '
          'the learned position table')
    logging.warning('--context=%d exceeds model.max_seq_len=%d', context,
                    cfg.model.max_seq_len)
  documents = strided_documents(cfg, split, files)
  if max_documents is not None:
    documents = documents[:max_documents]
  elif cfg.data.source == 'synthetic' and files is None:
    raise configs.ConfigError('data.source=synthetic has endless documents: give '
                              '--max_documents N')
  mesh = workdir_lib.fitting_mesh(cfg)
  graphdef, state, state_shardings, step = restore(workdir, cfg, mesh, checkpoint)
  score = make_score_fn(graphdef, state, state_shardings, mesh)
  total, tokens, count, windows = 0.0, 0, 0, 0

  def read():
    nonlocal windows
    for i in range(len(documents)):
      doc = documents[i]
      windows += len(strided_windows(len(doc) - 1, context, stride))
      yield doc

  for _, nll in strided_token_nll(score, read(), context=context, stride=stride,
                                  batch_size=cfg.train.global_batch_size):
    total += float(np.sum(nll, dtype=np.float64))
    tokens += len(nll)
    count += 1
  if not tokens:
    raise sources.DataError('no documents to evaluate')
  loss = total / tokens
  return {'step': step, 'loss': loss, 'perplexity': float(np.exp(loss)),
          'tokens': tokens, 'documents': count, 'windows': windows,
          'context': context, 'stride': stride}


def evaluate_lengths(workdir: str, lengths: Sequence[int], *, files: str | None = None,
                     split: str = 'eval', checkpoint: int | None = None,
                     max_documents: int | None = None) -> dict:
  """Loss and perplexity at each context length L on the same documents.

  The documents are those with at least max(L) + 1 tokens, cut to that many;
  at length L each is read as non-overlapping windows of L tokens (strided
  evaluation with stride = context = L), so every length scores the same
  targets. Writes and returns `DIR/eval_lengths.json`: {'step', 'documents',
  'tokens', 'lengths': [{'length', 'loss', 'perplexity'}, ...]}.
  """
  try:
    lengths = sorted({int(n) for n in lengths})
  except ValueError:
    lengths = []
  if not lengths or lengths[0] < 1:
    raise configs.ConfigError(f'--lengths={lengths}: give positive lengths, e.g. 128,256')
  cfg = workdir_lib.load_config(workdir)
  if lengths[-1] > cfg.model.max_seq_len and cfg.model.position == 'learned':
    raise configs.ConfigError(f'--lengths: {lengths[-1]} exceeds model.max_seq_len='
                              f'{cfg.model.max_seq_len}, the learned position table')
  longest = lengths[-1] + 1
  documents = strided_documents(cfg, split, files)
  if cfg.data.source == 'synthetic' and files is None and max_documents is None:
    raise configs.ConfigError('data.source=synthetic has endless documents: give '
                              '--max_documents N')
  chosen = []
  for i in range(len(documents)):
    if max_documents is not None and len(chosen) >= max_documents:
      break
    doc = np.asarray(documents[i])
    if len(doc) >= longest:
      chosen.append(doc[:longest])
  if not chosen:
    raise sources.DataError(f'--lengths: no document has {longest} tokens; use shorter '
                            'lengths or --files with longer documents')
  mesh = workdir_lib.fitting_mesh(cfg)
  graphdef, state, state_shardings, step = restore(workdir, cfg, mesh, checkpoint)
  score = make_score_fn(graphdef, state, state_shardings, mesh)
  result = {'step': step, 'documents': len(chosen), 'tokens': len(chosen) * lengths[-1],
            'lengths': []}
  for length in lengths:
    total = sum(float(np.sum(nll, dtype=np.float64)) for _, nll in strided_token_nll(
        score, chosen, context=length, stride=length, batch_size=cfg.train.global_batch_size))
    loss = total / result['tokens']
    result['lengths'].append({'length': length, 'loss': loss,
                              'perplexity': float(np.exp(loss))})
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'eval_lengths.json'), 'w') as f:
      json.dump(result, f, indent=2)
  return result


def evaluate_tasks(workdir: str, spec: str, checkpoint: int | None = None,
                   limit: int | None = None) -> dict:
  """{'step', 'tasks': {name: metrics}, 'core'} of `spec` (`eval.tasks`
  syntax) on a checkpoint of `workdir`; also written to DIR/eval_tasks.json."""
  cfg = workdir_lib.load_config(workdir)
  if not configs.eval_task_specs(spec, '--tasks'):
    raise configs.ConfigError('--tasks is empty')
  limit = (cfg.eval.task_limit if 'eval' in cfg else 1000) if limit is None else limit
  mesh = workdir_lib.fitting_mesh(cfg)
  graphdef, state, state_shardings, step = restore(workdir, cfg, mesh, checkpoint)
  results = tasks.make_taskset(cfg, spec, limit, graphdef, state_shardings, mesh)(state)
  out = {'step': step, 'tasks': results, 'core': tasks.scalars(results)['eval/core']}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'eval_tasks.json'), 'w') as f:
      f.write(json.dumps(out, indent=1) + '\n')
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required')
  strided = _STRIDE.value is not None or _CONTEXT.value is not None
  if _LENGTHS.value and (strided or _EVAL_STEPS.value is not None):
    raise app.UsageError('--lengths sets its own windows: drop --stride, --context, --eval_steps')
  if not strided and not _LENGTHS.value and (_FILES.value or _MAX_DOCUMENTS.value):
    raise app.UsageError('--files and --max_documents need --stride (or --context)')
  if strided and _EVAL_STEPS.value is not None:
    raise app.UsageError('--eval_steps is for the packed evaluation, not --stride')
  from train import distributed  # pylint: disable=g-import-not-at-top
  distributed.maybe_initialize()
  metrics.configure_logging()
  if _TASKS.value is not None:
    if strided or _EVAL_STEPS.value is not None:
      raise app.UsageError('--tasks scores tasks alone: drop --stride, --context, --eval_steps')
    try:
      out = evaluate_tasks(_WORKDIR.value, _TASKS.value, _CHECKPOINT.value,
                           _TASK_LIMIT.value)
    except FileNotFoundError as e:
      raise configs.UserError(str(e)) from None
    if jax.process_index() == 0:
      print(f'{_WORKDIR.value} {tasks.format_results(out)}')
    return
  try:
    if _LENGTHS.value:
      result = evaluate_lengths(_WORKDIR.value, _LENGTHS.value,
                                files=_FILES.value, split=_SPLIT.value,
                                checkpoint=_CHECKPOINT.value,
                                max_documents=_MAX_DOCUMENTS.value)
      for r in result['lengths'] if jax.process_index() == 0 else []:
        print(f'{_WORKDIR.value} step {result["step"]}: length {r["length"]}: loss '
              f'{r["loss"]:.4f} | perplexity {r["perplexity"]:.2f}')
      return
    if strided:
      result = evaluate_strided(
          _WORKDIR.value, stride=_STRIDE.value, context=_CONTEXT.value,
          files=_FILES.value, split=_SPLIT.value, checkpoint=_CHECKPOINT.value,
          max_documents=_MAX_DOCUMENTS.value)
    else:
      result = evaluate(_WORKDIR.value, _CHECKPOINT.value, _EVAL_STEPS.value,
                        _SPLIT.value)
  except FileNotFoundError as e:
    raise configs.UserError(str(e)) from None
  if jax.process_index() != 0:
    return
  if strided:
    what = _FILES.value or f'{_SPLIT.value} documents'
    print(f'{_WORKDIR.value} step {result["step"]}: {what}, context '
          f'{result["context"]} stride {result["stride"]}: loss {result["loss"]:.4f} | '
          f'perplexity {result["perplexity"]:.2f} | {result["tokens"]:,} tokens in '
          f'{result["documents"]:,} documents ({result["windows"]:,} windows)')
  else:
    print(f'{_WORKDIR.value} step {result["step"]}: {_SPLIT.value} loss '
          f'{result["loss"]:.4f} | perplexity {result["perplexity"]:.2f} | '
          f'{result["tokens"]:,} target tokens')


if __name__ == '__main__':
  errors.run(main)
