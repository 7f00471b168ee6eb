"""grain pipeline of image batches for the tokenizer (the generator's token batches are
global_batches.py's, a pure function of the step, with no iterator state).

The pipeline is a `grain.IterDataset` whose iterators are checkpointable: `it.get_state()`
/ `it.set_state(state)`, or `grain.checkpoint.CheckpointSave(it)` /
`CheckpointRestore(it)` inside an Orbax checkpoint. The state is the position in a
deterministic stream (shuffle order from the seed, per-example randomness from the seed and
the example's position in the stream), so a restored iterator continues exactly where the
saved one stopped. Resume with the same config (num_workers included: with worker processes
grain's state is per worker).

Image pipeline, per host shard:
    source[shard::count] -> shuffle(seed) -> repeat -> decode + resize + crop/flip (random_map)
    -> to_iter_dataset [-> mp_prefetch(num_workers), under absl.app] -> _ImageBatches: drop
    bad files (count, log), stack B good records, uint8 -> float32 in [-1, 1]
Bad files are dropped after the worker processes, in the process that owns the iterator, so
the iterator's `SkipCounter` sees every skip whatever `num_workers` is, and the counts are part
of the iterator's state (a resumed run keeps reporting the files skipped before the restart).
Batching after the workers keeps eval batches in source order; the cost is one inter-process
transfer per image rather than per batch.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from absl import flags
import grain
import numpy as np
from PIL import Image

from radar_jax.data import sources as sources_lib

# LlamaGen's (and ADM's) random crop: resize the short side to a random length in
# [S, S / MIN_CROP_FRAC], then crop S x S at a random offset.
MIN_CROP_FRAC = 0.8


# ---------------------------------------------------------------------------------------------
# Skipped-file accounting
# ---------------------------------------------------------------------------------------------

class SkipCounter:
    """The undecodable files one image iterator has skipped.

    `count` is the number of distinct bad files (each logged once, with its path, at WARNING);
    `encounters` also counts repeats of the same file in later epochs; `paths` lists them.
    Every iterator of `make_image_dataset` owns one (`iterator.skip_counter`, or
    `skipped_count(iterator)`), saved and restored with the iterator's state.
    """

    def __init__(self, paths: tuple[str, ...] | list[str] = (), encounters: int = 0):
        self._paths = set(paths)
        self.encounters = int(encounters)

    @property
    def count(self) -> int:
        return len(self._paths)

    @property
    def paths(self) -> list[str]:
        return sorted(self._paths)

    def record(self, where: str, reason: str) -> None:
        """Counts one skipped record; logs the first time `where` (a path) comes up."""
        self.encounters += 1
        if where in self._paths:
            return
        self._paths.add(where)
        logging.warning("Skipping an image that cannot be decoded (%s); it will be skipped "
                        "whenever it comes up again.", reason)

    def to_state(self) -> dict[str, Any]:
        """JSON-serialisable state: grows with the number of distinct bad files (few)."""
        return {"paths": self.paths, "encounters": self.encounters}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SkipCounter:
        return cls(state["paths"], state["encounters"])


def skipped_count(iterator: grain.DatasetIterator) -> int:
    """Distinct undecodable files that `iterator` (from `make_image_dataset`) has skipped.

    Includes files skipped before the iterator was restored from a checkpoint. A training
    loop reports it next to its metrics; `iterator.skip_counter` has the paths too.
    """
    counter = getattr(iterator, "skip_counter", None)
    if not isinstance(counter, SkipCounter):
        raise TypeError(f"skipped_count needs an iterator of make_image_dataset(...), got "
                        f"{type(iterator).__name__}; call it on iter(dataset), not on a wrapper.")
    return counter.count


class _SafeSource:
    """Wraps a source so a BadImageError becomes a marker record instead of a crash.

    The marker travels through the (possibly multi-process) map stages and is removed, and
    counted, by `_ImageBatches` in the iterator's own process.
    """

    def __init__(self, source):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            return self._source[index]
        except sources_lib.BadImageError as e:
            return {"skipped": e.where, "reason": str(e)}


class _ImageBatchIterator(grain.DatasetIterator):
    """Drops marker records (counting them), stacks B good records, converts to float.

    If 2N records in a row (N = records per epoch) were all bad, every file is bad, and an
    infinitely repeated pipeline would spin forever without yielding: raise instead. (Two
    epochs, because a window of N straddling an epoch boundary can miss the good files.)
    """

    def __init__(self, parent: grain.DatasetIterator, batch_size: int, drop_remainder: bool,
                 epoch_size: int, what: str):
        super().__init__(parent)
        self._batch_size = batch_size
        self._drop_remainder = drop_remainder
        self._limit = 2 * epoch_size
        self._what = what
        self._bad_in_a_row = 0
        self.skip_counter = SkipCounter()

    def __next__(self) -> dict[str, np.ndarray]:
        images, labels = [], []
        while len(images) < self._batch_size:
            try:
                record = next(self._parent)
            except StopIteration:
                break
            if "skipped" in record:
                self.skip_counter.record(record["skipped"], record["reason"])
                self._bad_in_a_row += 1
                if self._bad_in_a_row >= self._limit:
                    raise sources_lib.DataUnavailableError(
                        f"{self._what}: none of the last {self._bad_in_a_row} images could be "
                        f"decoded (e.g. {record['reason']}). Check that the files are real "
                        "images.")
                continue
            self._bad_in_a_row = 0
            images.append(record["image"])
            labels.append(record["label"])
        if not images or (self._drop_remainder and len(images) < self._batch_size):
            raise StopIteration
        # uint8 -> float32 here, after the workers, so the processes exchange 4x fewer bytes.
        # Dividing by 127.5 (not multiplying by its float32 reciprocal) maps 255 to exactly 1.
        images_BSS3 = np.stack(images).astype(np.float32)
        images_BSS3 /= np.float32(127.5)
        images_BSS3 -= np.float32(1.0)
        return {"image": images_BSS3, "label": np.asarray(labels, np.int32)}

    def get_state(self) -> dict[str, Any]:
        # Batches never straddle a get_state call, so the parent's position is the whole story.
        return {"parent": self._parent.get_state(), "skipped": self.skip_counter.to_state(),
                "bad_in_a_row": self._bad_in_a_row}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.skip_counter = SkipCounter.from_state(state["skipped"])
        self._bad_in_a_row = int(state["bad_in_a_row"])

    def __str__(self) -> str:
        return f"ImageBatchIterator(batch_size={self._batch_size})"


class _ImageBatches(grain.IterDataset):
    """grain stage that yields the `_ImageBatchIterator` batches (see there)."""

    def __init__(self, parent: grain.IterDataset, batch_size: int, drop_remainder: bool,
                 epoch_size: int, what: str):
        super().__init__(parent)
        self._args = (batch_size, drop_remainder, epoch_size, what)

    def __iter__(self) -> _ImageBatchIterator:
        return _ImageBatchIterator(self._parent.__iter__(), *self._args)

    def __str__(self) -> str:
        return f"ImageBatches(batch_size={self._args[0]})"


# ---------------------------------------------------------------------------------------------
# Per-example preprocessing (runs in grain's reader threads / worker processes)
# ---------------------------------------------------------------------------------------------

def resize_short_side(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (H', W', 3) with min(H', W') == size, aspect kept.

    Bicubic with PIL's antialiasing (reducing_gap=3 first box-reduces big images, which is
    faster and visually indistinguishable), like LlamaGen's center/random crop helpers.
    """
    h, w = image.shape[:2]
    if min(h, w) == size:
        return image
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    pil = Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC, reducing_gap=3.0)
    return np.asarray(pil, np.uint8)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (size, size, 3): short side resized to size, centre crop."""
    image = resize_short_side(image, size)
    h, w = image.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return image[top:top + size, left:left + size]


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (size, size, 3): short side resized to a random length in
    [size, ceil(size / MIN_CROP_FRAC)], then a crop at a random offset."""
    short = int(rng.integers(size, math.ceil(size / MIN_CROP_FRAC) + 1))
    image = resize_short_side(image, short)
    h, w = image.shape[:2]
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    return image[top:top + size, left:left + size]


