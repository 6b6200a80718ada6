"""Sparse Mixture-of-Experts feed-forward layer: `MoE(cfg_model, rngs=...)`.

`y, aux = MoE(cfg_model, rngs=rngs)(x)` replaces a decoder block's MLP. It
implements
- top-k softmax routing (Shazeer et al. 2017, "Outrageously Large Neural
  Networks"; top-2 with renormalised weights as in Mixtral, Jiang et al. 2024),
- always-on shared experts (Dai et al. 2024, "DeepSeekMoE"), optionally
  scaled by a learned sigmoid gate sigmoid(x . w) (`moe_shared_expert_gate`;
  Qwen2-MoE, Qwen3-Next),
- dropless grouped expert computation (Gale et al. 2022, "MegaBlocks"): the
  (token, expert) assignments are sorted by expert and each expert multiplies
  only its own rows, so the FLOPs grow with k, not with the number of experts,
- optional capacity-factor dropping (Lepikhin et al. 2020, "GShard"; Fedus et
  al. 2021, "Switch Transformers"),
- the Switch load-balancing loss and the router z-loss (Zoph et al. 2022,
  "ST-MoE"), returned in `aux` for the trainer to weight,
- DeepSeek-V3's router (DeepSeek-AI 2024, "DeepSeek-V3 Technical Report"):
  sigmoid scores (`moe_router='sigmoid'`), `moe_routed_scaling`, and
  group-limited routing (`moe_num_groups`, `moe_topk_groups`),
- GPT-OSS's router bias (`moe_router_bias`: u = x W_r + b, a trained [E]
  bias) and experts with biases (`use_bias`) and the clamped SwiGLU
  (`mlp_activation='clamped_swiglu'`, model/mlp.py) (OpenAI 2025, "gpt-oss
  Model Card"); its top-k-then-softmax router is 'softmax' with
  `moe_renormalize` (softmax over the k chosen logits = the renormalised
  top-k of the full softmax),
- auxiliary-loss-free load balancing (Wang et al. 2024, "Auxiliary-Loss-Free
  Load Balancing Strategy for Mixture-of-Experts"): a per-expert bias added to
  the scores for the choice of experts only, moved outside the gradient after
  each optimizer step (`MoE.update_bias`, `train.moe_bias_update_rate`).

Routing, per token with router logits u [E] (x W_r, plus b with `moe_router_bias`):
- scores s = softmax(u) ('softmax') or s = sigmoid(u) ('sigmoid');
- selection scores c = s + bias (bias [E]: for 'sigmoid' an `ExpertBias`
  variable, zero until the trainer moves it; none, i.e. 0, for 'softmax');
- with G = moe_num_groups > 1 the experts split into G groups of E / G
  consecutive experts; a group scores the sum of its two largest c (one when
  a group holds one expert), the moe_topk_groups best groups are kept and the
  experts of the others are excluded;
- the k experts with the largest c among those left are chosen;
- their combine weights are the unbiased s of the chosen experts, divided by
  their sum when `moe_renormalize`, times `moe_routed_scaling`.
The load-balancing loss's P_e is the mean of softmax(u) for 'softmax' and of
s / sum(s) (the normalised sigmoid scores, as DeepSeek-V3's sequence-wise
balance loss) for 'sigmoid'. With the defaults (softmax, one group, zero bias,
scaling 1) this is the plain top-k router.

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

Dispatch, `model.moe_dispatch`:
- 'global': the layer computes on global arrays and XLA's partitioner places
  the work; the one sort over all N assignments gathers every token onto
  every device of a mesh.
- 'all_to_all': expert parallelism (GShard; Switch; Rajbhandari et al. 2022,
  "DeepSpeed-MoE") under `jax.shard_map` over the trainer's mesh: each device
  routes its own tokens, packs them per destination expert shard into a
  fixed-size buffer, `all_to_all`s it over the `expert` mesh axis, runs its
  E / expert local experts on the rows it received, and sends the results
  back. Static buffers: dropless, room for all of a device's n_dev * k
  assignments per destination shard (the worst case); with a capacity factor,
  min(C, n_dev) rows per expert. The capacity rule is the global one above:
  each device learns the per-(choice, expert) counts of the devices before it
  (an all-gather of [k, E] integers), so the same assignments are dropped.
  The loss statistics are psums over the batch axes: the same values as the
  global path. A tensor-split `mlp` dimension is summed with a psum over
  `tensor` after the down projection; the FSDP-split `embed` dimension of the
  expert weights is gathered on entry, as in the global path.
- 'auto' (default): 'all_to_all' inside the trainer's context when the mesh
  has an `expert` axis > 1 that divides num_experts and the batch splits over
  the batch axes, else 'global'. 'all_to_all' where that does not hold inside
  the trainer's context is an error; outside it (tests, sampling, one device)
  there is no mesh and the global path runs.
"""

