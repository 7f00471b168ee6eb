"""LlamaGen-compatible class-conditional transformer with RadAR's prompt embedding.

One Linen module serves every use: teacher-forced training on a packed layout with a (L, L)
nested mask, RDS layouts with per-example (B, L, L) masks, and the KV-cached samplers that feed
one block at a time. The module never builds masks or layouts itself: callers pass per-token
metadata (`flat_pos`, `is_new`, `is_class`) and a boolean mask, usually from `schedules.py`.

Architecture (LlamaGen's GPT, autoregressive/models/gpt.py): class token from a label table with
a null row for CFG, RMSNorm pre-norm blocks, fused `wqkv` attention with 2D RoPE (in
`radar_jax.models.attention`), SwiGLU MLP, final RMSNorm and a zero-initialised output head; the
config fields are in `radar_jax.models.transformer_config` (re-exported here).
Parameter names mirror LlamaGen's state dict (`layers.0.attention.wqkv.weight` ->
`layers_0/attention/wqkv/kernel`), so the converter in `radar_jax.convert.gpt` is a renaming
table plus transposes. With `scan_layers=True` the blocks are one `nn.scan` and their params are
stacked under `layers/...` with a leading 'layers' axis (`stack_layer_params` /
`unstack_layer_params` convert between the two layouts).

Precision in bfloat16 mode (`residual_float32=True`, the default, as LlamaGen's autocast does):
the residual stream, the norms and the logits are float32; the attention and MLP matmuls and
the output head's matmul run on bfloat16 operands (the head accumulates into float32 logits).
`residual_float32=False` is the older all-bfloat16 stream. In float32 mode both are identical.

RadAR's additions: `prompt_embedding`, one learnable (dim,) vector fed at every new-ring
position, and arbitrary boolean attention masks instead of LlamaGen's causal one.

Memory: `remat_policy` rematerialises each block in the backward pass ('full' saves nothing,
'minimal' saves the weight matmuls' outputs and recomputes attention, 'dots_saveable' saves
every matmul); `weighted_cross_entropy` computes the head and the loss over chunks of the
sequence so the (B, L, V) float32 logits are never live at once, with the head's gradient
computed chunk by chunk in the forward pass, so the backward pass need not recompute them.

Logical axis names on parameters (map them to mesh axes in `radar_jax.sharding`):
  tok_embeddings ('vocab', 'embed'); cls_embedding ('classes', 'embed') -- its own name because
  1000 classes + 1 null row rarely divides a mesh axis, so rules normally leave it replicated;
  wqkv ('embed', 'qkv'); wo ('heads', 'embed'); w1/w3 ('embed', 'mlp'); w2 ('mlp', 'embed');
  norms ('norm',); output ('embed', 'vocab'); prompt_embedding ('embed',); scanned layers get a
  leading 'layers' axis (replicated unless a rule names it).
Activations: the residual stream is constrained to ('batch', 'length', 'embed') and the logits to
('batch', 'length', 'vocab'); both are no-ops without logical axis rules.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from radar_jax.models.attention import Attention, apply_rope, dense, n_kv_head, rope_2d
from radar_jax.models.transformer_config import (REMAT_POLICIES, ffn_hidden_dim, model_config,
                                                 remat_policy, residual_dtype, validate_config)

__all__ = ["model_config", "validate_config", "ffn_hidden_dim", "rope_2d", "apply_rope",
           "Transformer", "init_cache", "init_params", "param_logical_axes", "count_params",
           "weighted_cross_entropy", "stack_layer_params", "unstack_layer_params",
           "REMAT_POLICIES", "remat_policy"]

Cache = dict[str, dict[str, jax.Array]]


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------
def _normal(config, axes):
    return nn.with_logical_partitioning(nn.initializers.normal(config.initializer_range), axes)


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


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x), hidden width from `ffn_hidden_dim`."""
    config: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, x_BLD, train):
        cfg = self.config
        hidden = ffn_hidden_dim(cfg)
        gate_BLF = dense(cfg, hidden, ("embed", "mlp"), "w1")(x_BLD)
        up_BLF = dense(cfg, hidden, ("embed", "mlp"), "w3")(x_BLD)
        out_BLD = dense(cfg, cfg.dim, ("mlp", "embed"), "w2")(nn.silu(gate_BLF) * up_BLF)
        if cfg.ffn_dropout_p > 0:
            out_BLD = nn.Dropout(cfg.ffn_dropout_p)(out_BLD, deterministic=not train)
        return out_BLD


