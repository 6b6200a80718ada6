"""Evaluation tasks (train/tasks.py): batched, sharded scoring against a
one-example-at-a-time reference written here from the model's forward and
`train.sample.generate`; built-in tasks; bits per byte; the converters."""

import io
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
  for k in range(5):        # 7 examples x 3 choices: the last call is padded
    context = ' '.join(rng.choice(words, size=int(rng.integers(2, 20))))
    choices = [' ' + ' '.join(rng.choice(words, size=int(rng.integers(1, 4))))
               for _ in range(3)]
    examples.append(tasks.Example([context] * 3, choices, k % 3))
  for k in range(2):        # partial scoring (WinoGrande): contexts vary, one continuation
    contexts = [' '.join(rng.choice(words, size=int(rng.integers(2, 12)))) for _ in range(3)]
    examples.append(tasks.parse_example(
        {'contexts': contexts, 'continuation': ' return self', 'label': k % 3}, 'x'))
  task = tasks.Task('mc', examples, max_len=64, neutral='\n')
  rows, cut = tasks.task_rows(task, tok)
  length = rows['inputs'].shape[1]
  assert length == 64 and cut > 0          # some contexts are cut from the left
  assert len(rows['inputs']) % 8           # the last call of 8 rows is padded
  scorer = tasks.Scorer(graphdef, shardings, mesh, rows_per_call=8)
  logprob, _ = scorer(state, rows)
  got = tasks.task_metrics(task, logprob, np.zeros(len(logprob), bool))

  ref_scores, correct, correct_norm, correct_cal = [], 0, 0, 0
  neutral = [tok.bos_id] + tok.encode('\n')
  for e in examples:
    s = np.asarray([_reference_logprob(host, [tok.bos_id] + tok.encode(ctx), tok.encode(c),
                                       length) for ctx, c in zip(e.contexts, e.choices)])
    s0 = np.asarray([_reference_logprob(host, neutral, tok.encode(c), length)
                     for c in e.choices])
    ref_scores.extend(s)
    nbytes = np.asarray([len(c.encode()) for c in e.choices])
    correct += np.argmax(s) == e.label
    correct_norm += np.argmax(s / nbytes) == e.label
    correct_cal += np.argmax(s - s0) == e.label
  n = len(examples)
  np.testing.assert_allclose(logprob[:3 * n], ref_scores, rtol=1e-5, atol=1e-4)
  assert got['accuracy'] == correct / n
  assert got['accuracy_norm'] == correct_norm / n
  assert got['accuracy_calibrated'] == correct_cal / n
  # The three rankings differ here, so each metric is checked on its own.
  assert len({correct, correct_norm, correct_cal}) == 3, (correct, correct_norm, correct_cal)
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
  logprob, greedy = scorer(state, tasks.make_rows(list(zip(contexts, answers)), 256)[0])
  assert greedy.tolist() == [True, False] * 3
  # LAMBADA's second figure: exp(-mean summed log p(answer | context)).
  task = tasks.Task('em', [tasks.Example(['.'], ['.'], 0)] * 6, 256)
  m = tasks.task_metrics(task, logprob, greedy)
  ref = [_reference_logprob(host, c, a, 10**6) for c, a in zip(contexts, answers)]
  assert m['exact_match'] == 0.5
  assert m['perplexity'] == pytest.approx(math.exp(-np.mean(ref)), rel=1e-4)


def test_untrained_model_is_at_chance_on_next_line(tiny):
  cfg, mesh, graphdef, state, shardings, _ = tiny
  tok = tokenizers.get_tokenizer('bytes')
  [task] = tasks.build_tasks('next_line', 200, tok, seq_len=64)
  scorer = tasks.Scorer(graphdef, shardings, mesh, rows_per_call=64)
  m = tasks.task_metrics(task, *scorer(state, tasks.task_rows(task, tok)[0]))
  assert m['chance'] == 0.25 and task.neutral == '\n'
  for metric in ('accuracy', 'accuracy_calibrated'):
    lo, hi = m[f'{metric}_ci95']
    assert lo <= 0.25 <= hi, m


@pytest.fixture(scope='module')
def task_run(tmp_path_factory):
  """Two steps of the tiny loop with tasks at each eval, then train.evaluate."""
  from tensorboard.backend.event_processing import event_accumulator
  from train import evaluate
  from train import loop
  workdir = str(tmp_path_factory.mktemp('tasks_run'))
  task_file = os.path.join(workdir, 'mine.jsonl')
  with open(task_file, 'w') as f:
    for k in range(5):
      f.write(json.dumps({'context': f'x = {k}\n', 'choices': ['y = 1', 'import os'],
                          'label': k % 2}) + '\n')
  docs = os.path.join(workdir, 'docs.jsonl')   # short documents: many EOS targets
  with open(docs, 'w') as f:
    for k in range(64):
      f.write(json.dumps({'text': f'caf\u00e9 {k} ' * (k % 5 + 1)}) + '\n')
  spec = f'copy@64,next_line,mine:{task_file}'
  cfg = configs.load('configs/llama.py:tiny', [
      'model.num_layers=1', 'train.steps=2', 'train.eval_every_steps=2',
      'train.eval_steps=1', 'train.seq_len=64', 'train.log_every_steps=1',
      'data.source=jsonl', f'data.train_files={docs}', f'data.eval_files={docs}',
      f'eval.tasks={spec}', 'eval.task_limit=8'])
  summary = loop.train_and_evaluate(cfg, workdir)
  acc = event_accumulator.EventAccumulator(workdir, size_guidance={'scalars': 0})
  acc.Reload()
  tags = {t: [e.value for e in acc.Scalars(t)] for t in acc.Tags()['scalars']}
  after = evaluate.evaluate_tasks(workdir, f'mine:{task_file}')
  return cfg, summary, tags, after, workdir


