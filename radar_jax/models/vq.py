"""VQ image tokenizer: a Flax Linen port of LlamaGen's VQ model (tokenizer_image/vq_model.py), NHWC.

Images in [-1, 1] (B, H, W, 3) -> encoder -> quant_conv -> latents (B, h, w, D) -> nearest
l2-normalised codebook entry -> codes (B, h, w) int32, with h = H / 2**(len(ch_mult) - 1).
Codes -> codebook entries -> post_quant_conv -> decoder -> images (B, H, W, 3) float32.
LlamaGen's VQ-16 (`vq16_model_config()`) maps 256x256 images to 16x16 codes from 16384 entries.

Parameter names mirror LlamaGen's PyTorch state dict, so `radar_jax.convert.vq` is a name rule
plus transposes: a torch key `encoder.conv_blocks.0.res.1.conv1.weight` is the Flax path
`encoder/conv_blocks_0/res_1/conv1/kernel` (numeric list indices join their parent with `_`;
conv `weight` -> `kernel` HWIO, GroupNorm `weight` -> `scale`, `quantize.embedding.weight` ->
`quantize/embedding/embedding`). LlamaGen's `quantize.codebook_used` buffer (a rolling usage
window, mutable state) has no counterpart: usage is reported per batch instead.

Logical axis names (for `radar_jax.sharding`; names it does not know mean replicated):
  conv kernels (kh, kw, in, out): ('conv_height', 'conv_width', 'conv_in', 'conv_out');
  conv biases: ('conv_out',); GroupNorm scale and bias: ('norm',);
  codebook (codebook_size, codebook_embed_dim): ('codebook', 'codebook_dim').
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

NUM_GROUPS = 32  # GroupNorm groups, as LlamaGen's Normalize().
NORM_EPS = 1e-6  # GroupNorm epsilon, as LlamaGen's Normalize().
L2_EPS = 1e-12  # torch.nn.functional.normalize's eps: x / max(||x||, eps).
ENTROPY_TEMPERATURE = 0.01  # LlamaGen's compute_entropy_loss default.

# LlamaGen's ModelArgs defaults, plus the Encoder/Decoder constructor defaults (ch,
# num_res_blocks) that LlamaGen does not expose in ModelArgs, plus our compute dtype.
_DEFAULTS = dict(
    codebook_size=16384,  # Number of codebook entries K.
    codebook_embed_dim=8,  # Dimension D of a code vector (the quantised latent).
    codebook_l2_norm=True,  # Quantise on the unit sphere: l2-normalise latents and codes.
    codebook_show_usage=True,  # Report the fraction of entries used in the batch.
    commit_loss_beta=0.25,  # Weight of the commitment loss.
    entropy_loss_ratio=0.0,  # Weight of LlamaGen's entropy loss (0 skips computing it).
    encoder_ch_mult=(1, 1, 2, 2, 4),  # Channel multipliers per encoder level.
    decoder_ch_mult=(1, 1, 2, 2, 4),  # Channel multipliers per decoder level.
    z_channels=256,  # Channels of the encoder output / decoder input.
    ch=128,  # Base channel count.
    num_res_blocks=2,  # ResnetBlocks per level (the decoder uses one more).
    dropout_p=0.0,  # Dropout inside ResnetBlocks when training.
    dtype="float32",  # Compute dtype: 'float32' | 'bfloat16'. Params are always float32.
)


def vq_config(**overrides: Any) -> ml_collections.ConfigDict:
    """A VQ config with LlamaGen's field names and defaults (VQ-16), `overrides` applied."""
    config = ml_collections.ConfigDict(dict(_DEFAULTS))
    for name, value in overrides.items():
        if name not in _DEFAULTS:
            raise ValueError(f"unknown VQ config field {name!r}; known: {sorted(_DEFAULTS)}")
        config[name] = value
    return config


def vq16_model_config() -> ml_collections.ConfigDict:
    """LlamaGen's VQ-16: ch 128, ch_mult (1,1,2,2,4), z 256, 16384 x 8 codes; 256px -> 16x16."""
    return vq_config()


def vq8_model_config() -> ml_collections.ConfigDict:
    """LlamaGen's VQ-8: ch_mult (1,2,2,4), downsample 8; 256px -> 32x32 codes."""
    return vq_config(encoder_ch_mult=(1, 2, 2, 4), decoder_ch_mult=(1, 2, 2, 4))


