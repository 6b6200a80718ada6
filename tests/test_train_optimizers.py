"""The optimizers of `train.optimizer` against NumPy versions of their papers'
update rules, the parameter-group table, schedule-free's averaged weights,
Muon on a mesh, muP at its base width, and bitwise resume for every optimizer.
"""

import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import configs
import model
from train import loop
from train import mesh as mesh_lib
from train import optim
from train import sharding
from train import step as step_lib

TINY = ['model.num_layers=1', 'model.d_model=32', 'model.d_ff=64',
        'train.grad_clip_norm=0.0', 'train.warmup_steps=0',
        'train.lr_schedule=constant', 'train.learning_rate=0.01',
        'train.weight_decay=0.1']
# One parameter of each group of the LLaMA preset, and the shape Muon sees.
CHECKED = {'embed/embedding': 'embedding', 'head': 'head',
           'blocks/0/attn_norm/scale': 'norm', 'blocks/0/attn/wq': 'matrix',
           'blocks/0/attn/wo': 'matrix', 'blocks/0/mlp/wi_gate': 'matrix',
           'blocks/0/mlp/wo': 'matrix'}
AS_MATRIX = {'blocks/0/attn/wq': (32, 32), 'blocks/0/attn/wo': (32, 32)}


def flat(tree):
  """{parameter path: float64 array} of an nnx State (or a tree like it)."""
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = sharding._path_name(path).removesuffix('/value')  # pylint: disable=protected-access
    out[name] = np.asarray(x, np.float64)
  return out


def first_update(overrides, steps=1):
  """(params, grads, updates) of the tiny decoder's first optimizer update
  (steps=2: also the second update, with grads2 and updates2)."""
  cfg = configs.load('configs/llama.py:tiny', TINY + overrides)
  optimizer, _ = optim.make_optimizer(cfg.train, cfg.model)

  @jax.jit
  def run():
    _, params, _ = nnx.split(model.Decoder(cfg.model, rngs=nnx.Rngs(0)), nnx.Param, ...)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    grads = treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    updates, state = optimizer.update(grads, optimizer.init(params), params)
    out = [params, grads, updates]
    if steps == 2:
      grads2 = jax.tree.map(lambda g: jnp.roll(g, 1) - 0.5 * g, grads)
      out += [grads2, optimizer.update(grads2, state, params)[0]]
    return out

  return (cfg, *map(flat, run()))


def newton_schulz(g, steps=5):
  """Jordan et al.'s quintic iteration, float64."""
  a, b, c = 3.4445, -4.7750, 2.0315
  x = g / np.linalg.norm(g)
  tall = x.shape[0] > x.shape[1]
  if tall:
    x = x.T
  for _ in range(steps):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x.T if tall else x


def adafactor_direction(g, eps=1e-30):
  """Shazeer & Stern 2018, Alg. 4 at step 1 (beta2_hat = 0), with update
  clipping d = 1: V = R C / (1^T R) for matrices, g^2 for vectors."""
  g2 = g * g + eps
  if g.ndim == 2:
    r = g2.sum(axis=1, keepdims=True)          # row sums   [n, 1]
    c = g2.sum(axis=0, keepdims=True)          # column sums [1, m]
    v = r @ c / r.sum()
  else:
    v = g2
  u = g / np.sqrt(v)
  return u / max(1.0, np.sqrt(np.mean(u * u)))


def reference(kind, name, group, p, g, cfg):
  """The first update of `kind` for one parameter, from its paper."""
  t = cfg.train
  lr, wd = t.learning_rate, t.weight_decay if group in ('matrix', 'head') else 0.0
  if kind == 'adamw':
    direction = g / (np.abs(g) + 1e-8)         # m_hat = g, v_hat = g^2
  elif kind == 'lion':
    direction = np.sign((1 - 0.9) * g)         # sign(b1 m + (1 - b1) g), m = 0
  elif kind == 'sgd':
    direction = g                              # momentum buffer = g
  elif kind == 'adafactor':
    direction = adafactor_direction(g)
  elif kind == 'muon':
    if group != 'matrix':                      # AdamW at muon_adam_lr
      return -t.muon_adam_lr * (g / (np.abs(g) + 1e-8) + wd * p)
    shape = AS_MATRIX.get(name, g.shape)
    matrix = newton_schulz(g.reshape(shape))   # Nesterov: (1 + beta) g, same direction
    direction = (0.2 * np.sqrt(max(shape)) * matrix).reshape(g.shape)
  return -lr * (direction + wd * p)


@pytest.mark.parametrize('kind,extra', [
    ('adamw', []), ('lion', []), ('sgd', []), ('adafactor', []),
    ('muon', ['train.muon_adam_lr=0.003'])])