class Block(nn.Module):
    """Pre-norm transformer layer: x + attention(norm(x)), then + feed_forward(norm(.)).

    The residual x keeps its dtype (float32 with residual_float32); the sublayers' outputs
    (compute dtype) are added to it.
    """
    config: ml_collections.ConfigDict
    drop_path: float = 0.0

    def _drop_path(self, y_BLD, train, drop_rate):
        # Stochastic depth per example (LlamaGen's DropPath), rescaled to keep the expectation.
        # Under scan_layers the rate is a traced per-layer scalar (`drop_rate`).
        if not train or self.config.drop_path_rate == 0.0:
            return y_BLD
        if drop_rate is None:
            if self.drop_path == 0.0:
                return y_BLD
            drop_rate = self.drop_path
        keep = 1.0 - drop_rate
        keep_B11 = jax.random.bernoulli(self.make_rng("dropout"), keep, (y_BLD.shape[0], 1, 1))
        return jnp.where(keep_B11, y_BLD / keep, 0).astype(y_BLD.dtype)

    @nn.compact
    def __call__(self, x_BLD, cos_BLP, sin_BLP, mask_BLS, layer_cache, cache_index, train,
                 drop_rate=None):
        """Returns (x_BLD after the layer, same dtype; new layer cache or None)."""
        cfg = self.config
        attn_BLD, new_cache = Attention(cfg, name="attention")(
            RMSNorm(cfg.dim, cfg.norm_eps, name="attention_norm")(x_BLD), cos_BLP, sin_BLP,
            mask_BLS, layer_cache, cache_index, train)
        h_BLD = x_BLD + self._drop_path(attn_BLD, train, drop_rate)
        ffn_BLD = FeedForward(cfg, name="feed_forward")(
            RMSNorm(cfg.dim, cfg.norm_eps, name="ffn_norm")(h_BLD), train)
        out_BLD = (h_BLD + self._drop_path(ffn_BLD, train, drop_rate)).astype(x_BLD.dtype)
        return nn.with_logical_constraint(out_BLD, ("batch", "length", "embed")), new_cache


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


def _block_class(config):
    """Block, wrapped in nn.remat with the config's policy when one is set."""
    policy = remat_policy(config)
    if policy == "none":
        return Block
    # static_argnums counts self as 0: `train` (index 7) is a Python bool.
    return nn.remat(Block, policy=REMAT_POLICIES[policy], static_argnums=(7,),
                    prevent_cse=not config.get("scan_layers", False))


