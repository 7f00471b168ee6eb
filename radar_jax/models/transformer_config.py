"""Transformer config: LlamaGen's `ModelArgs` fields plus radar_jax's memory/speed switches.

`model_config(size, **overrides)` builds it, `validate_config` checks it; both are re-exported
by `radar_jax.models.transformer`, where the fields are used.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from radar_jax.models.attention import ATTENTION_IMPLS, n_kv_head

# Sizes of the RadAR/LlamaGen registry: (n_layer, dim, n_head). 'tiny' is the parity fixture's
# shape (../shared/fixtures/llamagen_gpt_tiny.npz). XL is 30 layers, not LlamaGen-XL's 36, to hit
# RadAR's 610M non-embedding parameters (see docs/method.md, "Model sizes").
_SIZES = {
    "tiny": dict(n_layer=2, dim=64, n_head=4),
    "B": dict(n_layer=12, dim=768, n_head=12),
    "L": dict(n_layer=24, dim=1024, n_head=16),
    "XL": dict(n_layer=30, dim=1280, n_head=20),
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# remat_policy -> what the backward pass keeps of each block's forward (None: nothing, i.e.
# recompute the whole block). 'minimal' keeps the weight matmuls' outputs and recomputes the
# attention scores (batched dots), which hold most of a block's activation bytes at L = 1629.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


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
    params stay float32), residual_float32 (bfloat16 mode keeps the residual stream, norms and
    logits in float32, like LlamaGen's autocast; False = all bfloat16), remat (old switch: True
    = remat_policy 'full'), remat_policy ('none' | 'full' | 'minimal' | 'dots_saveable', see
    REMAT_POLICIES), attention_impl ('xla' einsum core, fastest on CPU | 'dot_product' =
    jax.nn.dot_product_attention; see radar_jax.models.attention), attention_chunk (query
    rows per chunk in uncached forwards, which then skip keys past the packed layout's reach;
    0 = one pass over the whole mask; see radar_jax.models.attention), scan_layers (one nn.scan
    over the blocks with stacked params: faster compiles; no KV cache).

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
    c.residual_float32 = True
    c.remat = False
    c.remat_policy = "none"
    c.attention_impl = "xla"
    c.attention_chunk = 320
    c.scan_layers = False
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


def remat_policy(config) -> str:
    """The effective remat policy name: `remat_policy`, or 'full' for the old `remat=True`."""
    policy = config.get("remat_policy", "none")
    return "full" if policy == "none" and config.get("remat", False) else policy


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first inconsistent field of a transformer config."""
    dim, n_head = config.dim, config.n_head
    if dim % n_head:
        raise ValueError(f"dim={dim} is not divisible by n_head={n_head}")
    head_dim = dim // n_head
    if head_dim % 4:
        raise ValueError(f"head_dim = dim/n_head = {head_dim} must be a multiple of 4 for 2D "
                         "RoPE (half the rotary pairs for rows, half for columns)")
    n_kv = n_kv_head(config)
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
    if remat_policy(config) not in REMAT_POLICIES:
        raise ValueError(f"remat_policy={config.remat_policy!r}: choose one of "
                         f"{list(REMAT_POLICIES)}")
    impl = config.get("attention_impl", "xla")
    if impl == "splash":
        raise ValueError(
            "attention_impl='splash' is not available: the Pallas splash kernel takes a static "
            "mask shared by the batch (plus same-segment ids), but the nested mask is derived "
            "from traced per-example metadata (RDS ladders differ per example). Use 'xla' or "
            "'dot_product' (see radar_jax/models/attention.py).")
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r}: choose one of {list(ATTENTION_IMPLS)}")
    chunk = config.get("attention_chunk", 0)
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
        raise ValueError(f"attention_chunk={chunk!r}: give query rows per chunk as an int >= 0 "
                         "(0 = one pass over the whole mask)")


def ffn_hidden_dim(config) -> int:
    """LlamaGen's SwiGLU width: 4*dim -> int(2/3 of it) -> * ffn_dim_multiplier -> round up."""
    hidden = int(2 * (4 * config.dim) / 3)
    if config.ffn_dim_multiplier is not None:
        hidden = int(config.ffn_dim_multiplier * hidden)
    return -(-hidden // config.multiple_of) * config.multiple_of


def residual_dtype(config):
    """Dtype of the residual stream, the embeddings' output and the norms."""
    if config.get("residual_float32", True):
        return jnp.float32
    return _DTYPES[config.dtype]
