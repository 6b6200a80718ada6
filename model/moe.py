"""Sparse Mixture-of-Experts feed-forward layer: `MoE(cfg_model, rngs=...)`.

`y, aux = MoE(cfg_model, rngs=rngs)(x)` replaces a decoder block's MLP. It
implements
- top-k softmax routing (Shazeer et al. 2017, "Outrageously Large Neural
  Networks"; top-2 with renormalised weights as in Mixtral, Jiang et al. 2024),
- always-on shared experts (Dai et al. 2024, "DeepSeekMoE"),
- dropless grouped expert computation (Gale et al. 2022, "MegaBlocks"): the
  (token, expert) assignments are sorted by expert and each expert multiplies
  only its own rows, so the FLOPs grow with k, not with the number of experts,
- optional capacity-factor dropping (Lepikhin et al. 2020, "GShard"; Fedus et
  al. 2021, "Switch Transformers"),
- the Switch load-balancing loss and the router z-loss (Zoph et al. 2022,
  "ST-MoE"), returned in `aux` for the trainer to weight.

Shapes: n = batch * seq tokens, E experts, k experts per token, N = n * k
assignments, d = d_model, f = moe_d_ff. Routing sees all n tokens of the call
(padding included: the trainer masks the loss, not the router).

Assignment order and the dropping rule. Assignment a = j * n + t is token t's
j-th choice (j = 0 is its highest-probability expert; t indexes the flattened
[batch, seq] in row-major order). Assignments are ranked choice-major: every
token's first choice before any token's second choice, ties by token index (the
GShard rule: a token's best expert is the last thing dropped). With
`moe_capacity_factor` = cf, expert e keeps its first
C = min(ceil(cf * n * k / E), n) assignments in that rank and drops the rest;
a dropped assignment contributes zero (no renormalisation over the surviving
experts), while the token keeps its other experts, the shared experts and the
residual. Dropping makes a token's output depend on the other tokens of the
batch, later positions included; the default (dropless) routing is causal.

Grouped matmul, `grouped_matmul=`:
- 'ragged': `jax.lax.ragged_dot` over the N sorted rows. TPU lowers it to a
  native grouped matmul; XLA on CPU (and on GPU without a grouped-GEMM
  rewrite) expands it into a zero-padded dense product, E times the work.
- 'blocked': each expert's rows are padded to a multiple of a block of b ~
  N / (2E) rows (a multiple of 8) and every block multiplies the weights of
  its one expert (a batched matmul over gathered per-block weights): at most
  N + E*b ~ 1.5N rows of work on any backend, for a gather of about 3 copies
  of the expert weights per matmul.
- 'auto' (default): 'ragged' on TPU, 'blocked' elsewhere.
With a capacity factor every expert has exactly C slots, so the experts run as
one batched matmul over [E, C] slots (GShard's layout), E*C ~ cf*N rows.
"""

import math

import jax
from jax import lax
import jax.numpy as jnp
from flax import nnx

from model import mlp as mlp_lib
from model import partitioning

GROUPED_MATMULS = ('auto', 'ragged', 'blocked')


def capacity(num_tokens: int, num_experts: int, experts_per_token: int,
             capacity_factor: float) -> int:
  """Slots per expert: ceil(cf * n * k / E), at most n (top-k never repeats an expert)."""
  c = math.ceil(capacity_factor * num_tokens * experts_per_token / num_experts)
  return max(1, min(c, num_tokens))


def block_size(num_assignments: int, num_experts: int) -> int:
  """Rows per block of the 'blocked' matmul: ~N / (2E), a multiple of 8."""
  return 8 * max(1, math.ceil(num_assignments / (16 * num_experts)))


def sort_by_expert(expert_ids, num_experts: int):
  """Groups assignments by expert, keeping their rank order within each expert.

  Args:
    expert_ids: int [N], the expert of each assignment, in rank order.
    num_experts: E.
  Returns:
    order: int [N], assignment indices sorted by expert (stable).
    counts: int [E], assignments per expert (before any dropping).
    position: int [N], each assignment's rank among its expert's assignments
      (0 = first served).
  """
  n = expert_ids.shape[0]
  order = jnp.argsort(expert_ids, stable=True)
  counts = jnp.bincount(expert_ids, length=num_experts).astype(jnp.int32)
  starts = jnp.cumsum(counts) - counts
  sorted_position = jnp.arange(n, dtype=jnp.int32) - starts[expert_ids[order]]
  position = jnp.zeros((n,), jnp.int32).at[order].set(sorted_position,
                                                      unique_indices=True)
  return order, counts, position