def test_first_update_is_the_papers_rule(kind, extra):
  cfg, params, grads, updates = first_update([f'train.optimizer={kind}', *extra])
  for name, group in CHECKED.items():
    if kind == 'adafactor' and params[name].ndim > 2:
      continue                                 # factored over its 2 largest dims
    want = reference(kind, name, group, params[name], grads[name], cfg)
    np.testing.assert_allclose(updates[name], want, rtol=2e-4, atol=1e-7,
                               err_msg=f'{kind} {name}')
  if kind == 'muon':
    # Orthogonal per whole matrix: singular values near 1 (the quintic lands
    # in about [0.7, 1.2]) times 0.2 sqrt(max(fan_in, fan_out)).
    for name in ('blocks/0/attn/wq', 'blocks/0/mlp/wi_gate', 'blocks/0/mlp/wo'):
      shape = AS_MATRIX.get(name, updates[name].shape)
      step = updates[name] + cfg.train.learning_rate * cfg.train.weight_decay * params[name]
      s = np.linalg.svd(step.reshape(shape) / (-0.01 * 0.2 * np.sqrt(max(shape))),
                        compute_uv=False)
      assert 0.6 < s.min() and s.max() < 1.25, (name, s)


def test_lion_second_update_is_the_sign_of_the_interpolation():
  """Chen et al. 2023, Alg. 2: c = b1 m + (1 - b1) g, update sign(c),
  m = b2 m + (1 - b2) g (b1 = 0.9, b2 = 0.99): the betas show from step 2."""
  cfg, params, g1, _, g2, updates = first_update(['train.optimizer=lion'], steps=2)
  for name, group in CHECKED.items():
    m = (1 - 0.99) * g1[name]
    direction = np.sign(0.9 * m + (1 - 0.9) * g2[name])
    decay = cfg.train.weight_decay * params[name] if group in ('matrix', 'head') else 0.0
    np.testing.assert_allclose(updates[name], -cfg.train.learning_rate * (direction + decay),
                               rtol=1e-5, atol=1e-7, err_msg=name)


def parse_table(lines):
  rows = {}
  for line in lines[1:]:
    group, tensors, count, rule, decay, lr = line.split()
    rows[group] = dict(tensors=int(tensors), params=int(count.replace(',', '')),
                       rule=rule, decay=float(decay), lr=float(lr))
  return rows


def group_table(spec, overrides):
  cfg = configs.load(spec, overrides)
  abstract = nnx.eval_shape(lambda: model.Decoder(cfg.model, rngs=nnx.Rngs(0)))
  _, params, _ = nnx.split(abstract, nnx.Param, ...)
  return cfg, params, parse_table(optim.describe_groups(params, cfg.train, cfg.model))


def test_group_table_routes_embeddings_head_norms_biases():
  # GPT-2 layout: biases, LayerNorm (scale + bias), learned positions, tied
  # embeddings; plus memory tokens and an MoE layer's router under Muon.
  cfg, params, rows = group_table('configs/gpt2.py:tiny', [
      'model.num_memory_tokens=2', 'model.num_experts=4', 'model.moe_layer_interval=2',
      'train.optimizer=muon', 'train.muon_adam_lr=0.002', 'train.learning_rate=0.02'])
  m, layers = cfg.model, cfg.model.num_layers
  d = m.d_model
  # Norms: 2 LayerNorms per layer and the final one, scale and bias each.
  assert rows['norm'] == dict(tensors=2 * (2 * layers + 1), params=2 * d * (2 * layers + 1),
                              rule='adamw', decay=0.0, lr=0.002)
  # Token table, learned positions, memory tokens.
  assert rows['embedding'] == dict(
      tensors=3, params=(m.vocab_size + m.max_seq_len + 2) * d, rule='adamw',
      decay=0.0, lr=0.002)
  assert 'head' not in rows                    # tied: the token table is the head
  assert rows['bias']['rule'] == 'adamw' and rows['bias']['decay'] == 0.0
  assert rows['router'] == dict(tensors=1, params=d * 4, rule='adamw', decay=0.1, lr=0.002)
  assert rows['matrix']['rule'] == 'muon' and rows['matrix']['lr'] == 0.02
  # Every parameter is in exactly one group.
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert sum(r['params'] for r in rows.values()) == total == model.count_params(m)

  _, _, rows = group_table('configs/llama.py:tiny', ['model.mup_base_width=16'])
  assert rows['head'] == dict(tensors=1, params=64 * 320, rule='adamw', decay=0.1, lr=0.003)
  # muP: hidden matrices at lr / m (m = 64 / 16), the rest at lr.
  assert rows['matrix']['lr'] == pytest.approx(0.003 / 4)
  assert rows['embedding']['lr'] == rows['norm']['lr'] == 0.003


