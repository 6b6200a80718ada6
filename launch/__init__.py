"""Launching ablations: sweeps, comparison, local multi-process and cluster scripts.

- `launch.sweep`: `python -m launch.sweep` expands a sweep, validates every run,
  trains them one after another and skips finished ones.
- `launch.compare`: `python -m launch.compare DIR` tables a sweep's runs (per
  arm over seeds: intervals, paired differences) and draws their loss curves.
- `launch.scaling`: `python -m launch.scaling` plans and trains an isoFLOP
  ladder; `launch.fit`: `python -m launch.fit TABLE.csv` fits scaling laws.
- `launch.local`: `python -m launch.local` starts an N-process jax.distributed
  job on one machine.
- `launch.cluster`: `python -m launch.cluster` renders SLURM, TPU VM pod and
  XPK scripts from `launch/templates/`.

See docs/launch.md and docs/scaling.md.
"""
