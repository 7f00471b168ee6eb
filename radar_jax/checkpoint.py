"""Orbax checkpointing: auto-resume with the data iterator, keep-N, params-only export.

A checkpoint step holds two items:
  'state': the whole train state pytree (params, optimizer state, EMA, step);
  'data':  the grain data iterator's state, so a resumed run sees the same data order.
Orbax writes each step into a temporary directory and renames it when complete, so a kill in
the middle of a save leaves the previous step intact; `latest_step()` only ever sees finished
steps. Saves are asynchronous: training continues while the arrays are written.
"""

from __future__ import annotations

import logging
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from radar_jax import fileio


class Checkpointer:
    """Thin wrapper around `ocp.CheckpointManager` for one training run.

    Args:
      directory: where the step directories go (created if missing), e.g. workdir/checkpoints.
      keep: how many most recent checkpoints to keep.
      async_save: write in a background thread.
    """

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"keep={keep}: keep at least one checkpoint.")
        self.directory = fileio.path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "data"), options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any = None, *, force: bool = False):
        """Saves `state` (and the iterator's position) as checkpoint `step`."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, state_template: Any, data_iterator: Any = None,
                step: int | None = None) -> tuple[Any, int | None]:
        """Restores the latest (or given) step into the template's structure and shardings.

        `state_template` is a pytree of arrays or `jax.ShapeDtypeStruct`s with shardings; the
        restored arrays get the same shardings. The data iterator, when given, is restored in
        place. Returns (state, step), or (state_template, None) when there is no checkpoint.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            return state_template, None
        abstract = jax.tree.map(_abstract, state_template)
        items = {"state": ocp.args.StandardRestore(abstract)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError) as e:
            raise ValueError(
                f"Checkpoint {self.directory}/{step} does not match this run's model or optimizer "
                f"({e}). Use a fresh --workdir, or the config that wrote this checkpoint.") from e
        logging.info("Resumed from %s at step %d.", self.directory, step)
        return restored["state"], step

    def wait(self):
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()


def latest_step(directory) -> int | None:
    """The newest finished checkpoint step under `directory` (None when there is none);
    Orbax's temporary folders of saves in flight are not steps."""
    directory = epath.Path(directory)
    if not directory.exists():
        return None
    steps = ocp.utils.checkpoint_steps(directory)
    return max(steps) if steps else None


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    x = np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def export_params(path: str, params: Any) -> None:
    """Writes a params-only checkpoint (for sampling, the notebook, or sharing weights)."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(fileio.path(path), params, force=True)


def load_params(path: str, template: Any = None) -> Any:
    """Reads a params-only checkpoint written by `export_params`.

    With a template (a pytree of arrays or ShapeDtypeStructs), shapes are checked and the
    template's shardings applied. Without one, every array is restored onto this process's first
    device, whatever mesh wrote it: params trained on a pod can be sampled on a laptop.
    """
    path = fileio.path(path)
    if not path.exists():
        raise FileNotFoundError(f"No params checkpoint at {path}: train first, or pass the "
                                "directory that export_params wrote.")
    with ocp.StandardCheckpointer() as ckptr:
        if template is None:
            metadata = ckptr.metadata(path)
            metadata = getattr(metadata, "item_metadata", metadata)
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            template = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
            return ckptr.restore(path, template)
        return ckptr.restore(path, jax.tree.map(_abstract, template))
