#!/usr/bin/env bash
# Runs radar_jax on the GPUs of this machine, or on every node of a SLURM allocation.
#
#   launch/gpu.sh configs/b.py /shared/runs/radar_b [--config.x=y ...]          # one node
#   srun --ntasks-per-node=1 launch/gpu.sh configs/xl.py /shared/runs/radar_xl   # many nodes
#
# Install once per node: pip install -e . "jax[cuda12]". Under SLURM, radar_jax.main calls
# jax.distributed.initialize(), which reads the coordinator and process ids from SLURM; the
# workdir must be on storage every node sees.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,9p' "$0"; exit 2
fi
CONFIG=$1; WORKDIR=$2; shift 2
cd "$(dirname "$0")/.."
# Let XLA overlap collectives with compute and use the GPU memory it needs.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec python3 -m radar_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
