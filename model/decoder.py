"""The decoder-only transformer, assembled from `config.model` flags alone.

`Decoder(cfg.model, rngs=nnx.Rngs(0))(tokens, segment_ids, positions)` returns
float32 logits [batch, seq, vocab] and a dict of auxiliary losses and
statistics (the MoE load-balancing and router z-losses and the expert load,
averaged over MoE layers; empty for dense models). The call is
`hidden_states` (the blocks) then `logits` (the head), which a loss may call
itself on slices of positions (`train.loss_chunk_size`).

A block is attention then MLP (or MoE), each a residual branch with the norm
placement of `model.norm_position`:
- `pre`: x + f(norm(x)) (GPT-2, LLaMA; Xiong et al. 2020), final norm before
  the head;
- `post`: norm(x + f(x)) (Vaswani et al. 2017, GPT-1, BERT); the last block's
  output is already normalised, so there is no final norm;
- `sandwich`: x + norm_out(f(norm_in(x))) (Gemma 2; Ding et al. 2021, "CogView"),
  final norm before the head.

Also here: token embeddings (tied to the head through `Embed.unembed`, as GPT-2
and Gemma, or a separate head), `embedding_scale` (x sqrt(d_model), Gemma),
additive learned/sinusoidal positions, `embedding_norm` (a norm on the
embedded input, Bloom), learned memory tokens (Burtsev et al.
2020, "Memory Transformer"; Darcet et al. 2023, "Registers") that are prepended
to the sequence and stripped before the head, final-logit soft-capping
(Gemma 2), and per-block rematerialisation.

Decoding runs the same code: `init_cache` gives each layer its own cache
(`model.kv_cache`), and `hidden_states(..., cache=, chunk=)` runs a prefill
(this forward, also filling the caches) or a step over the caches, returning
the updated caches (`train.sample`). Without a cache nothing changes.

Layer i uses the sliding window unless `global_layer_interval=k` makes it
global ((i + 1) % k == 0), and uses MoE when `num_experts > 0`,
i >= moe_first_dense_layers and (i + 1) % moe_layer_interval == 0.

Multi-token prediction (`model.mtp_depth`, model/mtp.py): the modules live
here and run only through `mtp_hidden_states` / `mtp_logits`, which the
training loss and `train.sample --speculative` (their drafts) call; the
plain call ignores them. `update_router_biases`
moves the MoE layers' aux-loss-free selection biases (train/step.py calls it
after the optimizer step).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from model import attention as attention_lib
from model import mla
from model import mlp as mlp_lib
from model import moe
from model import mtp as mtp_lib
from model import mup
from model import norms
from model import partitioning
from model import positions as positions_lib
from model import scan as scan_lib

REMAT_POLICIES = {
    # Keep only the block's inputs; recompute everything in the backward pass.
    'full': jax.checkpoint_policies.nothing_saveable,
    # Keep the outputs of the weight matmuls (projections, MLP); recompute the
    # cheap elementwise work and the attention scores (batched dots), which
    # are the memory-hungry part.
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def is_global_layer(cfg_model, layer_index: int) -> bool:
  """Whether layer `layer_index` attends without the sliding window."""
  if cfg_model.sliding_window is None:
    return True
  k = cfg_model.global_layer_interval
  return k is not None and (layer_index + 1) % k == 0


def is_moe_layer(cfg_model, layer_index: int) -> bool:
  """Whether layer `layer_index` uses the MoE layer instead of the dense MLP
  (MTP blocks count on from num_layers)."""
  if layer_index < cfg_model.get('moe_first_dense_layers', 0):
    return False
  return cfg_model.num_experts > 0 and (layer_index + 1) % cfg_model.moe_layer_interval == 0


class Embed(nnx.Module):
  """Token embedding [vocab, d_model]; `unembed` is the tied output head."""

  def __init__(self, cfg_model, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    self.embedding = nnx.Param(
        init(rngs.params(), (cfg_model.vocab_size, cfg_model.d_model),
             jnp.dtype(cfg_model.param_dtype)),
        logical_axes=('vocab', 'embed'))
    self.dtype = jnp.dtype(cfg_model.dtype)

  def __call__(self, tokens):
    """int [b, t] -> [b, t, d] in the compute dtype."""
    # Gather the FSDP-split `embed` dimension of the table before the lookup,
    # as for every other weight: a lookup into the split table would hand an
    # embed-split result to the batch-split residual stream.
    table = partitioning.constrain(self.embedding[...], ('vocab', None))
    return jnp.take(table, tokens, axis=0).astype(self.dtype)

  def unembed(self, x):
    """Logits against the embedding rows: [b, t, d] -> float32 [b, t, vocab]."""
    return jnp.einsum('btd,vd->btv', x.astype(self.dtype),
                      self.embedding[...].astype(self.dtype),
                      preferred_element_type=jnp.float32)


class Block(nnx.Module):
  """One transformer layer; (x, positions, segment_ids) -> (x, aux)."""

  def __init__(self, cfg_model, layer_index: int, *, rngs: nnx.Rngs):
    self.norm_position = cfg_model.norm_position
    self.num_memory_tokens = cfg_model.num_memory_tokens
    window = None if is_global_layer(cfg_model, layer_index) else cfg_model.sliding_window
    # The token mixer: attention, or a Gated DeltaNet where model.layer_pattern says L.
    mixer = mla.attention_class(cfg_model, layer_index)
    self.attn = mixer(cfg_model, sliding_window=window, rngs=rngs)
    self.is_moe = is_moe_layer(cfg_model, layer_index)
    if self.is_moe:
      self.mlp = moe.MoE(cfg_model, rngs=rngs)
    else:
      self.mlp = mlp_lib.MLP(cfg_model, rngs=rngs)
    self.attn_norm = norms.make_norm(cfg_model)
    self.mlp_norm = norms.make_norm(cfg_model)
    if self.norm_position == 'sandwich':
      self.attn_out_norm = norms.make_norm(cfg_model)
      self.mlp_out_norm = norms.make_norm(cfg_model)

  def _ffn(self, x):
    if self.is_moe:
      return self.mlp(x)
    return self.mlp(x), {}

  def init_cache(self, batch, length, streaming=None):
    """This layer's empty decoding cache (its attention's) for up to `length` tokens."""
    return self.attn.init_cache(batch, length, num_memory_tokens=self.num_memory_tokens,
                                streaming=streaming)

  def __call__(self, x, positions, segment_ids=None, *, cache=None, chunk=None):
    """(x, aux); with a cache (`model.kv_cache`), (x, aux, updated cache)."""
    def attn(y):
      if cache is None:
        return self.attn(y, positions, segment_ids, self.num_memory_tokens), None
      return self.attn(y, positions, segment_ids, self.num_memory_tokens,
                       cache=cache, chunk=chunk)

    dtype = x.dtype
    if self.norm_position == 'pre':
      with jax.named_scope('attention_block'):
        a, new_cache = attn(self.attn_norm(x))
        x = x + a.astype(dtype)
      with jax.named_scope('mlp_block'):
        y, aux = self._ffn(self.mlp_norm(x))
        x = x + y.astype(dtype)
    elif self.norm_position == 'post':
      with jax.named_scope('attention_block'):
        a, new_cache = attn(x)
        x = self.attn_norm(x + a.astype(dtype))
      with jax.named_scope('mlp_block'):
        y, aux = self._ffn(x)
        x = self.mlp_norm(x + y.astype(dtype))
    elif self.norm_position == 'sandwich':
      with jax.named_scope('attention_block'):
        a, new_cache = attn(self.attn_norm(x))
        x = x + self.attn_out_norm(a).astype(dtype)
      with jax.named_scope('mlp_block'):
        y, aux = self._ffn(self.mlp_norm(x))
        x = x + self.mlp_out_norm(y).astype(dtype)
    else:
      raise ValueError(f'model.norm_position={self.norm_position!r}: must be one '
                       'of pre, post, sandwich')
    if cache is None:
      return x, aux
    return x, aux, new_cache


def _call_block(block, x, positions, segment_ids):
  return block(x, positions, segment_ids)


def _call_mtp(module, x, emb, positions, segment_ids):
  return module(x, emb, positions, segment_ids)


class Decoder(nnx.Module):
  """tokens int [b, t] -> (logits float32 [b, t, vocab], aux dict)."""

  def __init__(self, cfg_model, *, rngs: nnx.Rngs):
    if cfg_model.remat not in ('none', *REMAT_POLICIES):
      raise ValueError(f'model.remat={cfg_model.remat!r}: must be one of none, '
                       f'{", ".join(REMAT_POLICIES)}')
    d = cfg_model.d_model
    self.d_model = d
    self.dtype = jnp.dtype(cfg_model.dtype)
    self.position = cfg_model.position
    self.embedding_scale = cfg_model.embedding_scale
    self.num_memory_tokens = cfg_model.num_memory_tokens
    self.final_logit_softcap = cfg_model.final_logit_softcap
    self.remat = cfg_model.remat
    self.tie_embeddings = cfg_model.tie_embeddings
    self.norm_position = cfg_model.norm_position
    self.input_mult = mup.input_mult(cfg_model)       # 1.0 without muP
    self.output_mult = mup.output_mult(cfg_model)
    pdt = jnp.dtype(cfg_model.param_dtype)

    self.embed = Embed(cfg_model, rngs=rngs)
    self.embedding_norm = cfg_model.get('embedding_norm', False)
    if self.embedding_norm:
      self.embed_norm = norms.make_norm(cfg_model)
    if self.position == 'learned':
      self.position_embed = positions_lib.LearnedPositions(cfg_model, rngs=rngs)
    if self.num_memory_tokens:
      self.memory = nnx.Param(
          nnx.initializers.normal(0.02)(rngs.params(), (self.num_memory_tokens, d), pdt),
          logical_axes=(None, 'embed'))
    blocks = [Block(cfg_model, i, rngs=rngs) for i in range(cfg_model.num_layers)]
    self.num_layers = cfg_model.num_layers
    # model.scan_layers: the blocks after an unrolled prefix, stacked per
    # position in their repeating group (`model.scan`); built from the
    # unrolled blocks, so the same seed gives the same weights.
    self.scan_prefix, self.scan_period = len(blocks), None
    if cfg_model.get('scan_layers', False):
      self.scan_prefix, self.scan_period = scan_lib.find_layout(
          [scan_lib.block_key(b) for b in blocks])
    self.blocks = nnx.List(blocks[:self.scan_prefix])
    if self.scan_period is not None:
      p, start = self.scan_period, self.scan_prefix
      self.scan_blocks = nnx.List([scan_lib.stack_blocks(blocks[start + j::p])
                                   for j in range(p)])
    if self.norm_position != 'post':
      self.final_norm = norms.make_norm(cfg_model)
    if not self.tie_embeddings:
      # Small, like the tied embedding: near-uniform predictions at step 0
      # (loss ln(vocab)) whether or not the embeddings are tied.
      self.head = nnx.Param(
          nnx.initializers.normal(0.02)(rngs.params(), (d, cfg_model.vocab_size), pdt),
          logical_axes=('embed', 'vocab'))
    self.mtp_depth = cfg_model.get('mtp_depth', 0)
    if self.mtp_depth:
      if self.num_memory_tokens:
        raise ValueError('model.mtp_depth with model.num_memory_tokens: the MTP '
                         'modules take no memory tokens')
      # Built last, so the main parameters initialise as without them.
      # Module k's block is built as layer num_layers + k - 1 would be.
      self.mtp = nnx.List([
          mtp_lib.MTPModule(cfg_model, Block(cfg_model, cfg_model.num_layers + k, rngs=rngs),
                            rngs=rngs)
          for k in range(self.mtp_depth)])

  def embed_tokens(self, tokens, positions):
    """Token embeddings plus additive positions, [b, t, d] in the compute dtype."""
    x = self.embed(tokens)
    if self.embedding_scale:
      # Gemma rounds the normaliser to the compute dtype before multiplying.
      x = x * jnp.asarray(math.sqrt(self.d_model), self.dtype)
    if self.input_mult != 1.0:
      x = x * jnp.asarray(self.input_mult, self.dtype)
    if self.position == 'learned':
      x = x + self.position_embed(positions).astype(self.dtype)
    elif self.position == 'sinusoidal':
      x = x + positions_lib.sinusoidal(positions, self.d_model).astype(self.dtype)
    if self.embedding_norm:
      x = self.embed_norm(x)       # Bloom's word_embeddings_layernorm
    return x

  def logits(self, x, final_norm=None):
    """The head: final norm, output projection (tied or not), muP's readout
    multiplier and the soft-cap. Hidden states [b, t, d] (from
    `hidden_states`) -> float32 logits [b, t, vocab]. `final_norm`: another
    norm in place of the decoder's (an MTP module's).

    Position-wise, so a chunked loss (`train.loss_chunk_size`) applies it to a
    slice of positions at a time and never holds the whole [b, t, vocab].
    """
    if final_norm is None and self.norm_position != 'post':
      final_norm = self.final_norm
    if final_norm is not None:
      x = final_norm(x)
    if self.tie_embeddings:
      logits = self.embed.unembed(x)
    else:
      logits = jnp.einsum('btd,dv->btv', x.astype(self.dtype),
                          self.head[...].astype(self.dtype),
                          preferred_element_type=jnp.float32)
    if self.output_mult != 1.0:
      logits = logits * self.output_mult      # muP's readout multiplier
    if self.final_logit_softcap is not None:
      cap = self.final_logit_softcap
      logits = cap * jnp.tanh(logits / cap)
    return partitioning.constrain(logits, ('batch', 'sequence', 'vocab'))

  def __call__(self, tokens, segment_ids=None, positions=None, *, cache=None, chunk=None):
    """(logits, aux); with a cache, (logits, aux, updated cache): see `hidden_states`."""
    out = self.hidden_states(tokens, segment_ids, positions, cache=cache, chunk=chunk)
    with jax.named_scope('head'):
      logits = self.logits(out[0])
    return (logits,) + out[1:]

  def init_cache(self, batch, length, streaming=None):
    """Empty decoding caches, one per layer, each chosen by its layer, for up to
    `length` tokens per sequence; `streaming` a `model.kv_cache.Streaming`."""
    return tuple(block.init_cache(batch, length, streaming) for block in self.layers())

  def layers(self) -> list:
    """Every block in layer order; scanned blocks sliced out of their stacks."""
    if self.scan_period is None:
      return list(self.blocks)
    stacked = [scan_lib.split_stacked(s) for s in self.scan_blocks]
    groups = (self.num_layers - self.scan_prefix) // self.scan_period
    return list(self.blocks) + [scan_lib.slice_layer(graphdef, state, g)
                                for g in range(groups) for graphdef, state in stacked]

  def hidden_states(self, tokens, segment_ids=None, positions=None, *, cache=None,
                    chunk=None):
    """The blocks without the head: (x [b, t, d] before the final norm, aux).

    Memory tokens are already stripped; `logits(x)` finishes the forward pass.

    Decoding: `cache` (from `init_cache`) and `chunk` (a `model.kv_cache.Chunk`
    naming each column's token index) make the call cached; it returns the
    updated cache third. The prefill chunk is run as a training forward (the
    memory tokens prepended, attention over the chunk itself, `segment_ids`
    0 on padding) that also fills the cache; a later chunk (one new token per
    row) attends over the cache and gets no memory tokens (they are cached).
    """
    b, t = tokens.shape
    positions = _default_positions(tokens, segment_ids, positions)
    with jax.named_scope('embed'):
      x = self.embed_tokens(tokens, positions)

    m = self.num_memory_tokens if cache is None or chunk.prefill else 0
    if m:
      # Memory tokens lead the attention sequence. Their rotary position is 0
      # (no rotation); their segment id is irrelevant to the mask (memory keys
      # are visible to all), so they copy the first token's to keep ids sorted.
      memory = jnp.broadcast_to(self.memory[...].astype(self.dtype), (b, m, self.d_model))
      x = jnp.concatenate([memory, x], axis=1)
      positions = jnp.concatenate([jnp.zeros((b, m), positions.dtype), positions], axis=1)
      if segment_ids is not None:
        segment_ids = jnp.concatenate(
            [jnp.broadcast_to(segment_ids[:, :1], (b, m)), segment_ids], axis=1)
    # The residual stream is split by batch, and by sequence under context
    # parallelism (see `model.partitioning`, `model.context_parallel`).
    residual_axes = ('batch', 'sequence', 'embed')
    x = partitioning.constrain(x, residual_axes)

    call = _call_block
    if self.remat != 'none' and cache is None:
      call = nnx.remat(_call_block, policy=REMAT_POLICIES[self.remat])
    moe_aux = []
    new_cache = []
    scanned = self.scan_period is not None
    # With a cache (decoding) the scanned blocks run unrolled, one slice each.
    blocks = self.layers() if scanned and cache is not None else self.blocks
    for i, block in enumerate(blocks):
      with jax.named_scope(f'layer_{i}'):
        if cache is None:
          x, aux = call(block, x, positions, segment_ids)
        else:
          x, aux, layer_cache = block(x, positions, segment_ids, cache=cache[i], chunk=chunk)
          new_cache.append(layer_cache)
      x = partitioning.constrain(x, residual_axes)
      if aux:
        moe_aux.append(aux)

    # Per-layer loads in layer order (the bias update's `moe_layer_loads`):
    # the unrolled blocks', then a scanned group's [groups, E] per period slot.
    loads = [(i, a['moe_expert_load']) for i, a in
             zip([i for i, b in enumerate(blocks) if b.is_moe], moe_aux)]
    count = len(moe_aux)
    if scanned and cache is None:
      x, stacked_aux = self._scan(x, positions, segment_ids, residual_axes)
      for j, a in enumerate(stacked_aux):
        if a:
          groups = (self.num_layers - self.scan_prefix) // self.scan_period
          moe_aux.append({key: v.sum(0) for key, v in a.items()})
          count += groups
          loads += [(self.scan_prefix + g * self.scan_period + j, a['moe_expert_load'][g])
                    for g in range(groups)]
    # Each MoE statistic is averaged over the MoE layers.
    aux = _moe_aux(moe_aux, count, [load for _, load in sorted(loads, key=lambda p: p[0])])
    if cache is None:
      return x[:, m:], aux
    return x[:, m:], aux, tuple(new_cache)

  # -- multi-token prediction (the loss; speculative drafts) ----------------

  def mtp_hidden_states(self, x, tokens, segment_ids=None, positions=None):
    """The MTP modules on the main hidden states (model/mtp.py).

    x: [b, t, d] from `hidden_states`; tokens: the same int [b, t] inputs.
    Returns ([h^1, ..., h^D] each [b, t, d], aux of the MTP blocks' MoE
    layers, averaged as in `hidden_states`). Position i of h^k predicts the
    input token i + k + 1 through `mtp_logits(k, h^k)`; positions with
    i + k >= t see a 0 token in place of x_{i+k} and are for the loss to mask.
    """
    positions = _default_positions(tokens, segment_ids, positions)
    call = _call_mtp
    if self.remat != 'none':
      call = nnx.remat(_call_mtp, policy=REMAT_POLICIES[self.remat])
    hidden, moe_aux = [], []
    for k, module in enumerate(self.mtp, start=1):
      with jax.named_scope(f'mtp_{k}'):
        emb = self.embed_tokens(mtp_lib.shift_left(tokens, k), positions)
        x, aux = call(module, x, emb, positions, segment_ids)
        x = partitioning.constrain(x, ('batch', None, 'embed'))
      hidden.append(x)
      if aux:
        moe_aux.append(aux)
    return hidden, _moe_aux(moe_aux)

  def mtp_logits(self, k: int, h):
    """Depth k's (1..D) float32 logits [b, t, vocab] from h^k: its own norm,
    then the decoder's shared head."""
    return self.logits(h, final_norm=getattr(self.mtp[k - 1], 'out_norm', None))

  # -- aux-loss-free balancing ---------------------------------------------

  def moe_layers(self):
    """The MoE layers in the order of aux['moe_layer_loads']: the blocks'
    in layer order (a scanned one sliced out of its stack: a copy, to read),
    then the MTP blocks'."""
    blocks = self.layers() + [module.block for module in getattr(self, 'mtp', [])]
    return [block.mlp for block in blocks if block.is_moe]

  def update_router_biases(self, loads, rate: float):
    """Moves every MoE layer's selection bias by its own load (`MoE.update_bias`).

    loads: [L, E], aux['moe_layer_loads'] of the blocks, optionally followed
    by the MTP blocks'; L may stop after the main blocks (then the MTP
    blocks' biases stay). A scanned slot's stacked bias [groups, E] moves
    row by row, each group's layer by its own load, as unrolled.
    """
    # Row of loads of each main MoE layer, in layer order.
    main = [i for i, block in enumerate(self.layers()) if block.is_moe]
    row = {layer: r for r, layer in enumerate(main)}
    for i, block in enumerate(self.blocks):
      if block.is_moe and row[i] < len(loads):
        block.mlp.update_bias(loads[row[i]], rate)
    if self.scan_period is not None:
      groups = (self.num_layers - self.scan_prefix) // self.scan_period
      for j, stacked in enumerate(self.scan_blocks):
        if not stacked.is_moe:
          continue
        rows = [row[self.scan_prefix + g * self.scan_period + j] for g in range(groups)]
        if rows[-1] >= len(loads):
          continue
        mlp = stacked.mlp
        if not hasattr(mlp, 'bias'):
          mlp.update_bias(loads[rows[0]], rate)    # raises: no selection bias
        load = loads[jnp.asarray(rows)].astype(jnp.float32)      # [groups, E]
        # MoE.update_bias per row: bias += rate * sign(mean load - load).
        mlp.bias[...] = mlp.bias[...] + rate * jnp.sign(
            jnp.mean(load, axis=-1, keepdims=True) - load)
    mtp = [module.block.mlp for module in getattr(self, 'mtp', []) if module.block.is_moe]
    for r, layer in enumerate(mtp, start=len(main)):
      if r < len(loads):
        layer.update_bias(loads[r], rate)

  def _scan(self, x, positions, segment_ids, residual_axes):
    """The scanned blocks: one `jax.lax.scan` over the groups, each step the
    `scan_period` blocks of a group (rematerialised as `model.remat` says).
    Returns (x, per group position: its aux dict with a leading group axis)."""
    stacked = [scan_lib.split_stacked(s) for s in self.scan_blocks]
    graphdefs = [g for g, _ in stacked]

    def body(x, states):
      auxes = []
      for j, (graphdef, state) in enumerate(zip(graphdefs, states)):
        block = scan_lib.merge_layer(graphdef, state)
        with jax.named_scope(f'scan_{j}'):
          x, aux = block(x, positions, segment_ids)
        x = partitioning.constrain(x, residual_axes)
        auxes.append(aux)
      return x, auxes

    if self.remat != 'none':
      body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
    return jax.lax.scan(body, x, [s for _, s in stacked])

def _default_positions(tokens, segment_ids, positions):
  """0, 1, ... per row, or per document with `segment_ids`, unless given."""
  if positions is not None:
    return positions
  b, t = tokens.shape
  if segment_ids is None:
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return positions_lib.segment_positions(segment_ids)


def _moe_aux(moe_aux: list[dict], count: int | None = None, loads=None) -> dict:
  """Each MoE statistic averaged over the `count` MoE layers (default: one
  per entry; a scanned group's entry sums its layers), plus every layer's own
  load [L, E] in layer order (`moe_layer_loads`, for the bias update; default:
  each entry's `moe_expert_load`)."""
  if not moe_aux:
    return {}
  count = len(moe_aux) if count is None else count
  aux = {key: sum(a[key] for a in moe_aux) / count for key in moe_aux[0]}
  if loads is None:
    loads = [a['moe_expert_load'] for a in moe_aux]
  aux['moe_layer_loads'] = jnp.stack(loads)
  return aux