class Transformer(nn.Module):
    """RadAR / LlamaGen c2i transformer. See the module docstring for names and axes."""
    config: ml_collections.ConfigDict

    def setup(self):
        cfg = self.config
        validate_config(cfg)
        res_dtype = residual_dtype(cfg)
        self.tok_embeddings = nn.Embed(cfg.vocab_size, cfg.dim, dtype=res_dtype,
                                       embedding_init=_normal(cfg, ("vocab", "embed")))
        # LlamaGen's LabelEmbedder: one extra row (id num_classes) is the CFG null class.
        n_rows = cfg.num_classes + int(cfg.class_dropout_prob > 0)
        self.cls_embedding = _LabelEmbedder(n_rows, cfg.dim, res_dtype, cfg.initializer_range)
        self.prompt_embedding = self.param("prompt_embedding", _normal(cfg, ("embed",)),
                                           (cfg.dim,))
        block = _block_class(cfg)
        if cfg.get("scan_layers", False):
            # Broadcast: cos, sin, mask, layer_cache (None), cache_index (None), train; scanned:
            # the per-layer drop-path rate.
            self.layers = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast,) * 6 + (0,), length=cfg.n_layer,
                metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
        else:
            drop = np.linspace(0.0, cfg.drop_path_rate, cfg.n_layer)
            self.layers = [block(cfg, float(drop[i])) for i in range(cfg.n_layer)]
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = dense(cfg, cfg.vocab_size, ("embed", "vocab"), None, zero=True,
                            float32_out=cfg.get("residual_float32", True))

    def embed(self, tokens, labels, is_new, is_class, *, train: bool = False) -> jax.Array:
        """Input embeddings of a packed sequence, after token dropout.

        Args:
          tokens: (B, L) int; read only where neither is_new nor is_class (other values are
            ignored, -1 included).
          labels: (B,) int class ids in [0, num_classes]; num_classes is the null class.
          is_new, is_class: (L,) or (B, L) bool.
          train: enables class dropout (labels -> null with prob class_dropout_prob) and token
            dropout; both draw from the 'dropout' rng.
        Returns: (B, L, dim) in the residual dtype (float32 unless residual_float32=False).
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

    def logits_from_hidden(self, h_BLD):
        """Final norm and output head: (B, L, dim) residual -> (B, L, vocab_size) float32."""
        logits_BLV = self.output(self.norm(h_BLD)).astype(jnp.float32)
        return nn.with_logical_constraint(logits_BLV, ("batch", "length", "vocab"))

    def forward_embeddings(self, h_BLD, flat_pos, mask, *, train: bool = False,
                           cache: Cache | None = None, cache_index=None,
                           return_hidden: bool = False):
        """Runs the layers, final norm and head on input embeddings.

        Args:
          h_BLD: (B, L, dim) input embeddings (from `embed`).
          flat_pos: (L,) or (B, L) int grid position h*W + w; negative = class token (no
            rotation).
          mask: bool, True where query i may attend key j: (L, L) or (B, L, L) without a cache;
            (L, S) or (B, L, S) over the S cache slots with one.
          cache: None, or the `init_cache` pytree; this block's keys/values are written at
            slots [cache_index, cache_index + L). Not with scan_layers.
          cache_index: int32 scalar (may be traced) when a cache is given.
          return_hidden: return the last block's output (B, L, dim) in the residual dtype
            instead of the logits (for `weighted_cross_entropy`).
        Returns: (logits (B, L, vocab_size) float32 or the hidden, updated cache or None).
        """
        cfg = self.config
        b, l, _ = h_BLD.shape
        flat_pos_BL = _per_example(flat_pos, b, "flat_pos", 1).astype(jnp.int32)
        mask_BLS = _per_example(mask, b, "mask", 2).astype(bool)
        scan = cfg.get("scan_layers", False)
        if cache is not None and scan:
            raise ValueError("config.model.scan_layers=True has no KV-cache path (the sampler "
                             "needs one): sample with scan_layers=False, converting the params "
                             "with transformer.unstack_layer_params")
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
        h_BLD = h_BLD.astype(residual_dtype(cfg))
        h_BLD = nn.with_logical_constraint(h_BLD, ("batch", "length", "embed"))
        new_cache = None if cache is None else {}
        if scan:
            drop_N = jnp.linspace(0.0, cfg.drop_path_rate, cfg.n_layer, dtype=jnp.float32)
            h_BLD, _ = self.layers(h_BLD, cos_BLP, sin_BLP, mask_BLS, None, None, train, drop_N)
        else:
            for i, layer in enumerate(self.layers):
                name = f"layers_{i}"
                h_BLD, layer_cache = layer(h_BLD, cos_BLP, sin_BLP, mask_BLS,
                                           None if cache is None else cache[name], cache_index,
                                           train)
                if cache is not None:
                    new_cache[name] = layer_cache
        if return_hidden:
            return h_BLD, new_cache
        return self.logits_from_hidden(h_BLD), new_cache

    def __call__(self, tokens, labels, flat_pos, is_new, is_class, mask, *, train: bool = False,
                 cache: Cache | None = None, cache_index=None, return_hidden: bool = False):
        """Logits for every index of a packed sequence: `embed` then `forward_embeddings`.

        Shapes: tokens (B, L) int32, labels (B,) int32, flat_pos/is_new/is_class (L,) or
        (B, L), mask (L, L)/(B, L, L) bool, or (L, S)/(B, L, S) with a cache of S slots.
        Returns (logits (B, L, vocab_size) float32, updated cache or None); with
        return_hidden=True the first entry is the last block's output (B, L, dim) instead.
        """
        h_BLD = self.embed(tokens, labels, is_new, is_class, train=train)
        return self.forward_embeddings(h_BLD, flat_pos, mask, train=train, cache=cache,
                                       cache_index=cache_index, return_hidden=return_hidden)


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
# Memory-lean loss: the head and cross-entropy over chunks of the sequence
# ----------------------------------------------------------------------------------------------
def _chunks(x, chunk: int):
    """(B, L, ...) -> (N, B, C, ...): near-equal sequence chunks, zero padded at the end (at
    most N - 1 positions)."""
    b, l = x.shape[:2]
    n_chunks = max(1, -(-l // max(1, int(chunk))))
    size = -(-l // n_chunks)
    x = jnp.pad(x, ((0, 0), (0, n_chunks * size - l)) + ((0, 0),) * (x.ndim - 2))
    return x.reshape((b, n_chunks, size) + x.shape[2:]).swapaxes(0, 1)


def _unchunk(x_NBC, length: int):
    """Inverse of `_chunks`: (N, B, C, ...) -> (B, length, ...)."""
    x = x_NBC.swapaxes(0, 1)
    return x.reshape((x.shape[0], -1) + x.shape[3:])[:, :length]


def _chunk_ce(model, head_params, h_BCD, t_BC):
    logits_BCV = model.apply({"params": head_params}, h_BCD, method="logits_from_hidden")
    logz_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
    picked_BC = jnp.take_along_axis(logits_BCV, t_BC[..., None], axis=-1)[..., 0]
    return logz_BC - picked_BC, jnp.argmax(logits_BCV, axis=-1) == t_BC


def weighted_cross_entropy(model: Transformer, params, hidden_BLD, targets_BL, weights_BL, *,
                           chunk: int = 256):
    """sum(CE * weights) of the output head over chunks of the sequence, with its gradient
    computed chunk by chunk in the forward pass (a fused linear cross-entropy).

    The loss is linear in the weights, so each chunk's gradient with respect to the hidden
    states and the head (final norm and output kernel) is known as soon as its logits are: the
    forward pass computes the logits, their softmax and the two backward matmuls for one chunk
    at a time, keeps only (B, L, dim) and the head's gradients, and the backward pass scales
    them by the incoming cotangent. Three head matmuls per step instead of the four of a
    rematerialised chunk loop (which recomputes the logits), and no (B, L, V) array is ever
    live.

    Args:
      model: the Transformer (its config gives dtypes).
      params: its params (unboxed), as passed to `model.apply`.
      hidden_BLD: (B, L, dim) from `model.apply(..., return_hidden=True)`.
      targets_BL: (B, L) int target codes; values outside [0, vocab) are allowed where the
        weight is 0 (they are clipped before the gather).
      weights_BL: (B, L) float; where it is 0 the CE is 0 and `correct` is False.
      chunk: the most sequence positions per chunk (near-equal chunks).
    Returns:
      total: float32 scalar sum(CE * weights), differentiable in params, hidden_BLD and the
        weights;
      ce_BL (B, L) float32 = logsumexp(logits) - logits[target] and correct_BL (B, L) bool =
        argmax(logits) == target (values only: no gradient flows through them).
    """
    # What logits_from_hidden reads (the final norm and the output kernel), plus the one param
    # setup() creates eagerly; the other submodules bind lazily, so their params stay out of
    # the chunk loop (and get no zero gradients).
    head = {k: params[k] for k in ("norm", "output", "prompt_embedding") if k in params}
    targets_BL = jnp.clip(jnp.asarray(targets_BL, jnp.int32), 0, model.config.vocab_size - 1)
    total, ce_BL, correct_BL = _fused_ce(model, chunk, head, hidden_BLD, targets_BL,
                                         jnp.asarray(weights_BL, jnp.float32))
    return total, jax.lax.stop_gradient(ce_BL), correct_BL


def _fused_ce_forward(model, chunk, head, hidden_BLD, targets_BL, weights_BL):
    l = hidden_BLD.shape[1]
    h_NBCD, t_NBC, w_NBC = (_chunks(x, chunk) for x in (hidden_BLD, targets_BL, weights_BL))

    def one_chunk(d_head, x):
        h_BCD, t_BC, w_BC = x
        (ce_BC, correct_BC), vjp = jax.vjp(lambda p, h: _chunk_ce(model, p, h, t_BC), head,
                                           h_BCD)
        on_BC = w_BC != 0
        g_head, g_h = vjp((w_BC, jnp.zeros(correct_BC.shape, jax.dtypes.float0)))
        d_head = jax.tree.map(jnp.add, d_head, g_head)
        return d_head, (ce_BC, correct_BC & on_BC, g_h)

    zeros = jax.tree.map(jnp.zeros_like, head)
    d_head, (ce_NBC, correct_NBC, d_h_NBCD) = jax.lax.scan(one_chunk, zeros,
                                                          (h_NBCD, t_NBC, w_NBC))
    raw_ce_BL, correct_BL = _unchunk(ce_NBC, l), _unchunk(correct_NBC, l)
    ce_BL = jnp.where(weights_BL != 0, raw_ce_BL, 0.0)
    d_hidden = _unchunk(d_h_NBCD, l).astype(hidden_BLD.dtype)
    total = jnp.sum(ce_BL * weights_BL)
    return (total, ce_BL, correct_BL), (d_head, d_hidden, targets_BL, raw_ce_BL)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused_ce(model, chunk, head, hidden_BLD, targets_BL, weights_BL):
    return _fused_ce_forward(model, chunk, head, hidden_BLD, targets_BL, weights_BL)[0]


def _fused_ce_bwd(model, chunk, res, cotangents):
    del model, chunk
    d_head, d_hidden, targets_BL, ce_BL = res
    g = cotangents[0]  # ce_BL and correct_BL leave through stop_gradient / as bools
    scale = lambda x: (x * g).astype(x.dtype)
    # d total / d weights = the CE, also where a weight is 0.
    return (jax.tree.map(scale, d_head), scale(d_hidden),
            np.zeros(targets_BL.shape, jax.dtypes.float0), scale(ce_BL))


_fused_ce.defvjp(_fused_ce_forward, _fused_ce_bwd)


# ----------------------------------------------------------------------------------------------
# Helpers: cache, init, parameter layouts and counts
# ----------------------------------------------------------------------------------------------
def init_cache(config, batch: int, length: int, dtype=jnp.float32) -> Cache:
    """Empty KV cache: {'layers_i': {'k', 'v': (batch, length, n_kv_head, head_dim) zeros}}."""
    shape = (batch, length, n_kv_head(config), config.dim // config.n_head)
    return {f"layers_{i}": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
            for i in range(config.n_layer)}


def stack_layer_params(params, n_layer: int):
    """Per-layer params (layers_0 .. layers_{n-1}) -> the scan_layers layout ('layers', stacked
    on a new leading axis). Other entries are kept as they are."""
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs),
                                 *[params[f"layers_{i}"] for i in range(n_layer)])
    return out


def unstack_layer_params(params):
    """The scan_layers layout -> per-layer params layers_0 .. layers_{n-1} (LlamaGen's names)."""
    out = {k: v for k, v in params.items() if k != "layers"}
    n_layer = jax.tree.leaves(params["layers"])[0].shape[0]
    for i in range(n_layer):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    return out


def _init_fn(config):
    """A function rng -> boxed variables, with the smallest valid dummy inputs (1 class token
    and 1 grid token); parameter shapes do not depend on the sequence length."""
    model = Transformer(config)

    def init(rng):
        return model.init(rng, jnp.zeros((1, 2), jnp.int32), jnp.zeros((1,), jnp.int32),
                          np.array([-1, 0]), np.array([False, False]), np.array([True, False]),
                          np.tril(np.ones((2, 2), bool)))
    return init


@functools.lru_cache(maxsize=32)
def _jitted_init(config: ml_collections.FrozenConfigDict):
    return jax.jit(_init_fn(config))


def init_params(config, rng: jax.Array, *, unbox: bool = True):
    """Fresh parameters (float32). unbox=False keeps nn.Partitioned boxes (logical axes).
    Jitted (one compile per config, not one per initializer op as eagerly: 7.4 s -> 3.5 s
    for model_config('tiny') on 2 CPU cores)."""
    params = _jitted_init(ml_collections.FrozenConfigDict(config))(rng)["params"]
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
