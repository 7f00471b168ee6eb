"""LPIPS-VGG16 perceptual distance (Zhang et al. 2018, `lpips` v0.1 'vgg') as a Flax module, NHWC.

d(x, y) = sum_k mean_{h,w} sum_c w_kc (f_k(x) - f_k(y))_{hwc}^2, where f_k are VGG16 ReLU
features at the 5 taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, each normalised to unit
length over channels, and w_k >= 0 are the learned 1x1 'lin' layers. Inputs in [-1, 1] pass
LPIPS's scaling layer first ((x - shift) / scale, shift/scale per RGB channel).

Parameters (Flax paths mirror the PyTorch names):
  net/features_{i}/kernel (3,3,in,out), net/features_{i}/bias: torchvision vgg16 `features.{i}`
    for the 13 conv indices i in VGG16_CONVS;
  lin{k}/kernel (1,1,C_k,1): lpips `lin{k}.model.1.weight` (1,C_k,1,1).
Pretrained weights never download: `launch/convert_lpips.py` turns torchvision's vgg16 .pth
and lpips's weights/v0.1/vgg.pth (files the user provides) into an .npz that
`load_lpips_params` reads. Logical axis names as in models/vq.py (conv kernels
('conv_height', 'conv_width', 'conv_in', 'conv_out'), biases ('conv_out',)).
"""

from __future__ import annotations

import os
import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from radar_jax import fileio

# torchvision vgg16 `features` conv indices and output channels; a 2x2 max-pool precedes the
# convs in POOL_BEFORE, and the LPIPS taps follow the ReLU of the convs in TAPS.
VGG16_CONVS = ((0, 64), (2, 64), (5, 128), (7, 128), (10, 256), (12, 256), (14, 256),
               (17, 512), (19, 512), (21, 512), (24, 512), (26, 512), (28, 512))
POOL_BEFORE = (5, 10, 17, 24)
TAPS = (2, 7, 14, 21, 28)
TAP_CHANNELS = (64, 128, 256, 512, 512)
MIN_SIZE = 16  # Four 2x2 pools precede the last tap: smaller images leave it empty.
# LPIPS ScalingLayer: maps [-1, 1] inputs to the statistics VGG was trained with.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
FEATURE_EPS = 1e-10  # lpips normalize_tensor: x / (||x|| + eps).

_CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")


def scaling_layer(images: jax.Array) -> jax.Array:
    """LPIPS's input scaling: (x - SHIFT) / SCALE over the RGB axis. (B,H,W,3) -> same."""
    return (images - jnp.asarray(SHIFT, images.dtype)) / jnp.asarray(SCALE, images.dtype)


class VGG16Features(nn.Module):
    """VGG16 conv stack up to relu5_3. (B,H,W,3) scaled images -> 5 taps (B,H/2**k,W/2**k,C_k)."""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        taps = []
        for index, features in VGG16_CONVS:
            if index in POOL_BEFORE:
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
            x = nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                        param_dtype=jnp.float32, name=f"features_{index}",
                        kernel_init=nn.with_logical_partitioning(
                            nn.initializers.he_normal(), _CONV_AXES),
                        bias_init=nn.with_logical_partitioning(
                            nn.initializers.zeros, ("conv_out",)))(x)
            x = nn.relu(x)
            if index in TAPS:
                taps.append(x.astype(jnp.float32))
        return taps


def normalize_channels(f: jax.Array) -> jax.Array:
    """f / (||f||_2 over the channel axis + 1e-10), lpips's normalize_tensor, NHWC."""
    return f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + FEATURE_EPS)


class LPIPS(nn.Module):
    """LPIPS-VGG16 distance. __call__(x, y): two (B,H,W,3) batches in [-1, 1], H, W >= 16 ->
    (B,) float32 distances (0 for identical images; >= 0 and symmetric when lin weights >= 0,
    as in the trained weights and this module's random init)."""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"LPIPS needs two NHWC RGB batches of one shape, got {x.shape} "
                             f"and {y.shape}")
        if min(x.shape[1:3]) < MIN_SIZE:
            raise ValueError(f"LPIPS needs images of at least {MIN_SIZE}x{MIN_SIZE} pixels "
                             f"(VGG16 pools 4 times), got {x.shape[1]}x{x.shape[2]}")
        b = x.shape[0]
        # One VGG pass over both batches: half the compiled convs of two passes.
        both = scaling_layer(jnp.concatenate([x, y], axis=0).astype(jnp.float32))
        taps = VGG16Features(self.dtype, name="net")(both.astype(self.dtype))
        total_B = jnp.zeros((b,), jnp.float32)
        for k, (f, c) in enumerate(zip(taps, TAP_CHANNELS)):
            f = normalize_channels(f)
            diff_BHWC = jnp.square(f[:b] - f[b:])
            # Nonnegative random init: LPIPS lin weights are trained with a clamp at zero.
            lin = nn.Conv(1, (1, 1), use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
                          name=f"lin{k}", kernel_init=nn.with_logical_partitioning(
                              nn.initializers.uniform(2.0 / c), _CONV_AXES))
            total_B = total_B + jnp.mean(lin(diff_BHWC), axis=(1, 2, 3))
        return total_B


