#!/usr/bin/env bash
#SBATCH --job-name=radar_jax
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=B:TERM@180
#SBATCH --open-mode=append
#SBATCH --output=radar_jax-%j.out
# Trains radar_jax on the GPUs of a SLURM allocation (sbatch) or of this machine (bash).
#
#   sbatch --nodes=4 launch/gpu.sh --config=configs/xl.py --workdir=/shared/runs/radar_xl
#   bash launch/gpu.sh --config=configs/b.py --workdir=runs/radar_b          # one node, no SLURM
#
# Run sbatch from the repository root (or set RADAR_DIR), on storage every node sees; the
# arguments go to `python -m radar_jax.main` unchanged. Environment:
#   VENV        virtualenv to activate, relative to the repository (default .venv); make it once:
#               python3.11 -m venv .venv && .venv/bin/pip install -e . "jax[cuda12]"
#   JAX_COORDINATOR_PORT  coordinator port on the first node (default from the job id)
#   RADAR_PREEMPTED_STATUS  exit status radar_jax uses after saving on SIGTERM (default 143)
#
# One process per node, owning all of the node's GPUs (--ntasks-per-node=1 --gpus-per-node=8):
# the batch step starts one task per node with srun, and each task exports
# JAX_COORDINATOR_ADDRESS (first node of SLURM_JOB_NODELIST), JAX_NUM_PROCESSES=SLURM_NTASKS,
# JAX_PROCESS_ID=SLURM_PROCID and JAX_LOCAL_DEVICE_IDS=0,...,G-1 for the G GPUs SLURM gave it
# (without the last, jax's SLURM detection would give each process only GPU SLURM_LOCALID = 0).
#
# Preemption and time limit: SLURM sends SIGTERM to this script 180 s before the limit (and on
# preemption); it is forwarded to the run, which saves a checkpoint and exits with
# RADAR_PREEMPTED_STATUS; the job is then requeued (--requeue, scontrol requeue) and resumes
# from the workdir. Exit status: 0 finished, 2 bad config / input, 143 saved and requeued.
set -euo pipefail

PREEMPTED_STATUS=${RADAR_PREEMPTED_STATUS:-143}
die() { echo "launch/gpu.sh: $*" >&2; exit 2; }

if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${RADAR_JAX_STEP:-}" ]; then
  # --- the batch step: one srun task per node ----------------------------------------------
  # sbatch runs a copy of this file from its spool folder: find the repository from where
  # sbatch was called.
  cd "${RADAR_DIR:-${SLURM_SUBMIT_DIR:-.}}"
  [ -f radar_jax/main.py ] || die "no radar_jax/main.py in $PWD: run sbatch from the" \
    "repository root or set RADAR_DIR=/path/to/radar_jax"
  nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
  # All of it, then the first line (`| head -n 1` could kill scontrol with SIGPIPE).
  hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST"); head=${hosts%%$'\n'*}
  port=${JAX_COORDINATOR_PORT:-$((SLURM_JOB_ID % 4096 + 61440))}
  export JAX_COORDINATOR_ADDRESS=${JAX_COORDINATOR_ADDRESS:-$head:$port}
  export RADAR_JAX_STEP=1
  gpus=()
  [ -n "${SLURM_GPUS_PER_NODE:-}" ] && gpus=(--gpus-per-node="$SLURM_GPUS_PER_NODE")
  echo "radar_jax: job $SLURM_JOB_ID, start $((${SLURM_RESTART_COUNT:-0} + 1)), $nodes node(s)," \
    "coordinator $JAX_COORDINATOR_ADDRESS"
  srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 ${gpus[@]+"${gpus[@]}"} \
    --kill-on-bad-exit=1 bash "$PWD/launch/gpu.sh" "$@" &
  step=$!
  got_term=0
  # srun forwards the signal to every task; the trap makes `wait` return, so wait again for
  # the run to finish its checkpoint.
  trap 'got_term=1; echo "radar_jax: SIGTERM, the run saves a checkpoint"; kill -TERM "$step"' TERM
  status=0
  wait "$step" || status=$?
  while kill -0 "$step" 2>/dev/null; do status=0; wait "$step" || status=$?; done
  if [ "$status" -ne 0 ] && { [ "$got_term" = 1 ] || [ "$status" = "$PREEMPTED_STATUS" ]; }; then
    echo "radar_jax: stopped with status $status; requeueing job $SLURM_JOB_ID to resume"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  exit "$status"
fi

# --- one process: a task of the srun step, or this machine alone ----------------------------
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -f "$VENV/bin/activate" ] || die "no virtualenv at VENV=$VENV (in $PWD): make it with" \
  "python3.11 -m venv .venv && .venv/bin/pip install -e . 'jax[cuda12]', or set VENV"
# shellcheck disable=SC1091  # the venv is made by the user
source "$VENV/bin/activate"

if [ -n "${SLURM_JOB_ID:-}" ]; then
  export JAX_NUM_PROCESSES=$SLURM_NTASKS JAX_PROCESS_ID=$SLURM_PROCID
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    IFS=, read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"; ngpu=${#visible[@]}
  elif [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
    ngpu=$SLURM_GPUS_ON_NODE
  else
    ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  fi
  # Indices among the GPUs this process sees (CUDA_VISIBLE_DEVICES renumbers them from 0).
  if [ "${ngpu:-0}" -gt 0 ]; then
    JAX_LOCAL_DEVICE_IDS=$(seq -s , 0 $((ngpu - 1))); export JAX_LOCAL_DEVICE_IDS
  fi
fi
# XLA's default preallocation is 75% of GPU memory; the model and activations want more.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec python -m radar_jax.main "$@"
