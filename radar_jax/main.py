r"""radar_jax command line.

  python -m radar_jax.main --config=configs/demo.py --workdir=workdirs/demo

runs the config's whole pipeline (tokenizer -> token cache -> RadAR -> samples), resuming or
skipping finished stages. `--mode` runs one stage: train_vq, cache_tokens, train, sample, eval.
Any config field can be overridden: `--config.train.num_steps=100`; a config file may take an
argument: `--config=configs/imagenet.py:XL`.

Exit status: 0 done; 2 a user error (one line on stderr naming the field, the value and the
fix); 143 stopped by SIGTERM / Ctrl-C after saving a checkpoint (run the same command to
resume; RADAR_PREEMPTED_STATUS changes the number); anything else is a bug and prints its
traceback.
"""

import logging
import os
import sys

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from radar_jax import checkpoint as ckpt_lib
from radar_jax import config_io
from radar_jax import data as data_lib
from radar_jax import pipeline
from radar_jax import preemption

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Python config file with get_config(), e.g. configs/demo.py or "
    "configs/imagenet.py:XL.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and images (local path or gs://...).")
_MODE = flags.DEFINE_enum(
    "mode", "all", pipeline.MODES,
    "Which stage(s) to run: 'all' runs every stage the config defines, skipping finished ones.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() (auto-detected on Cloud TPU VM "
    "slices, SLURM, and when JAX_COORDINATOR_ADDRESS is set).")
flags.mark_flags_as_required(["config", "workdir"])

USER_ERROR = 2
_USER_ERRORS = (config_io.ConfigError, data_lib.DataUnavailableError,
                ckpt_lib.CheckpointMismatchError)


def distributed_init_args(environ=os.environ, force: bool = False) -> dict | None:
    """Arguments for jax.distributed.initialize(), or None for a single-process run.

    - JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID: any launcher, and the
      tests, start N processes by hand (JAX itself reads only the first of the three);
    - SLURM with more than one task, and GKE TPU slices (TPU_WORKER_HOSTNAMES lists several
      workers): jax.distributed.initialize() detects those clusters by itself;
    - `force` (--multihost): initialise and let JAX detect the cluster. A GCE TPU VM slice sets
      no environment variable to see it by, so launch/tpu.sh passes --multihost there (JAX
      then reads the slice from the TPU metadata server).
    """
    if "JAX_COORDINATOR_ADDRESS" in environ and "JAX_NUM_PROCESSES" in environ:
        return dict(coordinator_address=environ["JAX_COORDINATOR_ADDRESS"],
                    num_processes=int(environ["JAX_NUM_PROCESSES"]),
                    process_id=int(environ.get("JAX_PROCESS_ID", "0")))
    slurm = int(environ.get("SLURM_NTASKS", "1")) > 1
    tpu_slice = "," in environ.get("TPU_WORKER_HOSTNAMES", "") or \
        environ.get("MEGASCALE_COORDINATOR_ADDRESS")
    return {} if (force or slurm or tpu_slice) else None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    # Orbax logs every step of every save at INFO; keep its warnings, drop the chatter.
    logging.getLogger("absl").addFilter(
        lambda r: r.levelno >= logging.WARNING or "orbax" not in r.pathname)
    # Multi-host clusters: connect the processes before any other JAX call.
    init_args = distributed_init_args(force=_MULTIHOST.value)
    if init_args is not None:
        jax.distributed.initialize(**init_args)
    logging.info("JAX %s on %s; process %d of %d.", jax.__version__, jax.devices(),
                 jax.process_index(), jax.process_count())
    try:
        pipeline.run(_CONFIG.value, _WORKDIR.value, _MODE.value)
    except preemption.Preempted as e:
        logging.warning("radar_jax: %s.", e)
        sys.exit(preemption.PREEMPTED_STATUS)
    except _USER_ERRORS as e:
        print(f"radar_jax: {e}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR)


if __name__ == "__main__":
    app.run(main)
