"""Read PyTorch-style state dicts from LlamaGen `.pt` files, `.npz` or `.safetensors` as numpy.

The converters (`convert/vq.py`, `convert/gpt.py`) map these flat dicts, keyed by LlamaGen's own
names (`encoder.conv_in.weight`, `layers.0.attention.wqkv.weight`, ...), onto Flax parameter trees.
Reading is kept apart from mapping so every format gives the converter the same input:

- `.pt` / `.pth` / `.bin` / `.ckpt`: a torch pickle, loaded with `weights_only=True` and no other
  globals allowed than `argparse.Namespace` (LlamaGen training checkpoints pickle their argparse
  args next to the weights). torch is imported only here, lazily: it is an optional dependency.
- `.npz`: the parity fixtures' layout, arrays under `sd/<key>` plus a JSON string `config`; a
  plain `.npz` of the state dict (no `sd/` prefix) works too.
- `.safetensors`: a flat state dict.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

# Formats by file extension.
TORCH_EXTENSIONS = (".pt", ".pth", ".bin", ".ckpt")
NPZ_EXTENSIONS = (".npz",)
SAFETENSORS_EXTENSIONS = (".safetensors",)

# Entries under which LlamaGen (and DDP/DeepSpeed wrappers) nest the weights of a checkpoint, in
# the order they are tried: LlamaGen's own loaders read "model" first.
WRAPPER_KEYS = ("model", "ema", "module", "state_dict")

# Prefixes that wrappers add to every key: DDP ("module.") and torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# Key prefix of the state dict inside the parity fixtures' .npz files.
NPZ_PREFIX = "sd/"


def _extension(path: str) -> str:
    return os.path.splitext(str(path))[1].lower()


def _check_exists(path: str) -> None:
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint file {path!r} does not exist or is not a file: "
                         "pass the path of a LlamaGen .pt, or an .npz / .safetensors state dict")


def _strip_wrapper_prefixes(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Removes a prefix such as `module.` when every key carries it (DDP / torch.compile)."""
    changed = True
    while changed and sd:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def _unwrap(obj: Any, path: str, key: str | None) -> dict[str, Any]:
    """Finds the flat {name: tensor} mapping inside a loaded checkpoint object."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a state dict: save "
                         "`model.state_dict()` (or LlamaGen's {'model': state_dict, ...}) instead")
    if key is not None:
        if key not in obj:
            raise ValueError(f"{path!r} has no entry {key!r}; its top-level keys are "
                             f"{sorted(map(str, obj))[:20]}")
        return _unwrap(obj[key], path, None) if _is_wrapper(obj[key]) else obj[key]
    if _is_wrapper(obj):
        for k in WRAPPER_KEYS:
            if isinstance(obj.get(k), dict):
                return _unwrap(obj[k], path, None)
    return obj


def _is_wrapper(obj: Any) -> bool:
    """True when `obj` nests the weights under one of WRAPPER_KEYS rather than holding them."""
    return isinstance(obj, dict) and any(isinstance(obj.get(k), dict) for k in WRAPPER_KEYS)


def _load_torch(path: str, key: str | None) -> dict[str, np.ndarray]:
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ImportError(
            f"reading the PyTorch checkpoint {path!r} needs torch, which is not installed: "
            "`pip install radar_jax[torch]`, or convert the file once to .npz / .safetensors "
            "(a flat {name: array} state dict) on a machine that has torch") from e
    import argparse  # pylint: disable=import-outside-toplevel

    try:
        # weights_only=True refuses arbitrary pickled code; LlamaGen's training checkpoints
        # also pickle an argparse.Namespace ("args"), the one extra global we allow.
        if hasattr(torch.serialization, "safe_globals"):
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        else:  # torch < 2.5 has no safe_globals context manager.
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (UnpicklingError, RuntimeError, ...).
        raise ValueError(f"could not read {path!r} with torch.load(weights_only=True): {e}") from e
    sd = _unwrap(obj, path, key)
    out = {}
    for name, value in sd.items():
        if not isinstance(value, torch.Tensor):
            continue  # Non-tensor entries (step counters, ...) are not parameters.
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16: widen losslessly.
            value = value.float()
        out[str(name)] = value.numpy()
    return out


def _load_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            files = list(data.files)
            has_prefix = any(k.startswith(NPZ_PREFIX) for k in files)
            out = {}
            for k in files:
                if has_prefix:
                    if k.startswith(NPZ_PREFIX):
                        out[k[len(NPZ_PREFIX):]] = data[k]
                elif k != "config":
                    out[k] = data[k]
    except Exception as e:  # OSError, ValueError, zipfile.BadZipFile, EOFError...
        raise ValueError(f"could not read {path!r} as an .npz archive: {e}") from e
    return out


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
        return dict(load_file(path))
    except Exception as e:  # safetensors raises SafetensorError, which is no ValueError.
        raise ValueError(f"could not read {path!r} as a .safetensors file: {e}") from e


def load_state_dict(path: str | os.PathLike, *, key: str | None = None) -> dict[str, np.ndarray]:
    """Reads a flat state dict {torch name: numpy array} from a checkpoint file.

    Args:
      path: a LlamaGen `.pt` (also `.pth`, `.bin`, `.ckpt`), an `.npz` (arrays under `sd/<key>`
        as in the parity fixtures, or bare keys) or a `.safetensors` file.
      key: for torch files, the entry holding the weights (e.g. "ema"); by default the first of
        "model", "ema", "module", "state_dict" that exists, or the whole object.

    Returns:
      {name: np.ndarray} with LlamaGen's key names (conv weights OIHW, linear weights (out, in)),
      dtypes as stored (bfloat16 widened to float32). `module.` / `_orig_mod.` prefixes that
      every key carries are stripped.

    Raises:
      ValueError: the file is missing, unreadable, has an unknown extension, or holds no tensors.
      ImportError: a torch file is given and torch is not installed.
    """
    path = os.fspath(path)
    ext = _extension(path)
    if ext not in TORCH_EXTENSIONS + NPZ_EXTENSIONS + SAFETENSORS_EXTENSIONS:
        raise ValueError(f"unknown checkpoint extension {ext!r} for {path!r}: expected one of "
                         f"{TORCH_EXTENSIONS + NPZ_EXTENSIONS + SAFETENSORS_EXTENSIONS}")
    _check_exists(path)
    if ext in TORCH_EXTENSIONS:
        sd = _load_torch(path, key)
    elif ext in NPZ_EXTENSIONS:
        sd = _load_npz(path)
    else:
        sd = _load_safetensors(path)
    sd = _strip_wrapper_prefixes(sd)
    if not sd:
        raise ValueError(f"{path!r} holds no tensors: expected a state dict of named arrays")
    return sd


def load_npz_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON `config` entry of an `.npz` checkpoint as a dict, or None when there is none.

    Files other than `.npz` carry no config and give None.

    Raises:
      ValueError: the `config` entry exists but is not a JSON object.
    """
    path = os.fspath(path)
    if _extension(path) not in NPZ_EXTENSIONS:
        return None
    _check_exists(path)
    with np.load(path, allow_pickle=False) as data:
        if "config" not in data.files:
            return None
        raw = data["config"]
    try:
        config = json.loads(str(raw.item() if raw.ndim == 0 else raw))
    except json.JSONDecodeError as e:
        raise ValueError(f"the 'config' entry of {path!r} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"the 'config' entry of {path!r} is a {type(config).__name__}, "
                         "expected a JSON object of constructor arguments")
    return config
