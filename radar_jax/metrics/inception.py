r"""The FID Inception-v3 in Flax Linen, and batched, sharded feature extraction.

This is the network of the original FID code and of ADM's evaluator (TensorFlow's
`classify_image_graph_def.pb`, "inception-2015-12-05") in the PyTorch form torch-fidelity
reproduces as `FeatureExtractorInceptionV3`: the same layers, the same TF-compatible patches
(average pools that do not count the padding, a max pool in the last block), the same input
pipeline (TensorFlow-1 bilinear resize to 299x299, then (x - 128) / 128). Module and parameter
names mirror torch-fidelity's state dict (`Mixed_6d.branch1x1.conv`, `fc`), so
`radar_jax.convert.inception.load_inception` is a table plus transposes.

Outputs of `InceptionV3()(images)` (a dict of float32 arrays):
- 'pool' (N, 2048): the average-pooled Mixed_7c features, TF's `pool_3:0` (FID, Precision/Recall).
- 'logits_unbiased' (N, 1008): pool @ fc.weight.T without the bias. This is what the Inception
  Score uses: ADM's evaluator takes the softmax of `pool_3 @ W` (the MatMul under
  `softmax/logits`, no bias) and torch-fidelity's IS defaults to its 'logits_unbiased' too.
- 'logits' (N, 1008): the same plus fc.bias (torch-fidelity's 'logits').
- 'spatial' (N, 2023): ADM's sFID features: TF's `mixed_6/conv:0`, first 7 channels, flattened
  in (H, W, C) order (17 * 17 * 7 = 2023), as ADM's `spatial[..., :7]` then `reshape(N, -1)`.
  torch-fidelity does not return this tensor but computes it exactly: its weight converter maps
  `mixed_6/conv` to `Mixed_6d.branch1x1` (the ReLU after conv + batch norm), whose output is the
  first 192 channels of Mixed_6d's concatenated output. So this is the same tensor, not an
  approximation.

Parity with torch-fidelity (random weights, odd input sizes) is checked in
tests/test_inception.py. Convolutions run at `lax.Precision.HIGHEST` by default so that GPUs
(TF32) and TPUs (bfloat16 passes) compute float32 features as the reference does.

Large arrays: `Inception.features(images)` (or `features(variables, images)`) runs fixed-size
batches, pads the last one, and shards each batch over all local devices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

INPUT_SIZE = 299          # the graph resizes every input to 299 x 299
NUM_CLASSES = 1008        # 1000 ImageNet classes + 8 unused outputs of the 2015 graph
POOL_DIM = 2048
SPATIAL_CHANNELS = 7      # ADM keeps the first 7 channels of mixed_6/conv
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
FEATURE_KEYS = ("pool", "logits_unbiased", "logits", "spatial")
DEFAULT_PRECISION = jax.lax.Precision.HIGHEST


# ------------------------------------------------------------------------------ input pipeline
def _tf1_bilinear_taps(in_size: int, out_size: int):
    """Source indices and weights of TF-1 `resize_bilinear(align_corners=False)` along one axis.

    TF-1 (no half-pixel centres) samples output pixel o at src = o * in / out, between
    floor(src) and min(floor(src) + 1, in - 1). Computed in float32 as torch-fidelity does.
    """
    scale = np.float32(in_size / out_size)
    src = np.arange(out_size, dtype=np.float32) * scale
    lo = src.astype(np.int64)  # src >= 0, so truncation is floor
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, (src - lo.astype(np.float32)).astype(np.float32)


def resize_like_tf1(images, size: int = INPUT_SIZE):
    """Bilinear resize with TensorFlow-1 semantics (torch-fidelity's
    `interpolate_bilinear_2d_like_tensorflow1x`, align_corners=False, 'slow' exact path).

    Args:
      images: float32 (N, H, W, C), any H, W >= 1.
      size: output height and width.

    Returns:
      float32 (N, size, size, C). Same operation order as the reference (x first, then y).
    """
    _, h, w, _ = images.shape
    if (h, w) == (size, size):
        return images  # the scale is 1: TF-1 resize is the identity
    ylo, yhi, dy = _tf1_bilinear_taps(h, size)
    xlo, xhi, dx = _tf1_bilinear_taps(w, size)
    rows_lo, rows_hi = images[:, ylo], images[:, yhi]          # (N, size, W, C)
    dx = dx[None, None, :, None]
    in_0 = rows_lo[:, :, xlo] + (rows_lo[:, :, xhi] - rows_lo[:, :, xlo]) * dx
    in_1 = rows_hi[:, :, xlo] + (rows_hi[:, :, xhi] - rows_hi[:, :, xlo]) * dx
    return in_0 + (in_1 - in_0) * dy[None, :, None, None]


def preprocess(images):
    """uint8 (or float 0..255) (N, H, W, 3) -> float32 (N, 299, 299, 3) in [-1, 1), as the graph:
    TF-1 bilinear resize to 299, then (x - 128) / 128."""
    x = resize_like_tf1(jnp.asarray(images).astype(jnp.float32))
    return (x - 128.0) / 128.0


# ------------------------------------------------------------------------------ network
class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3, running statistics) -> ReLU."""
    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)
    precision: Any = DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel_size, (self.strides, self.strides),
                    padding=((ph, ph), (pw, pw)), use_bias=False, precision=self.precision,
                    name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x):
    # TF's average pool divides by the number of real (unpadded) pixels.
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b/c/d)."""
    pool_features: int
    precision: Any = DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, p, name: BasicConv2d(f, k, 1, p, self.precision, name=name)  # noqa
        b1 = conv(64, (1, 1), (0, 0), "branch1x1")(x)
        b5 = conv(48, (1, 1), (0, 0), "branch5x5_1")(x)
        b5 = conv(64, (5, 5), (2, 2), "branch5x5_2")(b5)
        b3 = conv(64, (1, 1), (0, 0), "branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), (1, 1), "branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), (1, 1), "branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, (1, 1), (0, 0), "branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction (Mixed_6a)."""
    precision: Any = DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, (3, 3), 2, precision=self.precision, name="branch3x3")(x)
        bd = BasicConv2d(64, (1, 1), precision=self.precision, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), 1, (1, 1), self.precision, name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), 2, precision=self.precision, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b..6e). Output channels 0..191 are
    branch1x1 (in Mixed_6d: TF's `mixed_6/conv`, the sFID features)."""
    channels_7x7: int
    precision: Any = DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        conv = lambda f, k, p, name: BasicConv2d(f, k, 1, p, self.precision, name=name)  # noqa
        b1 = conv(192, (1, 1), (0, 0), "branch1x1")(x)
        b7 = conv(c7, (1, 1), (0, 0), "branch7x7_1")(x)
        b7 = conv(c7, (1, 7), (0, 3), "branch7x7_2")(b7)
        b7 = conv(192, (7, 1), (3, 0), "branch7x7_3")(b7)
        bd = conv(c7, (1, 1), (0, 0), "branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), (3, 0), "branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), (0, 3), "branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), (3, 0), "branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), (0, 3), "branch7x7dbl_5")(bd)
        bp = conv(192, (1, 1), (0, 0), "branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction (Mixed_7a)."""
    precision: Any = DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, s, p, name: BasicConv2d(f, k, s, p, self.precision,  # noqa
                                                    name=name)
        b3 = conv(192, (1, 1), 1, (0, 0), "branch3x3_1")(x)
        b3 = conv(320, (3, 3), 2, (0, 0), "branch3x3_2")(b3)
        b7 = conv(192, (1, 1), 1, (0, 0), "branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), 1, (0, 3), "branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), 1, (3, 0), "branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), 2, (0, 0), "branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """8x8 block (Mixed_7b with an average pool, Mixed_7c with TF's max pool)."""
    max_pool: bool
    precision: Any = DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, p, name: BasicConv2d(f, k, 1, p, self.precision, name=name)  # noqa
        b1 = conv(320, (1, 1), (0, 0), "branch1x1")(x)
        b3 = conv(384, (1, 1), (0, 0), "branch3x3_1")(x)
        b3 = jnp.concatenate([conv(384, (1, 3), (0, 1), "branch3x3_2a")(b3),
                              conv(384, (3, 1), (1, 0), "branch3x3_2b")(b3)], axis=-1)
        bd = conv(448, (1, 1), (0, 0), "branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), (1, 1), "branch3x3dbl_2")(bd)
        bd = jnp.concatenate([conv(384, (1, 3), (0, 1), "branch3x3dbl_3a")(bd),
                              conv(384, (3, 1), (1, 0), "branch3x3dbl_3b")(bd)], axis=-1)
        if self.max_pool:  # the 2015 graph's last block max-pools here (torch-fidelity's patch)
            pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3(x)
        bp = conv(192, (1, 1), (0, 0), "branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Classifier(nn.Module):
    """The 2048 -> 1008 `fc` layer, returning the logits without and with the bias."""
    precision: Any = DEFAULT_PRECISION

    @nn.compact
    def __call__(self, pool):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (POOL_DIM, NUM_CLASSES))
        bias = self.param("bias", nn.initializers.zeros, (NUM_CLASSES,))
        unbiased = jnp.dot(pool, kernel, precision=self.precision)
        return unbiased, unbiased + bias


class InceptionV3(nn.Module):
    """The FID Inception-v3. Variables: {'params', 'batch_stats'} (see load_inception).

    Call: `InceptionV3().apply(variables, images)` with images uint8 (N, H, W, 3), any H, W
    (or float in 0..255); `preprocessed=True` takes the output of `preprocess` instead.
    Returns the dict of float32 features described in the module docstring.
    """
    precision: Any = DEFAULT_PRECISION

    @nn.compact
    def __call__(self, images, preprocessed: bool = False):
        x = images if preprocessed else preprocess(images)              # (N, 299, 299, 3)
        pr = self.precision
        x = BasicConv2d(32, (3, 3), 2, precision=pr, name="Conv2d_1a_3x3")(x)   # 149
        x = BasicConv2d(32, (3, 3), precision=pr, name="Conv2d_2a_3x3")(x)      # 147
        x = BasicConv2d(64, (3, 3), 1, (1, 1), pr, name="Conv2d_2b_3x3")(x)     # 147
        x = _max_pool_3x3_s2(x)                                                 # 73
        x = BasicConv2d(80, (1, 1), precision=pr, name="Conv2d_3b_1x1")(x)      # 73
        x = BasicConv2d(192, (3, 3), precision=pr, name="Conv2d_4a_3x3")(x)     # 71
        x = _max_pool_3x3_s2(x)                                                 # 35 x 35 x 192
        x = InceptionA(32, pr, name="Mixed_5b")(x)                              # 256
        x = InceptionA(64, pr, name="Mixed_5c")(x)                              # 288
        x = InceptionA(64, pr, name="Mixed_5d")(x)                              # 288
        x = InceptionB(pr, name="Mixed_6a")(x)                                  # 17 x 17 x 768
        x = InceptionC(128, pr, name="Mixed_6b")(x)
        x = InceptionC(160, pr, name="Mixed_6c")(x)
        x = InceptionC(160, pr, name="Mixed_6d")(x)
        spatial_NHWC = x[..., :SPATIAL_CHANNELS]        # Mixed_6d.branch1x1 = mixed_6/conv
        x = InceptionC(192, pr, name="Mixed_6e")(x)
        x = InceptionD(pr, name="Mixed_7a")(x)                                  # 8 x 8 x 1280
        x = InceptionE(False, pr, name="Mixed_7b")(x)                           # 2048
        x = InceptionE(True, pr, name="Mixed_7c")(x)                            # 2048
        pool = jnp.mean(x, axis=(1, 2))                                         # (N, 2048)
        logits_unbiased, logits = Classifier(pr, name="fc")(pool)
        return dict(pool=pool, logits_unbiased=logits_unbiased, logits=logits,
                    spatial=spatial_NHWC.reshape(spatial_NHWC.shape[0], -1))


def variable_shapes() -> dict:
    """{'params', 'batch_stats'} trees of jax.ShapeDtypeStruct (no computation)."""
    # Shapes do not depend on the image size: trace on the smallest input the strides allow.
    images = jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32)
    return jax.eval_shape(lambda x: InceptionV3().init(jax.random.key(0), x, preprocessed=True),
                          images)


def random_variables(seed: int = 0) -> dict:
    """Random float32 numpy variables (tests, smoke runs; no substitute for the real weights).

    Kernels are He-normal (std sqrt(2 / fan_in)), so with the identity batch norm (mean 0,
    variance 1, scale 1, bias 0) ReLU activations keep their scale through the depth.
    Drawn with numpy: a jitted Flax init of 472 arrays compiles for tens of seconds on a CPU.
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        return np.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, np.float32)

    return jax.tree_util.tree_map_with_path(draw, variable_shapes())


# ------------------------------------------------------------------------------ batched features
# One compiled network per batch shape (the input is always 299 x 299 after `preprocess`), and
# one small resize per input image size: images of a new size do not recompile the network.
_preprocess_jit = jax.jit(preprocess)
_network_jit = jax.jit(lambda variables, x: InceptionV3().apply(variables, x, preprocessed=True))


def _check_images(images) -> None:
    shape, dtype = getattr(images, "shape", None), getattr(images, "dtype", None)
    if shape is None or len(shape) != 4 or shape[-1] != 3 or shape[0] == 0:
        raise ValueError(f"images must be a non-empty uint8 array (N, H, W, 3), got shape {shape};"
                         " stack RGB images along a new first axis (grayscale: repeat to 3 "
                         "channels)")
    if dtype != np.uint8:
        raise ValueError(f"images must be uint8 in 0..255, got dtype {dtype}; convert [-1, 1] "
                         "floats with np.clip((x + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)")


def features(variables, images, *, batch_size: int = 200, keys=FEATURE_KEYS,
             devices=None) -> dict[str, np.ndarray]:
    """Inception features of a large uint8 image array, batched and sharded over devices.

    Args:
      variables: {'params', 'batch_stats'} from `load_inception`.
      images: uint8 (N, H, W, 3), any array-like with `.shape`, `.dtype` and slicing (a numpy
        array, a memory map); read one batch at a time.
      batch_size: images per step, rounded up to a multiple of the device count. The last batch
        is padded (with copies of its last image) so one compiled program serves every batch.
      keys: which outputs to return (subset of FEATURE_KEYS).
      devices: devices to shard each batch over (a 1-axis 'data' mesh); default all local ones.

    Returns:
      {key: float32 numpy (N, D)}: 'pool' D=2048, 'logits_unbiased' / 'logits' D=1008,
      'spatial' D=2023.
    """
    _check_images(images)
    unknown = set(keys) - set(FEATURE_KEYS)
    if unknown:
        raise ValueError(f"unknown feature keys {sorted(unknown)}; choose from {FEATURE_KEYS}")
    devices = list(devices) if devices is not None else jax.local_devices()
    mesh = Mesh(np.array(devices), ("data",))
    batch_sharding = NamedSharding(mesh, P("data"))
    variables = jax.device_put(variables, NamedSharding(mesh, P()))  # replicated
    step = -(-max(1, int(batch_size)) // len(devices)) * len(devices)
    n = images.shape[0]
    outs = {k: [] for k in keys}

    def collect(pending):
        out, count = pending
        for k in keys:
            outs[k].append(np.asarray(out[k][:count], np.float32))

    pending = None
    for start in range(0, n, step):
        batch = np.asarray(images[start:start + step])
        count = batch.shape[0]
        if count < step:
            batch = np.concatenate([batch, np.repeat(batch[-1:], step - count, axis=0)])
        x = _preprocess_jit(jax.device_put(batch, batch_sharding))
        out = _network_jit(variables, x)
        if pending is not None:   # fetch the previous batch while this one runs
            collect(pending)
        pending = (out, count)
    collect(pending)
    return {k: np.concatenate(v, axis=0) for k, v in outs.items()}


def file_sha256(path) -> str:
    """Hex sha256 of a file's bytes (keys the reference-statistics caches)."""
    digest = hashlib.sha256()
    with open(os.fspath(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Inception:
    """The FID network with its weights, ready to featurise images.

    Attributes:
      variables: {'params', 'batch_stats'} of InceptionV3 (see load_inception).
      weights_id: names these weights in reference-statistics caches (the weights file's
        sha256 when built with `convert.inception.inception_from_file`); caches made with
        other weights are not reused.
    """
    variables: Any
    weights_id: str

    def features(self, images, *, batch_size: int = 200, keys=FEATURE_KEYS) -> dict:
        """`features(self.variables, images, ...)`: {key: float32 (N, D)}."""
        return features(self.variables, images, batch_size=batch_size, keys=keys)
