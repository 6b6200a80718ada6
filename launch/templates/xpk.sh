#!/bin/bash
# ablax: training on GKE with XPK, rendered by `python -m launch.cluster xpk`.
# Run from your workstation (xpk installed, cluster created):  bash $script_name
#
# XPK starts one pod per TPU host (num_slices x hosts per slice); each runs the
# command below from the image; JAX finds the other hosts by itself and
# train.distributed calls jax.distributed.initialize(). The workdir must be a
# bucket or shared volume every pod can write.
set -euo pipefail
xpk workload create \
  --cluster=$cluster \
  --project=$project \
  --zone=$zone \
  --workload=$workload \
  --tpu-type=$tpu_type \
  --num-slices=$num_slices \
  --docker-image=$docker_image \
  --command=$quoted_command