@dataclasses.dataclass(frozen=True)
class VQHyper:
    """Validated, hashable VQ hyper-parameters (see `_DEFAULTS` for each field's meaning)."""
    codebook_size: int
    codebook_embed_dim: int
    codebook_l2_norm: bool
    codebook_show_usage: bool
    commit_loss_beta: float
    entropy_loss_ratio: float
    encoder_ch_mult: tuple[int, ...]
    decoder_ch_mult: tuple[int, ...]
    z_channels: int
    ch: int
    num_res_blocks: int
    dropout_p: float
    dtype: str

    @property
    def downsample(self) -> int:
        """Image pixels per code along each axis (16 for VQ-16)."""
        return 2 ** (len(self.encoder_ch_mult) - 1)

    @property
    def compute_dtype(self) -> Any:  # The jnp dtype of `dtype`.
        return jnp.dtype(self.dtype)


def resolve_vq_config(config: Any) -> VQHyper:
    """Checks a VQ config (ConfigDict, dict or None for VQ-16) and fills in defaults.

    Raises:
      ValueError: an unknown field or a value out of range, naming it and the fix.
    """
    if config is None:
        values = {}
    elif isinstance(config, VQHyper):
        return config
    else:
        values = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    unknown = sorted(set(values) - set(_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown VQ config fields {unknown}; known: {sorted(_DEFAULTS)}")
    v = {**_DEFAULTS, **values}
    v["encoder_ch_mult"] = tuple(int(m) for m in v["encoder_ch_mult"])
    v["decoder_ch_mult"] = tuple(int(m) for m in v["decoder_ch_mult"])
    for name in ("codebook_size", "codebook_embed_dim", "z_channels", "ch", "num_res_blocks"):
        v[name] = int(v[name])
        if v[name] < 1:
            raise ValueError(f"VQ config {name}={v[name]} must be a positive integer")
    for name in ("encoder_ch_mult", "decoder_ch_mult"):
        if not v[name] or min(v[name]) < 1:
            raise ValueError(f"VQ config {name}={v[name]} must be a non-empty tuple of positive "
                             "channel multipliers, e.g. (1, 1, 2, 2, 4)")
        for m in v[name]:
            if (v["ch"] * m) % NUM_GROUPS:
                raise ValueError(f"VQ config ch={v['ch']} x {name} entry {m} = {v['ch'] * m} "
                                 f"channels is not divisible by the {NUM_GROUPS} GroupNorm "
                                 "groups: make ch a multiple of 32")
    if len(v["encoder_ch_mult"]) != len(v["decoder_ch_mult"]):
        raise ValueError(f"encoder_ch_mult {v['encoder_ch_mult']} and decoder_ch_mult "
                         f"{v['decoder_ch_mult']} must have the same length (same downsampling)")
    if not 0.0 <= float(v["dropout_p"]) < 1.0:
        raise ValueError(f"VQ config dropout_p={v['dropout_p']} must be in [0, 1)")
    if v["dtype"] not in ("float32", "bfloat16"):
        raise ValueError(f"VQ config dtype={v['dtype']!r} must be 'float32' or 'bfloat16'")
    for name in ("commit_loss_beta", "entropy_loss_ratio", "dropout_p"):
        v[name] = float(v[name])
    v["codebook_l2_norm"] = bool(v["codebook_l2_norm"])
    v["codebook_show_usage"] = bool(v["codebook_show_usage"])
    return VQHyper(**v)


# --- Building blocks.

def _uniform(bound: float):
    """U(-bound, bound): torch's default Conv2d bias init when bound = 1/sqrt(fan_in)."""
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def conv2d(features: int, kernel: int, in_features: int, name: str, dtype: Any, stride: int = 1,
           padding: Any = "SAME") -> nn.Conv:
    """A Conv with torch's default init (U(+-1/sqrt(fan_in)) for kernel and bias), named axes."""
    fan_in = kernel * kernel * in_features
    return nn.Conv(
        features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype,
        param_dtype=jnp.float32, name=name,
        # variance_scaling(1/3, fan_in, uniform) is U(+-sqrt(3 * (1/3) / fan_in)), torch's default.
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
            ("conv_height", "conv_width", "conv_in", "conv_out")),
        bias_init=nn.with_logical_partitioning(_uniform(1 / math.sqrt(fan_in)), ("conv_out",)))


def group_norm(name: str, dtype: Any) -> nn.GroupNorm:
    """LlamaGen's Normalize(): GroupNorm, 32 groups, eps 1e-6, affine (scale 1, bias 0)."""
    return nn.GroupNorm(
        num_groups=NUM_GROUPS, epsilon=NORM_EPS, dtype=dtype, param_dtype=jnp.float32,
        use_fast_variance=False,  # E[(x-mean)^2] as torch, not E[x^2]-mean^2.
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), name=name)


