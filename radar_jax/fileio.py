"""The one file-system layer: every path radar_jax reads or writes goes through etils.epath.

A workdir, token cache, params folder or image may be a local path or a gs:// URL; epath (the
layer Orbax itself uses) gives both the same pathlib API, so nothing here special-cases either.
Never pass such a path through `os.path.abspath`: it turns "gs://b/x" into "<cwd>/gs:/b/x".

Writes are atomic where a reader decides from the file (records that mark a stage finished,
metrics tables, images): the bytes go to a temporary name unique to this process and call, then
are renamed over the target, so a reader sees the old file or the new one, never half of one,
and two processes writing beside each other never share a temporary name.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import uuid
from typing import Any

from etils import epath

from radar_jax import config_io

PathLike = str | os.PathLike | epath.Path


def path(p: PathLike) -> epath.Path:
    """An epath.Path for a local path or a cloud URL; local relative paths become absolute
    (so a path logged or stored in a record still means the same file from another cwd)."""
    out = epath.Path(p)
    scheme = str(p).partition("://")[0] if "://" in str(p) else ""
    if scheme in _CLOUD_CLIENTS:
        if not _cloud_client_installed(scheme):
            module, extra = _CLOUD_CLIENTS[scheme]
            fix = f"pip install 'radar_jax[{extra}]'" if extra else f"pip install {module}"
            raise config_io.ConfigError(f"{p}: reading {scheme}:// paths needs {module} (or "
                                        f"TensorFlow) and neither is installed; {fix}.")
    elif not out.is_absolute():
        out = out.absolute()
    return out


# The package epath reads each cloud scheme through when TensorFlow (whose gfile epath prefers)
# is absent, and the extra that installs it.
_CLOUD_CLIENTS = {"gs": ("gcsfs", "gcs"), "s3": ("s3fs", None)}


@functools.cache
def _cloud_client_installed(scheme: str) -> bool:
    """Whether epath can read `scheme`:// here. Checked at the first such path, because
    without a client the failure comes from deep inside a stage, or a broad `except` takes
    it for an unreadable checkpoint."""
    return bool(importlib.util.find_spec(_CLOUD_CLIENTS[scheme][0])
                or importlib.util.find_spec("tensorflow"))


def _temp_name(target: epath.Path) -> epath.Path:
    return target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_bytes(target: PathLike, data: bytes) -> epath.Path:
    """Writes `data` to `target` atomically (temp file, then rename); creates the folder."""
    target = path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(target)
    try:
        tmp.write_bytes(data)
        tmp.replace(target)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return target


def write_json(target: PathLike, obj: Any) -> epath.Path:
    """Writes `obj` as indented JSON, atomically."""
    return write_bytes(target, json.dumps(obj, indent=1, sort_keys=True).encode("utf-8"))


def read_json(source: PathLike) -> Any | None:
    """The parsed JSON at `source`, or None when there is no such file."""
    source = path(source)
    if not source.exists():
        return None
    return json.loads(source.read_text())