class _TrainPreprocess(grain.transforms.RandomMap):
    """Random crop (or centre crop) and random flip; `rng` comes from (seed, position)."""

    def __init__(self, image_size: int, random_crop_: bool, flip: bool):
        self._size, self._random_crop, self._flip = image_size, random_crop_, flip

    def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if "skipped" in record:
            return record
        image = record["image"]
        if self._random_crop:
            image = random_crop(image, self._size, rng)
        else:
            image = center_crop(image, self._size)
        if self._flip and rng.random() < 0.5:
            image = image[:, ::-1]
        return {"image": np.ascontiguousarray(image), "label": np.int32(record["label"])}


class _EvalPreprocess(grain.transforms.Map):
    """Centre crop, no flip."""

    def __init__(self, image_size: int):
        self._size = image_size

    def map(self, record: dict[str, Any]) -> dict[str, Any]:
        if "skipped" in record:
            return record
        image = center_crop(record["image"], self._size)
        return {"image": np.ascontiguousarray(image), "label": np.int32(record["label"])}


# ---------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------

def _check_common(batch_size, seed, num_epochs, shard_index, shard_count) -> None:
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be a positive int (per host).")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r}: must be a non-negative int.")
    if num_epochs is not None and (not isinstance(num_epochs, (int, np.integer))
                                   or num_epochs < 1):
        raise ValueError(f"num_epochs={num_epochs!r}: use None (repeat forever) or an int >= 1.")
    if not (isinstance(shard_count, (int, np.integer)) and shard_count >= 1
            and isinstance(shard_index, (int, np.integer)) and 0 <= shard_index < shard_count):
        raise ValueError(f"shard_index={shard_index!r}, shard_count={shard_count!r}: need "
                         "0 <= shard_index < shard_count (usually jax.process_index() and "
                         "jax.process_count()).")


