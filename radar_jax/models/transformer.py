"""LlamaGen-compatible class-conditional transformer with RadAR's prompt embedding.

One Linen module serves every use: teacher-forced training on a packed layout with a (L, L)
nested mask, RDS layouts with per-example (B, L, L) masks, and the KV-cached samplers that feed
one block at a time. The module never builds masks or layouts itself: callers pass per-token
metadata (`flat_pos`, `is_new`, `is_class`) and a boolean mask, usually from `schedules.py`.

Architecture (LlamaGen's GPT, autoregressive/models/gpt.py): class token from a label table with
a null row for CFG, RMSNorm pre-norm blocks, fused `wqkv` attention with 2D RoPE, SwiGLU MLP,
final RMSNorm and a zero-initialised output head. Parameter names mirror LlamaGen's state dict
(`layers.0.attention.wqkv.weight` -> `layers_0/attention/wqkv/kernel`), so the converter in
`radar_jax.convert.gpt` is a renaming table plus transposes.

RadAR's additions: `prompt_embedding`, one learnable (dim,) vector fed at every new-ring
position, and arbitrary boolean attention masks instead of LlamaGen's causal one.

Logical axis names on parameters (map them to mesh axes in `radar_jax.sharding`):
  tok_embeddings ('vocab', 'embed'); cls_embedding ('classes', 'embed') -- its own name because
  1000 classes + 1 null row rarely divides a mesh axis, so rules normally leave it replicated;
  wqkv ('embed', 'qkv'); wo ('heads', 'embed'); w1/w3 ('embed', 'mlp'); w2 ('mlp', 'embed');
  norms ('norm',); output ('embed', 'vocab'); prompt_embedding ('embed',).
Activations: the residual stream is constrained to ('batch', 'length', 'embed') and the logits to
('batch', 'length', 'vocab'); both are no-ops without logical axis rules.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

Cache = dict[str, dict[str, jax.Array]]

# Sizes of the RadAR/LlamaGen registry: (n_layer, dim, n_head). 'tiny' is the parity fixture's
# shape (../shared/fixtures/llamagen_gpt_tiny.npz). XL is 30 layers, not LlamaGen-XL's 36, to hit
# RadAR's 610M non-embedding parameters (see RADAR.md, "Model sizes").
_SIZES = {
    "tiny": dict(n_layer=2, dim=64, n_head=4),
    "B": dict(n_layer=12, dim=768, n_head=12),
    "L": dict(n_layer=24, dim=1024, n_head=16),
    "XL": dict(n_layer=30, dim=1280, n_head=20),
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
def model_config(size: str = "tiny", **overrides: Any) -> ml_collections.ConfigDict:
    """Transformer config under LlamaGen's `ModelArgs` names, for a registry size.

    Fields: dim (model width), n_layer, n_head, n_kv_head (None = n_head; fewer = grouped-query
    attention), multiple_of (SwiGLU hidden rounded up to it), ffn_dim_multiplier (None or float
    scale of the SwiGLU hidden), rope_base, norm_eps (RMSNorm epsilon), initializer_range (std of
    the normal init), token_dropout_p / attn_dropout_p / resid_dropout_p / ffn_dropout_p
    (LlamaGen's ImageNet recipe: 0.1 / 0.0 / 0.1 / 0.1; all 0 for 'tiny'), drop_path_rate
    (stochastic depth, linear over layers), num_classes (a null class `num_classes` is added
    when class_dropout_prob > 0), class_dropout_prob (label dropout for CFG in training),
    vocab_size (VQ codebook size), cls_token_num (must be 1 here), block_size (H*W tokens),
    grid ((H, W); default the square root of block_size), dtype ('float32' | 'bfloat16' compute,
    params stay float32), remat (rematerialise each layer to save memory).

    'tiny' is the fixture shape (dim 64, 2 layers, 4 heads, multiple_of 32, vocab 64, 10
    classes, 8x8 grid); 'B', 'L', 'XL' use vocab 16384, 1000 classes and a 16x16 grid.
    Overrides apply last; a `block_size` override without `grid` recomputes the square grid.
    """
    if size not in _SIZES:
        raise ValueError(f"unknown model size {size!r}: choose one of {sorted(_SIZES)}")
    c = ml_collections.ConfigDict()
    c.update(_SIZES[size])
    c.n_kv_head = None
    c.multiple_of = 256
    c.ffn_dim_multiplier = None
    c.rope_base = 10000.0
    c.norm_eps = 1e-5
    c.initializer_range = 0.02
    c.token_dropout_p = 0.1
    c.attn_dropout_p = 0.0
    c.resid_dropout_p = 0.1
    c.ffn_dropout_p = 0.1
    c.drop_path_rate = 0.0
    c.num_classes = 1000
    c.class_dropout_prob = 0.1
    c.vocab_size = 16384
    c.cls_token_num = 1
    c.block_size = 256
    c.grid = None
    c.dtype = "float32"
    c.remat = False
    if size == "tiny":
        c.update(multiple_of=32, vocab_size=64, num_classes=10, block_size=64,
                 token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    unknown = sorted(set(overrides) - set(c.keys()))
    if unknown:
        raise ValueError(f"unknown transformer config fields {unknown}: valid fields are "
                         f"{sorted(c.keys())}")
    c.update(overrides)
    if c.grid is None:
        side = math.isqrt(c.block_size)
        if side * side != c.block_size:
            raise ValueError(f"block_size={c.block_size} is not a square: pass grid=(H, W) "
                             "with H*W == block_size")
        c.grid = (side, side)
    c.grid = tuple(int(g) for g in c.grid)
    validate_config(c)
    return c


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first inconsistent field of a transformer config."""
    dim, n_head = config.dim, config.n_head
    if dim % n_head:
        raise ValueError(f"dim={dim} is not divisible by n_head={n_head}")
    head_dim = dim // n_head
    if head_dim % 4:
        raise ValueError(f"head_dim = dim/n_head = {head_dim} must be a multiple of 4 for 2D "
                         "RoPE (half the rotary pairs for rows, half for columns)")
    n_kv = _n_kv_head(config)
    if n_head % n_kv:
        raise ValueError(f"n_head={n_head} is not a multiple of n_kv_head={n_kv}")
    if config.cls_token_num != 1:
        raise ValueError(f"cls_token_num={config.cls_token_num}: only 1 class token (c2i) is "
                         "supported")
    if config.grid is None or len(config.grid) != 2:
        raise ValueError(f"grid={config.grid} must be (H, W)")
    if config.grid[0] * config.grid[1] != config.block_size:
        raise ValueError(f"grid={tuple(config.grid)} has {config.grid[0] * config.grid[1]} "
                         f"tokens but block_size={config.block_size}: make H*W == block_size")
    if config.dtype not in _DTYPES:
        raise ValueError(f"dtype={config.dtype!r}: choose one of {sorted(_DTYPES)}")
    for name in ("token_dropout_p", "attn_dropout_p", "resid_dropout_p", "ffn_dropout_p",
                 "drop_path_rate", "class_dropout_prob"):
        if not 0.0 <= config[name] < 1.0:
            raise ValueError(f"{name}={config[name]} must be in [0, 1)")


def _n_kv_head(config) -> int:
    return config.n_head if config.n_kv_head is None else config.n_kv_head


def ffn_hidden_dim(config) -> int:
    """LlamaGen's SwiGLU width: 4*dim -> int(2/3 of it) -> * ffn_dim_multiplier -> round up."""
    hidden = int(2 * (4 * config.dim) / 3)
    if config.ffn_dim_multiplier is not None:
        hidden = int(config.ffn_dim_multiplier * hidden)
    return -(-hidden // config.multiple_of) * config.multiple_of


# ----------------------------------------------------------------------------------------------
# 2D rotary embedding
# ----------------------------------------------------------------------------------------------
def rope_2d(flat_pos_BL: jax.Array, head_dim: int, grid_w: int, base: float):
    """cos and sin of LlamaGen's 2D RoPE at grid positions (h, w) = divmod(flat_pos, W).

    Follows LlamaGen's precompute_freqs_cis_2d: head_dim//4 frequencies base^(-2i/(head_dim/2));
    the first head_dim//4 rotary pairs turn with the row h, the last head_dim//4 with the column
    w. Negative flat_pos (the class token, or padding) gets cos = sin = 0 -- LlamaGen's cache
    holds zeros there, so the class token's q and k become exactly 0; parity needs that.

    Args: flat_pos_BL (B, L) int32; returns cos_BLP, sin_BLP (B, L, head_dim//2) float32.
    """
    half = head_dim // 2
    inv_freq_F = 1.0 / (base ** (jnp.arange(0, half, 2, dtype=jnp.float32)[: half // 2] / half))
    row_BL = (flat_pos_BL // grid_w).astype(jnp.float32)
    col_BL = (flat_pos_BL % grid_w).astype(jnp.float32)
    angle_BLP = jnp.concatenate([row_BL[..., None] * inv_freq_F,
                                 col_BL[..., None] * inv_freq_F], axis=-1)
    valid_BL1 = (flat_pos_BL >= 0)[..., None]
    cos_BLP = jnp.where(valid_BL1, jnp.cos(angle_BLP), 0.0)
    sin_BLP = jnp.where(valid_BL1, jnp.sin(angle_BLP), 0.0)
    return cos_BLP, sin_BLP


def apply_rope(x_BLHD: jax.Array, cos_BLP: jax.Array, sin_BLP: jax.Array) -> jax.Array:
    """Rotates adjacent pairs (x[2i], x[2i+1]) by the angles; computed in float32, cast back."""
    b, l, h, d = x_BLHD.shape
    x_BLHP2 = x_BLHD.astype(jnp.float32).reshape(b, l, h, d // 2, 2)
    x0, x1 = x_BLHP2[..., 0], x_BLHP2[..., 1]
    cos, sin = cos_BLP[:, :, None, :], sin_BLP[:, :, None, :]  # broadcast over heads
    out_BLHP2 = jnp.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
    return out_BLHP2.reshape(b, l, h, d).astype(x_BLHD.dtype)


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------
def _normal(config, axes):
    return nn.with_logical_partitioning(nn.initializers.normal(config.initializer_range), axes)


def _dense(config, features, axes, name, zero=False):
    init = (nn.with_logical_partitioning(nn.initializers.zeros_init(), axes) if zero
            else _normal(config, axes))
    return nn.Dense(features, use_bias=False, kernel_init=init, dtype=_DTYPES[config.dtype],
                    param_dtype=jnp.float32, name=name)


class RMSNorm(nn.Module):
    """LlamaGen's RMSNorm: normalise in float32, cast back, scale by `weight` (init ones)."""
    dim: int
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                                   ("norm",)), (self.dim,))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return y.astype(x.dtype) * weight.astype(x.dtype)


class Attention(nn.Module):
    """Multi-head (optionally grouped-query) attention under an arbitrary boolean mask."""
    config: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, x_BLD, cos_BLP, sin_BLP, mask_BLS, layer_cache, cache_index, train):
        """x_BLD (B, L, dim); mask_BLS (B|1, L, S) bool with S = L, or the cache length.

        Returns (out_BLD, new_layer_cache or None).
        """
        cfg = self.config
        n_head, n_kv = cfg.n_head, _n_kv_head(cfg)
        head_dim, group = cfg.dim // n_head, n_head // n_kv
        b, l, _ = x_BLD.shape
        qkv = _dense(cfg, (n_head + 2 * n_kv) * head_dim, ("embed", "qkv"), "wqkv")(x_BLD)
        q, k, v = jnp.split(qkv, [n_head * head_dim, (n_head + n_kv) * head_dim], axis=-1)
        q_BLHD = apply_rope(q.reshape(b, l, n_head, head_dim), cos_BLP, sin_BLP)
        k_BLKD = apply_rope(k.reshape(b, l, n_kv, head_dim), cos_BLP, sin_BLP)
        v_BLKD = v.reshape(b, l, n_kv, head_dim)

        new_cache = None
        if layer_cache is not None:
            # Write this block's keys/values at [cache_index, cache_index + L) and attend over
            # every slot; the caller's mask hides the slots that are empty or not yet visible.
            start = (jnp.int32(0), jnp.asarray(cache_index, jnp.int32), jnp.int32(0),
                     jnp.int32(0))
            k_cache = jax.lax.dynamic_update_slice(
                layer_cache["k"], k_BLKD.astype(layer_cache["k"].dtype), start)
            v_cache = jax.lax.dynamic_update_slice(
                layer_cache["v"], v_BLKD.astype(layer_cache["v"].dtype), start)
            new_cache = {"k": k_cache, "v": v_cache}
            k_BSKD, v_BSKD = k_cache.astype(q_BLHD.dtype), v_cache.astype(q_BLHD.dtype)
        else:
            k_BSKD, v_BSKD = k_BLKD, v_BLKD

        # Query head h uses kv head h // group (torch's repeat_interleave), without copying
        # the keys: split the query heads into (kv head, group).
        q_BLKGD = q_BLHD.reshape(b, l, n_kv, group, head_dim)
        scores_BKGLS = jnp.einsum("blkgd,bskd->bkgls", q_BLKGD, k_BSKD,
                                  preferred_element_type=jnp.float32) / math.sqrt(head_dim)
        # Large finite negative, not -inf: a fully masked row (padding) stays finite.
        scores_BKGLS = jnp.where(mask_BLS[:, None, None], scores_BKGLS,
                                 jnp.finfo(jnp.float32).min)
        # Softmax with the normalisation moved after the AV product: dividing the (L, D)
        # output instead of the (L, S) probabilities saves a pass over the scores, which
        # dominates on CPU when S is a long cache (same values up to float rounding).
        exp_BKGLS = jnp.exp(scores_BKGLS - jnp.max(scores_BKGLS, axis=-1, keepdims=True))
        denom_BKGL1 = jnp.sum(exp_BKGLS, axis=-1, keepdims=True)
        exp_BKGLS = exp_BKGLS.astype(q_BLHD.dtype)
        if cfg.attn_dropout_p > 0:
            exp_BKGLS = nn.Dropout(cfg.attn_dropout_p)(exp_BKGLS, deterministic=not train)
        out_BKGLD = jnp.einsum("bkgls,bskd->bkgld", exp_BKGLS, v_BSKD,
                               preferred_element_type=jnp.float32) / denom_BKGL1
        out_BLKGD = jnp.moveaxis(out_BKGLD, 3, 1).astype(q_BLHD.dtype)
        out_BLD = _dense(cfg, cfg.dim, ("heads", "embed"), "wo")(out_BLKGD.reshape(b, l, -1))
        if cfg.resid_dropout_p > 0:
            out_BLD = nn.Dropout(cfg.resid_dropout_p)(out_BLD, deterministic=not train)
        return out_BLD, new_cache


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x), hidden width from `ffn_hidden_dim`."""
    config: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, x_BLD, train):
        cfg = self.config
        hidden = ffn_hidden_dim(cfg)
        gate_BLF = _dense(cfg, hidden, ("embed", "mlp"), "w1")(x_BLD)
        up_BLF = _dense(cfg, hidden, ("embed", "mlp"), "w3")(x_BLD)
        out_BLD = _dense(cfg, cfg.dim, ("mlp", "embed"), "w2")(nn.silu(gate_BLF) * up_BLF)
        if cfg.ffn_dropout_p > 0:
            out_BLD = nn.Dropout(cfg.ffn_dropout_p)(out_BLD, deterministic=not train)
        return out_BLD


class Block(nn.Module):
    """Pre-norm transformer layer: x + attention(norm(x)), then + feed_forward(norm(.))."""
    config: ml_collections.ConfigDict
    drop_path: float = 0.0

    def _drop_path(self, y_BLD, train):
        # Stochastic depth per example (LlamaGen's DropPath), rescaled to keep the expectation.
        if not train or self.drop_path == 0.0:
            return y_BLD
        keep = 1.0 - self.drop_path
        keep_B11 = jax.random.bernoulli(self.make_rng("dropout"), keep, (y_BLD.shape[0], 1, 1))
        return jnp.where(keep_B11, y_BLD / keep, 0).astype(y_BLD.dtype)

    @nn.compact
    def __call__(self, x_BLD, cos_BLP, sin_BLP, mask_BLS, layer_cache, cache_index, train):
        cfg = self.config
        attn_BLD, new_cache = Attention(cfg, name="attention")(
            RMSNorm(cfg.dim, cfg.norm_eps, name="attention_norm")(x_BLD), cos_BLP, sin_BLP,
            mask_BLS, layer_cache, cache_index, train)
        h_BLD = x_BLD + self._drop_path(attn_BLD, train)
        ffn_BLD = FeedForward(cfg, name="feed_forward")(
            RMSNorm(cfg.dim, cfg.norm_eps, name="ffn_norm")(h_BLD), train)
        return h_BLD + self._drop_path(ffn_BLD, train), new_cache


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
def _per_example(x, batch: int, name: str, ndim: int):
    """Gives per-token metadata of rank `ndim` a leading batch axis (1 broadcasts to batch)."""
    x = jnp.asarray(x)
    if x.ndim == ndim:
        x = x[None]
    if x.ndim != ndim + 1 or x.shape[0] not in (1, batch):
        raise ValueError(f"{name} has shape {x.shape}: expected {ndim} dims, or {ndim + 1} "
                         f"with a leading batch axis of 1 or {batch}")
    return x


class Transformer(nn.Module):
    """RadAR / LlamaGen c2i transformer. See the module docstring for names and axes."""
    config: ml_collections.ConfigDict

    def setup(self):
        cfg = self.config
        validate_config(cfg)
        cdt = _DTYPES[cfg.dtype]
        self.tok_embeddings = nn.Embed(cfg.vocab_size, cfg.dim, dtype=cdt,
                                       embedding_init=_normal(cfg, ("vocab", "embed")))
        # LlamaGen's LabelEmbedder: one extra row (id num_classes) is the CFG null class.
        n_rows = cfg.num_classes + int(cfg.class_dropout_prob > 0)
        self.cls_embedding = _LabelEmbedder(n_rows, cfg.dim, cdt, cfg.initializer_range)
        self.prompt_embedding = self.param("prompt_embedding", _normal(cfg, ("embed",)),
                                           (cfg.dim,))
        block = nn.remat(Block, static_argnums=(7,)) if cfg.remat else Block
        drop = np.linspace(0.0, cfg.drop_path_rate, cfg.n_layer)
        self.layers = [block(cfg, float(drop[i])) for i in range(cfg.n_layer)]
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = _dense(cfg, cfg.vocab_size, ("embed", "vocab"), None, zero=True)

    def embed(self, tokens, labels, is_new, is_class, *, train: bool = False) -> jax.Array:
        """Input embeddings of a packed sequence, after token dropout.

        Args:
          tokens: (B, L) int; read only where neither is_new nor is_class (other values are
            ignored, -1 included).
          labels: (B,) int class ids in [0, num_classes]; num_classes is the null class.
          is_new, is_class: (L,) or (B, L) bool.
          train: enables class dropout (labels -> null with prob class_dropout_prob) and token
            dropout; both draw from the 'dropout' rng.
        Returns: (B, L, dim) in the compute dtype.
        """
        cfg = self.config
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens has shape {tokens.shape}: expected (B, L)")
        b, _ = tokens.shape
        labels = jnp.asarray(labels)
        if labels.shape != (b,):
            raise ValueError(f"labels has shape {labels.shape}: expected ({b},)")
        is_new_BL = _per_example(is_new, b, "is_new", 1).astype(bool)
        is_class_BL = _per_example(is_class, b, "is_class", 1).astype(bool)
        if train and cfg.class_dropout_prob > 0:
            drop_B = jax.random.uniform(self.make_rng("dropout"), (b,)) < cfg.class_dropout_prob
            labels = jnp.where(drop_B, cfg.num_classes, labels)
        cls_BD = self.cls_embedding(labels)
        # Clip so that ignored slots (e.g. -1 at new/class positions) never gather out of range.
        tok_BLD = self.tok_embeddings(jnp.clip(tokens, 0, cfg.vocab_size - 1))
        prompt_D = self.prompt_embedding.astype(tok_BLD.dtype)
        h_BLD = jnp.where(is_new_BL[..., None], prompt_D, tok_BLD)
        h_BLD = jnp.where(is_class_BL[..., None], cls_BD[:, None, :], h_BLD)
        if cfg.token_dropout_p > 0:
            h_BLD = self.tok_dropout(h_BLD, deterministic=not train)
        return h_BLD

    def forward_embeddings(self, h_BLD, flat_pos, mask, *, train: bool = False,
                           cache: Cache | None = None, cache_index=None):
        """Runs the layers, final norm and head on input embeddings.

        Args:
          h_BLD: (B, L, dim) input embeddings (from `embed`).
          flat_pos: (L,) or (B, L) int grid position h*W + w; negative = class token (no
            rotation).
          mask: bool, True where query i may attend key j: (L, L) or (B, L, L) without a cache;
            (L, S) or (B, L, S) over the S cache slots with one.
          cache: None, or the `init_cache` pytree; this block's keys/values are written at
            slots [cache_index, cache_index + L).
          cache_index: int32 scalar (may be traced) when a cache is given.
        Returns: (logits (B, L, vocab_size) float32, updated cache or None).
        """
        cfg = self.config
        b, l, _ = h_BLD.shape
        flat_pos_BL = _per_example(flat_pos, b, "flat_pos", 1).astype(jnp.int32)
        mask_BLS = _per_example(mask, b, "mask", 2).astype(bool)
        s = l if cache is None else cache["layers_0"]["k"].shape[1]
        if mask_BLS.shape[1:] != (l, s):
            raise ValueError(f"mask has shape {jnp.shape(mask)}: expected ({l}, {s}) or "
                             f"(B, {l}, {s}) for {l} tokens and {s} "
                             f"{'cache slots' if cache is not None else 'keys'}")
        if cache is not None and cache_index is None:
            raise ValueError("a cache was given without cache_index: pass the first slot to "
                             "write this block's keys/values to")
        cos_BLP, sin_BLP = rope_2d(flat_pos_BL, cfg.dim // cfg.n_head, cfg.grid[1],
                                   cfg.rope_base)
        h_BLD = nn.with_logical_constraint(h_BLD, ("batch", "length", "embed"))
        new_cache = None if cache is None else {}
        for i, layer in enumerate(self.layers):
            name = f"layers_{i}"
            h_BLD, layer_cache = layer(h_BLD, cos_BLP, sin_BLP, mask_BLS,
                                       None if cache is None else cache[name], cache_index,
                                       train)
            h_BLD = nn.with_logical_constraint(h_BLD, ("batch", "length", "embed"))
            if cache is not None:
                new_cache[name] = layer_cache
        logits_BLV = self.output(self.norm(h_BLD)).astype(jnp.float32)
        logits_BLV = nn.with_logical_constraint(logits_BLV, ("batch", "length", "vocab"))
        return logits_BLV, new_cache

    def __call__(self, tokens, labels, flat_pos, is_new, is_class, mask, *, train: bool = False,
                 cache: Cache | None = None, cache_index=None):
        """Logits for every index of a packed sequence: `embed` then `forward_embeddings`.

        Shapes: tokens (B, L) int32, labels (B,) int32, flat_pos/is_new/is_class (L,) or
        (B, L), mask (L, L)/(B, L, L) bool, or (L, S)/(B, L, S) with a cache of S slots.
        Returns (logits (B, L, vocab_size) float32, updated cache or None).
        """
        h_BLD = self.embed(tokens, labels, is_new, is_class, train=train)
        return self.forward_embeddings(h_BLD, flat_pos, mask, train=train, cache=cache,
                                       cache_index=cache_index)


class _LabelEmbedder(nn.Module):
    """Holds `embedding_table` so the path is cls_embedding/embedding_table/embedding."""
    num_rows: int
    dim: int
    dtype: Any
    std: float

    def setup(self):
        init = nn.with_logical_partitioning(nn.initializers.normal(self.std),
                                            ("classes", "embed"))
        self.embedding_table = nn.Embed(self.num_rows, self.dim, dtype=self.dtype,
                                        embedding_init=init)

    def __call__(self, labels_B):
        return self.embedding_table(labels_B)


# ----------------------------------------------------------------------------------------------
# Helpers: cache, init, parameter counts
# ----------------------------------------------------------------------------------------------
def init_cache(config, batch: int, length: int, dtype=jnp.float32) -> Cache:
    """Empty KV cache: {'layers_i': {'k', 'v': (batch, length, n_kv_head, head_dim) zeros}}."""
    shape = (batch, length, _n_kv_head(config), config.dim // config.n_head)
    return {f"layers_{i}": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
            for i in range(config.n_layer)}


def _init_fn(config):
    """A function rng -> boxed variables, with the smallest valid dummy inputs (1 class token
    and 1 grid token); parameter shapes do not depend on the sequence length."""
    model = Transformer(config)

    def init(rng):
        return model.init(rng, jnp.zeros((1, 2), jnp.int32), jnp.zeros((1,), jnp.int32),
                          np.array([-1, 0]), np.array([False, False]), np.array([True, False]),
                          np.tril(np.ones((2, 2), bool)))
    return init


def init_params(config, rng: jax.Array, *, unbox: bool = True):
    """Fresh parameters (float32). unbox=False keeps nn.Partitioned boxes (logical axes)."""
    params = _init_fn(config)(rng)["params"]
    return nn.unbox(params) if unbox else params


def param_logical_axes(config):
    """Tree of PartitionSpecs of logical axis names, matching `init_params`'s tree."""
    boxed = jax.eval_shape(_init_fn(config), jax.random.key(0))["params"]
    return nn.get_partition_spec(boxed)


# Top-level parameters that are embeddings or the head, not "non-embedding" parameters.
EMBEDDING_PARAMS = ("tok_embeddings", "cls_embedding", "prompt_embedding", "output")


def count_params(config) -> dict[str, int]:
    """{'total': all parameters, 'non_embedding': without EMBEDDING_PARAMS}; no real init."""
    shapes = nn.unbox(jax.eval_shape(_init_fn(config), jax.random.key(0))["params"])
    sizes = {k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v))
             for k, v in shapes.items()}
    total = sum(sizes.values())
    embedding = sum(n for k, n in sizes.items() if k in EMBEDDING_PARAMS)
    return dict(total=total, non_embedding=total - embedding)
