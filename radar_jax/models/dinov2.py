"""DINOv2 ViT (Oquab et al. 2023) in Flax Linen, NHWC, numerically matching Hugging Face's
`Dinov2Model` / `Dinov2WithRegistersModel` (and torch-hub's `dinov2_vit*14`).

Images in [-1, 1] (B, H, W, 3) -> ImageNet normalisation -> 14x14 patch conv -> [CLS, registers,
patches] + learned position embeddings -> pre-norm blocks (attention and MLP, each scaled by
LayerScale) -> final LayerNorm. `DINOv2(config).apply({'params': p}, images)` returns
  patch_tokens    (B, H // 14, W // 14, D) float32, after the final LayerNorm;
  cls_token       (B, D) float32, after the final LayerNorm (HF's pooler_output);
  register_tokens (B, R, D) float32, after the final LayerNorm (R = num_register_tokens, may be 0).
Sizes not a multiple of 14 lose their last H % 14 rows / W % 14 columns, as the stride-14 conv
of HF and torch-hub does (a VALID convolution).

Position embeddings are learned for an (image_size / 14)^2 grid (37x37 for the released 518px
models) and resampled to the input's grid with torch's `interpolate(mode='bicubic',
align_corners=False)` reproduced exactly (see `bicubic_matrix`): jax.image.resize uses another
cubic kernel (Keys a=-0.5 with edge renormalisation) and would not match. The three references
differ and each is a config choice:
  HF Dinov2Model:                 size=(h, w), antialias=False (torch's a=-0.75 kernel).
  HF Dinov2WithRegistersModel:    size=(h, w), antialias=True (PIL-like a=-0.5 kernel).
  torch-hub dinov2_vit*14:        scale_factor=((h + 0.1) / M, (w + 0.1) / M), antialias=False.
  torch-hub dinov2_vit*14_reg:    size=(h, w), antialias=True.
As in all of them the table is used unchanged when the input is square with the trained grid.

Parameter names mirror transformers' (v5) module names, so the converter is a rename:
  embeddings/{cls_token (1,1,D), position_embeddings (1,1+M*M,D), register_tokens (1,R,D),
  patch_embeddings/{kernel (14,14,3,D), bias}}, layer_{i}/{norm1, attention/{q_proj, k_proj,
  v_proj, o_proj}, layer_scale1/lambda1, norm2, mlp/{fc1, fc2} or mlp/{gate_proj, up_proj,
  down_proj} (SwiGLU, giant), layer_scale2/lambda1}, layernorm. HF's `mask_token` (used only for
  masked pre-training) has no counterpart. Params are plain (no logical axes): the network is a
  frozen feature extractor, replicated under `radar_jax.sharding`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

# DINOv2's ImageNet normalisation (torchvision's), applied to images mapped to [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Cubic-convolution parameter of torch's bicubic kernels: upsample_bicubic2d uses -0.75, the
# antialiased variant (_upsample_bicubic2d_aa, PIL's) -0.5.
CUBIC_A = -0.75
CUBIC_A_ANTIALIAS = -0.5

# HF Dinov2Config's defaults (facebook/dinov2-base), our interpolation switches and dtype.
_DEFAULTS = dict(
    hidden_size=768,  # Token width D.
    num_hidden_layers=12,  # Transformer blocks.
    num_attention_heads=12,  # Heads per block (head dim D / heads).
    mlp_ratio=4,  # MLP hidden width = int(D * mlp_ratio) (SwiGLU: 2/3 of it, rounded to 8).
    patch_size=14,  # Patch side in pixels (the stride of the patch conv).
    image_size=518,  # Side the position table was learned at: (image_size // patch_size)^2 + 1.
    num_channels=3,  # Input channels.
    qkv_bias=True,  # Biases on the q/k/v projections.
    layerscale_value=1.0,  # Init of LayerScale's lambda1 (the checkpoint overrides it).
    layer_norm_eps=1e-6,  # Epsilon of every LayerNorm.
    hidden_act="gelu",  # MLP activation; only 'gelu' (exact, erf) is supported.
    use_swiglu_ffn=False,  # SwiGLU MLP instead of fc1-GELU-fc2 (ViT-g/14).
    num_register_tokens=0,  # Register tokens after CLS (4 in "DINOv2 with registers").
    interpolate_antialias=False,  # Antialiased bicubic for the position table (registers: True).
    interpolate_offset=0.0,  # torch-hub's 0.1 scale-factor offset; 0 resamples by size (HF).
    dtype="float32",  # Compute dtype: 'float32' | 'bfloat16'. Params are always float32.
)

CONFIG_FIELDS = tuple(_DEFAULTS)  # Every field a DINOv2 config has.

# The released sizes (ViT-S/B/L/g with patch 14), as HF's facebook/dinov2-{size} configs.
SIZES = {
    "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
    "giant": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24,
                  use_swiglu_ffn=True),
}


def dinov2_config(size: str = "base", **overrides: Any) -> ml_collections.ConfigDict:
    """A DINOv2 config with HF's field names: `size` in SIZES ('small', 'base', 'large',
    'giant'), then `overrides` (any field of _DEFAULTS) applied."""
    if size not in SIZES:
        raise ValueError(f"unknown DINOv2 size {size!r}; known: {sorted(SIZES)}")
    config = ml_collections.ConfigDict({**_DEFAULTS, **SIZES[size]})
    for name, value in overrides.items():
        if name not in _DEFAULTS:
            raise ValueError(f"unknown DINOv2 config field {name!r}; known: {sorted(_DEFAULTS)}")
        config[name] = value
    return config


@dataclasses.dataclass(frozen=True)
class DINOv2Hyper:
    """Validated, hashable DINOv2 hyper-parameters (see `_DEFAULTS` for each field)."""
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    mlp_ratio: float
    patch_size: int
    image_size: int
    num_channels: int
    qkv_bias: bool
    layerscale_value: float
    layer_norm_eps: float
    hidden_act: str
    use_swiglu_ffn: bool
    num_register_tokens: int
    interpolate_antialias: bool
    interpolate_offset: float
    dtype: str

    @property
    def grid(self) -> int:
        """Side M of the learned position grid (37 for 518px, patch 14)."""
        return self.image_size // self.patch_size

    @property
    def compute_dtype(self) -> Any:  # The jnp dtype of `dtype`.
        return jnp.dtype(self.dtype)

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of the MLP; SwiGLU keeps 2/3 of it rounded up to a multiple of 8, as
        HF's Dinov2SwiGLUFFN and torch-hub's SwiGLUFFNFused."""
        hidden = int(self.hidden_size * self.mlp_ratio)
        return (int(hidden * 2 / 3) + 7) // 8 * 8 if self.use_swiglu_ffn else hidden