class MoE(nnx.Module):
  """Top-k routed experts plus optional shared experts over [batch, seq, d_model]."""

  def __init__(self, cfg_model, *, rngs: nnx.Rngs, grouped_matmul: str = 'auto'):
    m = cfg_model
    e, k = m.num_experts, m.experts_per_token
    if e < 1:
      raise ValueError(f'model.num_experts={e}: an MoE layer needs at least one expert')
    if not 1 <= k <= e:
      raise ValueError(f'model.experts_per_token={k}: must be in [1, num_experts={e}]')
    mlp_lib.activation(m.mlp_activation)        # refuses an unknown name
    if m.moe_capacity_factor is not None and m.moe_capacity_factor <= 0:
      raise ValueError(f'model.moe_capacity_factor={m.moe_capacity_factor}: must be '
                       'None or positive')
    if grouped_matmul not in GROUPED_MATMULS:
      raise ValueError(f'grouped_matmul={grouped_matmul!r}: must be one of '
                       f'{", ".join(GROUPED_MATMULS)}')
    self.num_experts, self.experts_per_token = e, k
    self.capacity_factor = m.moe_capacity_factor
    self.renormalize = bool(m.moe_renormalize)
    self.gated = bool(m.mlp_gated)
    self.use_bias = bool(m.use_bias)
    self.activation = m.mlp_activation
    self.dtype = jnp.dtype(m.dtype)
    self.grouped_matmul = grouped_matmul
    d = m.d_model
    f = m.moe_d_ff if m.moe_d_ff is not None else m.d_ff
    pdt = jnp.dtype(m.param_dtype)
    self.d_model, self.d_ff = d, f

    # Initialised as the dense MLP (model/mlp.py): N(0, 0.02) into the hidden
    # layer, the depth-scaled std out of it; the router likewise N(0, 0.02),
    # so routing starts near uniform.
    w_in = nnx.initializers.normal(0.02)
    w_out = nnx.initializers.normal(mlp_lib.out_init_stddev(m))
    self.router = nnx.Param(w_in(rngs.params(), (d, e), pdt), logical_axes=('embed', None))
    if self.gated:
      self.w_gate = nnx.Param(w_in(rngs.params(), (e, d, f), pdt),
                              logical_axes=('experts', 'embed', 'mlp'))
    self.w_up = nnx.Param(w_in(rngs.params(), (e, d, f), pdt),
                          logical_axes=('experts', 'embed', 'mlp'))
    self.w_down = nnx.Param(w_out(rngs.params(), (e, f, d), pdt),
                            logical_axes=('experts', 'mlp', 'embed'))
    if self.use_bias:
      if self.gated:
        self.b_gate = nnx.Param(jnp.zeros((e, f), pdt), logical_axes=('experts', 'mlp'))
      self.b_up = nnx.Param(jnp.zeros((e, f), pdt), logical_axes=('experts', 'mlp'))
      self.b_down = nnx.Param(jnp.zeros((e, d), pdt), logical_axes=('experts', 'embed'))

    # The shared experts are one dense MLP of width num_shared_experts * f: with
    # an elementwise activation that equals the sum of that many MLPs of width f
    # (DeepSeek's checkpoints store them the same way).
    self.num_shared_experts = m.num_shared_experts
    if self.num_shared_experts:
      self.shared = mlp_lib.MLP(m, d_ff=self.num_shared_experts * f, rngs=rngs)

  # -- pieces ---------------------------------------------------------------

  def _param(self, name):
    p = getattr(self, name, None)
    if p is None:
      return None
    # Gather the FSDP-split `embed` dimension before the grouped matmuls, as
    # for a dense weight (see `model.partitioning`); experts and mlp stay split.
    axes = tuple(None if a == 'embed' else a for a in p.get_metadata()['logical_axes'])
    return partitioning.constrain(p[...], axes).astype(self.dtype)

  def _mlp(self, x, matmul, add_bias):
    """act(x W_gate) * (x W_up) W_down (or act(x W_up) W_down), with biases if any."""
    act = mlp_lib.activation(self.activation)
    def proj(h, name):
      out = matmul(h, self._param('w_' + name))
      b = self._param('b_' + name) if self.use_bias else None
      return out if b is None else add_bias(out, b)
    if self.gated:
      h = act(proj(x, 'gate')) * proj(x, 'up')
    else:
      h = act(proj(x, 'up'))
    return proj(h, 'down')

  def _route(self, xf):
    """Float32 router: logits [n, E], probabilities [n, E], top-k weights/experts [n, k]."""
    logits = jnp.einsum('nd,de->ne', xf.astype(jnp.float32),
                        self.router[...].astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = lax.top_k(probs, self.experts_per_token)
    if self.renormalize:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return logits, probs, weights, experts

  def _padded_experts(self, x_rep, rows, num_groups, group_rows, group_expert):
    """Experts over a padded layout: [num_groups, group_rows] slots, one expert each.

    x_rep [N, d] goes to slot `rows` [N] (out of range = dropped); the result
    for each assignment is read back from the same slot (zero when dropped).
    group_expert: int [num_groups] or None when group g is expert g.
    """
    d = x_rep.shape[-1]
    xp = jnp.zeros((num_groups * group_rows, d), x_rep.dtype)
    xp = xp.at[rows].set(x_rep, mode='drop').reshape(num_groups, group_rows, d)
    if group_expert is None:
      pick = lambda w: w
    else:
      pick = lambda w: jnp.take(w, group_expert, axis=0)
    matmul = lambda h, w: jnp.einsum('grd,gdf->grf', h, pick(w))
    add_bias = lambda h, b: h + pick(b)[:, None, :]
    yp = self._mlp(xp, matmul, add_bias).reshape(num_groups * group_rows, d)
    return yp.at[rows].get(mode='fill', fill_value=0)

  def _ragged_experts(self, x_rep, order, counts, expert_ids):
    """Experts as `lax.ragged_dot` over the N rows sorted by expert."""
    x_sorted = x_rep.at[order].get(unique_indices=True)
    e_sorted = expert_ids[order]
    matmul = lambda h, w: lax.ragged_dot(h, w, counts)
    add_bias = lambda h, b: h + jnp.take(b, e_sorted, axis=0)
    y_sorted = self._mlp(x_sorted, matmul, add_bias)
    return jnp.zeros_like(y_sorted).at[order].set(y_sorted, unique_indices=True)

  # -- forward ---------------------------------------------------------------

  def __call__(self, x):
    b, t, d = x.shape
    n, e, k = b * t, self.num_experts, self.experts_per_token
    big_n = n * k
    xf = x.reshape(n, d)

    with jax.named_scope('moe_router'):
      logits, probs, weights, experts = self._route(xf)
      # Assignment a = j * n + t (choice-major rank order, see the docstring).
      expert_ids = experts.T.reshape(big_n)                      # [N]
      combine = weights.T                                        # [k, n] f32
      order, counts, position = sort_by_expert(expert_ids, e)

    with jax.named_scope('moe_losses'):
      load = counts.astype(jnp.float32) / big_n                  # f_e, sums to 1
      mean_prob = jnp.mean(probs, axis=0)                        # P_e
      aux = {
          'moe_aux_loss': e * jnp.sum(load * mean_prob),
          'moe_router_z_loss': jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1))),
          'moe_expert_load': load,
      }

    with jax.named_scope('moe_experts'):
      # Each token repeated once per choice, in assignment order: [N, d].
      x_rep = jnp.broadcast_to(xf.astype(self.dtype)[None], (k, n, d)).reshape(big_n, d)
      impl = self.grouped_matmul
      if impl == 'auto':
        impl = 'ragged' if jax.default_backend() == 'tpu' else 'blocked'
      if self.capacity_factor is not None:
        c = capacity(n, e, k, self.capacity_factor)
        keep = position < c
        rows = jnp.where(keep, expert_ids * c + position, e * c)    # e*c: dropped
        y_assign = self._padded_experts(x_rep, rows, e, c, None)
        combine = combine * keep.reshape(k, n)
      elif impl == 'ragged':
        y_assign = self._ragged_experts(x_rep, order, counts, expert_ids)
      else:
        bs = block_size(big_n, e)
        # Blocks needed: sum_e ceil(count_e / bs) <= ceil(N / bs) + E - 1.
        num_blocks = -(-big_n // bs) + e - 1
        padded = -(-counts // bs) * bs
        padded_end = jnp.cumsum(padded)
        rows = padded_end[expert_ids] - padded[expert_ids] + position
        block_expert = jnp.searchsorted(padded_end, jnp.arange(num_blocks) * bs,
                                        side='right')
        block_expert = jnp.minimum(block_expert, e - 1)  # unused tail blocks
        y_assign = self._padded_experts(x_rep, rows, num_blocks, bs, block_expert)

    with jax.named_scope('moe_combine'):
      y = jnp.einsum('knd,kn->nd', y_assign.reshape(k, n, d).astype(jnp.float32),
                     combine)
      y = y.astype(self.dtype)

    y = y.reshape(b, t, d)
    if self.num_shared_experts:
      with jax.named_scope('moe_shared'):
        y = y + self.shared(x).astype(self.dtype)
    return y.astype(x.dtype), aux
