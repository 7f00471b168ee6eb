#!/usr/bin/env bash
# Runs radar_jax on every worker of a Cloud TPU VM (single host or pod slice).
#
#   launch/tpu.sh TPU_NAME ZONE configs/xl.py gs://BUCKET/radar_xl [--config.x=y ...]
#
# Creates nothing: make the TPU first, e.g.
#   gcloud compute tpus tpu-vm create TPU_NAME --zone=ZONE --accelerator-type=v5p-64 \
#       --version=v2-alpha-tpuv5
# The repository is copied to every worker, installed with jax[tpu], and started on all of
# them at once; radar_jax.main calls jax.distributed.initialize() on multi-host slices, shards
# the batch over all chips (config.mesh) and checkpoints to the workdir (use a gs:// bucket so
# every host sees it; a restarted job resumes from the latest checkpoint).
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,12p' "$0"; exit 2
fi
TPU_NAME=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
REPO_DIR=$(cd "$(dirname "$0")/.." && pwd)

tar -C "$REPO_DIR" --exclude=.git --exclude='*.egg-info' --exclude=workdirs -czf /tmp/radar_jax.tgz .
gcloud compute tpus tpu-vm scp /tmp/radar_jax.tgz "$TPU_NAME":/tmp/ --zone="$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command "
  set -e
  mkdir -p ~/radar_jax && tar -C ~/radar_jax -xzf /tmp/radar_jax.tgz && cd ~/radar_jax
  python3 -m pip install -q -e . 'jax[tpu]'
  python3 -m radar_jax.main --config=$CONFIG --workdir=$WORKDIR $*
"