def resolve_dinov2_config(config: Any) -> DINOv2Hyper:
    """Checks a DINOv2 config (ConfigDict, dict, None for base) and fills in defaults.

    Raises:
      ValueError: an unknown field or an unsupported value, naming it and the fix.
    """
    if isinstance(config, DINOv2Hyper):
        return config
    values = {} if config is None else dict(
        config.to_dict() if hasattr(config, "to_dict") else config)
    unknown = sorted(set(values) - set(_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown DINOv2 config fields {unknown}; known: {sorted(_DEFAULTS)}")
    v = {**_DEFAULTS, **values}
    for name in ("image_size", "patch_size"):
        if isinstance(v[name], (list, tuple)):
            if len(set(v[name])) != 1:
                raise ValueError(f"DINOv2 config {name}={v[name]}: only square values are "
                                 "supported (the released models are square)")
            v[name] = v[name][0]
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                 "image_size", "num_channels"):
        v[name] = int(v[name])
        if v[name] < 1:
            raise ValueError(f"DINOv2 config {name}={v[name]} must be a positive integer")
    v["num_register_tokens"] = int(v["num_register_tokens"])
    if v["num_register_tokens"] < 0:
        raise ValueError(f"DINOv2 config num_register_tokens={v['num_register_tokens']} must "
                         "be >= 0")
    if v["hidden_size"] % v["num_attention_heads"]:
        raise ValueError(f"DINOv2 config hidden_size={v['hidden_size']} is not divisible by "
                         f"num_attention_heads={v['num_attention_heads']}")
    if v["image_size"] < v["patch_size"]:
        raise ValueError(f"DINOv2 config image_size={v['image_size']} is smaller than "
                         f"patch_size={v['patch_size']}")
    if v["hidden_act"] != "gelu":
        raise ValueError(f"DINOv2 config hidden_act={v['hidden_act']!r} is not supported: "
                         "only 'gelu' (all released DINOv2 models)")
    if v["dtype"] not in ("float32", "bfloat16"):
        raise ValueError(f"DINOv2 config dtype={v['dtype']!r} must be 'float32' or 'bfloat16'")
    for name in ("mlp_ratio", "layerscale_value", "layer_norm_eps", "interpolate_offset"):
        v[name] = float(v[name])
    for name in ("qkv_bias", "use_swiglu_ffn", "interpolate_antialias"):
        v[name] = bool(v[name])
    return DINOv2Hyper(**v)


# --- Position-embedding resampling (torch's bicubic, as a matrix per axis).

def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter `a`, evaluated at offsets x."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(n_in: int, n_out: int, *, antialias: bool = False,
                   offset: float = 0.0) -> np.ndarray:
    """(n_out, n_in) float64 matrix W such that W @ x resamples x along one axis exactly as
    torch.nn.functional.interpolate(mode='bicubic', align_corners=False) does.

    torch's bicubic is separable, so a 2-D resize is W_h @ X @ W_w^T. `offset` > 0 reproduces
    torch-hub DINOv2's call with scale_factor=(n_out + offset) / n_in instead of a size (torch
    then maps coordinates with that factor, not with n_out / n_in).

    antialias=False (upsample_bicubic2d): source x = scale * (i + 0.5) - 0.5, 4 taps at
      floor(x) - 1 .. floor(x) + 2 clamped to the edge, weights of the a=-0.75 kernel.
    antialias=True (_upsample_bicubic2d_aa): the a=-0.5 kernel stretched by the scale when
      downsampling, taps outside the input dropped and the weights renormalised; an axis whose
      size does not change is copied.
    """
    scale = n_in / n_out if offset == 0 else 1.0 / ((n_out + offset) / n_in)
    # torch keeps the scale and source coordinates in float32 (opmath of a float tensor).
    scale = float(np.float32(scale))
    out = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    if not antialias:
        src = (np.float32(scale) * (rows + 0.5).astype(np.float32) - np.float32(0.5))
        src = src.astype(np.float64)
        base = np.floor(src)
        t = src - base
        taps = (t + 1, t, 1 - t, 2 - t)
        for k, dist in zip(range(-1, 3), taps):
            cols = np.clip(base.astype(np.int64) + k, 0, n_in - 1)
            np.add.at(out, (rows, cols), _cubic(dist, CUBIC_A))
        return out
    if n_in == n_out:
        return np.eye(n_in)
    support = 2.0 * scale if scale >= 1.0 else 2.0
    stretch = 1.0 / scale if scale >= 1.0 else 1.0
    for i in rows:
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)  # int() truncates, as torch's cast.
        hi = min(int(center + support + 0.5), n_in)
        cols = np.arange(lo, hi)
        w = _cubic((cols - center + 0.5) * stretch, CUBIC_A_ANTIALIAS)
        out[i, lo:hi] = w / w.sum()
    return out


