"""Token-map caches: the format and its writers (the reader is token_reader.TokenCache).

Generator training reads codes, not pixels, so the tokenizer runs once per dataset. ImageNet
with ten crops is 12.8M maps of 16x16 codes: 6.5 GB as uint16, too big to load whole into
every host's RAM, so a cache is a directory of memory-mapped .npy shards:

    <path>/codes-00000.npy   codes (n0, h, w), uint16 when the codebook fits, else int32
    <path>/labels-00000.npy  labels (n0,) int32
    <path>/shard-00000.json  the shard's commit record: length, grid, dtype, value ranges
    ...                      one triple per shard (usually one per encoding process)
    <path>/meta.json         written last, by one process: format_version, num_examples,
                             grid, dtype, the shard list and the caller's metadata ('meta')

A cache without meta.json is incomplete (an encode that has not finished, or crashed) and is
never read. Every file is written under a temp name unique to its process, then renamed, so a
reader never sees half a file. All IO goes through etils.epath, so <path> may be gs://...

gs:// caches cannot be memory-mapped: `TokenCache` (token_reader.py) copies the shards to
local disk first (once; `local_dir=`, default under the system temp dir; a copy whose
meta.json matches is reused) and maps the copy, so random reads stay local and no host holds
the cache in RAM.

Multi-host encoding:
    every process:   write_token_shard(path, jax.process_index(), codes, labels, vocab_size=V)
    barrier (all shards written), then process 0:
                     finalize_token_cache(path, meta, num_shards=jax.process_count())
A single process uses `save_token_cache(path, codes, labels, meta)` (one shard + finalize).
Caches of format 1 (one .npz file) are still read, whole, by `TokenCache`/`load_token_cache`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import uuid
from typing import Any

from etils import epath
import numpy as np

FORMAT_VERSION = 2
META_FILE = "meta.json"
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.json$")
_UINT16_CODES = 1 << 16  # codebooks up to 65,536 entries fit uint16 (LlamaGen's is 16,384)


class IncompleteTokenCacheError(ValueError):
    """The cache directory exists but has no meta.json: its encode has not finished."""


def rebuild_hint(path: Any) -> str:
    return f"delete {path} or pass --config.tokens.rebuild=True to encode the dataset again"


def is_remote(path: Any) -> bool:
    """True for gs://, s3://, ... paths (which cannot be memory-mapped or os-accessed)."""
    return "://" in str(path)


def codes_dtype(vocab_size: int | None = None, max_code: int | None = None) -> np.dtype:
    """uint16 when codes 0..vocab_size-1 (or 0..max_code) fit, else int32."""
    n = vocab_size if vocab_size is not None else (max_code if max_code is not None else 0) + 1
    return np.dtype(np.uint16 if n <= _UINT16_CODES else np.int32)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def _shard_names(shard_id: int) -> tuple[str, str, str]:
    return f"codes-{shard_id:05d}.npy", f"labels-{shard_id:05d}.npy", f"shard-{shard_id:05d}.json"


def _tmp_name(final: epath.Path) -> epath.Path:
    # Unique per host, process and call: two processes never write the same temp file.
    tag = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return final.parent / f".tmp-{final.name}.{tag}"


