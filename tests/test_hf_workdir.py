"""python -m model.hf import / export (train/hf_workdir.py): HF folder -> ablax
workdir -> HF folder."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import configs
from configs import base as base_config
import model as model_lib
from data import pipeline
from model import hf
from model import scan as scan_lib
from tests import hf_families
from train import loop as train_loop
from train import mesh as mesh_lib
from train import hf_workdir
from train import optim
from train import step as step_lib
from train import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
  """`python -m model.hf ARGS` as a user types it."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  return subprocess.run([sys.executable, '-m', 'model.hf', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def test_import_workdir_then_export(tmp_path):
  # 320 ids: the workdir's default bytes tokenizer (258 ids) must fit.
  model = hf_families.make_hf_model('qwen3', vocab_size=320)
  model.save_pretrained(tmp_path / 'hf')
  # The documented command lines, as subprocesses.
  result = _cli('import', str(tmp_path / 'hf'), '--workdir', str(tmp_path / 'work'))
  assert result.returncode == 0, result.stderr
  with open(tmp_path / 'work' / 'config.json') as f:
    saved = json.load(f)
  assert saved['model']['qk_norm'] is True
  assert os.path.isdir(tmp_path / 'work' / 'checkpoints' / '0')

  cfg, decoder = workdir_lib.load_decoder(str(tmp_path / 'work'))
  tokens = hf_families.random_tokens(0, (1, 16))
  got, _ = decoder(jnp.asarray(tokens))
  want = hf_families.hf_logits(model, tokens)
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-4 * np.abs(want).max())

  result = _cli('export', str(tmp_path / 'work'), '--out', str(tmp_path / 'back'))
  assert result.returncode == 0, result.stderr
  before = load_file(str(tmp_path / 'hf' / 'model.safetensors'))
  after = load_file(str(tmp_path / 'back' / 'model.safetensors'))
  assert sorted(before) == sorted(after)
  for name in before:
    np.testing.assert_array_equal(before[name], after[name], err_msg=name)


def test_command_line_help_and_usage_errors(tmp_path):
  result = _cli('--help')
  assert result.returncode == 0, result.stderr
  listed = {line.split()[0] for line in result.stdout.splitlines() if line.startswith('  --')}
  assert {'--workdir', '--out', '--overwrite', '--step'} <= listed, listed
  for text in ('python -m model.hf import HF_DIR --workdir DIR',
               'python -m model.hf export DIR --out HF_DIR'):
    assert text in result.stdout, text
  # A missing command, a missing --workdir: one `ablax:` line, exit 2.
  for args, text in ((['--out', 'x'], 'give a command'),
                     (['import', str(tmp_path)], 'give --workdir DIR'),
                     (['export', str(tmp_path), str(tmp_path)], 'export takes one folder')):
    result = _cli(*args)
    lines = [l for l in result.stderr.splitlines() if l.startswith('ablax:')]
    assert result.returncode == 2 and len(lines) == 1 and text in lines[0], result.stderr


def test_load_fills_the_model_only(tmp_path):
  """model.hf.load maps the model; the workdir's training and data fields are
  hf_workdir's (the folder's tokenizer, a seq_len within max_seq_len)."""
  model = hf_families.make_hf_model('llama', vocab_size=320)
  model.save_pretrained(tmp_path)
  (tmp_path / 'tokenizer.json').write_text('{}')
  cfg, _ = hf.load(str(tmp_path))
  assert sorted(cfg.keys()) == ['model']
  whole = hf_workdir.workdir_config(str(tmp_path), cfg.model)
  assert whole.data.tokenizer == 'hf:' + str(tmp_path / 'tokenizer.json')
  # base's seq_len is 128; the model's max_position_embeddings 64.
  assert base_config.get_config().train.seq_len == 128 and cfg.model.max_seq_len == 64
  assert whole.train.seq_len == 64
  assert whole.model.to_dict() == cfg.model.to_dict()


# -- an imported workdir is an ordinary workdir --------------------------------


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  """A tiny random transformers Llama (Llama 3 RoPE scaling, GQA), imported."""
  root = tmp_path_factory.mktemp('imported')
  model = hf_families.make_hf_model('llama', vocab_size=320)
  model.save_pretrained(root / 'hf')
  hf_workdir.import_to_workdir(str(root / 'hf'), str(root / 'work'))
  return root


def _saved_config(workdir):
  with open(os.path.join(workdir, 'config.json')) as f:
    return ml_collections.ConfigDict(json.load(f))


def test_training_goes_on_from_an_imported_workdir(imported):
  workdir = str(imported / 'work')
  (imported / 'doc.txt').write_text('import os\nprint(os.getcwd())\n' * 20)
  # The imported config as it is (`configs/workdir.py:DIR`), with other data
  # than the import's defaults, as a user would train on.
  cfg = configs.load(f'configs/workdir.py:{workdir}', [
      'data.source=text', f'data.train_files={imported / "doc.txt"}',
      'train.steps=2', 'train.seq_len=32', 'train.global_batch_size=8',
      'train.eval_steps=0', 'train.warmup_steps=1', 'train.log_every_steps=1',
      'train.checkpoint_every_steps=2'])
  assert cfg.model.to_dict() == _saved_config(workdir).model.to_dict()
  # The first batch the run will read (the import saved no data position);
  # 1 grain worker reads the same batches as none, in another iterator state.
  it = pipeline.make_iterator(cfg, 'train')
  batch = next(it)
  it.close()
  cfg.data.worker_count = 1
  summary = train_loop.train_and_evaluate(cfg, workdir)
  assert summary['status'] == 'done' and sorted(summary['losses']) == [1, 2]
  assert sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints'))) == [0, 2]

  # Step 1's loss is the imported model's cross-entropy on that batch.
  _, decoder = hf.load(str(imported / 'hf'))
  logits, _ = decoder(jnp.asarray(batch['inputs']), segment_ids=jnp.asarray(
      batch['segment_ids']), positions=jnp.asarray(batch['positions']))
  logits = np.asarray(logits, np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, batch['targets'][..., None], -1)[..., 0]
  want = (nll * batch['loss_mask']).sum() / batch['loss_mask'].sum()
  np.testing.assert_allclose(summary['losses'][1], want, rtol=1e-5)
  assert summary['losses'][2] != summary['losses'][1]