def interpolate_pos_embed(table_MMD: jax.Array, height: int, width: int, *,
                          antialias: bool = False, offset: float = 0.0) -> jax.Array:
    """Resamples a (M, M, D) position table to (height, width, D), float32, as torch's
    bicubic interpolate (see `bicubic_matrix`). Sizes are static Python ints."""
    m = table_MMD.shape[0]
    w_hm = jnp.asarray(bicubic_matrix(m, height, antialias=antialias, offset=offset), jnp.float32)
    w_wm = jnp.asarray(bicubic_matrix(m, width, antialias=antialias, offset=offset), jnp.float32)
    return jnp.einsum("hi,ijd,wj->hwd", w_hm, table_MMD.astype(jnp.float32), w_wm,
                      precision=jax.lax.Precision.HIGHEST)


# --- The network.

_INIT = nn.initializers.truncated_normal(0.02)  # HF's init (initializer_range), for random use.


def _dense(features: int, name: str, dtype: Any, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=_INIT, name=name)


def _layer_norm(hp: DINOv2Hyper, name: str) -> nn.LayerNorm:
    # E[(x - mean)^2] as torch, not E[x^2] - mean^2 (which loses digits on large activations).
    return nn.LayerNorm(epsilon=hp.layer_norm_eps, use_fast_variance=False,
                        dtype=hp.compute_dtype, param_dtype=jnp.float32, name=name)