class Quadratic(nnx.Module):
  """A decayed matrix and an undecayed norm scale: f = 0.5 |p - target|^2."""

  def __init__(self, rngs):
    self.kernel = nnx.Param(jax.random.normal(rngs.params(), (4, 3)), logical_axes=('embed', 'mlp'))
    self.scale = nnx.Param(jax.random.normal(rngs.params(), (4,)), logical_axes=('norm',))


def test_schedule_free_stores_the_averaged_weights():
  """Defazio et al. 2024, Alg. 1 (AdamW form), in NumPy; the train state
  holds x (what evaluation, sampling and checkpoints read)."""
  t = ml_collections.ConfigDict(dict(
      optimizer='schedule_free_adamw', steps=3, learning_rate=0.1, warmup_steps=0,
      lr_schedule='constant', min_lr_ratio=0.1, weight_decay=0.5, adam_b1=0.9,
      adam_b2=0.95, grad_clip_norm=0.0))
  optimizer, schedule = optim.make_optimizer(t)
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=1)), jax.devices()[:1])
  graphdef, state, shardings = step_lib.create_train_state(
      lambda: Quadratic(nnx.Rngs(0)), optimizer, mesh, seed=0)
  target = {'kernel': np.full((4, 3), 0.5), 'scale': np.full((4,), -1.0)}

  def loss(q, batch, rng):
    del batch, rng
    total = sum(0.5 * jnp.sum((getattr(q, k)[...] - target[k]) ** 2) for k in target)
    return total, {'weight': jnp.ones(()), 'loss': total}

  train_step = step_lib.make_train_step(loss, optimizer, graphdef=graphdef,
                                        state_shardings=shardings, mesh=mesh,
                                        schedule=schedule)
  x = {k: np.asarray(state['params'][k][...], np.float64) for k in target}
  z = {k: v.copy() for k, v in x.items()}
  v = {k: np.zeros_like(a) for k, a in x.items()}
  b1, b2, lr, weights = 0.9, 0.95, 0.1, 0.0
  for n in range(1, 4):
    state, _ = train_step(state, {'inputs': np.zeros((1, 1), np.int32)})
    weights += lr ** 2
    c = lr ** 2 / weights
    for k in x:
      y = (1 - b1) * z[k] + b1 * x[k]
      g = y - target[k]
      v[k] = b2 * v[k] + (1 - b2) * g * g
      decay = 0.5 * y if k == 'kernel' else 0.0
      z[k] = z[k] - lr * (g / (np.sqrt(v[k] / (1 - b2 ** n)) + 1e-8) + decay)
      x[k] = (1 - c) * x[k] + c * z[k]
    for k in x:
      np.testing.assert_allclose(np.asarray(state['params'][k][...]), x[k],
                                 rtol=1e-5, atol=1e-6, err_msg=f'step {n} {k}')


def test_mup_at_base_width_is_the_standard_model():
  """Same parameters, logits and optimizer groups, bit for bit."""
  overrides = ['model.num_layers=1', 'model.d_model=32', 'model.d_ff=64']
  sp = configs.load('configs/llama.py:tiny', overrides)
  mup = configs.load('configs/llama.py:tiny', overrides + [
      'model.mup_base_width=32', 'model.mup_input_mult=1.0', 'model.mup_output_mult=1.0'])
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, 320)
  outputs = []
  for cfg in (sp, mup):
    decoder = model.Decoder(cfg.model, rngs=nnx.Rngs(0))
    _, params, _ = nnx.split(decoder, nnx.Param, ...)
    outputs.append((flat(params), np.asarray(decoder(tokens)[0]),
                    optim.group_settings(cfg.train, cfg.model)))
  (p0, l0, g0), (p1, l1, g1) = outputs
  for name in p0:
    np.testing.assert_array_equal(p0[name], p1[name], err_msg=name)
  np.testing.assert_array_equal(l0, l1)
  assert g0 == g1
  # Away from the base the hidden matrices change (and only they).
  wide = configs.load('configs/llama.py:tiny', overrides + ['model.mup_base_width=8'])
  assert optim.group_settings(wide.train, wide.model)['matrix'].lr_mult == 0.25