def test_loop_logs_task_tags_and_bits_per_byte(task_run):
  cfg, summary, tags, after, workdir = task_run
  want = {'eval/bits_per_byte', 'eval/core', 'eval/copy@64/exact_match',
          'eval/copy@64/perplexity'} | {
      f'eval/{t}/{m}' for t in ('mine', 'next_line')
      for m in ('accuracy', 'accuracy_norm', 'centered_accuracy')} | {
          'eval/next_line/accuracy_calibrated'}
  assert want <= set(tags), sorted(set(tags))
  assert all(len(tags[t]) == 2 for t in want)          # evals at steps 0 and 2
  # Bits per byte from the eval batches: byte tokens are one byte, EOS none.
  from data import pipeline
  tokens = nbytes = 0
  for batch in pipeline.make_iterator(cfg, 'eval', 0, 1):
    mask = batch['loss_mask'] > 0
    tokens += mask.sum()
    nbytes += (mask & (batch['targets'] < 256)).sum()
  loss = summary['eval']['eval/loss']
  assert tokens > nbytes
  assert summary['eval']['eval/bits_per_byte'] == pytest.approx(
      loss * tokens / nbytes / math.log(2), rel=1e-6)
  ev = summary['eval']
  assert ev['eval/core'] == pytest.approx(
      (ev['eval/mine/centered_accuracy'] + ev['eval/next_line/centered_accuracy']
       + ev['eval/copy@64/exact_match']) / 3)
  # train.evaluate on the final checkpoint gives the loop's last scores.
  mine = after['tasks']['mine']
  for m in ('accuracy', 'accuracy_norm', 'centered_accuracy'):
    assert mine[m] == pytest.approx(ev[f'eval/mine/{m}'])
  assert mine['chance'] == 0.5 and after['core'] == mine['centered_accuracy']
  with open(os.path.join(workdir, 'eval_tasks.json')) as f:
    assert json.load(f)['tasks']['mine']['examples'] == 5
  # launch.compare shows the run's final task scores.
  from launch import compare  # pylint: disable=g-import-not-at-top
  [row] = compare.compare(workdir, out=io.StringIO())
  for tag in want - {'eval/copy@64/perplexity'} - {f'eval/{t}/centered_accuracy'
                                                  for t in ('mine', 'next_line')}:
    assert row[tag.removeprefix('eval/')] == pytest.approx(ev[tag], rel=1e-6), tag


