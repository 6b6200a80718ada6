"""Bad inputs, as a user types them: every ablax command exits with status 2
and ONE `ablax: ...` line naming the field, flag or file to change; no
traceback; no checkpoint of an existing run changed (hashes before and after).

Each case is a real subprocess (`python -m train`, `train.sample`, ...). Most
fail while the flags are parsed, before JAX is imported; the rest share one
tiny trained workdir (copied per case, since a run takes the workdir lock).
"""

import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

import configs
from train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['model.num_layers=1', 'train.seq_len=32', 'train.steps=2',
        'train.warmup_steps=1', 'train.eval_steps=0', 'train.checkpoint_every_steps=2']
TRAIN = [sys.executable, '-m', 'train', '--config', 'configs/llama.py:tiny'] + [
    f'--config.{o}' for o in TINY]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A 2-step tiny run with a checkpoint at step 2."""
  workdir = str(tmp_path_factory.mktemp('trained'))
  loop.train_and_evaluate(configs.load('configs/llama.py:tiny', TINY), workdir)
  return workdir


def tree_hash(folder: str) -> str:
  digest = hashlib.sha256()
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      digest.update(os.path.relpath(path, folder).encode())
      with open(path, 'rb') as f:
        digest.update(f.read())
  return digest.hexdigest()


def cases(root: str, trained: str):
  """(id, argv, the text the `ablax:` line must hold, workdir or None)."""
  bad_py = os.path.join(root, 'bad_config.py')
  with open(bad_py, 'w') as f:
    f.write('def get_config(arg=None):\n  return (\n')
  a_file = os.path.join(root, 'a_file')
  open(a_file, 'w').close()
  empty = os.path.join(root, 'empty.jsonl')
  with open(empty, 'w') as f:
    f.write('{"text": ""}\n{"text": ""}\n')
  malformed = os.path.join(root, 'malformed.jsonl')
  with open(malformed, 'w') as f:
    f.write('{"text": "a fine line"}\n{"text": oops\n')
  no_ckpt = os.path.join(root, 'no_ckpt')
  os.makedirs(no_ckpt)
  shutil.copy(os.path.join(trained, 'config.json'), no_ckpt)

  def copy(name):
    """A copy of the trained workdir (its own lock)."""
    path = os.path.join(root, name)
    shutil.copytree(trained, path)
    return path

  corrupt = copy('corrupt')
  for rootdir, _, files in os.walk(os.path.join(corrupt, 'checkpoints', '2', 'state')):
    if os.path.basename(rootdir) == 'd':
      for name in files:
        os.remove(os.path.join(rootdir, name))
  locked = copy('locked')
  with open(os.path.join(locked, 'LOCK'), 'w') as f:
    json.dump({'host': os.uname().nodename, 'pid': os.getpid(), 'started': 'now',
               'command': 'train'}, f)
  new = lambda name: ['--workdir', os.path.join(root, name)]
  sample = [sys.executable, '-m', 'train.sample', '--prompt', 'hi']
  return [
      # Before JAX: the flags.
      ('unknown_field', TRAIN + new('w1') + ['--config.model.num_layerz=4'],
       'model.num_layerz is not a config field; did you mean model.num_layers', None),
      ('missing_config', [sys.executable, '-m', 'train', '--config', 'configs/nope.py']
       + new('w2'), "config file 'configs/nope.py' not found", None),
      ('config_syntax', [sys.executable, '-m', 'train', '--config', bad_py] + new('w3'),
       f'{bad_py}:2: syntax error', None),
      ('unknown_size', [sys.executable, '-m', 'train', '--config', 'configs/llama.py:huge']
       + new('w4'), "unknown size 'huge'", None),
      ('bad_choice', TRAIN + new('w5') + ['--config.model.norm_type=foo'],
       "model.norm_type='foo': must be one of rmsnorm, layernorm", None),
      ('bad_type', TRAIN + new('w6') + ['--config.model.num_layers=x'],
       "model.num_layers='x': expected int", None),
      ('bad_divergence', TRAIN + new('w7') + ['--config.train.on_divergence=retry'],
       'train.on_divergence', None),
      ('align_missing_config', [sys.executable, '-m', 'align', '--config',
                                'configs/nope.py'] + new('w8'), 'configs/nope.py', None),
      ('sample_max_new_tokens', sample + ['--workdir', trained, '--max_new_tokens', '-3'],
       '--max_new_tokens=-3', None),
      ('sample_top_p', sample + ['--workdir', trained, '--top_p', '0'], '--top_p=0.0', None),
      ('workdir_is_a_file', TRAIN + ['--workdir', a_file], f'{a_file} is a file', None),
      ('workdir_cannot_be_made', TRAIN + ['--workdir', os.path.join(a_file, 'sub')],
       'cannot be created', None),
      ('missing_tokenizer', TRAIN + new('w9') + [
          '--config.data.tokenizer=hf:/nowhere/tokenizer.json'], '/nowhere/tokenizer.json',
       None),
      ('empty_documents', TRAIN + new('w11') + [
          '--config.data.source=jsonl', f'--config.data.train_files={empty}',
          '--config.data.eval_files='], 'is empty', None),
      ('malformed_jsonl', TRAIN + new('w12') + [
          '--config.data.source=jsonl', f'--config.data.train_files={malformed}',
          '--config.data.eval_files='], 'malformed.jsonl', None),
      ('sample_not_a_workdir', sample + ['--workdir', root], 'config.json not found', None),
      ('sample_no_checkpoint', sample + ['--workdir', no_ckpt], 'holds no checkpoint', None),
      ('export_no_checkpoint', [sys.executable, '-m', 'model.hf', 'export', no_ckpt,
                                '--out', os.path.join(root, 'hf')], 'holds no checkpoint',
       None),
      ('evaluate_not_a_workdir', [sys.executable, '-m', 'train.evaluate', '--workdir',
                                  root], 'config.json not found', None),
      ('dpo_init_checkpoint', [sys.executable, '-m', 'align', '--config', 'configs/dpo.py:tiny',
                               '--config.dpo.init_checkpoint=/nowhere'] + new('w13'),
       'dpo.init_checkpoint', None),
      # An existing run is left as it was.
      ('other_model', TRAIN + ['--workdir', copy('other_model'), '--config.model.d_model=32',
                               '--config.train.steps=4'], 'model.d_model: saved 64, now 32',
       'other_model'),
      ('other_batch_size', TRAIN + ['--workdir', copy('other_batch'),
                                    '--config.train.global_batch_size=4',
                                    '--config.train.steps=4'], 'train.global_batch_size=4',
       'other_batch'),
      ('corrupt_checkpoint', TRAIN + ['--workdir', corrupt, '--config.train.steps=4'],
       'none of the checkpoints', 'corrupt'),
      ('workdir_locked', TRAIN + ['--workdir', locked, '--config.train.steps=4'],
       f'in use by another run (train, pid {os.getpid()}', 'locked'),
      ('align_workdir_locked', [sys.executable, '-m', 'align', '--config',
                                'configs/dpo.py:tiny', '--workdir', locked,
                                f'--config.dpo.init_checkpoint={trained}'],
       f'in use by another run (train, pid {os.getpid()}', 'locked'),
  ]


def run(argv):
  env = dict(os.environ, JAX_PLATFORMS='cpu', ABLAX_NO_BAR='1')
  env.pop('ABLAX_DEBUG', None)
  return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)


def test_every_bad_input_is_one_line_and_changes_nothing(trained, tmp_path):
  table = cases(str(tmp_path), trained)
  before = {name: tree_hash(os.path.join(str(tmp_path), name))
            for _, _, _, name in table if name}
  before['trained'] = tree_hash(trained)
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    results = list(pool.map(lambda case: run(case[1]), table))
  failures = []
  for (case_id, _, expected, _), result in zip(table, results):
    lines = [line for line in result.stderr.splitlines() if line.startswith('ablax:')]
    problems = []
    if result.returncode != 2:
      problems.append(f'exit status {result.returncode}')
    if len(lines) != 1 or expected not in lines[0]:
      problems.append(f'ablax lines {lines}, expected one holding {expected!r}')
    if 'Traceback' in result.stderr:
      problems.append('a traceback')
    if problems:
      failures.append(f'{case_id}: {"; ".join(problems)}\n{result.stderr[-1500:]}')
  assert not failures, '\n\n'.join(failures)
  after = {name: tree_hash(os.path.join(str(tmp_path), name))
           for _, _, _, name in table if name}
  after['trained'] = tree_hash(trained)
  assert after == before
  # A refused start on a fresh workdir leaves no config.json, but the reason.
  assert not os.path.exists(tmp_path / 'w11' / 'config.json')
  with open(tmp_path / 'w11' / 'start_failed.json') as f:
    assert 'is empty' in json.load(f)['message']


@pytest.mark.parametrize('flags,message', [
    (dict(top_p=1.5), '--top_p=1.5: must be in (0, 1]'),
    (dict(temperature=-1.0), '--temperature=-1.0: must be >= 0'),
    (dict(top_k=-1), '--top_k=-1: must be >= 0'),
])
def test_sampling_flags_are_checked(flags, message):
  from train import sample  # pylint: disable=g-import-not-at-top
  args = dict(max_new_tokens=4, temperature=1.0, top_k=0, top_p=1.0) | flags
  with pytest.raises(configs.UserError) as e:
    sample.check_sampling(**args)
  assert str(e.value).startswith(message)


def test_debug_shows_the_traceback(tmp_path):
  result = run(TRAIN + ['--workdir', str(tmp_path), '--config.model.num_layerz=4',
                        '--debug'])
  assert result.returncode != 0 and 'Traceback' in result.stderr


def test_resuming_a_finished_run_has_nothing_to_do(trained, tmp_path):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(trained, workdir)
  before = tree_hash(workdir)
  result = run(TRAIN + ['--workdir', workdir])
  assert result.returncode == 0, result.stderr[-2000:]
  assert f'nothing to do: {workdir} is already at step 2 and train.steps=2' in result.stdout
  assert 'done:' not in result.stdout
  assert tree_hash(workdir) == before
