#!/bin/bash
# ablax: training on a Cloud TPU VM pod slice, rendered by `python -m launch.cluster tpu`.
# Run from your workstation:  bash $script_name
#
# The same command runs on every worker of the slice (--worker=all); JAX
# finds the other hosts from the TPU metadata, and train.distributed calls
# jax.distributed.initialize(). The workdir must be shared by all workers
# (a gs:// bucket or a mounted file system) so every host writes its part of
# the checkpoints into one place.
set -euo pipefail
gcloud compute tpus tpu-vm ssh $tpu_name \
  --zone=$zone --project=$project --worker=all \
  --command=$remote_command