import functools
import math
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from model import mlp as mlp_lib
from model import mup
from model import partitioning

GROUPED_MATMULS = ('auto', 'ragged', 'blocked')
ROUTERS = ('softmax', 'sigmoid')
DISPATCHES = ('auto', 'global', 'all_to_all')
# Expert weights: name -> logical axes with `embed` whole (gathered on entry).
_EXPERT_WEIGHTS = {
    'w_gate': ('experts', None, 'mlp'), 'w_up': ('experts', None, 'mlp'),
    'w_down': ('experts', 'mlp', None), 'b_gate': ('experts', 'mlp'),
    'b_up': ('experts', 'mlp'), 'b_down': ('experts', None),
}


class ExpertBias(nnx.Variable):
  """The per-expert selection bias of aux-loss-free balancing: not a Param, so
  it sits in the train state's `model_state` (checkpointed, replicated) and
  no optimizer or weight decay touches it."""


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


class ExpertParallelPlan(NamedTuple):
  """Where the all-to-all dispatch runs: the mesh and its axes by role."""
  mesh: jax.sharding.Mesh
  batch_axes: tuple[str, ...]   # split the tokens (in the batch sharding's order)
  mlp_axes: tuple[str, ...]     # split the experts' hidden dimension ('tensor' or ())


def _axes(entry) -> tuple[str, ...]:
  """A PartitionSpec entry as a tuple of mesh axis names."""
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