def test_adafactor_factored_moments_are_replicated():
  """Adafactor's row/column moments sit in copies of the parameters' Variables
  with a reduced shape: they are replicated, the parameters stay sharded."""
  # Adafactor runs unrolled (train.loop.unrolled_if_needed).
  cfg = loop.unrolled_if_needed(
      configs.load('configs/llama.py:tiny', ['train.optimizer=adafactor']))
  assert not cfg.model.scan_layers
  optimizer, _ = optim.make_optimizer(cfg.train, cfg.model)
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({'data': 1, 'fsdp': 8}))
  _, _, abstract, _ = step_lib.train_state_spec(
      lambda: model.Decoder(cfg.model, rngs=nnx.Rngs(0)), optimizer, mesh, seed=0)
  specs = {sharding._path_name(p): x.sharding.spec  # pylint: disable=protected-access
           for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  rows = [k for k in specs if k.endswith('mlp/wi_gate/value') and 'v_row' in k]
  assert rows and all(specs[k] == jax.sharding.PartitionSpec() for k in rows)
  assert specs['params/blocks/0/mlp/wi_gate/value'] == jax.sharding.PartitionSpec('fsdp', None)


def test_muon_on_a_mesh_equals_one_device():
  """fsdp x tensor splits the matrices Newton-Schulz multiplies: two steps
  on a 2 x 2 mesh give the one-device result."""
  cfg = configs.load('configs/llama.py:tiny', TINY + [
      'train.optimizer=muon', 'train.global_batch_size=4', 'train.seq_len=16'])
  tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(3), (4, 17), 0, 320))
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
           'loss_mask': np.ones((4, 16), np.float32)}
  results = []
  for shape, devices in (({'data': 1}, jax.devices()[:1]),
                         ({'data': 1, 'fsdp': 2, 'tensor': 2}, jax.devices()[:4])):
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(shape), devices)
    optimizer, schedule = optim.make_optimizer(cfg.train, cfg.model)
    graphdef, state, shardings = step_lib.create_train_state(
        lambda: model.Decoder(cfg.model, rngs=nnx.Rngs(0)), optimizer, mesh, seed=0)
    train_step = step_lib.make_train_step(step_lib.lm_loss(cfg.train), optimizer,
                                          graphdef=graphdef, state_shardings=shardings,
                                          mesh=mesh, schedule=schedule)
    for _ in range(2):
      state, _ = train_step(state, batch)
    results.append(flat(jax.device_get(state['params'])))
  for name, want in results[0].items():
    np.testing.assert_allclose(results[1][name], want, rtol=1e-4, atol=1e-6, err_msg=name)


RESUME = ['model.num_layers=1', 'model.d_model=32', 'model.d_ff=64',
          'data.source=synthetic', 'train.seq_len=16', 'train.steps=4',
          'train.lr_schedule=constant', 'train.warmup_steps=1',
          'train.log_every_steps=1', 'train.eval_steps=0',
          'train.checkpoint_every_steps=2', 'train.keep_checkpoints=5']


# Every optimizer but adamw (whose resume is tests/test_train_resume.py's, with
# a kill -9): Muon's transform beside AdamW groups, schedule-free's stored
# averaged weights, and the optax states of lion, sgd and adafactor (whose
# factored moments are placed by the sharding rules' fallback).
@pytest.mark.parametrize('kind', ['muon', 'schedule_free_adamw', 'lion', 'sgd', 'adafactor'])
def test_resume_is_bitwise_for_every_optimizer(kind, tmp_path):
  """4 steps straight vs. steps 3-4 resumed from the straight run's step-2
  checkpoint (in process, on the 8 fake devices)."""
  cfg = configs.load('configs/llama.py:tiny', RESUME + [f'train.optimizer={kind}'])
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  want = loop.train_and_evaluate(cfg, straight)
  os.makedirs(os.path.join(resumed, 'checkpoints'))
  shutil.copy(os.path.join(straight, 'config.json'), resumed)
  shutil.copytree(os.path.join(straight, 'checkpoints', '2'),
                  os.path.join(resumed, 'checkpoints', '2'))
  got = loop.train_and_evaluate(cfg, resumed)
  assert sorted(got['losses']) == [3, 4]
  assert got['losses'] == {s: want['losses'][s] for s in (3, 4)}      # bitwise
  a, b = checkpoint_state(straight), checkpoint_state(resumed)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))


def checkpoint_state(workdir):
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, 'checkpoints', '4', 'state'))


@pytest.mark.parametrize('overrides,field', [
    (['train.optimizer=adam'], 'train.optimizer'),
    (['train.optimizer=schedule_free_adamw'], 'train.lr_schedule'),
    (['train.optimizer=sgd', 'train.b2=0.9'], 'train.b2'),
    (['train.optimizer=adamw', 'train.momentum=0.9'], 'train.momentum'),
    (['model.mup_base_width=32', 'train.optimizer=adafactor'], 'model.mup_base_width'),
    (['model.mup_base_width=32', 'model.attn_scale=0.1'], 'model.attn_scale'),
])
def test_settings_that_would_be_wrong_or_ignored_are_refused(overrides, field):
  with pytest.raises(configs.ConfigError, match=field):
    configs.load('configs/llama.py:tiny', overrides)
