"""FID Inception-v3 weights (PyTorch state dict) -> Flax variables of `metrics.inception`.

Supported files (downloaded once by the user; nothing downloads at run time):
- torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`
  (github.com/toshas/torch-fidelity/releases/download/v0.2.0/...), the TensorFlow 2015 graph's
  constants converted by torch-fidelity's utils/util_convert_inception_weights.py.
- pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (github.com/mseitzer/pytorch-fid
  releases, tag fid_weights): supported, same key names. pytorch-fid loads it strictly into
  torchvision's `Inception3(num_classes=1008, aux_logits=False)` with its FID blocks swapped in,
  whose module names (Conv2d_1a_3x3 ... Mixed_7c.branch_pool, fc) and shapes are exactly
  torch-fidelity's. Note the features then follow torch-fidelity's / TF's input pipeline
  (TF-1 bilinear resize), not pytorch-fid's own `F.interpolate` resize.
- an `.npz` (or `.safetensors`) of either state dict, same keys.

Mapping: `X.conv.weight` (O, I, kh, kw) -> params `X/conv/kernel` (kh, kw, I, O);
`X.bn.weight`/`bias` -> params `X/bn/scale`/`bias`; `X.bn.running_mean`/`running_var` ->
batch_stats `X/bn/mean`/`var`; `fc.weight` (1008, 2048) -> params `fc/kernel` (2048, 1008);
`fc.bias` -> `fc/bias`. `*.num_batches_tracked` counters are ignored.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np

from radar_jax.convert.state_dict import load_state_dict
from radar_jax.metrics import inception as inception_lib

_BN_NAMES = {("params", "scale"): "weight", ("params", "bias"): "bias",
             ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}
_WHICH_FILE = ("expected torch-fidelity's weights-inception-2015-12-05-6726825d.pth, pytorch-fid's "
               "pt_inception-2015-12-05-6726825d.pth, or an .npz of the same state dict")


def _torch_name(collection: str, path: tuple[str, ...]) -> str:
    """Flax (collection, module path..., leaf) -> torch state-dict key."""
    *modules, leaf = path
    if modules[-1] == "bn":
        return ".".join(modules + [_BN_NAMES[(collection, leaf)]])
    return ".".join(modules + ["weight" if leaf == "kernel" else leaf])


def _to_flax(value: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
    if path[-1] == "kernel" and value.ndim == 4:   # conv OIHW -> HWIO
        return value.transpose(2, 3, 1, 0)
    if path[-1] == "kernel":                       # fc (out, in) -> (in, out)
        return value.T
    return value


@functools.cache   # a constant of the architecture: trace it once per process
def _expected():
    """{torch key: (collection, flax path, flax shape)} for every variable of InceptionV3."""
    shapes = inception_lib.variable_shapes()
    table = {}
    for collection, tree in shapes.items():
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            path = tuple(k.key for k in key_path)
            table[_torch_name(collection, path)] = (collection, path, tuple(leaf.shape))
    return table


def variables_from_state_dict(sd: dict[str, np.ndarray], source: str = "the state dict") -> dict:
    """Maps a flat torch-fidelity / pytorch-fid Inception state dict onto Flax variables.

    Args:
      sd: {torch key: numpy array}, e.g. from `radar_jax.convert.load_state_dict`.
      source: names the file in error messages.

    Returns:
      {'params': ..., 'batch_stats': ...} nested dicts of float32 numpy arrays for
      `metrics.inception.InceptionV3().apply`.

    Raises:
      ValueError: naming every missing, unexpected and mis-shaped key.
    """
    expected = _expected()
    given = {k: v for k, v in sd.items() if not k.endswith(".num_batches_tracked")}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    misshaped, out = [], {"params": {}, "batch_stats": {}}
    for key in sorted(set(expected) & set(given)):
        collection, path, shape = expected[key]
        value = _to_flax(np.asarray(given[key]), path)
        if tuple(value.shape) != shape:
            torch_shape = tuple(np.shape(given[key]))
            misshaped.append(f"{key} has shape {torch_shape}, expected "
                             f"{tuple(_torch_shape(path, shape))}")
            continue
        node = out[collection]
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value.astype(np.float32)
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if misshaped:
        problems.append("mis-shaped keys: " + "; ".join(misshaped))
    if problems:
        raise ValueError(f"{source} is not the FID Inception-v3 state dict: "
                         + " | ".join(problems) + f". {_WHICH_FILE}")
    return out


def _torch_shape(path, flax_shape):
    if path[-1] == "kernel" and len(flax_shape) == 4:
        kh, kw, i, o = flax_shape
        return (o, i, kh, kw)
    if path[-1] == "kernel":
        return flax_shape[::-1]
    return flax_shape


def to_state_dict(variables) -> dict[str, np.ndarray]:
    """The inverse map: Flax variables -> {torch key: float32 numpy} (e.g. to write an .npz)."""
    sd = {}
    for collection, tree in variables.items():
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            path = tuple(k.key for k in key_path)
            value = np.asarray(leaf, np.float32)
            if path[-1] == "kernel":
                value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
            sd[_torch_name(collection, path)] = np.ascontiguousarray(value)
    return sd


def load_inception(path: str | os.PathLike) -> dict:
    """Reads FID Inception-v3 weights into Flax variables.

    Args:
      path: torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`, pytorch-fid's
        `pt_inception-2015-12-05-6726825d.pth` (read with torch.load(weights_only=True)), or an
        .npz / .safetensors of the same state dict.

    Returns:
      {'params': ..., 'batch_stats': ...} float32 numpy trees for InceptionV3.

    Raises:
      ValueError: the file is missing or unreadable, or a key is missing, unexpected or
        mis-shaped (each one is named).
    """
    if not os.path.isfile(os.fspath(path)):
        raise ValueError(f"Inception weights {os.fspath(path)!r} do not exist or are not a file: "
                         f"{_WHICH_FILE} (download it once; nothing downloads at run time)")
    sd = load_state_dict(path)
    return variables_from_state_dict(sd, source=f"Inception weights {os.fspath(path)!r}")


def inception_from_file(path) -> inception_lib.Inception:
    """The Inception of torch-fidelity's / pytorch-fid's .pth (or an .npz of its state dict),
    named by the file's sha256 (reference-statistics caches are keyed by it)."""
    return inception_lib.Inception(variables=load_inception(path),
                                   weights_id=inception_lib.file_sha256(path)[:16])
