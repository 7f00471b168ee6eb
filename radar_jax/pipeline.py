"""The main job: each stage of a config, run (or resumed, or skipped when finished) in order.

Workdir layout for a pipeline config (configs/demo.py, b.py, ...):
  workdir/tokenizer/   tokenizer run (checkpoints, metrics, reconstructions.png, params/)
A tokenizer-only config (configs/demo_vq.py, vq16.py) runs its tokenizer stage in workdir itself.
"""

from __future__ import annotations

import logging
import os

import ml_collections

from radar_jax import data as data_lib

MODES = ("all", "train_vq")


def _is_tokenizer_config(config: ml_collections.ConfigDict) -> bool:
    """Tokenizer-only configs are a tokenizer run at the top level (no generator sections)."""
    return "tokenizer" not in config


def tokenizer_stage(config: ml_collections.ConfigDict, workdir: str):
    """(tokenizer run config, its workdir) for either kind of config."""
    if _is_tokenizer_config(config):
        return config, workdir
    return config.tokenizer, os.path.join(workdir, "tokenizer")


def run(config: ml_collections.ConfigDict, workdir: str, mode: str = "all"):
    """Runs `mode` ('all' or one stage) of `config` in `workdir`."""
    if mode not in MODES:
        raise ValueError(f"--mode={mode!r}: choose one of {', '.join(MODES)}.")
    # Fail at once, before any compile, when the dataset is not there.
    vq_config, vq_workdir = tokenizer_stage(config, workdir)
    data_lib.check_data_available(vq_config.data)
    if mode in ("all", "train_vq"):
        from radar_jax import train_vq  # pylint: disable=g-import-not-at-top
        metrics = train_vq.train_and_evaluate(vq_config, vq_workdir)
        logging.info("Tokenizer done: %s", metrics)