class LayerScale(nn.Module):
    """x * lambda1, lambda1 (D,) initialised to `init_value` (HF Dinov2LayerScale)."""
    init_value: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        lam = self.param("lambda1", nn.initializers.constant(self.init_value), (x.shape[-1],),
                         jnp.float32)
        return x * lam.astype(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention over all tokens (no mask). (B, L, D) -> (B, L, D)."""
    hp: DINOv2Hyper

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        hp = self.hp
        b, l, d = x_BLD.shape
        heads = hp.num_attention_heads
        dh = d // heads
        q, k, v = (_dense(d, n, hp.compute_dtype, hp.qkv_bias)(x_BLD).reshape(b, l, heads, dh)
                   for n in ("q_proj", "k_proj", "v_proj"))  # (B, L, H, Dh) each
        logits_BHLL = jnp.einsum("blhd,bmhd->bhlm", q, k).astype(jnp.float32) * dh ** -0.5
        probs_BHLL = jax.nn.softmax(logits_BHLL, axis=-1).astype(v.dtype)
        out_BLHD = jnp.einsum("bhlm,bmhd->blhd", probs_BHLL, v)
        return _dense(d, "o_proj", hp.compute_dtype)(out_BLHD.reshape(b, l, d))


class MLP(nn.Module):
    """fc1 -> exact GELU -> fc2, or SwiGLU down_proj(silu(gate_proj x) * up_proj x)."""
    hp: DINOv2Hyper

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hp = self.hp
        d, hidden, dtype = x.shape[-1], hp.mlp_hidden, hp.compute_dtype
        if hp.use_swiglu_ffn:
            gate = _dense(hidden, "gate_proj", dtype)(x)
            up = _dense(hidden, "up_proj", dtype)(x)
            return _dense(d, "down_proj", dtype)(nn.silu(gate) * up)
        h = nn.gelu(_dense(hidden, "fc1", dtype)(x), approximate=False)  # HF's "gelu" is erf.
        return _dense(d, "fc2", dtype)(h)


class Layer(nn.Module):
    """Pre-norm block: x + ls1(attn(norm1 x)), then + ls2(mlp(norm2 x)). (B, L, D)."""
    hp: DINOv2Hyper

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hp = self.hp
        x = x + LayerScale(hp.layerscale_value, name="layer_scale1")(
            Attention(hp, name="attention")(_layer_norm(hp, "norm1")(x)))
        return x + LayerScale(hp.layerscale_value, name="layer_scale2")(
            MLP(hp, name="mlp")(_layer_norm(hp, "norm2")(x)))


class Embeddings(nn.Module):
    """Normalised images (B, H, W, C) -> tokens (B, 1 + R + h*w, D): [CLS, registers, patches],
    position embeddings added to CLS and patches (not registers), as HF and torch-hub."""
    hp: DINOv2Hyper

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
        hp = self.hp
        b, height, width, _ = x.shape
        d, p, m = hp.hidden_size, hp.patch_size, hp.grid
        # A VALID stride-p conv drops the H % p last rows and W % p last columns, as torch's.
        patches = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=hp.compute_dtype,
                          param_dtype=jnp.float32, kernel_init=_INIT,
                          name="patch_embeddings")(x.astype(hp.compute_dtype))
        gh, gw = patches.shape[1], patches.shape[2]
        cls = self.param("cls_token", _INIT, (1, 1, d), jnp.float32)
        pos = self.param("position_embeddings", _INIT, (1, 1 + m * m, d), jnp.float32)
        patch_pos = pos[0, 1:]  # (M*M, D)
        # The references skip resampling only for a square input of the trained grid; for any
        # other input they resample, which with an offset is not the identity even at M x M.
        if not (gh * gw == m * m and height == width):
            patch_pos = interpolate_pos_embed(
                patch_pos.reshape(m, m, d), gh, gw, antialias=hp.interpolate_antialias,
                offset=hp.interpolate_offset).reshape(gh * gw, d)
        tokens = patches.reshape(b, gh * gw, d).astype(jnp.float32) + patch_pos
        cls = jnp.broadcast_to(cls + pos[:, :1], (b, 1, d))
        parts = [cls]
        if hp.num_register_tokens:
            reg = self.param("register_tokens", nn.initializers.zeros,
                             (1, hp.num_register_tokens, d), jnp.float32)
            parts.append(jnp.broadcast_to(reg, (b, hp.num_register_tokens, d)))
        parts.append(tokens)
        return jnp.concatenate(parts, axis=1).astype(hp.compute_dtype), (gh, gw)


class DINOv2(nn.Module):
    """DINOv2 ViT. `config`: ConfigDict/dict with HF field names (see `dinov2_config`), or None
    for ViT-B/14.

    __call__(images (B, H, W, C) in [-1, 1], any float dtype; H, W >= patch_size) -> dict
      patch_tokens (B, H // p, W // p, D), cls_token (B, D), register_tokens (B, R, D), all
      float32 and after the final LayerNorm (HF's last_hidden_state split by token kind).
    """
    config: Any = None

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        hp = resolve_dinov2_config(self.config)
        if images.ndim != 4 or images.shape[-1] != hp.num_channels:
            raise ValueError(f"DINOv2 expects NHWC images (B, H, W, {hp.num_channels}), got "
                             f"shape {images.shape}")
        if min(images.shape[1:3]) < hp.patch_size:
            raise ValueError(f"images {images.shape[1]}x{images.shape[2]} are smaller than one "
                             f"{hp.patch_size}x{hp.patch_size} patch: resize them up first")
        x = (images.astype(jnp.float32) + 1.0) * 0.5  # [-1, 1] -> [0, 1]
        x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
        tokens, (gh, gw) = Embeddings(hp, name="embeddings")(x)
        for i in range(hp.num_hidden_layers):
            tokens = Layer(hp, name=f"layer_{i}")(tokens)
        tokens = _layer_norm(hp, "layernorm")(tokens).astype(jnp.float32)
        b, r, d = tokens.shape[0], hp.num_register_tokens, hp.hidden_size
        return dict(patch_tokens=tokens[:, 1 + r:].reshape(b, gh, gw, d),
                    cls_token=tokens[:, 0], register_tokens=tokens[:, 1:1 + r])