def test_token_bytes_sum_to_the_text_bytes(tmp_path):
  """Summed over a text's tokens, `token_bytes` is the text's UTF-8 length
  (SentencePiece: plus the dummy space it puts before the first word)."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  from test_data_tokenizers import LINES, _train_hf  # pylint: disable=g-import-not-at-top
  texts = ['Caf\u00e9: the quick dog jumps over arrays.', 'def add(a, b): \u20ac5',
           'na\u00efve fa\u00e7ade']
  hf_path = tmp_path / 'hf' / 'tokenizer.json'
  _train_hf(hf_path, ['<s>', '</s>'])
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text('\n'.join(LINES).replace('\n    ', ' ') + '\n', encoding='utf-8')
  spm.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(tmp_path / 'sp'), vocab_size=340,
      model_type='bpe', character_coverage=0.98, byte_fallback=True, unk_id=0,
      bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
  for spec, extra in (('bytes', 0), (f'hf:{hf_path}', 0),
                      (f'sentencepiece:{tmp_path / "sp.model"}', 1)):
    tok = tokenizers.get_tokenizer(spec)
    table = tokenizers.token_bytes(tok, 400)
    assert table[tok.bos_id] == table[tok.eos_id] == 0 and table[399] == 0
    if extra:                 # rare characters go through byte-fallback pieces
      assert any(tok._sp.is_byte(i) for t in texts for i in tok.encode(t))  # pylint: disable=protected-access
    for text in texts:
      assert table[tok.encode(text)].sum() == len(text.encode('utf-8')) + extra, (spec, text)


def _convert(tmp_path, fmt, name, **kw):
  out = tmp_path / f'{name}.out.jsonl'
  count = tasks.convert(fmt, os.path.join(FIXTURES, name), str(out), **kw)
  lines = [json.loads(line) for line in out.read_text(encoding='utf-8').splitlines()]
  assert count == len(lines)
  tasks.read_task_file(str(out))      # a valid task file
  return lines


def test_converters_on_published_layouts(tmp_path):
  hs = _convert(tmp_path, 'hellaswag', 'hellaswag.jsonl')
  assert hs[0] == {'context': 'Making tea: A man fills a kettle with water. He',
                   'choices': [' eats the kettle.', ' paints the wall blue.',
                               ' puts it on the stove and waits.', ' runs away from the dog.'],
                   'label': 2}
  assert hs[1]['context'] == 'Home and Garden: How to water a plant. Check the soil.'
  assert hs[1]['choices'][0] == ' Push a finger into the soil. If it is dry, water it.'
  assert hs[1]['choices'][3] == ' Close the window. twice.' and hs[1]['label'] == 0

  arc = _convert(tmp_path, 'arc', 'arc.jsonl')
  assert arc[0] == {'context': 'Question: Which gas do plants take in?\nAnswer:',
                    'choices': [' oxygen', ' carbon dioxide', ' helium', ' neon'],
                    'label': 1, 'id': 'Test_001'}
  assert arc[1]['label'] == 0 and len(arc[1]['choices']) == 3     # numeric keys
  assert _convert(tmp_path, 'arc', 'arc_hf.jsonl')[0] == arc[0]

  piqa = _convert(tmp_path, 'piqa', 'valid.jsonl')           # labels found beside it
  assert piqa == [
      {'context': 'Question: Keep bread fresh\nAnswer:',
       'choices': [' Put it in a sealed bag.', ' Put it in the bath.'], 'label': 0},
      {'context': 'Question: Open a jar with a tight lid\nAnswer:',
       'choices': [' Freeze the jar.', ' Run the lid under hot water.'], 'label': 1}]

  wino = _convert(tmp_path, 'winogrande', 'winogrande.jsonl')
  assert wino[0] == {'contexts': ['The cup did not fit in the box because the cup',
                                  'The cup did not fit in the box because the box'],
                     'continuation': ' was too big.', 'label': 0, 'id': 'w1'}

  lam = _convert(tmp_path, 'lambada', 'lambada.jsonl')
  assert lam[0]['choices'] == [' cat'] and lam[0]['context'].endswith('went after the')

  with pytest.raises(sources.DataError, match='not a line of the arc layout'):
    tasks.convert('arc', os.path.join(FIXTURES, 'winogrande.jsonl'), str(tmp_path / 'x'))


def test_partial_scoring_rows_score_the_continuation_after_each_context():
  tok = tokenizers.get_tokenizer('bytes')
  task = tasks.Task('w', [tasks.parse_example(
      {'contexts': ['a cup', 'the box'], 'continuation': ' was big', 'label': 1}, 'x')], 64)
  rows, _ = tasks.task_rows(task, tok)
  for r, ctx in enumerate(['a cup', 'the box']):
    width = len(ctx) + len(' was big')       # BOS + text - 1
    mask = rows['loss_mask'][r]
    assert mask.sum() == len(' was big') and mask[width - 8:width].all()
    assert bytes(rows['targets'][r, mask > 0].tolist()) == b' was big'


def test_task_specs_and_config_errors():
  assert configs.eval_task_specs('next_line, passkey@512,hs:/d/hs.jsonl,copy') == [
      ('next_line', None, None), ('passkey@512', 512, None), ('hs', None, '/d/hs.jsonl'),
      ('copy', None, None)]
  for bad, match in (('nextline', 'unknown task'), ('next_line@64', 'no @N'),
                     ('passkey@16', '>= 32'), ('copy,copy', 'twice'),
                     ('next_line:/x.jsonl', 'built-in'), ('a b:/x', 'bad task name')):
    with pytest.raises(configs.ConfigError, match=match):
      configs.load('configs/llama.py:tiny', [f'eval.tasks={bad}'])
  with pytest.raises(configs.ConfigError, match='train.eval_steps'):
    configs.load('configs/llama.py:tiny', ['eval.tasks=copy', 'train.eval_steps=0'])
  with pytest.raises(configs.ConfigError, match='eval.task_limit'):
    configs.load('configs/llama.py:tiny', ['eval.task_limit=-1'])


def test_next_line_is_exactly_at_chance_for_any_context_blind_scorer():
  examples = tasks.next_line_examples(40)
  texts = tasks._eval_texts()  # pylint: disable=protected-access
  for e in examples[:8]:      # the true line follows its passage in a file
    assert any(e.contexts[0] + e.choices[e.label] in t for t in texts)
    assert len(set(e.choices)) == 4
  task = tasks.Task('next_line', examples, 128)
  for blind in (len, lambda c: -len(c), lambda c: tasks._hash(c) % 1000):  # pylint: disable=protected-access
    scores = np.asarray([blind(c) for e in examples for c in e.choices], float)
    m = tasks.task_metrics(task, scores, np.zeros(len(scores), bool))
    assert m['accuracy'] == m['accuracy_norm'] == 0.25, m
