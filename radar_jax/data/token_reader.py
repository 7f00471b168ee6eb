"""Reading token caches: `TokenCache` (random access, memory-mapped), checks against a config.

The format and the writers are in token_cache.py. Local shards are opened with
np.load(mmap_mode='r'): `cache[indices]` reads only those maps from disk. gs:// caches are
copied to local disk first (once; see `TokenCache`), then mapped the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from typing import Any, Iterable

from etils import epath
import numpy as np

from radar_jax.data.token_cache import _atomic_write
from radar_jax.data.token_cache import _check_arrays
from radar_jax.data.token_cache import FORMAT_VERSION
from radar_jax.data.token_cache import IncompleteTokenCacheError
from radar_jax.data.token_cache import is_remote
from radar_jax.data.token_cache import META_FILE
from radar_jax.data.token_cache import rebuild_hint

_CHUNK = 1 << 16  # records per chunk when scanning a shard: bounded memory


def _copy_file(src: epath.Path, dst: epath.Path) -> None:
    with src.open("rb") as f:
        _atomic_write(dst, lambda g: shutil.copyfileobj(f, g, 16 << 20))


def _local_copy(root: epath.Path, meta_text: str, info: dict, local_dir: Any) -> epath.Path:
    """Copies a remote cache to local disk (once) so that it can be memory-mapped."""
    if local_dir is None:
        key = hashlib.sha1(str(root).encode()).hexdigest()[:16]
        local_dir = os.path.join(tempfile.gettempdir(), "radar_jax_token_caches", key)
    local = epath.Path(local_dir)
    if (local / META_FILE).exists() and (local / META_FILE).read_text() == meta_text:
        return local  # the same cache, copied before (meta.json is written last)
    local.mkdir(parents=True, exist_ok=True)
    (local / META_FILE).unlink(missing_ok=True)
    logging.info("Copying token cache %s (%d maps) to %s to memory-map it.", root,
                 info["num_examples"], local)
    for s in info["shards"]:
        for name in (s["codes"], s["labels"]):
            _copy_file(root / name, local / name)
    _atomic_write(local / META_FILE, lambda f: f.write(meta_text.encode()))
    return local


class TokenCache:
    """Random access to a token cache without loading it: `cache[indices]` reads those maps.

    A grain MapDataset source too (`len`, `cache[i]`). Picklable (grain worker processes):
    the memory maps are reopened in the unpickled copy, never copied.

    Attributes:
      path: the cache as given; meta: the caller's metadata (dict); grid: (h, w);
      dtype: the stored code dtype; info: the whole meta.json; shard_lengths: list of ints.
    """

    def __init__(self, path: Any, *, local_dir: Any = None):
        """Opens the cache at `path` (local or gs://; gs:// is copied to `local_dir` first).

        Raises:
          FileNotFoundError: nothing at `path`.
          IncompleteTokenCacheError: a directory without meta.json (never read).
          ValueError: corrupt, of another format version, or shards not matching meta.json.
        """
        self.path = str(path)
        root = epath.Path(path)
        if not root.exists():
            raise FileNotFoundError(
                f"token cache {self.path!r} not found: encode the dataset with the tokenizer "
                "first (the encode stage writes it when it is missing), or fix the path.")
        if not root.is_dir():
            self._open_npz(root)
            return
        if not (root / META_FILE).exists():
            raise IncompleteTokenCacheError(
                f"token cache {self.path} is incomplete (no {META_FILE}: its encode did not "
                f"finish, or is still running on other hosts); {rebuild_hint(self.path)}.")
        meta_text = (root / META_FILE).read_text()
        try:
            info = json.loads(meta_text)
            version = info["format_version"]
            if version == FORMAT_VERSION:
                self.info, self.meta = info, info["meta"]
                self.grid, self.dtype = tuple(info["grid"]), np.dtype(info["dtype"])
                self.shard_lengths = [int(s["length"]) for s in info["shards"]]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"token cache {self.path}: {META_FILE} is corrupt ({e!r}); "
                             f"{rebuild_hint(self.path)}.") from e
        if version != FORMAT_VERSION:
            raise ValueError(f"token cache {self.path} has format version {version}, this code "
                             f"reads {FORMAT_VERSION}; {rebuild_hint(self.path)}.")
        self._local = _local_copy(root, meta_text, info, local_dir) if is_remote(root) else root
        self._in_memory = False
        self._open_shards()

    @classmethod
    def from_arrays(cls, codes: np.ndarray, labels: np.ndarray,
                    meta: dict[str, Any] | None = None) -> TokenCache:
        """An in-memory cache over int (N, h, w) codes and int (N,) labels (tests, small data)."""
        codes, labels = np.asarray(codes), np.asarray(labels)
        _check_arrays(codes, labels, None, "TokenCache.from_arrays")
        self = cls.__new__(cls)
        self.path = "<in memory>"
        self._set_arrays(codes, labels, meta or {})
        return self

    def _set_arrays(self, codes, labels, meta):
        self.meta, self.grid, self.dtype = meta, tuple(codes.shape[1:]), codes.dtype
        self.shard_lengths = [len(codes)]
        self.info = dict(format_version=1, num_examples=len(codes), grid=list(self.grid),
                         dtype=codes.dtype.name, shards=[], meta=meta)
        self._in_memory = True
        self._shards = [(codes, labels)]
        self._starts = np.zeros(1, np.int64)

    def _open_npz(self, root: epath.Path) -> None:
        """Format 1: one .npz holding everything, loaded whole (such caches were small)."""
        try:
            with root.open("rb") as f, np.load(f, allow_pickle=False) as npz:
                codes, labels = np.asarray(npz["codes"]), np.asarray(npz["labels"])
                meta, version = json.loads(str(npz["meta_json"])), int(npz["format_version"])
        except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as e:
            raise ValueError(
                f"token cache {self.path!r} is corrupt or not a token cache ({type(e).__name__}: "
                f"{e}); {rebuild_hint(self.path)}.") from e
        if version != 1 or codes.ndim != 3 or labels.shape != codes.shape[:1]:
            raise ValueError(f"token cache {self.path!r}: format {version}, codes {codes.shape},"
                             f" labels {labels.shape}; {rebuild_hint(self.path)}.")
        self._set_arrays(codes, labels, meta)

    def _open_shards(self) -> None:
        shards = []
        for s in self.info["shards"]:
            try:
                if s["length"]:  # an empty file cannot be mapped
                    codes = np.load(os.fspath(self._local / s["codes"]), mmap_mode="r")
                    labels = np.load(os.fspath(self._local / s["labels"]), mmap_mode="r")
                else:
                    codes = np.zeros((0,) + self.grid, s["dtype"])
                    labels = np.zeros((0,), np.int32)
            except (ValueError, OSError) as e:
                raise ValueError(f"token cache {self.path}: shard {s['id']} cannot be read "
                                 f"({type(e).__name__}: {e}); {rebuild_hint(self.path)}.") from e
            want = (s["length"],) + self.grid
            if codes.shape != want or labels.shape != want[:1] or codes.dtype != s["dtype"]:
                raise ValueError(f"token cache {self.path}: shard {s['id']} holds codes "
                                 f"{codes.shape} {codes.dtype}, labels {labels.shape}, but "
                                 f"{META_FILE} says {want} {s['dtype']}; "
                                 f"{rebuild_hint(self.path)}.")
            shards.append((codes, labels))
        self._shards = shards
        self._starts = np.cumsum([0] + self.shard_lengths[:-1]).astype(np.int64)

    # Pickle the description, not the maps: np.memmap would pickle as a full in-RAM copy.
    def __getstate__(self):
        state = dict(self.__dict__)
        if not self._in_memory:
            state.pop("_shards")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if not self._in_memory:
            self._open_shards()

    def __len__(self) -> int:
        return int(sum(self.shard_lengths))

    def __repr__(self) -> str:
        return (f"TokenCache({self.path!r}, {len(self)} maps {self.grid} {self.dtype}, "
                f"{len(self.shard_lengths)} shard(s))")

    def __getitem__(self, indices):
        """int i -> (codes int32 (h, w), label int32 ());
        int array (n,) -> (codes int32 (n, h, w), labels int32 (n,)). Reads only those maps."""
        scalar = np.ndim(indices) == 0
        idx = np.atleast_1d(np.asarray(indices, np.int64))
        n = len(self)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"token cache index out of range [0, {n}): "
                             f"{idx[(idx < 0) | (idx >= n)][0]}")
        codes = np.empty((len(idx),) + self.grid, np.int32)
        labels = np.empty((len(idx),), np.int32)
        shard_of = np.searchsorted(self._starts, idx, side="right") - 1
        for k in np.unique(shard_of):
            rows = np.flatnonzero(shard_of == k)
            local = idx[rows] - self._starts[k]
            codes[rows] = self._shards[k][0][local]
            labels[rows] = self._shards[k][1][local]
        return (codes[0], labels[0]) if scalar else (codes, labels)

    def _chunks(self, which: int) -> Iterable[tuple[int, np.ndarray]]:
        """(global index of the first record, array chunk) over codes (0) or labels (1)."""
        for k, shard in enumerate(self._shards):
            for a in range(0, len(shard[which]), _CHUNK):
                yield int(self._starts[k]) + a, np.asarray(shard[which][a:a + _CHUNK])

    def code_counts(self, minlength: int = 0) -> np.ndarray:
        """int64 (max(minlength, max code + 1),): how often each code occurs, read in chunks."""
        counts = np.zeros(minlength, np.int64)
        for _, chunk in self._chunks(0):
            c = np.bincount(chunk.ravel(), minlength=len(counts))
            counts = np.pad(counts, (0, len(c) - len(counts))) + c
        return counts

    def validate(self, *, num_classes: int | None = None, vocab_size: int | None = None) -> None:
        """Raises ValueError naming the first record whose label is outside [0, num_classes)
        (or negative) or whose codes reach vocab_size. Labels are scanned; codes only where a
        shard's recorded maximum (or, in memory, the data) says one is too large."""
        for start, chunk in self._chunks(1):
            bad = chunk < 0
            if num_classes is not None:
                bad |= chunk >= num_classes
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                bound = (f"in [0, {num_classes}) (config.model.num_classes)" if num_classes
                         else ">= 0")
                raise ValueError(
                    f"token cache {self.path}: record {start + i} has label {int(chunk[i])}; "
                    f"labels must be {bound}. Fix the labels or num_classes; "
                    f"{rebuild_hint(self.path)}.")
        if vocab_size is None:
            return
        maxima = [s["code_max"] for s in self.info["shards"]] or [vocab_size]
        if self._in_memory or max(maxima) >= vocab_size:
            for start, chunk in self._chunks(0):
                rows = (chunk.reshape(len(chunk), -1) >= vocab_size).any(axis=1)
                if rows.any():
                    i = int(np.flatnonzero(rows)[0])
                    raise ValueError(
                        f"token cache {self.path}: record {start + i} has code "
                        f"{int(chunk[i].max())} >= config.model.vocab_size={vocab_size}: it was "
                        f"encoded with another tokenizer; {rebuild_hint(self.path)}.")


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True))