def swish(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(x)


class ResnetBlock(nn.Module):
    """norm-swish-conv3x3 twice (dropout before the second conv), plus a 1x1 nin_shortcut
    on the residual path when the channel count changes. (B,H,W,Cin) -> (B,H,W,out_channels)."""
    out_channels: int
    dropout_p: float
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        cin = x.shape[-1]
        h = swish(group_norm("norm1", self.dtype)(x))
        h = conv2d(self.out_channels, 3, cin, "conv1", self.dtype)(h)
        h = swish(group_norm("norm2", self.dtype)(h))
        h = nn.Dropout(self.dropout_p, deterministic=not train)(h)
        h = conv2d(self.out_channels, 3, self.out_channels, "conv2", self.dtype)(h)
        if cin != self.out_channels:
            x = conv2d(self.out_channels, 1, cin, "nin_shortcut", self.dtype)(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, 1x1-conv q/k/v/proj_out, residual."""
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        h = group_norm("norm", self.dtype)(x)
        q_BLC, k_BLC, v_BLC = (
            conv2d(c, 1, c, n, self.dtype)(h).reshape(b, hh * ww, c) for n in ("q", "k", "v"))
        # Softmax in float32 whatever the compute dtype: bfloat16 logits lose the ranking.
        w_BLL = jnp.einsum("blc,bmc->blm", q_BLC, k_BLC).astype(jnp.float32) * c ** -0.5
        w_BLL = jax.nn.softmax(w_BLL, axis=-1).astype(v_BLC.dtype)
        out_BLC = jnp.einsum("blm,bmc->blc", w_BLL, v_BLC)
        return x + conv2d(c, 1, c, "proj_out", self.dtype)(out_BLC.reshape(b, hh, ww, c))


class Downsample(nn.Module):
    """LlamaGen's stride-2 3x3 conv after zero-padding one row/column at the bottom/right."""
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        # Asymmetric padding (0, 1) on H and W, as LlamaGen's F.pad(x, (0, 1, 0, 1)).
        return conv2d(c, 3, c, "conv", self.dtype, stride=2, padding=((0, 1), (0, 1)))(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv2d(x.shape[-1], 3, x.shape[-1], "conv", self.dtype)(x)


class Level(nn.Module):
    """One resolution level: `num_blocks` ResnetBlocks (each followed by an AttnBlock when
    `attn`), then an optional Downsample or Upsample. Named `conv_blocks_{i}` as in LlamaGen."""
    out_channels: int
    num_blocks: int
    attn: bool
    resample: str | None  # None | 'down' | 'up'
    dropout_p: float
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        """x -> the level's output; with return_features, (output, the features before the
        resampling conv, i.e. at this level's own resolution)."""
        for j in range(self.num_blocks):
            x = ResnetBlock(self.out_channels, self.dropout_p, self.dtype,
                            name=f"res_{j}")(x, train)
            if self.attn:
                x = AttnBlock(self.dtype, name=f"attn_{j}")(x)
        features = x
        if self.resample == "down":
            x = Downsample(self.dtype, name="downsample")(x)
        elif self.resample == "up":
            x = Upsample(self.dtype, name="upsample")(x)
        return (x, features) if return_features else x


def _mid(x: jax.Array, channels: int, dropout_p: float, dtype: Any, train: bool) -> jax.Array:
    """The middle stack mid_0 (ResnetBlock), mid_1 (AttnBlock), mid_2 (ResnetBlock)."""
    x = ResnetBlock(channels, dropout_p, dtype, name="mid_0")(x, train)
    x = AttnBlock(dtype, name="mid_1")(x)
    return ResnetBlock(channels, dropout_p, dtype, name="mid_2")(x, train)


class Encoder(nn.Module):
    """(B, H, W, 3) -> (B, H/2**(L-1), W/2**(L-1), z_channels) for L = len(encoder_ch_mult)."""
    hp: VQHyper

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        hp, dtype = self.hp, self.hp.compute_dtype
        mults, n = hp.encoder_ch_mult, len(hp.encoder_ch_mult)
        x = conv2d(hp.ch, 3, x.shape[-1], "conv_in", dtype)(x.astype(dtype))
        for i, m in enumerate(mults):
            last = i == n - 1
            # Attention only at the lowest resolution, where H*W is small.
            x = Level(hp.ch * m, hp.num_res_blocks, attn=last, resample=None if last else "down",
                      dropout_p=hp.dropout_p, dtype=dtype, name=f"conv_blocks_{i}")(x, train)
        c = hp.ch * mults[-1]
        x = _mid(x, c, hp.dropout_p, dtype, train)
        x = swish(group_norm("norm_out", dtype)(x))
        return conv2d(hp.z_channels, 3, c, "conv_out", dtype)(x)


class Decoder(nn.Module):
    """(B, h, w, z_channels) -> (B, h*2**(L-1), w*2**(L-1), 3); levels run from the deepest."""
    hp: VQHyper

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False, return_features: bool = False):
        """With return_features, returns (images, features): features[i] is conv_blocks_i's
        output before its upsample, (B, h*2**i, w*2**i, ch * decoder_ch_mult[n-1-i])."""
        hp, dtype = self.hp, self.hp.compute_dtype
        mults, n = hp.decoder_ch_mult, len(hp.decoder_ch_mult)
        c = hp.ch * mults[-1]
        x = conv2d(c, 3, z.shape[-1], "conv_in", dtype)(z.astype(dtype))
        x = _mid(x, c, hp.dropout_p, dtype, train)
        # conv_blocks_0 is the deepest level (ch_mult[-1], with attention), as LlamaGen builds
        # the list in reversed(range(n)); every level but the last upsamples.
        features = []
        for i, m in enumerate(reversed(mults)):
            x, f = Level(hp.ch * m, hp.num_res_blocks + 1, attn=i == 0,
                         resample="up" if i != n - 1 else None, dropout_p=hp.dropout_p,
                         dtype=dtype, name=f"conv_blocks_{i}")(x, train, return_features=True)
            features.append(f)
        x = swish(group_norm("norm_out", dtype)(x))
        out = conv2d(3, 3, hp.ch * mults[0], "conv_out", dtype)(x)
        return (out, features) if return_features else out


# --- Quantiser.

def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """x / max(||x||_2, 1e-12) along `axis`, as torch.nn.functional.normalize."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, L2_EPS)


def entropy_loss(affinity_NK: jax.Array, temperature: float = ENTROPY_TEMPERATURE) -> jax.Array:
    """LlamaGen's compute_entropy_loss: mean per-sample entropy minus the entropy of the mean.

    affinity_NK: (N, K) float32, higher is closer (LlamaGen passes minus the distances).
    Returns a float32 scalar, <= ~0 by concavity of entropy: minimising it makes each latent
    pick one code confidently while spreading the batch over the codebook.
    """
    logits_NK = affinity_NK.reshape(-1, affinity_NK.shape[-1]) / temperature
    probs_NK = jax.nn.softmax(logits_NK, axis=-1)
    log_probs_NK = jax.nn.log_softmax(logits_NK, axis=-1)
    avg_probs_K = jnp.mean(probs_NK, axis=0)
    avg_entropy = -jnp.sum(avg_probs_K * jnp.log(avg_probs_K + 1e-5))
    sample_entropy = -jnp.mean(jnp.sum(probs_NK * log_probs_NK, axis=-1))
    return sample_entropy - avg_entropy


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantiser with a straight-through estimator (float32 throughout).

    The codebook parameter is `embedding/embedding` (K, D), LlamaGen's `embedding.weight`.
    With l2_norm both the latents and the codebook rows are l2-normalised before the search,
    so the argmin over squared distances is the argmax of cosine similarity.
    """
    codebook_size: int
    embed_dim: int
    beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    l2_norm: bool = True
    show_usage: bool = True

    def setup(self):
        def init(key, shape, dtype=jnp.float32):
            # LlamaGen: U(-1/K, 1/K), then l2-normalised rows when l2_norm.
            table = jax.random.uniform(key, shape, dtype, -1.0 / shape[0], 1.0 / shape[0])
            return l2_normalize(table) if self.l2_norm else table
        self.embedding = nn.Embed(
            self.codebook_size, self.embed_dim, dtype=jnp.float32, param_dtype=jnp.float32,
            embedding_init=nn.with_logical_partitioning(init, ("codebook", "codebook_dim")))

    def codebook(self) -> jax.Array:
        """(K, D) float32 code vectors as the search sees them (l2-normalised when l2_norm)."""
        table_KD = self.embedding.embedding.astype(jnp.float32)
        return l2_normalize(table_KD) if self.l2_norm else table_KD

    def lookup(self, codes: jax.Array) -> jax.Array:
        """codes (...) int -> code vectors (..., D) float32. Out-of-range codes are clamped
        (JAX gather semantics), so validate codes from untrusted sources first."""
        return jnp.take(self.codebook(), codes, axis=0, mode="clip")

    def __call__(self, z: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Quantises latents.

        Args:
          z: (B, h, w, D) latents (any float dtype; computed in float32).
        Returns:
          z_q: (B, h, w, D) float32, the code vectors in the forward pass, with the gradient of
            the (normalised) latents in the backward pass (straight-through).
          aux: 'codes' (B, h, w) int32; 'vq_loss' mean ||z_q - sg(z)||^2 (moves the codebook),
            'commit_loss' beta * mean ||sg(z_q) - z||^2 (moves the encoder), 'entropy_loss'
            (0 unless entropy_loss_ratio > 0), 'codebook_usage' fraction of the K entries used
            in this batch (0 when show_usage is off); all float32 scalars.
        """
        if z.shape[-1] != self.embed_dim:
            raise ValueError(f"latents have {z.shape[-1]} channels, the codebook has "
                             f"codebook_embed_dim={self.embed_dim}")
        z = z.astype(jnp.float32)
        if self.l2_norm:
            z = l2_normalize(z)
        e_KD = self.codebook()
        z_ND = z.reshape(-1, self.embed_dim)
        # ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e, the same expansion LlamaGen uses, so near-ties
        # break the same way; HIGHEST precision keeps TPUs from rounding the dot to bfloat16.
        d_NK = (jnp.sum(z_ND ** 2, axis=1, keepdims=True) + jnp.sum(e_KD ** 2, axis=1)[None, :]
                - 2.0 * jnp.einsum("nd,kd->nk", z_ND, e_KD, precision=jax.lax.Precision.HIGHEST))
        codes_N = jnp.argmin(d_NK, axis=1).astype(jnp.int32)
        zq = jnp.take(e_KD, codes_N, axis=0).reshape(z.shape)
        sg = jax.lax.stop_gradient
        vq_loss = jnp.mean(jnp.square(zq - sg(z)))
        commit_loss = self.beta * jnp.mean(jnp.square(sg(zq) - z))
        if self.entropy_loss_ratio > 0:
            ent = self.entropy_loss_ratio * entropy_loss(-d_NK)
        else:  # Skip the (N, K) softmaxes: 16k tokens x 16k codes is 1 GiB each.
            ent = jnp.zeros((), jnp.float32)
        if self.show_usage:
            counts_K = jnp.zeros((self.codebook_size,), jnp.int32).at[codes_N].add(1)
            usage = jnp.mean((counts_K > 0).astype(jnp.float32))
        else:
            usage = jnp.zeros((), jnp.float32)
        zq_st = z + sg(zq - z)  # Straight-through: forward zq, gradient identity to z.
        aux = dict(codes=codes_N.reshape(z.shape[:-1]), vq_loss=vq_loss, commit_loss=commit_loss,
                   entropy_loss=ent, codebook_usage=usage)
        return zq_st, aux


# --- The tokenizer.

class VQModel(nn.Module):
    """LlamaGen's VQModel in Linen. `config`: ConfigDict/dict with LlamaGen's field names
    (see `vq_config`), or None for VQ-16.

    Methods (all NHWC; images in [-1, 1]; `train` enables dropout, rng 'dropout'):
      encode(images (B,H,W,3)) -> codes (B,h,w) int32
      decode_codes(codes (B,h,w) int) -> images (B,H,W,3) float32
      __call__(images, train=False) -> (reconstruction (B,H,W,3) float32, aux), aux as
        VectorQuantizer's ('codes', 'vq_loss', 'commit_loss', 'entropy_loss', 'codebook_usage')
      encode_latents(images) -> (B,h,w,D) float32 latents before quantisation (quant_conv out)
      quantize_latents(latents) -> (z_q (B,h,w,D), aux)
      decode_latents(z_q (B,h,w,D)) -> images; codes_to_latents(codes) -> (B,h,w,D)
      decode_codes_with_features(codes) -> (images, per-level decoder features)
    """
    config: Any = None

    def setup(self):
        hp = resolve_vq_config(self.config)
        self.hp = hp
        dtype = hp.compute_dtype
        self.encoder = Encoder(hp)
        self.decoder = Decoder(hp)
        self.quantize = VectorQuantizer(
            hp.codebook_size, hp.codebook_embed_dim, hp.commit_loss_beta, hp.entropy_loss_ratio,
            hp.codebook_l2_norm, hp.codebook_show_usage)
        self.quant_conv = conv2d(hp.codebook_embed_dim, 1, hp.z_channels, "quant_conv", dtype)
        self.post_quant_conv = conv2d(hp.z_channels, 1, hp.codebook_embed_dim, "post_quant_conv",
                                      dtype)

    def _check_images(self, images: jax.Array) -> None:
        f = self.hp.downsample
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be NHWC (B, H, W, 3) in [-1, 1], got shape "
                             f"{images.shape}; transpose NCHW with x.transpose(0, 2, 3, 1)")
        if images.shape[1] % f or images.shape[2] % f:
            raise ValueError(f"image size {images.shape[1]}x{images.shape[2]} is not a multiple "
                             f"of the tokenizer's downsampling factor {f}: resize or crop it")

    def encode_latents(self, images: jax.Array, train: bool = False) -> jax.Array:
        """(B,H,W,3) in [-1,1] -> (B,H/f,W/f,codebook_embed_dim) float32, f = hp.downsample."""
        self._check_images(images)
        h = self.encoder(images, train)
        return self.quant_conv(h).astype(jnp.float32)

    def quantize_latents(self, latents: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(B,h,w,D) latents -> (z_q (B,h,w,D) float32, aux); see VectorQuantizer."""
        return self.quantize(latents)

    def encode(self, images: jax.Array, train: bool = False) -> jax.Array:
        """(B,H,W,3) in [-1,1] -> codes (B,H/f,W/f) int32."""
        return self.quantize(self.encode_latents(images, train))[1]["codes"]

    def codes_to_latents(self, codes: jax.Array) -> jax.Array:
        """codes (B,h,w) int -> code vectors (B,h,w,D) float32 (l2-normalised when l2_norm)."""
        if codes.ndim != 3:
            raise ValueError(f"codes must be (B, h, w), got shape {codes.shape}")
        return self.quantize.lookup(codes)

    def decode_latents(self, z_q: jax.Array, train: bool = False) -> jax.Array:
        """(B,h,w,D) code vectors -> images (B,h*f,w*f,3) float32 (about [-1, 1])."""
        h = self.post_quant_conv(z_q.astype(self.hp.compute_dtype))
        return self.decoder(h, train).astype(jnp.float32)

    def decode_codes(self, codes: jax.Array, train: bool = False) -> jax.Array:
        """codes (B,h,w) int -> images (B,h*f,w*f,3) float32."""
        return self.decode_latents(self.codes_to_latents(codes), train)

    def decode_codes_with_features(self, codes: jax.Array, train: bool = False
                                   ) -> tuple[jax.Array, list[jax.Array]]:
        """codes (B,h,w) int -> (images (B,h*f,w*f,3) float32, features): features[i] float32
        is the decoder's conv_blocks_i output before its upsample, (B, h*2**i, w*2**i,
        ch * decoder_ch_mult[-1-i]); the images equal decode_codes'. Tokenizer post-training
        (radar_jax/tpt.py) aligns one of them to DINOv2 features."""
        h = self.post_quant_conv(self.codes_to_latents(codes).astype(self.hp.compute_dtype))
        out, features = self.decoder(h, train, return_features=True)
        return out.astype(jnp.float32), [f.astype(jnp.float32) for f in features]

    def __call__(self, images: jax.Array, train: bool = False
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Full forward: encode, quantise (straight-through), decode. See the class docstring."""
        z_q, aux = self.quantize(self.encode_latents(images, train))
        return self.decode_latents(z_q, train), aux


def count_params(params: Any) -> int:
    """Total number of scalars in a parameter pytree (boxed or not, arrays or ShapeDtypeStructs)."""
    leaves = jax.tree_util.tree_leaves(nn.meta.unbox(params))
    return int(sum(math.prod(x.shape) for x in leaves))
