"""Attention for radar_jax's transformer: 2D RoPE, the KV cache, and the attention cores.

`Attention` is LlamaGen's fused-`wqkv` attention (optionally grouped-query) under an arbitrary
boolean mask (RadAR's nested mask, a causal one, or a mask over KV-cache slots). Two cores
compute the same softmax(q k^T / sqrt(d)) v, chosen by the config field `attention_impl`:

  'xla'          explicit einsums in head-major layout with float32 scores, the mask as an
                 additive bias, the row max held out of the gradient and the softmax
                 normalisation moved after the AV product (each spares a pass over the (L, S)
                 scores). The default: on this project's CPU it is the faster core.
  'dot_product'  `jax.nn.dot_product_attention(..., mask=, implementation=None)`: XLA's
                 attention op with a boolean mask, the entry point that picks fused kernels
                 where the backend has them. On GPU, cuDNN's flash kernel takes only causal /
                 padding / sliding-window masks (not a boolean (B, L, S) one), so with the
                 nested mask JAX lowers it through XLA too.
  'splash'       not implemented, on purpose: the Pallas TPU splash kernel needs its mask as
                 static numpy (or a function of the query/key index only) shared by the whole
                 batch, plus optional segment ids that can only express "same segment". The
                 nested mask under per-example RDS (the ImageNet recipe) differs per example
                 and is derived from traced per-token metadata (step, role) inside jit, which
                 neither form can express; only rds=False training on the full ladder would
                 fit, and it is not the recipe. See validate_config's message.

Both cores keep every fully masked row finite (padding rows attend uniformly), so padded
layouts never produce NaNs.

Uncached forwards over a packed layout (training, TPT, the reference forward) run the core over
query chunks of `attention_chunk` rows (0 = one pass over the whole (L, L) mask). Chunk [a, b)
attends only to keys [0, b + block_size): in a packed RadAR layout (any schedule, RDS
sub-ladder or correction band; raster too) a query sees the class token, earlier steps and its
own block, and a block holds each of the H*W grid positions at most once, so no query sees a
key block_size or more positions after itself (tests/test_attention.py checks this on real
layouts). A mask that shows keys beyond that reach needs `attention_chunk=0`.
The default, 320 rows, was the fastest of 128-768 for a GPT-B training step on euclidean-13
(L = 1629, batch 2, float32) on this project's 2-core CPU, three steps each in one session:
22.8-23.5 s, against 26.8-28.3 s with 128-row chunks and 29.4-30.9 s for the earlier core
(a transposed key prefix copied per chunk, a select mask, the max in the gradient) at 128
rows. The README's training benchmark has the side-by-side figures.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

ATTENTION_IMPLS = ("xla", "dot_product")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Score of a hidden key: exp(score - row max) underflows to exactly 0, and adding it to any
# finite score stays finite.
_MASKED = -1e30


def n_kv_head(config) -> int:
    """Key/value heads: n_kv_head, or n_head when it is None (plain multi-head attention)."""
    return config.n_head if config.n_kv_head is None else config.n_kv_head


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
# Attention cores: (B, L, H, D) queries, (B, S, K, D) keys/values, (B, L, S) bool mask.
# ----------------------------------------------------------------------------------------------
def _chunk_bounds(l: int, s: int, chunk: int, reach: int):
    """(a, e, e_key) per query chunk: rows [a, e) of L, keys [0, e_key) of S."""
    bounds = []
    for a in range(0, l, chunk):
        e = min(l, a + chunk)
        bounds.append((a, e, min(s, e + reach)))
    return bounds


def _softmax_av(q, k, v, mask_BQS, dropout, qk: str, av: str):
    """softmax(q k^T) v with float32 scores, q already scaled by 1/sqrt(D); float32 result.

    `qk` and `av` are the two einsums; scores and result are laid out (B, K, G, Q, ...).
    The mask is an additive bias, not a select: the gradient of an add is the identity, so the
    backward pass skips a masked copy of the scores' cotangent. The row max is a constant of
    the softmax (it cancels), so it carries no gradient: stop_gradient spares the backward pass
    the argmax mask that autodiff would otherwise build over the scores. The normalisation is
    moved after the AV product: dividing the (Q, D) output instead of the (Q, S) probabilities
    saves a pass over the scores.
    """
    bias_BQS = jnp.where(mask_BQS, 0.0, _MASKED).astype(jnp.float32)
    scores_BKGQS = jnp.einsum(qk, q, k, preferred_element_type=jnp.float32) + \
        bias_BQS[:, None, None]
    max_BKGQ1 = jax.lax.stop_gradient(jnp.max(scores_BKGQS, axis=-1, keepdims=True))
    exp_BKGQS = jnp.exp(scores_BKGQS - max_BKGQ1)
    denom_BKGQ1 = jnp.sum(exp_BKGQS, axis=-1, keepdims=True)
    exp_BKGQS = exp_BKGQS.astype(q.dtype)
    if dropout is not None:
        exp_BKGQS = dropout(exp_BKGQS)
    return jnp.einsum(av, exp_BKGQS, v, preferred_element_type=jnp.float32) / denom_BKGQ1


def einsum_attention(q_BLHD, k_BSKD, v_BSKD, mask_BLS, dropout=None, chunk: int = 0,
                     reach: int | None = None):
    """softmax(q k^T / sqrt(D)) v with float32 scores; returns (B, L, H, D) in q's dtype.

    Query head h uses kv head h // (H // K) (torch's repeat_interleave), without copying the
    keys. `dropout`, when given, is applied to the unnormalised probabilities (attn dropout).
    chunk > 0: query chunks of `chunk` rows, chunk [a, b) over keys [0, min(S, b + reach)) --
    equal to one pass when no query i sees a key j >= i + reach (see the module docstring).
    Chunks run on head-major operands, transposed once, so each chunk's keys are a contiguous
    prefix; one pass (the KV-cached sampler's few queries over a long cache) runs on the
    operands as they are, which measured faster there.
    """
    b, l, n_head, head_dim = q_BLHD.shape
    s, n_kv = k_BSKD.shape[1], k_BSKD.shape[2]
    scale = jnp.asarray(1.0 / math.sqrt(head_dim), q_BLHD.dtype)
    q_BLKGD = (q_BLHD * scale).reshape(b, l, n_kv, n_head // n_kv, head_dim)
    if not chunk or l <= chunk:
        out_BKGLD = _softmax_av(q_BLKGD, k_BSKD, v_BSKD, mask_BLS, dropout,
                                "blkgd,bskd->bkgls", "bkgls,bskd->bkgld")
        return jnp.moveaxis(out_BKGLD, 3, 1).reshape(b, l, n_head, head_dim).astype(
            q_BLHD.dtype)
    q_BKGLD = jnp.transpose(q_BLKGD, (0, 2, 3, 1, 4))
    k_BKSD, v_BKSD = (jnp.transpose(x, (0, 2, 1, 3)) for x in (k_BSKD, v_BSKD))
    outs = [_softmax_av(q_BKGLD[:, :, :, a:e], k_BKSD[:, :, :e_key], v_BKSD[:, :, :e_key],
                        mask_BLS[:, a:e, :e_key], dropout, "bkgqd,bksd->bkgqs",
                        "bkgqs,bksd->bkgqd")
            for a, e, e_key in _chunk_bounds(l, s, chunk, reach)]
    out_BKGLD = jnp.concatenate(outs, axis=3)
    return jnp.transpose(out_BKGLD, (0, 3, 1, 2, 4)).reshape(b, l, n_head, head_dim).astype(
        q_BLHD.dtype)


def dot_product_attention(q_BLHD, k_BSKD, v_BSKD, mask_BLS):
    """The same attention through `jax.nn.dot_product_attention` (grouped-query native)."""
    return jax.nn.dot_product_attention(q_BLHD, k_BSKD, v_BSKD, mask=mask_BLS[:, None],
                                        implementation=None)


def chunked_attention(core, q_BLHD, k_BSKD, v_BSKD, mask_BLS, chunk: int, reach: int):
    """`core` over query chunks of `chunk` rows; chunk [a, b) sees keys [0, min(S, b + reach)).

    Equal to `core` over the whole mask when no query i sees a key j >= i + reach (padding rows,
    which see nothing, stay uniform over fewer keys; nothing reads them). Static shapes: one
    slice per chunk, unrolled.
    """
    outs = [core(q_BLHD[:, a:e], k_BSKD[:, :e_key], v_BSKD[:, :e_key], mask_BLS[:, a:e, :e_key])
            for a, e, e_key in _chunk_bounds(q_BLHD.shape[1], k_BSKD.shape[1], chunk, reach)]
    return jnp.concatenate(outs, axis=1)


# ----------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------
def dense(config, features, axes, name, zero=False, float32_out=False):
    """Bias-free Dense in the compute dtype with float32 params and logical axes.

    float32_out: the matmul still runs on compute-dtype operands, but accumulates and returns
    float32 (no rounding of the result to bfloat16; what the output head needs).
    """
    init = nn.initializers.zeros_init() if zero else nn.initializers.normal(
        config.initializer_range)
    kw = {}
    if float32_out:
        kw["dot_general"] = lambda *a, **k: jax.lax.dot_general(
            *a, **{**k, "preferred_element_type": jnp.float32})
    return nn.Dense(features, use_bias=False, kernel_init=nn.with_logical_partitioning(init, axes),
                    dtype=_DTYPES[config.dtype], param_dtype=jnp.float32, name=name, **kw)


class Attention(nn.Module):
    """Multi-head (optionally grouped-query) attention under an arbitrary boolean mask."""
    config: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, x_BLD, cos_BLP, sin_BLP, mask_BLS, layer_cache, cache_index, train):
        """x_BLD (B, L, dim); mask_BLS (B|1, L, S) bool with S = L, or the cache length.

        layer_cache: None, or {'k', 'v': (B, S, n_kv_head, head_dim)}; this call's keys and
        values are written at slots [cache_index, cache_index + L).
        Returns (out_BLD in the compute dtype, new_layer_cache or None).
        """
        cfg = self.config
        n_head, n_kv = cfg.n_head, n_kv_head(cfg)
        head_dim = cfg.dim // n_head
        b, l, _ = x_BLD.shape
        qkv = dense(cfg, (n_head + 2 * n_kv) * head_dim, ("embed", "qkv"), "wqkv")(x_BLD)
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

        mask_BLS = jnp.broadcast_to(mask_BLS, (b,) + mask_BLS.shape[1:])
        impl = cfg.get("attention_impl", "xla")
        chunk = cfg.get("attention_chunk", 0)
        # Chunk only uncached forwards over a packed layout (see the module docstring).
        chunk = chunk if layer_cache is None and chunk and l > chunk else 0
        if cfg.attn_dropout_p > 0 and train:
            # Attention dropout needs the probabilities, which only the einsum core exposes.
            drop = nn.Dropout(cfg.attn_dropout_p)
            out_BLHD = einsum_attention(q_BLHD, k_BSKD, v_BSKD, mask_BLS,
                                        lambda p: drop(p, deterministic=False), chunk,
                                        cfg.block_size)
        elif impl == "dot_product":
            out_BLHD = chunked_attention(dot_product_attention, q_BLHD, k_BSKD, v_BSKD,
                                         mask_BLS, chunk, cfg.block_size) if chunk else \
                dot_product_attention(q_BLHD, k_BSKD, v_BSKD, mask_BLS)
        else:
            out_BLHD = einsum_attention(q_BLHD, k_BSKD, v_BSKD, mask_BLS, None, chunk,
                                        cfg.block_size)
        out_BLD = dense(cfg, cfg.dim, ("heads", "embed"), "wo")(out_BLHD.reshape(b, l, -1))
        if cfg.resid_dropout_p > 0:
            out_BLD = nn.Dropout(cfg.resid_dropout_p)(out_BLD, deterministic=not train)
        return out_BLD, new_cache