# --- Weights: PyTorch state dicts -> flat {'net/features_0/kernel': array, ...} -> .npz.


def lpips_param_shapes() -> dict[str, tuple[int, ...]]:
    """{'/'-joined path: shape} of LPIPS's parameters."""
    x = jnp.zeros((1, MIN_SIZE, MIN_SIZE, 3), jnp.float32)
    shapes = jax.eval_shape(LPIPS().init, jax.random.PRNGKey(0), x, x)["params"]
    flat = flax.traverse_util.flatten_dict(nn.meta.unbox(shapes), sep="/")
    return {k: tuple(v.shape) for k, v in flat.items()}


def lpips_params_from_state_dicts(*state_dicts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Builds LPIPS's flat params from PyTorch state dicts (merged in order).

    Accepted keys: torchvision vgg16 `features.{i}.weight|bias` (or a full lpips model's
    `net.slice{n}.{i}.weight|bias`), and lpips `lin{k}.model.1.weight` (or `.model.0.`,
    lpips without dropout). Other keys (classifier.*, scaling_layer.*) are ignored.

    Returns:
      {'net/features_{i}/kernel': (3,3,in,out), ..., 'lin{k}/kernel': (1,1,C,1)} float32.
    Raises:
      ValueError: a parameter is missing or has the wrong shape (naming it).
    """
    flat: dict[str, np.ndarray] = {}
    for sd in state_dicts:
        for key, value in sd.items():
            m = (re.fullmatch(r"(?:features|net\.slice\d)\.(\d+)\.(weight|bias)", key)
                 or re.fullmatch(r"lin(\d)\.model\.[01]\.(weight)", key))
            if m is None:
                continue
            value = np.asarray(value, np.float32)
            if key.startswith("lin"):
                flat[f"lin{m.group(1)}/kernel"] = value.transpose(2, 3, 1, 0)
            elif m.group(2) == "weight":  # OIHW -> HWIO
                flat[f"net/features_{m.group(1)}/kernel"] = value.transpose(2, 3, 1, 0)
            else:
                flat[f"net/features_{m.group(1)}/bias"] = value
    check_lpips_params(flat, "the given state dicts")
    return flat


def check_lpips_params(flat: dict[str, Any], what: str) -> None:
    """Raises ValueError naming any missing, unexpected or wrongly shaped LPIPS parameter."""
    want = lpips_param_shapes()
    missing = sorted(set(want) - set(flat))
    unexpected = sorted(set(flat) - set(want))
    if missing or unexpected:
        raise ValueError(f"{what} do not hold LPIPS-VGG16 weights: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}: pass torchvision's vgg16 weights and "
                         "lpips's weights/v0.1/vgg.pth to launch/convert_lpips.py")
    for k, shape in want.items():
        if tuple(np.shape(flat[k])) != shape:
            raise ValueError(f"LPIPS parameter {k} in {what} has shape {np.shape(flat[k])}, "
                             f"expected {shape}")


def save_lpips_params(flat: dict[str, np.ndarray], path: str | os.PathLike) -> None:
    """Writes flat LPIPS params to an .npz that `load_lpips_params` reads."""
    check_lpips_params(flat, "the params to save")
    np.savez(path, **{k: np.asarray(v, np.float32) for k, v in flat.items()})


def load_lpips_params(path: str | os.PathLike) -> dict[str, Any]:
    """Reads the .npz written by launch/convert_lpips.py -> nested params for LPIPS().apply.

    Raises:
      ValueError: missing/unreadable file or wrong contents, naming the path and the fix.
    """
    path = fileio.path(path)  # local or gs://: a pod's workers read the file from a bucket
    if not path.is_file():
        raise ValueError(f"LPIPS weights {str(path)!r} not found: make them once with "
                         "`python launch/convert_lpips.py --vgg VGG16.pth --lin vgg.pth "
                         f"--out {path}` (nothing is downloaded)")
    try:
        with path.open("rb") as f, np.load(f, allow_pickle=False) as data:
            flat = {k: data[k] for k in data.files}
    except Exception as e:  # BadZipFile, OSError, ValueError...
        raise ValueError(f"could not read LPIPS weights {str(path)!r} as .npz: {e}") from e
    check_lpips_params(flat, repr(str(path)))
    return flax.traverse_util.unflatten_dict(flat, sep="/")
