"""The jit-sharded training loop: `python -m train --config ... --workdir DIR`.

- `loop.train_and_evaluate(cfg, workdir)`: the loop (resume, eval, checkpoints,
  metrics, SIGTERM, NaN stop).
- `step`: the train state, `lm_loss`, `make_train_step` / `make_eval_step`
  (pluggable loss, gradient accumulation, explicit shardings, donated state),
  `token_lse_and_target` (per-token log-prob terms, chunked over positions
  with `train.loss_chunk_size`).
- `optim.make_optimizer(cfg.train, cfg.model)`: clipping, the parameter-group
  table and the update rule of `train.optimizer` (adamw, lion, adafactor, sgd,
  muon, schedule_free_adamw; muP's learning rates), and the schedule.
- `coord_check`: the muP coordinate check (`python -m train.coord_check`).
- `mesh.make_mesh(cfg.mesh)` and `sharding.RULES`: the device mesh and the
  logical-to-mesh axis table.
- `checkpoint`: orbax checkpoints, `restore_params`, `config.json`.
- `metrics`: TensorBoard event files, console, MFU.
- `distributed.maybe_initialize`: multi-process start-up.

See docs/training.md.
"""