def check_token_cache(path: Any, expected_meta: dict[str, Any] | None = None, *,
                      num_classes: int | None = None, vocab_size: int | None = None,
                      local_dir: Any = None) -> TokenCache:
    """Opens the cache and stops with one clear message if it does not fit the config.

    Args:
      path: the cache (or an open TokenCache).
      expected_meta: fields that must equal the cache's metadata, compared in the given order
        after a JSON round trip (tuples == lists); 'grid' is also compared with the maps' grid.
      num_classes, vocab_size: if given, every label must be in [0, num_classes) and every
        code < vocab_size (see TokenCache.validate).

    Returns:
      The open TokenCache.

    Raises:
      ValueError: the first field that differs, e.g. "augment='none' in the cache but 'flip'
        in the config; delete <path> or pass --config.tokens.rebuild=True ...", or a bad
        label/code naming its record; IncompleteTokenCacheError; FileNotFoundError.
    """
    cache = path if isinstance(path, TokenCache) else TokenCache(path, local_dir=local_dir)
    have_all = dict(cache.meta)
    have_all.setdefault("grid", list(cache.grid))
    for key, want in (expected_meta or {}).items():
        if key == "grid" and list(want) != list(cache.grid):
            have = list(cache.grid)
        elif key not in have_all:
            raise ValueError(f"token cache {cache.path}: {key} is not recorded in the cache "
                             f"(the config wants {want!r}); {rebuild_hint(cache.path)}.")
        else:
            have = have_all[key]
        if _as_json(have) != _as_json(want):
            raise ValueError(f"token cache {cache.path}: {key}={have!r} in the cache but "
                             f"{want!r} in the config; {rebuild_hint(cache.path)}.")
    cache.validate(num_classes=num_classes, vocab_size=vocab_size)
    return cache


def load_token_cache(path: Any) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The whole cache in memory: (codes int32 (N, h, w), labels int32 (N,), meta dict).

    For small caches and tests only; training reads `TokenCache(path)` without loading it.
    """
    cache = TokenCache(path)
    codes, labels = cache[np.arange(len(cache))]
    return codes, labels, cache.meta
