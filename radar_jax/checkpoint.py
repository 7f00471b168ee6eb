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
        # Handlers named up front, so a fresh process can read a step's metadata (the shape
        # check before restoring) without having restored anything yet.
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler()})

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any = None, *, force: bool = False):
        """Saves `state` (and the iterator's position) as checkpoint `step`."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, state_template: Any, data_iterator: Any = None
                ) -> tuple[Any, int | None]:
        """Restores the newest readable step into the template's structure and shardings.

        `state_template` is a pytree of arrays or `jax.ShapeDtypeStruct`s with shardings; the
        restored arrays get the same shardings. The data iterator, when given, is restored in
        place. Returns (state, step), or (state_template, None) when there is no checkpoint.

        A step whose files cannot be read (a disk fault, a copy cut short) is reported with
        its path and moved aside to `<directory>_unreadable/<step>` (never deleted), and the
        previous step is tried. A checkpoint of another model shape is not a fault: it raises
        `CheckpointMismatchError` naming the first differing array, before anything compiles.
        """
        abstract = jax.tree.map(_abstract, state_template)
        items = {"state": ocp.args.StandardRestore(abstract)}
        unreadable = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                metadata = self._manager.item_metadata(step)["state"]
            except Exception as e:  # pylint: disable=broad-except
                unreadable.append((step, e))
                continue
            _check_shapes(abstract, metadata, f"{self.directory}/{step}")
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # pylint: disable=broad-except
                unreadable.append((step, e))
                continue
            self._set_aside(unreadable)
            if data_iterator is not None:
                self._restore_data(step, data_iterator)
            logging.info("Resumed from %s at step %d.", self.directory, step)
            return restored["state"], step
        if unreadable:
            self._set_aside(unreadable)
            logging.warning("No readable checkpoint left in %s: starting from scratch.",
                            self.directory)
        return state_template, None

    def _restore_data(self, step: int, data_iterator) -> None:
        """The iterator's position; grain keeps one per process, so a run resumed on another
        number of processes cannot continue that stream (the generator's data has no iterator
        state and resumes anywhere: see data/global_batches.py)."""
        try:
            self._manager.restore(step, args=ocp.args.Composite(
                data=grain.checkpoint.CheckpointRestore(data_iterator)))
        except Exception as e:  # pylint: disable=broad-except
            saved = sorted(p.name for p in (self.directory / str(step) / "data").glob("*"))
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step}: the data position cannot be restored for "
                f"process {jax.process_index()} of {jax.process_count()} (saved: {saved}; "
                f"{type(e).__name__}). Resume with the number of processes that wrote it."
            ) from None

    def _set_aside(self, unreadable) -> None:
        """Moves unreadable steps out of the manager's sight, so later saves at those step
        numbers do not collide with them and the next start does not trip on them again."""
        if not unreadable:
            return
        aside = self.directory.parent / f"{self.directory.name}_unreadable"
        for step, error in unreadable:
            reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
            target = aside / str(step)
            logging.warning("Checkpoint %s/%d is unreadable (%s: %s); moved it to %s and "
                            "resumed from an earlier step.", self.directory, step,
                            type(error).__name__, reason, target)
            if jax.process_index() == 0:
                aside.mkdir(parents=True, exist_ok=True)
                if target.exists():
                    target = aside / f"{step}.{len(list(aside.iterdir()))}"
                (self.directory / str(step)).rename(target)
        self._manager.reload()

    def wait(self):
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()


class CheckpointMismatchError(ValueError):
    """The checkpoint was written by another model or optimizer configuration."""


def _path_name(keypath) -> str:
    parts = []
    for k in keypath:
        parts.append(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))))
    return "/".join(parts)


def _check_shapes(abstract: Any, metadata: Any, where: str) -> None:
    """Raises CheckpointMismatchError at the first array whose shape differs (or is missing)."""
    tree = getattr(metadata, "tree", metadata)
    have = {_path_name(p): tuple(m.shape) for p, m in
            jax.tree_util.tree_leaves_with_path(tree) if hasattr(m, "shape")}
    for p, want in jax.tree_util.tree_leaves_with_path(abstract):
        name = _path_name(p)
        if name not in have:
            raise CheckpointMismatchError(
                f"checkpoint {where} has no array {name}: it was written by another model or "
                "optimizer config; use the config that wrote it, or a fresh --workdir.")
        if have[name] != tuple(want.shape):
            raise CheckpointMismatchError(
                f"checkpoint {where} holds {name} with shape {have[name]} but this config "
                f"builds {tuple(want.shape)}: it was written by another model config; use the "
                "config that wrote it, or a fresh --workdir.")


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