def _seeds(seed: int, shard_index: int) -> tuple[int, int]:
    """(shuffle seed, augmentation seed), distinct per shard, each in grain's [0, 2**32)."""
    a, b = np.random.SeedSequence([int(seed), int(shard_index)]).generate_state(2)
    return int(a), int(b)


def _shard(ds: grain.MapDataset, shard_index: int, shard_count: int, what: str):
    sharded = ds[shard_index::shard_count]
    if len(sharded) == 0:
        raise sources_lib.DataUnavailableError(
            f"{what}: {len(ds)} records cannot feed shard {shard_index} of {shard_count}; use "
            "fewer hosts or more data.")
    return sharded


def worker_processes_available() -> bool:
    """Whether grain (0.2.x) can start worker processes in this program.

    grain reads one absl flag, --grain_enable_multiprocess_worker_profiling, with `.value`
    when it starts its workers, which raises UnparsedFlagAccessError unless the program has
    parsed its flags (absl.app.run does; pytest and notebooks do not). grain has no option
    for it, and marking absl's global flags parsed would change the program's state behind
    its back, so this only reads the state.
    """
    name = "grain_enable_multiprocess_worker_profiling"
    return bool(flags.FLAGS.is_parsed() or name not in flags.FLAGS or flags.FLAGS[name].present)


def _parallel_decode(ds: grain.MapDataset, num_workers: int) -> grain.IterDataset:
    """`ds` as an IterDataset decoded by `num_workers` processes, or by grain's reader threads
    in this process (num_workers=0, or where grain cannot start processes: see
    worker_processes_available). Both yield the same records in the same order; processes
    scale past the GIL. Their iterator states differ, so resume the way the run started."""
    if num_workers > 0 and worker_processes_available():
        return ds.to_iter_dataset().mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers))
    if num_workers > 0:
        logging.warning("config.tokenizer.data.num_workers=%d, but absl flags are not parsed "
                        "(not under absl.app), so grain cannot start worker processes: decoding "
                        "in this process's reader threads instead (the same batches).",
                        num_workers)
    return ds.to_iter_dataset()


def make_image_dataset(data_config: Any, split: str, batch_size: int, *, seed: int,
                       train: bool, num_epochs: int | None = None, shard_index: int = 0,
                       shard_count: int = 1, drop_remainder: bool = True) -> grain.IterDataset:
    """Batches of preprocessed images for one host.

    Args:
      data_config: `config.tokenizer.data` (fields in the package docstring).
      split: split name (data_config.train_split or .eval_split).
      batch_size: examples per batch on this host.
      seed: shuffle and augmentation seed (int >= 0); the same seed gives the same stream.
      train: True: shuffled, repeated `num_epochs` times (None = forever), random crop/flip
        per config. False: one pass (or `num_epochs`) in source order, centre crop, no flip.
      num_epochs: see `train`.
      shard_index, shard_count: this host reads records shard_index::shard_count.
      drop_remainder: drop a last partial batch (only matters for a finite number of epochs).

    Returns:
      A grain IterDataset; iterating yields {'image': float32 (B, S, S, 3) in [-1, 1],
      'label': int32 (B,)}, S = data_config.image_size. Its iterators support get_state /
      set_state and grain.checkpoint.CheckpointSave / CheckpointRestore, and count the files
      they skipped: `skipped_count(iterator)`, `iterator.skip_counter.paths`.

    Raises:
      DataUnavailableError: see `make_source`; ValueError for bad arguments.
    """
    _check_common(batch_size, seed, num_epochs, shard_index, shard_count)
    image_size = data_config.image_size
    if not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(
            f"config.tokenizer.data.image_size={image_size!r}: must be a positive int.")
    num_workers = data_config.num_workers
    if not isinstance(num_workers, (int, np.integer)) or num_workers < 0:
        raise ValueError(f"config.tokenizer.data.num_workers={num_workers!r}: must be an int "
                         ">= 0 (0 decodes in the training process).")
    source = sources_lib.make_source(data_config, split)
    what = source.description
    shuffle_seed, aug_seed = _seeds(seed, shard_index)

    ds = _shard(grain.MapDataset.source(_SafeSource(source)), shard_index, shard_count, what)
    epoch_size = len(ds)
    if train:
        ds = ds.shuffle(seed=shuffle_seed).repeat(num_epochs)
        # grain seeds each example's Generator with (aug_seed, position in this stream), so a
        # restored iterator redraws exactly the same crops and flips.
        ds = ds.random_map(
            _TrainPreprocess(image_size, bool(data_config.random_crop), bool(data_config.flip)),
            seed=aug_seed)
    else:
        if num_epochs not in (None, 1):
            ds = ds.repeat(num_epochs)
        ds = ds.map(_EvalPreprocess(image_size))
    it = _parallel_decode(ds, int(num_workers))
    it = _ImageBatches(it, int(batch_size), bool(drop_remainder), epoch_size, what)
    logging.info("Data %s[%s] (shard %d/%d): %s, batch %d, %s.", data_config.source, split,
                 shard_index, shard_count, what, batch_size,
                 "train (shuffled, augmented)" if train else "eval (in order)")
    return it
