"""Every field of the ablax config, with defaults.

Presets (`configs/llama.py`, `configs/gpt2.py`, ...) start from `get_config()`
here and flip the flags that make their family. Field names are fixed by the
user reference (`docs/reference.md`); `configs.validate` refuses bad values.

    python -m train --config configs/base.py --workdir /tmp/ablax_base
"""

import ml_collections


def model_config() -> ml_collections.ConfigDict:
  """The decoder's fields; layers see only this part of the config."""
  m = ml_collections.ConfigDict()
  # Shape.
  m.vocab_size = 320             # bytes tokenizer: 256 bytes + BOS + EOS, rounded up
  m.d_model = 64
  m.num_layers = 2
  m.num_heads = 4
  m.num_kv_heads = 4
  m.head_dim = ml_collections.FieldReference(None, field_type=int)
  m.d_ff = 256
  m.max_seq_len = 128
  m.tie_embeddings = True
  # Norms.
  m.norm_type = 'rmsnorm'        # rmsnorm | layernorm
  m.norm_position = 'pre'        # pre | post | sandwich
  m.norm_eps = 1e-6
  # Positions.
  m.position = 'rope'            # rope | alibi | learned | sinusoidal | none
  m.rope_theta = 10000.0
  # None, or {type: linear | ntk | yarn | llama3, factor, original_max_seq_len, ...}.
  m.rope_scaling = ml_collections.FieldReference(None, field_type=dict)
  # Share of each head's dims that RoPE rotates (partial rotary, as GPT-NeoX
  # and Qwen3-Next's 0.25): the first int(head_dim * rope_fraction) features
  # (an even count) rotate with the frequencies of that width, the rest pass
  # through. 1.0 = the whole head. Standard and differential attention.
  m.rope_fraction = 1.0
  # MLP.
  m.mlp_activation = 'silu'      # silu | gelu | gelu_tanh | relu | clamped_swiglu
  m.mlp_gated = True
  # --- Clamped SwiGLU (issue 17, GPT-OSS; docs/moe.md#gpt-oss-experts-and-router) ---
  # mlp_activation='clamped_swiglu' (needs mlp_gated=True), in the dense MLP
  # and the experts alike: g = min(x W_gate, limit), u = clip(x W_up, -limit,
  # limit), h = (u + 1) * g * sigmoid(alpha g). Used only with that activation
  # (other values of these two are refused with any other activation).
  m.mlp_swiglu_alpha = 1.702
  m.mlp_swiglu_limit = 7.0
  # --- end clamped SwiGLU ---
  # Linear layers.
  m.use_bias = False
  m.embedding_scale = False
  # A norm (model.norm_type) on the embedded input, before the first block
  # (Bloom's word_embeddings_layernorm).
  m.embedding_norm = False
  m.attn_scale = ml_collections.FieldReference(None, field_type=float)
  # Stability.
  m.qk_norm = False
  m.attn_logit_softcap = ml_collections.FieldReference(None, field_type=float)
  m.final_logit_softcap = ml_collections.FieldReference(None, field_type=float)
  # Attention.
  m.sliding_window = ml_collections.FieldReference(None, field_type=int)
  m.global_layer_interval = ml_collections.FieldReference(None, field_type=int)
  m.num_memory_tokens = 0
  m.attention_impl = 'auto'      # auto | xla | pallas | cudnn
  # --- Attention variants (issue 17; docs/attention.md) ---
  # Output gate o * sigmoid(x W_g) before the output projection (Qiu et al.
  # 2025): none | headwise (one gate per head) | elementwise (per channel).
  m.attention_gate = 'none'
  # One learned logit per head in every softmax denominator (GPT-OSS); XLA and
  # Pallas paths (attention_impl=cudnn is refused with it).
  m.attention_sinks = False
  # --- end attention variants ---
  # --- Multi-head latent attention (issue 16; docs/attention.md, model/mla.py) ---
  # standard: MHA/GQA/MQA by num_kv_heads and head_dim. mla: DeepSeek-V2/V3's
  # latent attention; keys and values are up-projected per head from one
  # normed latent of mla_kv_lora_rank numbers, RoPE acts on a separate
  # mla_qk_rope_head_dim part whose key all heads share, and the head dims come
  # from the mla_* fields (num_kv_heads must equal num_heads, head_dim None).
  # The defaults below are a tiny model's; DeepSeek-V3 uses 1536, 512, 128, 64, 128.
  # differential (issue 17; model/differential.py): Differential Transformer
  # attention; the num_heads (even) heads pair into num_heads/2 heads whose two
  # softmax maps are subtracted with a learned lambda (lambda_init by layer),
  # over values of 2 head_dim; same projections as standard plus 4 head_dim.
  m.attention_type = 'standard'  # standard | mla | differential
  m.mla_q_lora_rank = 0          # query latent rank; 0 = queries straight from x
  m.mla_kv_lora_rank = 32        # the key/value latent (what the cache stores)
  m.mla_qk_nope_head_dim = 16    # per-head q/k part without rope
  m.mla_qk_rope_head_dim = 8     # per-head q part and shared k part with rope
  m.mla_v_head_dim = 16          # per-head value dim
  # --- end multi-head latent attention ---
  # --- Linear-attention hybrids (issue 17; docs/attention.md, model/gdn.py) ---
  # A string of A (attention, every attention flag above) and L (Gated
  # DeltaNet) letters repeated over the depth: layer i is
  # layer_pattern[i % len]. '' or 'A': all attention; 'LLLA': Qwen3-Next's
  # three linear layers per attention layer.
  m.layer_pattern = ''
  # Gated DeltaNet (Yang et al. 2024): heads (None: num_heads), q/k head dim
  # (None: d_model // heads), value head dim (None: the q/k head dim) and the
  # width of the causal depthwise convolution on q/k/v (Qwen3-Next: 4).
  m.gdn_num_heads = ml_collections.FieldReference(None, field_type=int)
  m.gdn_head_dim = ml_collections.FieldReference(None, field_type=int)
  m.gdn_v_head_dim = ml_collections.FieldReference(None, field_type=int)
  # Value heads (None: gdn_num_heads), a multiple of the q/k heads: each q/k
  # head serves gdn_num_v_heads / gdn_num_heads consecutive value heads, each
  # with its own state, decay, write strength and output gate (Qwen3-Next: 2x).
  m.gdn_num_v_heads = ml_collections.FieldReference(None, field_type=int)
  m.gdn_conv_width = 4
  # --- end linear-attention hybrids ---
  # Pallas block sizes; None picks per backend and head_dim.
  m.attention_block_q = ml_collections.FieldReference(None, field_type=int)
  m.attention_block_kv = ml_collections.FieldReference(None, field_type=int)
  # MoE.
  m.num_experts = 0
  m.experts_per_token = 2
  m.num_shared_experts = 0
  m.moe_d_ff = ml_collections.FieldReference(None, field_type=int)
  m.moe_layer_interval = 1
  m.moe_capacity_factor = ml_collections.FieldReference(None, field_type=float)
  m.moe_renormalize = True
  # The shared experts' output times sigmoid(x . w), w a learned [d_model]
  # vector per MoE layer (Qwen2-MoE, Qwen3-Next's shared_expert_gate).
  # Needs num_shared_experts > 0.
  m.moe_shared_expert_gate = False
  # How tokens reach experts on a mesh: auto | global | all_to_all. global: one
  # sort over the whole batch, collectives left to XLA (gathers every token);
  # all_to_all: expert parallelism, each device routes its own tokens and
  # exchanges them over the `expert` mesh axis (model/moe.py); auto: all_to_all
  # when mesh.expert > 1 divides num_experts, else global.
  m.moe_dispatch = 'auto'
  # Context parallelism (mesh.context > 1 splits the sequence;
  # model/context_parallel.py): allgather | ring | ring_contiguous. allgather:
  # each device gathers every K/V block; ring: K/V blocks travel round the
  # context axis, causal sequences in the load-balanced (zigzag) order, each
  # device holding chunks d and 2c-1-d; ring_contiguous: the plain order.
  m.context_parallel = 'allgather'
  # --- DeepSeek-V3 routing (issue 16; docs/moe.md) ---
  # Router scores: softmax over the experts (Switch, Mixtral) or an independent
  # sigmoid per expert (DeepSeek-V3). The top-k weights are renormalised to sum
  # to 1 when moe_renormalize is set (DeepSeek-V3 does, for sigmoid).
  m.moe_router = 'softmax'       # softmax | sigmoid
  m.moe_routed_scaling = 1.0     # multiplies the routed experts' weights (2.5 in DeepSeek-V3)
  # Group-limited routing: the experts split into moe_num_groups equal groups;
  # a group scores the sum of its two best expert scores, the moe_topk_groups
  # best groups are kept and the top experts_per_token are chosen among their
  # experts (DeepSeek-V3: 8 groups, 4 kept). 1 and 1 = plain top-k.
  m.moe_num_groups = 1
  m.moe_topk_groups = 1
  # The first k layers use the dense MLP; the others follow moe_layer_interval
  # (DeepSeek-V3: 3).
  m.moe_first_dense_layers = 0
  # --- end DeepSeek-V3 routing ---
  # --- Router bias (issue 17, GPT-OSS; docs/moe.md#gpt-oss-experts-and-router) ---
  # A learned bias [E] added to the router logits (u = x W_r + b) before the
  # softmax/sigmoid and the top-k; trained like the other biases. Expert
  # biases are model.use_bias (which also puts biases on the projections).
  m.moe_router_bias = False
  # --- end router bias ---
  # --- Multi-token prediction (issue 16; docs/moe.md#multi-token-prediction) ---
  # D > 0 adds D sequential modules after the decoder: module k joins the
  # previous depth's hidden state with the embedding of token t+k, runs one
  # block and predicts token t+k+1 with the shared head (DeepSeek-V3, Gloeckle
  # et al. 2024). Training only: the plain forward and sampling ignore them;
  # train.mtp_loss_weight weighs their loss.
  m.mtp_depth = 0
  # --- end multi-token prediction ---
  # Numerics.
  m.dtype = 'float32'
  m.param_dtype = 'float32'
  m.remat = 'none'               # none | full | dots
  # Stack the blocks that repeat on a leading `layers` axis and run them with
  # one scan (model/scan.py): one compiled block per repeating group instead
  # of num_layers; blocks that do not repeat stay unrolled. Same weights and
  # losses as unrolled (a performance switch); checkpoints of either layout
  # load into the other. train.coord_check and train.optimizer='adafactor'
  # run unrolled.
  m.scan_layers = True
  # --- muP (Yang et al. 2022, Tensor Programs V; docs/optimizers.md) ---
  # None: standard parametrisation. An int: the d_model the hyperparameters
  # were tuned at; m = d_model / mup_base_width scales the hidden init std
  # (1/sqrt(m)), the logits (mup_output_mult / m), the attention scale
  # (1/head_dim form) and the hidden matrices' Adam LR (1/m). At m = 1 the
  # model and its updates equal the standard ones.
  m.mup_base_width = ml_collections.FieldReference(None, field_type=int)
  m.mup_input_mult = 1.0         # multiplies the embedding output (muP only)
  m.mup_output_mult = 1.0        # logits *= mup_output_mult / m (muP only)
  return m


