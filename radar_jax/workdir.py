"""The workdir: where every stage of a run lives, when a stage is finished, and its outputs.

One run's workdir (a local folder or gs://bucket/run) holds one folder per stage:

  tokenizer/   tokenizer training: checkpoints/, metrics.jsonl, reconstructions.png, params/
  tokens/      the training set encoded once by the tokenizer (the token cache)
  generator/   RadAR training: checkpoints/, metrics.jsonl, params/, schedule.json
  tokenizer_tpt/  optional tokenizer post-training (TPT): checkpoints/, metrics.jsonl, params/
               (the whole tokenizer, new decoder), projector/, eval.json
  samples/     samples.png (a row per class), growth.gif, codes.npz, metrics.json

This module is the only one that spells those names; every other module asks a `Workdir` for a
stage's path. It also owns the two facts that stages hand to each other:
- "stage X is finished": an atomically written `finished.json` record in the stage folder
  (written once the stage's outputs are complete) together with the checkpoint manager's latest
  step. A run killed before the record exists re-runs (resumes) the stage; a record whose step
  is below the config's num_steps (the user asked for more steps) re-runs it too.
- "what the generator was trained with": `generator/schedule.json`, the exact ring map and
  correction band, written before training starts. Sampling, evaluation, the notebook helper
  and `--mode=sample` all read it back, so none of them can rebuild a different schedule from a
  config that has changed since.
A Workdir also loads each finished stage's params at most once per process (`tokenizer()`,
`generator()`), however many later stages use them.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np

from radar_jax import checkpoint as ckpt_lib
from radar_jax import fileio
from radar_jax import schedules

TOKENIZER, TOKENS, GENERATOR, SAMPLES = "tokenizer", "tokens", "generator", "samples"
# Tokenizer post-training (radar_jax/tpt.py): runs after the generator, only when the config
# turns it on; its params then decode everything later (`decoder_params`), the original kept.
TOKENIZER_TPT = "tokenizer_tpt"
STAGES = (TOKENIZER, TOKENS, GENERATOR, TOKENIZER_TPT, SAMPLES)
_RECORD = "finished.json"
_SCHEDULE = "schedule.json"


def barrier(name: str) -> None:
    """Every process waits until process 0 wrote a record the others are about to read."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        multihost_utils.sync_global_devices(name)


class Workdir:
    """The stage layout of one run's workdir (see the module docstring)."""

    def __init__(self, root: fileio.PathLike):
        self.root = fileio.path(root)
        self._loaded: dict[str, Any] = {}  # stage name -> its params, loaded once

    @property
    def is_primary(self) -> bool:
        """Process 0 writes records, metrics, images and JSON; the others only read them."""
        return jax.process_index() == 0

    def __repr__(self):
        return f"Workdir({str(self.root)!r})"

    def stage(self, name: str):
        """The folder of stage `name` (an epath.Path; not created here)."""
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}: one of {', '.join(STAGES)}")
        return self.root / name

    def params_path(self, name: str):
        return self.stage(name) / "params"

    def checkpoints_path(self, name: str):
        return self.stage(name) / "checkpoints"

    @property
    def token_cache(self):
        """The token cache of the training split."""
        return self.stage(TOKENS) / "train"

    # ---------------------------------------------------------------- finished records
    def record(self, name: str) -> dict[str, Any] | None:
        """The finished record of stage `name`, or None while it is not finished."""
        return fileio.read_json(self.stage(name) / _RECORD)

    def mark_finished(self, name: str, step: int, **facts: Any) -> None:
        """Records that stage `name` completed `step` steps (process 0 writes, atomically)."""
        if self.is_primary:
            fileio.write_json(self.stage(name) / _RECORD, dict(step=int(step), **facts))
        barrier(f"radar_jax_finished_{name}")

    def clear_finished(self, name: str) -> None:
        """Removes stage `name`'s record before it is redone, so a run killed while redoing
        it does not find the old record and skip a half-written stage."""
        record = self.stage(name) / _RECORD
        if self.is_primary and record.exists():
            record.unlink()

    def is_finished(self, name: str, num_steps: int = 0) -> bool:
        """True when stage `name` has a record for at least `num_steps` steps, its params (for
        training stages) are exported, and no newer checkpoint says it went on after that."""
        record = self.record(name)
        if record is None or record.get("step", -1) < num_steps:
            return False
        if name == TOKENS:
            from radar_jax import data as data_lib  # pylint: disable=g-import-not-at-top
            return data_lib.token_cache_state(str(self.token_cache)) == "complete"
        if name in (TOKENIZER, GENERATOR, TOKENIZER_TPT):
            if not self.params_path(name).exists():
                return False
            latest = ckpt_lib.latest_step(self.checkpoints_path(name))
            # A checkpoint beyond the record: the stage was resumed with more steps and killed
            # before it finished again; the exported params are stale.
            if latest is not None and latest > record["step"]:
                return False
        return True

    # ---------------------------------------------------------------- the trained schedule
    def save_schedule(self, schedule: schedules.RingSchedule,
                      correction_band: int | None = None) -> None:
        """Writes generator/schedule.json: what the generator is trained with."""
        if self.is_primary:
            fileio.write_json(self.stage(GENERATOR) / _SCHEDULE, dict(
                kind=schedule.kind, ring_map=np.asarray(schedule.ring_map).tolist(),
                base_steps=None if schedule.base_steps is None else list(schedule.base_steps),
                correction_band=correction_band))
        barrier("radar_jax_schedule_saved")

    def trained_schedule(self) -> tuple[schedules.RingSchedule, int | None]:
        """(schedule, correction_band) the generator was trained with."""
        record = fileio.read_json(self.stage(GENERATOR) / _SCHEDULE)
        if record is None:
            raise FileNotFoundError(
                f"No {self.stage(GENERATOR) / _SCHEDULE}: this workdir has no trained generator; "
                "run the generator stage first (--mode=train, or --mode=all).")
        base = record.get("base_steps")
        schedule = schedules.RingSchedule(record["kind"], np.asarray(record["ring_map"]),
                                          None if base is None else tuple(base))
        return schedule, record.get("correction_band")

    # ---------------------------------------------------------------- loading stages once
    def params(self, name: str) -> Any:
        """The exported params of finished stage `name` (the EMA params when it trained with
        EMA), loaded once per Workdir, as device arrays: the sampler and the codecs would
        otherwise copy host arrays to the device at every call."""
        if name not in self._loaded:
            path = self.params_path(name)
            if not path.exists():
                flag = {TOKENIZER: "train_vq", GENERATOR: "train",
                        TOKENIZER_TPT: "post_train_vq"}.get(name, name)
                raise FileNotFoundError(f"No {name} params at {path}: run the {name} stage "
                                        f"first (--mode={flag}, or --mode=all).")
            logging.info("Loading the %s params from %s.", name, path)
            self._loaded[name] = jax.device_put(ckpt_lib.load_params(path))
        return self._loaded[name]

    def decoder_params(self) -> Any:
        """The tokenizer params every DECODE uses: the post-trained (TPT) tokenizer's when that
        stage is finished, else the tokenizer's. Encoding always uses params(TOKENIZER)."""
        return self.params(TOKENIZER_TPT if self.is_finished(TOKENIZER_TPT) else TOKENIZER)