def _atomic_write(final: epath.Path, write) -> None:
    """Calls write(f) on a temp file next to `final`, syncs it (locally), renames it."""
    tmp = _tmp_name(final)
    try:
        with tmp.open("wb") as f:
            write(f)
            if not is_remote(final) and hasattr(f, "fileno"):
                f.flush()
                os.fsync(f.fileno())  # the rename must not land before the data
        tmp.replace(final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json(final: epath.Path, obj: Any) -> None:
    _atomic_write(final, lambda f: f.write(json.dumps(obj, indent=1, sort_keys=True).encode()))


def _normalised_meta(meta: dict[str, Any], who: str) -> dict[str, Any]:
    """The metadata as it reads back from JSON (tuples become lists), or a clear error."""
    if not isinstance(meta, dict):
        raise ValueError(f"{who}: meta must be a dict, got {type(meta).__name__}.")
    try:
        return json.loads(json.dumps(meta, sort_keys=True))
    except TypeError as e:
        raise ValueError(f"{who}: meta must be JSON-serialisable ({e}).") from e


def _first_record_outside(arr: np.ndarray, low: int, high: int) -> tuple[int, int] | None:
    """(record index, value) of the first element of int (N, ...) `arr` outside [low, high],
    or None. min/max first: the masks are built only when something is wrong."""
    if arr.size == 0 or (arr.min() >= low and arr.max() <= high):
        return None
    flat = arr.reshape(len(arr), -1)
    bad = (flat < low) | (flat > high)
    i = int(np.flatnonzero(bad.any(axis=1))[0])
    return i, int(flat[i][bad[i]][0])


def _check_arrays(codes: np.ndarray, labels: np.ndarray, vocab_size: int | None, who: str):
    """Shapes (N, h, w) / (N,), int dtypes, labels >= 0, 0 <= codes < vocab_size (or int32)."""
    if codes.ndim != 3 or labels.shape != codes.shape[:1]:
        raise ValueError(f"{who}: codes {codes.shape} and labels {labels.shape}; expected codes "
                         "(N, h, w) and labels (N,).")
    int32_max = int(np.iinfo(np.int32).max)
    for name, arr, high in (("code", codes, int32_max if vocab_size is None else vocab_size - 1),
                            ("label", labels, int32_max)):
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{who}: {name}s have dtype {arr.dtype}; expected ints.")
        bad = _first_record_outside(arr, 0, high)
        if bad is not None:
            limit = (f">= vocab_size={vocab_size}; encode with the tokenizer whose codebook this "
                     "is" if name == "code" and vocab_size is not None and bad[1] >= 0
                     else f"outside [0, {high}]; fix the encoder's output")
            raise ValueError(f"{who}: record {bad[0]} has {name} {bad[1]} {limit}.")


def write_token_shard(path: Any, shard_id: int, codes: np.ndarray, labels: np.ndarray, *,
                      vocab_size: int | None = None) -> dict[str, Any]:
    """Writes one shard of a cache (each encoding process writes its own shard_id).

    Atomic: codes, labels, then the shard's commit record shard-<id>.json, each under a temp
    name unique to this process and renamed into place. Rewriting a shard id replaces it.
    A process may write several shards to bound its memory (e.g. shard_id = chunk *
    process_count + process_index); finalize then expects all ids 0..K-1.

    Args:
      path: the cache directory (local or gs://; created if missing).
      shard_id: int >= 0; shards are read back in id order (use jax.process_index()).
      codes: int (n, h, w) token ids >= 0 (n may be 0).
      labels: int (n,) class ids >= 0.
      vocab_size: the codebook size; picks the stored dtype (uint16 if <= 65,536, else int32)
        identically on every process, and rejects codes >= vocab_size. None: the dtype comes
        from this shard's largest code.

    Returns:
      The commit record (dict: id, length, grid, dtype, code_max, label_min, label_max, ...).

    Raises:
      ValueError: bad shapes/values (naming the record), or the cache is already finalized.
    """
    who = f"write_token_shard({path}, shard {shard_id})"
    if not isinstance(shard_id, (int, np.integer)) or shard_id < 0:
        raise ValueError(f"{who}: shard_id must be an int >= 0.")
    codes, labels = np.asarray(codes), np.asarray(labels)
    _check_arrays(codes, labels, vocab_size, who)
    root = epath.Path(path)
    if (root / META_FILE).exists():
        raise ValueError(f"{who}: {root} is already a finished token cache (it has {META_FILE});"
                         f" {rebuild_hint(root)}, or call remove_token_cache first.")
    root.mkdir(parents=True, exist_ok=True)
    code_max = int(codes.max()) if codes.size else -1
    dtype = codes_dtype(vocab_size, max(code_max, 0))
    codes_name, labels_name, record_name = _shard_names(int(shard_id))
    _atomic_write(root / codes_name, lambda f: np.save(f, codes.astype(dtype, copy=False)))
    _atomic_write(root / labels_name, lambda f: np.save(f, labels.astype(np.int32, copy=False)))
    record = dict(id=int(shard_id), codes=codes_name, labels=labels_name, length=len(codes),
                  grid=list(codes.shape[1:]), dtype=dtype.name, code_max=code_max,
                  label_min=int(labels.min()) if labels.size else 0,
                  label_max=int(labels.max()) if labels.size else -1)
    _write_json(root / record_name, record)
    return record


def finalize_token_cache(path: Any, meta: dict[str, Any], *,
                         num_shards: int | None = None) -> dict[str, Any]:
    """Makes the shards under `path` a readable cache: writes meta.json (atomically).

    Call it once, from one process (0), after every process's write_token_shard returned.

    Args:
      path: the cache directory.
      meta: the caller's JSON-serialisable facts to check on load: tokenizer path and
        fingerprint, augment, image size, grid, vocab_size, ...
      num_shards: the shards to expect, ids 0..num_shards-1 (e.g. jax.process_count());
        others are ignored. None: every shard present, which must be 0..K-1.

    Returns:
      The meta.json content: format_version, num_examples, grid, dtype, shards (list of
      commit records, each with its length), meta (the caller's metadata).

    Raises:
      ValueError: shards missing (an encoding process has not finished) or inconsistent.
    """
    root = epath.Path(path)
    meta = _normalised_meta(meta, f"finalize_token_cache({path})")
    found = {}
    if root.is_dir():
        for entry in root.iterdir():
            m = _SHARD_RE.match(entry.name)
            if m:
                found[int(m.group(1))] = entry
    wanted = range(num_shards if num_shards is not None else max(found, default=-1) + 1)
    missing = [i for i in wanted if i not in found]
    if not wanted or missing:
        raise ValueError(f"finalize_token_cache({path}): shard(s) {missing or [0]} not written "
                         "yet; call it after every encoding process has finished "
                         "write_token_shard (a process may have crashed: re-encode).")
    shards = [json.loads(found[i].read_text()) for i in wanted]
    grids = {tuple(s["grid"]) for s in shards if s["length"]} or {tuple(shards[0]["grid"])}
    if len(grids) != 1:
        raise ValueError(f"finalize_token_cache({path}): shards hold different grids {grids}.")
    grid = list(grids.pop())
    if "grid" in meta and list(meta["grid"]) != grid:
        raise ValueError(f"finalize_token_cache({path}): meta grid={meta['grid']} but the "
                         f"shards hold {tuple(grid)} token maps.")
    for s in shards:
        for name in (s["codes"], s["labels"]):
            if not (root / name).exists():
                raise ValueError(f"finalize_token_cache({path}): {name} is missing; re-encode.")
    dtype = "int32" if any(s["dtype"] == "int32" for s in shards) else "uint16"
    info = dict(format_version=FORMAT_VERSION, num_examples=sum(s["length"] for s in shards),
                grid=grid, dtype=dtype, shards=shards, meta=meta)
    _write_json(root / META_FILE, info)
    return info


def remove_token_cache(path: Any) -> None:
    """Deletes a cache (directory, or a format-1 .npz file); nothing if there is none."""
    p = epath.Path(path)
    if p.is_dir():
        p.rmtree()
    elif p.exists():
        p.unlink()


def save_token_cache(path: Any, codes: np.ndarray, labels: np.ndarray,
                     meta: dict[str, Any]) -> None:
    """One-process convenience: replaces any cache at `path` by one shard + meta.json.

    meta.json goes first, so a crash mid-write leaves an incomplete cache (never read), not a
    mix of old and new. Codes are stored as uint16 when meta['vocab_size'] (or the largest
    code) fits.

    Args:
      path: the cache directory (local or gs://).
      codes: int (N, h, w) token ids >= 0.
      labels: int (N,) class ids >= 0.
      meta: JSON-serialisable facts to check on load (tokenizer, image size, augment, ...).
    """
    who = f"save_token_cache({path})"
    _normalised_meta(meta, who)  # before touching the old cache
    vocab_size = meta.get("vocab_size")
    _check_arrays(np.asarray(codes), np.asarray(labels), vocab_size, who)
    root = epath.Path(path)
    if root.exists() and not root.is_dir():
        root.unlink()  # a format-1 .npz at this path
    elif root.is_dir():
        (root / META_FILE).unlink(missing_ok=True)
        for entry in root.iterdir():  # stale shards of an earlier multi-process encode
            if re.match(r"^(codes|labels|shard)-\d{5,}\.(npy|json)$", entry.name):
                entry.unlink(missing_ok=True)
    write_token_shard(root, 0, codes, labels, vocab_size=vocab_size)
    finalize_token_cache(root, meta, num_shards=1)


def token_cache_state(path: Any) -> str:
    """'missing', 'incomplete' (a directory without meta.json) or 'complete'."""
    p = epath.Path(path)
    if not p.exists():
        return "missing"
    if p.is_dir() and not (p / META_FILE).exists():
        return "incomplete"
    return "complete"