def get_config(arg=None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.model = model_config()

  c.train = ml_collections.ConfigDict()
  c.train.seed = 0
  c.train.steps = 200
  c.train.global_batch_size = 8
  c.train.seq_len = 128
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 20
  c.train.lr_schedule = 'cosine'  # cosine | linear | constant | wsd
  c.train.min_lr_ratio = 0.1
  c.train.decay_fraction = 0.2    # wsd: share of steps spent decaying
  c.train.weight_decay = 0.1
  c.train.adam_b1 = 0.9
  c.train.adam_b2 = 0.95
  c.train.grad_clip_norm = 1.0
  c.train.grad_accum_steps = 1
  c.train.z_loss_weight = 0.0
  c.train.moe_aux_loss_weight = 0.01
  c.train.moe_router_z_loss_weight = 0.001
  # Auxiliary-loss-free load balancing (Wang et al. 2024; DeepSeek-V3): after
  # each optimizer step every MoE layer's selection bias moves by this rate x
  # sign(mean load - load of the expert). 0 = off (the bias stays 0). Needs
  # model.moe_router='sigmoid' (softmax layers have no bias). The bias
  # steers which experts are chosen, not the weights they are combined with;
  # it is saved in checkpoints (the train state's model_state).
  c.train.moe_bias_update_rate = 0.0
  # λ: the mean of the model.mtp_depth multi-token-prediction cross-entropies,
  # times λ, is added to the loss (train/mtp_loss, train/mtp_loss_<k>).
  c.train.mtp_loss_weight = 0.3
  c.train.log_every_steps = 10
  c.train.eval_every_steps = 50
  c.train.eval_steps = 4
  c.train.checkpoint_every_steps = 50
  c.train.keep_checkpoints = 3
  # A workdir (its newest checkpoint) or DIR/checkpoints/STEP to start from:
  # only the parameters are loaded (the optimizer and step start fresh, e.g.
  # SFT from a pretraining run). '' = random init. Ignored on resume.
  c.train.init_checkpoint = ''
  # --- Chunked loss (issue 18; docs/training.md) ---
  # None: the head makes the whole float32 [batch, seq, vocab] logits. k: the
  # head and cross-entropy (z-loss, DPO log-probs) run k positions of every
  # row at a time in a rematerialised scan, so memory holds [batch, k, vocab].
  # A performance switch: same loss and gradients.
  c.train.loss_chunk_size = ml_collections.FieldReference(None, field_type=int)
  # --- end chunked loss ---
  # --- Divergence handling (issue 10; docs/training.md) ---
  # A non-finite loss, gradient or parameter: 'stop' (exit 3, naming the
  # newest finite checkpoint) or 'rollback' (reload the newest finite
  # checkpoint, skip the batches since, go on; PaLM, Chowdhery et al. 2022).
  c.train.on_divergence = 'stop'  # stop | rollback
  c.train.rollback_lr_scale = 1.0  # each rollback multiplies the learning rate by this
  c.train.max_rollbacks = 3        # then stop as with 'stop'
  # k: a loss above the running mean of the last 100 losses by k running
  # standard deviations is a spike (`train/spikes`); with on_divergence=
  # 'rollback' it also rolls back. None = no spike detection.
  c.train.spike_threshold = ml_collections.FieldReference(None, field_type=float)
  # --- end divergence handling ---
  # --- Optimizers (train/optim.py, docs/optimizers.md) ---
  # adamw | lion | adafactor | sgd | muon | schedule_free_adamw
  c.train.optimizer = 'adamw'
  # Betas; None: Adam-family rules use adam_b1/adam_b2 above, lion its paper's
  # 0.9/0.99, adafactor no momentum. When set, b1/b2 win over adam_b1/adam_b2.
  c.train.b1 = ml_collections.FieldReference(None, field_type=float)
  c.train.b2 = ml_collections.FieldReference(None, field_type=float)
  c.train.eps = 1e-8              # Adam's epsilon (adamw, muon's AdamW, schedule-free)
  # sgd and muon momentum; None: 0.9 for sgd, 0.95 for muon.
  c.train.momentum = ml_collections.FieldReference(None, field_type=float)
  # Nesterov momentum; None: off for sgd, on for muon.
  c.train.nesterov = ml_collections.FieldReference(None, field_type=bool)
  # muon: peak LR of the AdamW groups (embeddings, head, norms, biases,
  # router); None = train.learning_rate.
  c.train.muon_adam_lr = ml_collections.FieldReference(None, field_type=float)
  # muon: update scaling; moonlight = 0.2 sqrt(max(fan_in, fan_out)) (AdamW's
  # LR and decay carry over), spectral = sqrt(max(1, fan_out / fan_in)).
  c.train.muon_scale = 'moonlight'

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.expert = 1
  c.mesh.context = 1             # splits the sequence (context parallelism)

  c.data = ml_collections.ConfigDict()
  # builtin | text | jsonl | arrayrecord | synthetic | sft | tokens | parquet
  c.data.source = 'builtin'
  c.data.train_files = ''
  c.data.eval_files = ''
  c.data.text_field = 'text'
  c.data.tokenizer = 'bytes'      # bytes | sentencepiece:PATH | hf:PATH (tokenizer.json or its folder)
  c.data.packing = True
  c.data.shuffle_seed = 0
  c.data.worker_count = 0
  c.data.skip_bad_lines = False   # jsonl, sft, parquet: skip malformed rows with a warning
  # --- Corpora and mixtures (docs/data.md). ---
  # 'name:path:weight,...': documents drawn from several sources in proportion
  # to the weights; a path is a data.prepare folder or a glob (read by its
  # extension). A config file may give a list of dicts {name, path, weight}
  # (replace the field: c.data.mixture = [...]). '' = the single data.source.
  # With a mixture, data.train_files and data.eval_files stay empty.
  c.data.mixture = ''

  c.eval = ml_collections.ConfigDict()
  # Evaluation tasks run with every eval (train.eval_every_steps) and by
  # `train.evaluate --tasks`: comma-separated built-ins (next_line, copy[@N],
  # passkey@N) and NAME:PATH task files (JSONL); '' = none (docs/evaluation.md).
  c.eval.tasks = ''
  c.eval.task_limit = 1000        # examples per task (the first ones); 0 = all

  c.dpo = ml_collections.ConfigDict()
  c.dpo.init_checkpoint = ''      # align: the pretraining workdir (required)
  c.dpo.beta = 0.1
  # sigmoid (DPO) | ipo | hinge | robust | rpo | simpo | orpo (docs/dpo.md);
  # simpo and orpo are reference-free.
  c.dpo.loss = 'sigmoid'
  # ε: conservative DPO for sigmoid and rpo, the label-flip rate for robust.
  c.dpo.label_smoothing = 0.0
  c.dpo.nll_weight = 1.0          # α of the chosen token-mean NLL in rpo and orpo
  c.dpo.simpo_gamma = 0.5         # γ, the target reward margin of simpo
  c.dpo.reference_free = False
  # Score the pairs with the reference once before training (saved in
  # DIR/reference_logps.npz) instead of in every step: one model on the devices.
  c.dpo.precompute_reference = False
  c.dpo.train_files = 'builtin'
  c.dpo.eval_files = 'builtin'
  c.dpo.max_prompt_len = 64
  c.dpo.max_len = 128
  c.dpo.skip_bad_lines = False    # True: skip malformed JSONL lines and log the count
  return c