def test_an_imported_workdir_is_a_dpo_init_checkpoint(imported, tmp_path):
  from align import loop as align_loop  # pylint: disable=g-import-not-at-top
  workdir = str(imported / 'work_for_dpo')
  hf_workdir.import_to_workdir(str(imported / 'hf'), workdir)
  # `configs/dpo.py:DIR` takes the model and tokenizer from the workdir.
  cfg = configs.load(f'configs/dpo.py:{workdir}', [
      'dpo.max_prompt_len=16', 'dpo.max_len=32', 'train.global_batch_size=8',
      'train.steps=1', 'train.eval_steps=0', 'train.warmup_steps=1',
      'train.log_every_steps=1'])
  assert cfg.dpo.init_checkpoint == workdir
  assert cfg.model.to_dict() == _saved_config(workdir).model.to_dict()

  # The reference is the imported parameters, bit for bit.
  mesh = mesh_lib.make_mesh(cfg.mesh)
  model_fn = lambda: model_lib.Decoder(cfg.model, rngs=nnx.Rngs(0))
  optimizer, _ = optim.make_optimizer(cfg.train)
  _, _, _, shardings = step_lib.train_state_spec(model_fn, optimizer, mesh, 0)
  init_workdir, step_dir = align_loop.resolve_init_checkpoint(cfg.dpo.init_checkpoint)
  assert step_dir == os.path.join(workdir, 'checkpoints', '0')
  reference, _ = align_loop.load_reference(cfg, step_dir, init_workdir, mesh,
                                           shardings['params'], model_fn)
  _, decoder = hf.load(str(imported / 'hf'))
  # hf.load gives the unrolled layout; the run's (model.scan_layers, the
  # default) is read from the same checkpoint, converted on restore.
  want = scan_lib.convert(nnx.to_pure_dict(nnx.state(decoder, nnx.Param)), cfg.model,
                          scanned=bool(cfg.model.scan_layers))
  got = nnx.to_pure_dict(reference)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                               jax.tree_util.tree_flatten_with_path(want)[0]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))

  # And align runs from it: policy = reference at step 1, so the loss is ln 2.
  summary = align_loop.train_and_evaluate(cfg, str(tmp_path / 'dpo'))
  assert summary['status'] == 'done'
  assert summary['losses'][1] == pytest.approx(math.log(2), abs=1e-6)


# -- importing into a folder that holds a run ----------------------------------


def _tree_hash(folder):
  import hashlib  # pylint: disable=g-import-not-at-top
  digest = hashlib.sha256()
  for root, _, files in sorted(os.walk(folder)):
    for name in sorted(files):
      with open(os.path.join(root, name), 'rb') as f:
        digest.update(name.encode() + f.read())
  return digest.hexdigest()


def test_import_into_an_import_is_refused_unless_overwrite(tmp_path):
  work = str(tmp_path / 'work')
  first = hf_families.make_hf_model('qwen3', seed=0, vocab_size=320)
  second = hf_families.make_hf_model('qwen3', seed=1, vocab_size=320)
  first.save_pretrained(tmp_path / 'hf0')
  second.save_pretrained(tmp_path / 'hf1')
  hf_workdir.import_to_workdir(str(tmp_path / 'hf0'), work)
  before = _tree_hash(work)
  with pytest.raises(configs.UserError, match=f'{work} already holds .*--overwrite'):
    hf_workdir.import_to_workdir(str(tmp_path / 'hf1'), work)
  assert _tree_hash(work) == before            # nothing written, nothing claimed
  hf_workdir.import_to_workdir(str(tmp_path / 'hf1'), work, overwrite=True)
  _, decoder = workdir_lib.load_decoder(work)
  tokens = hf_families.random_tokens(0, (1, 8))
  got, _ = decoder(jnp.asarray(tokens))
  want = hf_families.hf_logits(second, tokens)  # the new weights, not the old
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_none_defaults_are_resolved_before_comparing_models():
  from train import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  cfg = configs.load('configs/llama.py:tiny', ['model.head_dim=16'])
  saved = json.loads(workdir_lib.config_json(cfg))
  saved['model']['head_dim'] = None           # 64 // 4 = 16: the same model
  del saved['model']['moe_dispatch']          # a field added after that run
  assert checkpoint_lib.model_differences(saved, cfg) == ([], [])
  saved['model']['d_model'] = 32              # now head_dim None means 8
  shape, _ = checkpoint_lib.model_differences(saved, cfg)
  assert 'model.d_model: saved 32, now 64' in shape
  assert any(line.startswith('model.head_dim: saved None') for line in shape)