class MoE(nnx.Module):
  """Top-k routed experts plus optional shared experts over [batch, seq, d_model]."""

  def __init__(self, cfg_model, *, rngs: nnx.Rngs, grouped_matmul: str = 'auto'):
    m = cfg_model
    e, k = m.num_experts, m.experts_per_token
    if e < 1:
      raise ValueError(f'model.num_experts={e}: an MoE layer needs at least one expert')
    if not 1 <= k <= e:
      raise ValueError(f'model.experts_per_token={k}: must be in [1, num_experts={e}]')
    mlp_lib.check_activation(m)                 # refuses an unknown name
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
    self.swiglu = mlp_lib.swiglu_params(m)
    self.dtype = jnp.dtype(m.dtype)
    self.grouped_matmul = grouped_matmul
    self.dispatch = m.get('moe_dispatch', 'auto')
    self.router_type = m.get('moe_router', 'softmax')
    if self.router_type not in ROUTERS:
      raise ValueError(f'model.moe_router={self.router_type!r}: must be one of '
                       f'{", ".join(ROUTERS)}')
    self.routed_scaling = float(m.get('moe_routed_scaling', 1.0))
    self.num_groups = m.get('moe_num_groups', 1)
    self.topk_groups = m.get('moe_topk_groups', 1)
    if self.num_groups < 1 or e % self.num_groups:
      raise ValueError(f'model.moe_num_groups={self.num_groups}: must divide '
                       f'num_experts={e}')
    if not 1 <= self.topk_groups <= self.num_groups:
      raise ValueError(f'model.moe_topk_groups={self.topk_groups}: must be in '
                       f'[1, moe_num_groups={self.num_groups}]')
    if k > self.topk_groups * (e // self.num_groups):
      raise ValueError(f'model.experts_per_token={k}: more than the experts of the '
                       f'{self.topk_groups} kept groups')
    if self.dispatch not in DISPATCHES:
      raise ValueError(f'model.moe_dispatch={self.dispatch!r}: must be one of '
                       f'{", ".join(DISPATCHES)}')
    d = m.d_model
    f = m.moe_d_ff if m.moe_d_ff is not None else m.d_ff
    pdt = jnp.dtype(m.param_dtype)
    self.d_model, self.d_ff = d, f

    # Initialised as the dense MLP (model/mlp.py): N(0, 0.02) into the hidden
    # layer, the depth-scaled std out of it; the router likewise N(0, 0.02),
    # so routing starts near uniform. muP scales the experts' init like the
    # dense MLP's and leaves the router's.
    w_in = nnx.initializers.normal(mup.hidden_std(m, 0.02))
    w_out = nnx.initializers.normal(mup.hidden_std(m, mlp_lib.out_init_stddev(m)))
    self.router = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (d, e), pdt),
                            logical_axes=('embed', None))
    # Sigmoid routers carry the selection bias (DeepSeek-V3's
    # e_score_correction_bias), float32 whatever param_dtype so steps of
    # train.moe_bias_update_rate (1e-3) do not round away. Softmax routers
    # have none: their state stays parameters only.
    if self.router_type == 'sigmoid':
      self.bias = ExpertBias(jnp.zeros((e,), jnp.float32))
    # GPT-OSS's router bias: a trained Param on the logits (zero at init).
    self.router_bias = (nnx.Param(jnp.zeros((e,), pdt), logical_axes=(None,))
                        if m.get('moe_router_bias', False) else None)
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
    # `moe_shared_expert_gate`: the shared output times sigmoid(x . w), one
    # learned [d] vector (Qwen2-MoE, Qwen3-Next); N(0, 0.02) as the router,
    # so the gate starts near 1/2.
    self.shared_gated = bool(self.num_shared_experts and m.get('moe_shared_expert_gate', False))
    if self.shared_gated:
      self.shared_gate = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (d,), pdt),
                                   logical_axes=('embed',))

  # -- pieces ---------------------------------------------------------------

  def _param(self, name):
    p = getattr(self, name, None)
    if p is None:
      return None
    # Gather the FSDP-split `embed` dimension before the grouped matmuls, as
    # for a dense weight (see `model.partitioning`); experts and mlp stay split.
    axes = tuple(None if a == 'embed' else a for a in p.get_metadata()['logical_axes'])
    return partitioning.constrain(p[...], axes).astype(self.dtype)

  def _expert_weights(self):
    """The expert weights and biases the layer has, by name, in the compute dtype."""
    return {name: self._param(name) for name in _EXPERT_WEIGHTS if hasattr(self, name)}

  def _mlp(self, w, x, matmul, add_bias, reduce=None):
    """act(x W_gate) * (x W_up) W_down (or act(x W_up) W_down), with biases if any.

    `reduce` sums the down projection's partial products when the hidden
    dimension is split over devices (before its bias, which is added once).
    """
    def proj(h, name):
      out = matmul(h, w['w_' + name])
      if name == 'down' and reduce is not None:
        out = reduce(out)
      b = w.get('b_' + name)
      return out if b is None else add_bias(out, b)
    if self.gated:
      h = mlp_lib.gated_unit(self.activation, proj(x, 'gate'), proj(x, 'up'), self.swiglu)
    else:
      h = mlp_lib.activation(self.activation)(proj(x, 'up'))
    return proj(h, 'down')

  def _route(self, xf, router, bias, router_bias=None):
    """Float32 router (see the module docstring): logits [n, E], the balance
    loss's probabilities [n, E], combine weights and experts [n, k]."""
    logits = jnp.einsum('nd,de->ne', xf.astype(jnp.float32), router.astype(jnp.float32))
    if router_bias is not None:
      logits = logits + router_bias.astype(jnp.float32)
    if self.router_type == 'softmax':
      scores = probs = jax.nn.softmax(logits, axis=-1)
    else:
      scores = jax.nn.sigmoid(logits)
      probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    choice = scores + bias.astype(jnp.float32)                   # selection only
    if self.num_groups > 1:
      n, e, g = choice.shape[0], self.num_experts, self.num_groups
      grouped = choice.reshape(n, g, e // g)
      group_score = jnp.sum(lax.top_k(grouped, min(2, e // g))[0], axis=-1)   # [n, G]
      _, kept = lax.top_k(group_score, self.topk_groups)                     # [n, G_k]
      keep = jnp.any(kept[:, :, None] == jnp.arange(g), axis=1)              # [n, G]
      choice = jnp.where(jnp.repeat(keep, e // g, axis=1), choice, -jnp.inf)
    _, experts = lax.top_k(choice, self.experts_per_token)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if self.renormalize:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    if self.routed_scaling != 1.0:
      weights = weights * self.routed_scaling
    return logits, probs, weights, experts

  def selection_bias(self):
    """The bias [E] added to the scores for the choice (zeros without one)."""
    if hasattr(self, 'bias'):
      return self.bias[...]
    return jnp.zeros((self.num_experts,), jnp.float32)

  def update_bias(self, load, rate: float):
    """Aux-loss-free balancing (Wang et al. 2024): bias += rate * sign(mean
    load - load), load [E] this layer's routed fractions of the step. Runs
    outside the gradient, after the optimizer step (train/step.py)."""
    if not hasattr(self, 'bias'):
      raise ValueError("train.moe_bias_update_rate > 0 needs model.moe_router='sigmoid' "
                       '(a softmax router has no selection bias)')
    load = load.astype(jnp.float32)
    self.bias[...] = self.bias[...] + rate * jnp.sign(jnp.mean(load) - load)

  def _batched_experts(self, w, xp, group_expert=None, reduce=None):
    """Experts over [G, r, d] groups of rows, group g on expert `group_expert[g]`
    (expert g when None)."""
    if group_expert is None:
      pick = lambda a: a
    else:
      pick = lambda a: jnp.take(a, group_expert, axis=0)
    matmul = lambda h, a: jnp.einsum('grd,gdf->grf', h, pick(a))
    add_bias = lambda h, b: h + pick(b)[:, None, :]
    return self._mlp(w, xp, matmul, add_bias, reduce)

  def _padded_experts(self, w, x_rep, rows, num_groups, group_rows, group_expert,
                      reduce=None):
    """Experts over a padded layout: [num_groups, group_rows] slots, one expert each.

    x_rep [M, d] goes to slot `rows` [M] (out of range = dropped); the result
    for each row is read back from the same slot (zero when dropped).
    group_expert: int [num_groups] or None when group g is expert g.
    """
    d = x_rep.shape[-1]
    xp = jnp.zeros((num_groups * group_rows, d), x_rep.dtype)
    xp = xp.at[rows].set(x_rep, mode='drop').reshape(num_groups, group_rows, d)
    yp = self._batched_experts(w, xp, group_expert, reduce)
    yp = yp.reshape(num_groups * group_rows, d)
    return yp.at[rows].get(mode='fill', fill_value=0)

  def _dropless_experts(self, w, x_rows, expert_ids, num_experts, impl, *,
                        block_rows=None, reduce=None):
    """Each row of x_rows [M, d] through its expert `expert_ids` [M], dropless.

    An id equal to `num_experts` marks an empty row (a padding slot of the
    all-to-all buffer): its output is zero. `block_rows`: the 'blocked'
    block size (default `block_size(M, num_experts)`).
    """
    m, e = x_rows.shape[0], num_experts
    # Empty rows sort last, as group e.
    order, counts, position = sort_by_expert(expert_ids, e + 1)
    counts = counts[:e]
    if impl == 'ragged':
      x_sorted = x_rows.at[order].get(unique_indices=True)
      e_sorted = jnp.minimum(expert_ids[order], e - 1)
      matmul = lambda h, a: lax.ragged_dot(h, a, counts)
      add_bias = lambda h, b: h + jnp.take(b, e_sorted, axis=0)
      y_sorted = self._mlp(w, x_sorted, matmul, add_bias, reduce)
      # Rows past the groups (empty slots) are not part of any product.
      valid = jnp.arange(m) < jnp.sum(counts)
      y_sorted = jnp.where(valid[:, None], y_sorted, 0)
      return jnp.zeros_like(y_sorted).at[order].set(y_sorted, unique_indices=True)
    bs = block_rows or block_size(m, e)
    # Blocks needed: sum_e ceil(count_e / bs) <= ceil(M / bs) + E - 1.
    num_blocks = -(-m // bs) + e - 1
    padded = -(-counts // bs) * bs
    padded_end = jnp.cumsum(padded)
    valid = expert_ids < e
    safe_ids = jnp.minimum(expert_ids, e - 1)
    rows = jnp.where(valid, padded_end[safe_ids] - padded[safe_ids] + position,
                     num_blocks * bs)                          # out of range: empty
    block_expert = jnp.searchsorted(padded_end, jnp.arange(num_blocks) * bs,
                                    side='right')
    block_expert = jnp.minimum(block_expert, e - 1)  # unused tail blocks
    return self._padded_experts(w, x_rows, rows, num_blocks, bs, block_expert, reduce)

  def _impl(self):
    if self.grouped_matmul == 'auto':
      return 'ragged' if jax.default_backend() == 'tpu' else 'blocked'
    return self.grouped_matmul

  # -- dispatch choice -------------------------------------------------------

  def expert_parallel_plan(self, x_shape) -> ExpertParallelPlan | None:
    """The all-to-all plan for an input of `x_shape`, or None for the global path.

    Raises ValueError when `model.moe_dispatch='all_to_all'` inside the
    trainer's mesh context cannot run as asked.
    """
    mesh = partitioning.current_mesh()
    if self.dispatch == 'global' or mesh is None:
      return None
    e = self.num_experts
    size = dict(mesh.shape).get('expert', 1)
    batch = partitioning.partition_spec(('batch', None, None), x_shape)
    batch_axes = _axes(batch[0]) if batch is not None else ()
    w_spec = partitioning.partition_spec(_EXPERT_WEIGHTS['w_up'], (e, self.d_model, self.d_ff))
    why = None
    if size == 1:
      why = 'the mesh has no expert axis (mesh.expert=1)'
    elif e % size:
      why = f'num_experts={e} does not divide over mesh.expert={size}'
    elif 'expert' not in batch_axes:
      why = (f'the batch of {x_shape[0]} rows does not split over the batch mesh '
             'axes (data x fsdp x expert)')
    elif w_spec is None or _axes(w_spec[0]) != ('expert',):
      why = "the rule table does not split 'experts' over the expert mesh axis"
    if why is not None:
      if self.dispatch == 'all_to_all':
        raise ValueError(f"model.moe_dispatch='all_to_all' cannot run: {why}. "
                         "Use moe_dispatch='auto' or 'global'.")
      return None
    return ExpertParallelPlan(mesh, batch_axes, _axes(w_spec[2]))

  # -- forward ---------------------------------------------------------------

  def __call__(self, x):
    plan = self.expert_parallel_plan(x.shape)
    if plan is None:
      y, aux = self._global(x)
    else:
      y, aux = self._expert_parallel(x, plan)
    if self.num_shared_experts:
      with jax.named_scope('moe_shared'):
        shared = self.shared(x).astype(self.dtype)
        if self.shared_gated:
          g = jnp.einsum('btd,d->bt', x.astype(self.dtype),
                         self.shared_gate[...].astype(self.dtype))
          shared = shared * jax.nn.sigmoid(g.astype(jnp.float32))[..., None].astype(self.dtype)
        y = y + shared
    return y.astype(x.dtype), aux

  def _global(self, x):
    """Routing and experts over the global arrays (one sort over all assignments)."""
    b, t, d = x.shape
    n, e, k = b * t, self.num_experts, self.experts_per_token
    big_n = n * k
    xf = x.reshape(n, d)

    with jax.named_scope('moe_router'):
      logits, probs, weights, experts = self._route(xf, self.router[...],
                                                    self.selection_bias(),
                                                    self._router_bias().get('b'))
      # Assignment a = j * n + t (choice-major rank order, see the docstring).
      expert_ids = experts.T.reshape(big_n)                      # [N]
      combine = weights.T                                        # [k, n] f32
      _, counts, position = sort_by_expert(expert_ids, e)

    with jax.named_scope('moe_losses'):
      load = counts.astype(jnp.float32) / big_n                  # f_e, sums to 1
      mean_prob = jnp.mean(probs, axis=0)                        # P_e
      aux = {
          'moe_aux_loss': e * jnp.sum(load * mean_prob),
          'moe_router_z_loss': jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1))),
          'moe_expert_load': load,
      }

    with jax.named_scope('moe_experts'):
      w = self._expert_weights()
      # Each token repeated once per choice, in assignment order: [N, d].
      x_rep = jnp.broadcast_to(xf.astype(self.dtype)[None], (k, n, d)).reshape(big_n, d)
      if self.capacity_factor is not None:
        c = capacity(n, e, k, self.capacity_factor)
        keep = position < c
        rows = jnp.where(keep, expert_ids * c + position, e * c)    # e*c: dropped
        y_assign = self._padded_experts(w, x_rep, rows, e, c, None)
        combine = combine * keep.reshape(k, n)
      else:
        y_assign = self._dropless_experts(w, x_rep, expert_ids, e, self._impl())

    with jax.named_scope('moe_combine'):
      y = jnp.einsum('knd,kn->nd', y_assign.reshape(k, n, d).astype(jnp.float32),
                     combine)
    return y.astype(self.dtype).reshape(b, t, d), aux

  def _expert_parallel(self, x, plan: ExpertParallelPlan):
    """The all-to-all dispatch under `shard_map` over `plan.mesh`."""
    batch = plan.batch_axes
    mlp = plan.mlp_axes or None
    w = {name: getattr(self, name)[...].astype(self.dtype)
         for name in _EXPERT_WEIGHTS if hasattr(self, name)}
    w_specs = {}
    for name, axes in _EXPERT_WEIGHTS.items():
      if name in w:
        w_specs[name] = P(*[('expert' if a == 'experts' else mlp if a == 'mlp' else None)
                            for a in axes])
    x_spec = P(batch, None, None)
    aux_specs = {'moe_aux_loss': P(), 'moe_router_z_loss': P(), 'moe_expert_load': P()}
    router_bias = self._router_bias()
    local = jax.shard_map(
        functools.partial(self._dispatch_local, plan),
        mesh=plan.mesh, in_specs=(x_spec, P(), P(), w_specs, {k: P() for k in router_bias}),
        out_specs=(x_spec, aux_specs), check_vma=True)
    return local(x, self.router[...], self.selection_bias(), w, router_bias)

  def _router_bias(self):
    """{'b': the router bias [E]} with `moe_router_bias`, else {} (a pytree
    that shard_map passes whole)."""
    return {} if self.router_bias is None else {'b': self.router_bias[...]}

  def _dispatch_local(self, plan, x, router, bias, w, router_bias):
    """One device's part of the all-to-all dispatch (inside `shard_map`).

    x: [b_dev, t, d], this device's tokens; router: [d, E] and bias [E],
    whole; w: this
    device's E / S experts (S = the expert axis size), hidden dimension split
    over `plan.mlp_axes`; router_bias: `_router_bias()`, whole.
    """
    batch = plan.batch_axes
    s = plan.mesh.shape['expert']
    b, t, d = x.shape
    n, e, k = b * t, self.num_experts, self.experts_per_token
    e_dev = e // s
    big_n = n * k
    n_global = n * math.prod(plan.mesh.shape[a] for a in batch)
    xf = x.reshape(n, d)
    reduce = None
    if plan.mlp_axes:
      reduce = lambda h: lax.psum(h, plan.mlp_axes)

    with jax.named_scope('moe_router'):
      logits, probs, weights, experts = self._route(xf, router, bias, router_bias.get('b'))
      expert_ids = experts.T.reshape(big_n)                      # [N] local, choice-major
      combine = weights.T                                        # [k, n]
      _, counts, position = sort_by_expert(expert_ids, e)
      shard, local_expert = expert_ids // e_dev, expert_ids % e_dev

    with jax.named_scope('moe_losses'):
      # Global means: sums over this device's tokens, psum'd over the devices
      # that split the batch, so the values equal the global path's.
      load = lax.psum(counts.astype(jnp.float32), batch) / (n_global * k)
      mean_prob = lax.psum(jnp.sum(probs, axis=0), batch) / n_global
      lse = jax.nn.logsumexp(logits, axis=-1)
      aux = {
          'moe_aux_loss': e * jnp.sum(load * mean_prob),
          'moe_router_z_loss': lax.psum(jnp.sum(jnp.square(lse)), batch) / n_global,
          'moe_expert_load': load,
      }

    with jax.named_scope('moe_dispatch'):
      x_rep = jnp.broadcast_to(xf.astype(self.dtype)[None], (k, n, d)).reshape(big_n, d)
      if self.capacity_factor is None:
        # Worst case: all N assignments go to one shard. Rows reach a shard
        # in rank order; the receiver groups them by local expert.
        slots = big_n
        _, _, shard_position = sort_by_expert(shard, s)
        send_rows = shard * slots + shard_position
        keep = None
      else:
        c = capacity(n_global, e, k, self.capacity_factor)
        c_dev = min(c, n)     # a device holds at most n assignments per expert
        keep = self._global_position(experts, position, batch) < c
        slots = e_dev * c_dev
        # Kept assignments are a prefix of this device's rank order for each
        # expert, so their local position is < c_dev.
        send_rows = jnp.where(keep, shard * slots + local_expert * c_dev + position,
                              s * slots)                          # out of range: dropped
      send = jnp.zeros((s * slots, d), self.dtype).at[send_rows].set(x_rep, mode='drop')
      # [S destination shards, slots, d] -> [S source devices, slots, d].
      recv = lax.all_to_all(send.reshape(s, slots, d), 'expert', 0, 0, tiled=True)

    with jax.named_scope('moe_experts'):
      if self.capacity_factor is None:
        send_ids = jnp.full((s * slots,), e_dev, jnp.int32).at[send_rows].set(
            local_expert.astype(jnp.int32))
        recv_ids = lax.all_to_all(send_ids.reshape(s, slots), 'expert', 0, 0, tiled=True)
        y_recv = self._dropless_experts(
            w, recv.reshape(s * slots, d), recv_ids.reshape(s * slots), e_dev,
            self._impl(), block_rows=block_size(big_n, e_dev), reduce=reduce)
      else:
        # [S, E_dev, c_dev, d] -> one group of S * c_dev rows per local expert.
        xp = recv.reshape(s, e_dev, c_dev, d).transpose(1, 0, 2, 3)
        yp = self._batched_experts(w, xp.reshape(e_dev, s * c_dev, d), reduce=reduce)
        y_recv = yp.reshape(e_dev, s, c_dev, d).transpose(1, 0, 2, 3)
      y_back = lax.all_to_all(y_recv.reshape(s, slots, d), 'expert', 0, 0, tiled=True)
      y_assign = y_back.reshape(s * slots, d).at[send_rows].get(mode='fill', fill_value=0)
      if keep is not None:
        combine = combine * keep.reshape(k, n)

    with jax.named_scope('moe_combine'):
      y = jnp.einsum('knd,kn->nd', y_assign.reshape(k, n, d).astype(jnp.float32),
                     combine)
    return y.astype(self.dtype).reshape(b, t, d), aux

  def _global_position(self, experts, position, batch_axes):
    """Each local assignment's rank among all assignments to its expert in the
    global order (choice-major, then global token index), as the global path
    ranks them.

    experts: int [n, k] this device's choices; position: int [N], the rank
    among this device's assignments to the same expert. Devices hold
    consecutive token ranges in the order of `batch_axes`.
    """
    k, e = self.experts_per_token, self.num_experts
    ids = experts.T                                              # [k, n]
    per_choice = jnp.sum(jax.nn.one_hot(ids, e, dtype=jnp.int32), axis=1)   # [k, E]
    every = lax.all_gather(per_choice, batch_axes)               # [R, k, E]
    total = jnp.sum(every, axis=0)
    earlier_choices = jnp.cumsum(total, axis=0) - total          # all devices, choices < j
    earlier_devices = (jnp.cumsum(every, axis=0) - every)[lax.axis_index(batch_axes)]
    local_earlier_choices = jnp.cumsum(per_choice, axis=0) - per_choice
    offset = earlier_choices + earlier_devices - local_earlier_choices   # [k, E]
    choice = jnp.arange(k)[:, None]
    return (position.reshape(k, -1) + offset[choice, ids]).reshape(-1)
