"""Token-map caches: the dataset encoded once by the tokenizer, stored as one .npz.

Generator training reads codes, not pixels, so the tokenizer runs once per dataset. The file
holds `codes` int32 (N, h, w), `labels` int32 (N,), `meta_json` (the caller's metadata as a
JSON string, so loading never unpickles anything) and `format_version`.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from typing import Any

import numpy as np

FORMAT_VERSION = 1


def save_token_cache(path: str, codes: np.ndarray, labels: np.ndarray,
                     meta: dict[str, Any]) -> None:
    """Writes the cache atomically: a temp file in the same folder, fsync, then rename.

    A crash mid-write leaves either the old file or none, never a truncated one.

    Args:
      path: destination, conventionally ending in .npz (folders are created).
      codes: int (N, h, w) token ids >= 0.
      labels: int (N,) class ids.
      meta: JSON-serialisable facts to check on load (tokenizer, image size, split, ...).
    """
    codes = np.asarray(codes)
    labels = np.asarray(labels)
    if codes.ndim != 3 or labels.shape != codes.shape[:1]:
        raise ValueError(f"save_token_cache: codes {codes.shape} and labels {labels.shape}; "
                         "expected codes (N, h, w) and labels (N,).")
    for name, arr in (("codes", codes), ("labels", labels)):
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"save_token_cache: {name} has dtype {arr.dtype}; expected ints.")
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
            raise ValueError(f"save_token_cache: {name} range [{arr.min()}, {arr.max()}] does "
                             "not fit non-negative int32.")
    try:
        meta_json = json.dumps(meta, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"save_token_cache: meta must be JSON-serialisable ({e}).") from e

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_token_cache_", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, codes=codes.astype(np.int32), labels=labels.astype(np.int32),
                     meta_json=np.array(meta_json), format_version=np.int32(FORMAT_VERSION))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a cache is shared data
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_token_cache(path: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Reads a cache written by `save_token_cache`.

    Returns:
      (codes int32 (N, h, w), labels int32 (N,), meta dict).

    Raises:
      FileNotFoundError: no file at `path` (the message says how to create it).
      ValueError: the file is not a complete token cache (delete it and re-encode).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"token cache {path!r} not found: encode the dataset with the tokenizer first (the "
            "generator training step writes it when it is missing), or fix the path.")
    try:
        with np.load(path, allow_pickle=False) as npz:
            codes = np.asarray(npz["codes"])
            labels = np.asarray(npz["labels"])
            meta = json.loads(str(npz["meta_json"]))
            version = int(npz["format_version"])
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as e:
        raise ValueError(
            f"token cache {path!r} is corrupt or not a token cache ({type(e).__name__}: {e}); "
            "delete it and encode the dataset again.") from e
    if version != FORMAT_VERSION:
        raise ValueError(f"token cache {path!r} has format version {version}, this code reads "
                         f"{FORMAT_VERSION}; delete it and encode the dataset again.")
    if codes.ndim != 3 or labels.shape != codes.shape[:1]:
        raise ValueError(f"token cache {path!r} holds codes {codes.shape} and labels "
                         f"{labels.shape}; delete it and encode the dataset again.")
    return codes.astype(np.int32), labels.astype(np.int32), meta
