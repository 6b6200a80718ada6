"""Every family preset builds with its real initialisers, runs, trains one step,
and has exactly the parameters `model.count_params` says; the counts and FLOPs
are checked against hand counts."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
import model

PRESETS = ('gpt2', 'llama', 'mistral', 'mixtral', 'qwen3', 'gemma2', 'mpt', 'deepseek',
           'deepseek_v3')
MOE_KEYS = {'moe_aux_loss', 'moe_router_z_loss', 'moe_expert_load', 'moe_layer_loads'}


def _n_params(decoder):
  return sum(x.size for x in jax.tree.leaves(nnx.state(decoder, nnx.Param)))


def _loss_fn(graphdef):
  def loss(params, tokens):
    logits, aux = nnx.merge(graphdef, params)(tokens[:, :-1])
    targets = tokens[:, 1:]
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return jnp.mean(nll), aux
  return loss


def _random_params(abstract, seed):
  """The parameters of an abstract model drawn from N(0, 0.1^2) (scales: 1 + that)."""
  graphdef, state = nnx.split(abstract)
  rng = np.random.RandomState(seed)
  def draw(path, x):
    value = 0.1 * rng.normal(size=x.shape) + (1.0 if path[-1].key == 'scale' else 0.0)
    return jnp.asarray(value, x.dtype)
  pure = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, pure)
  return graphdef, state


TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 258, (2, 33)), jnp.int32)


@pytest.mark.parametrize('name', PRESETS)
def test_tiny_preset_builds_runs_and_takes_a_gradient_step(name):
  cfg = configs.load(f'configs/{name}.py')          # no argument: tiny
  assert cfg.model.d_model == 64 and cfg.train.seq_len == 128
  # The constructor runs abstractly (the real initialisers, which compile one
  # kernel per shape on CPU, are run below on presets covering every kind of
  # parameter); the count is of the shapes it creates.
  abstract = nnx.eval_shape(lambda: model.Decoder(cfg.model, rngs=nnx.Rngs(0)))
  assert _n_params(abstract) == model.count_params(cfg.model)
  graphdef, params = _random_params(abstract, seed=0)

  value_and_grad = jax.jit(jax.value_and_grad(_loss_fn(graphdef), has_aux=True))
  (loss, aux), grads = value_and_grad(params, TOKENS)
  assert np.isfinite(float(loss))
  assert set(aux) == (MOE_KEYS if cfg.model.num_experts else set())
  leaves = jax.tree.leaves(grads)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  # A small step against the gradient lowers the loss on the same batch.
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in leaves))
  stepped = jax.tree.map(lambda p, g: p - 0.05 * g / norm, params, grads)
  (new_loss, _), _ = value_and_grad(stepped, TOKENS)
  assert float(new_loss) < float(loss) - 1e-3


@jax.jit
def _initial_loss(graphdef, params, tokens):
  return _loss_fn(graphdef)(params, tokens)


# Between them: LayerNorm, biases, a learned table, tied embeddings (gpt2);
# QK-norm (qwen3); router, experts, shared experts, an untied head (deepseek).
@pytest.mark.parametrize('name', ['gpt2', 'qwen3', 'deepseek'])
def test_real_initialisation_predicts_near_uniformly(name):
  cfg = configs.load(f'configs/{name}.py')
  decoder = model.Decoder(cfg.model, rngs=nnx.Rngs(0))
  assert _n_params(decoder) == model.count_params(cfg.model)
  loss, _ = _initial_loss(*nnx.split(decoder), TOKENS)
  # The first logged loss the preset docstrings promise: about ln(vocab).
  assert abs(float(loss) - math.log(320)) < 0.1


@pytest.mark.parametrize('name', PRESETS)
def test_small_preset_parameter_count_matches_the_built_shapes(name):
  cfg = configs.load(f'configs/{name}.py:small')
  abstract = nnx.eval_shape(lambda: model.Decoder(cfg.model, rngs=nnx.Rngs(0)))
  count = model.count_params(cfg.model)
  assert _n_params(abstract) == count
  assert 5e6 < count < 5e7


@pytest.mark.parametrize('name', PRESETS)
def test_unknown_size_is_refused_with_the_known_sizes(name):
  with pytest.raises(configs.ConfigError, match="unknown size 'huge'.*tiny, small"):
    configs.load(f'configs/{name}.py:huge')


def test_llama_tiny_parameter_count_by_hand():
  m = configs.load('configs/llama.py').model
  # vocab 320, d 64, 2 layers, 4 heads of 16, 2 K/V heads, SwiGLU 192, untied.
  embed = 320 * 64
  attn = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64      # q, k, v, o
  mlp = 3 * 64 * 192
  layer = attn + mlp + 2 * 64                         # two RMSNorm scales
  want = embed + 2 * layer + 64 + 64 * 320            # final norm, head
  assert want == 139584
  assert model.count_params(m) == want


def test_gpt2_tiny_parameter_count_by_hand():
  m = configs.load('configs/gpt2.py').model
  # Learned positions (128 rows), LayerNorm with bias, biases everywhere, tied.
  embed = 320 * 64 + 128 * 64
  attn = 4 * 64 * 64 + 3 * 64 + 64
  mlp = 64 * 256 + 256 + 256 * 64 + 64
  layer = attn + mlp + 2 * 2 * 64
  assert model.count_params(m) == embed + 2 * layer + 2 * 64


def test_deepseek_tiny_parameter_count_by_hand():
  m = configs.load('configs/deepseek.py').model
  # 16 routed experts of width 48, 2 shared (one MLP of width 96), router;
  # the first layer dense (SwiGLU of width 192), as DeepSeek-V3.
  moe = 64 * 16 + 16 * 3 * 64 * 48 + 3 * 64 * 96
  dense = 3 * 64 * 192
  attention_and_norms = 4 * 64 * 64 + 2 * 64
  assert model.count_params(m) == (2 * 320 * 64 + 2 * attention_and_norms + dense + moe
                                   + 64)


def test_llama_tiny_training_flops_by_hand():
  m = configs.load('configs/llama.py').model
  t = 128
  weights = (64 * 64 + 2 * 64 * 32 + 64 * 64) + 3 * 64 * 192
  pairs = t * (t + 1) // 2                           # causal (query, key) pairs
  attention = 2 * 2 * 64 * pairs / t                 # scores and values, per token
  forward = 2 * (2 * weights + attention) + 2 * 64 * 320   # 2 layers, then the head
  assert model.flops_per_token(m, t) == pytest.approx(3 * forward, rel=1e-12)
  assert 3 * forward == 811776


def test_sliding_window_and_memory_tokens_in_the_flop_count():
  m = configs.load('configs/llama.py', ['model.num_layers=1', 'model.sliding_window=4',
                                        'model.num_memory_tokens=2']).model
  t, w, mem = 10, 4, 2
  # Query i (0-based) sees min(i + 1, w) tokens plus the memory; memory
  # queries see the memory.
  pairs = sum(min(i + 1, w) + mem for i in range(t)) + mem * mem
  weights = (2 * 64 * 64 + 2 * 64 * 32) + 3 * 64 * 192
  forward = 2 * weights * (t + mem) / t + 2 * 2 * 64 * pairs / t + 2 * 64 * 320
  assert model.flops_per_token(m, t) == pytest.approx(3 * forward, rel=1e-12)


def test_moe_flops_scale_with_experts_per_token_not_with_experts():
  def flops(**kw):
    overrides = [f'model.{k}={v}' for k, v in kw.items()]
    return model.flops_per_token(configs.load('configs/deepseek.py', overrides).model, 128)
  base = flops(num_experts=16, experts_per_token=4)
  # More experts: only the router grows (d_model per expert per MoE layer;
  # one of the two layers, the first being dense).
  assert flops(num_experts=64, experts_per_token=4) - base == pytest.approx(
      3 * 2 * 64 * (64 - 16))
  # More experts per token: one expert MLP (3 d moe_d_ff) per extra choice.
  assert flops(num_experts=16, experts_per_token=6) - base == pytest.approx(
      3 * 2 * 2 * 3 * 64 * 48)
