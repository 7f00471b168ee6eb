r"""radar_jax command line.

  python -m radar_jax.main --config=configs/demo.py --workdir=workdirs/demo

runs the config's whole pipeline (tokenizer -> token cache -> RadAR -> samples), resuming or
skipping finished stages. `--mode` runs one stage: train_vq, cache_tokens, train, sample, eval.
Any config field can be overridden: `--config.train.num_steps=100`.
"""

import logging
import os

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from radar_jax import pipeline

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Python config file with get_config(), e.g. configs/demo.py.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and images (local path or gs://...).")
_MODE = flags.DEFINE_enum(
    "mode", "all", pipeline.MODES,
    "Which stage(s) to run: 'all' runs every stage the config defines, skipping finished ones.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    # Orbax logs every step of every save at INFO; keep its warnings, drop the chatter.
    logging.getLogger("absl").addFilter(
        lambda r: r.levelno >= logging.WARNING or "orbax" not in r.pathname)
    # Multi-host TPU / GPU clusters: connect the processes before any JAX call. A single
    # process (a laptop, one GPU, one TPU VM) needs nothing.
    multi_host = ("JAX_COORDINATOR_ADDRESS" in os.environ
                  or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
                  or int(os.environ.get("SLURM_NTASKS", "1")) > 1)
    if multi_host:
        jax.distributed.initialize()
    logging.info("JAX %s on %s; process %d of %d.", jax.__version__, jax.devices(),
                 jax.process_index(), jax.process_count())
    pipeline.run(_CONFIG.value, _WORKDIR.value, _MODE.value)


if __name__ == "__main__":
    app.run(main)
