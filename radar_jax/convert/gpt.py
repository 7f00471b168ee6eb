"""LlamaGen GPT (c2i) state dicts -> radar_jax Transformer parameters.

The Flax parameter names mirror LlamaGen's (see `radar_jax.models.transformer`), so conversion is
a renaming plus a transpose of every linear weight ((out, in) -> (in, out)):

  tok_embeddings.weight                  -> tok_embeddings/embedding
  cls_embedding.embedding_table.weight   -> cls_embedding/embedding_table/embedding
  layers.{i}.attention.{wqkv,wo}.weight  -> layers_{i}/attention/{wqkv,wo}/kernel      (.T)
  layers.{i}.feed_forward.{w1,w2,w3}.weight -> layers_{i}/feed_forward/{w1,w2,w3}/kernel (.T)
  layers.{i}.{attention_norm,ffn_norm}.weight -> layers_{i}/{attention_norm,ffn_norm}/weight
  norm.weight, output.weight             -> norm/weight, output/kernel (.T)

Buffers that are not parameters (`*.kv_cache.k_cache/v_cache` from setup_caches, `freqs_cis`,
`causal_mask`) are dropped. RadAR's `prompt_embedding` does not exist in LlamaGen: it is
initialised N(0, initializer_range) from the fixed key PROMPT_INIT_SEED (deterministic, and like a
fresh model's init, so fine-tuning starts from a prompt of the usual scale), and logged.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import jax
import ml_collections
import numpy as np

from radar_jax.convert.state_dict import load_npz_config, load_state_dict
from radar_jax.models import transformer

PROMPT_INIT_SEED = 0

# LlamaGen's usual head width (GPT-B ... GPT-XXXL all have dim / n_head = 64); used only to infer
# n_head when neither a JSON config nor `config` says it.
_LLAMAGEN_HEAD_DIM = 64

# Non-parameter buffers of a LlamaGen GPT state dict.
_DROPPED = re.compile(r"(^|\.)(kv_cache\.[kv]_cache|freqs_cis|causal_mask)$")

# Leaf renaming by the module that owns the weight: (flax leaf name, transpose?).
_LINEARS = {"wqkv", "wo", "w1", "w2", "w3", "output"}
_EMBEDDINGS = {"tok_embeddings", "embedding_table"}
_NORMS = {"attention_norm", "ffn_norm", "norm"}

# LlamaGen ModelArgs fields that do not shape a c2i model here; ignored if present.
_IGNORED_FIELDS = {"caption_dim", "max_batch_size", "max_seq_len", "model_type"}


def _flax_path(key: str) -> tuple[str, ...] | None:
    """'layers.3.attention.wqkv.weight' -> ('layers_3', 'attention', 'wqkv', 'kernel')."""
    parts = key.split(".")
    if len(parts) < 2 or parts[-1] != "weight":
        return None
    if parts[0] == "layers" and len(parts) > 2 and parts[1].isdigit():
        parts = [f"layers_{parts[1]}"] + parts[2:]
    owner = parts[-2]
    if owner in _LINEARS:
        leaf = "kernel"
    elif owner in _EMBEDDINGS:
        leaf = "embedding"
    elif owner in _NORMS:
        leaf = "weight"
    else:
        return None
    return tuple(parts[:-1]) + (leaf,)


def _infer_config(sd: dict[str, np.ndarray], grid) -> dict[str, Any]:
    """LlamaGen fields that the tensor shapes determine (used when no config is given).

    dim and vocab_size from tok_embeddings; n_layer from the layer indices; num_classes = rows of
    the class table - 1 (LlamaGen trains with class_dropout_prob > 0, which adds the null row);
    n_head = dim / 64 (LlamaGen's head width); n_kv_head from wqkv's rows; multiple_of = 256
    (LlamaGen's default) unless the SwiGLU width needs another rounding; block_size from `grid`,
    else 256 (16x16, the 256px models). Pass `config` when any of these guesses is wrong.
    """
    for needed in ("tok_embeddings.weight", "cls_embedding.embedding_table.weight"):
        if needed not in sd:
            raise ValueError(f"cannot infer the model config: {needed!r} is missing from the "
                             "state dict; is this a LlamaGen c2i GPT checkpoint?")
    vocab_size, dim = sd["tok_embeddings.weight"].shape
    n_layer = 1 + max((int(k.split(".")[1]) for k in sd if re.match(r"layers\.\d+\.", k)),
                      default=-1)
    if dim % _LLAMAGEN_HEAD_DIM:
        raise ValueError(f"cannot infer n_head for dim={dim} (not a multiple of LlamaGen's head "
                         f"width {_LLAMAGEN_HEAD_DIM}): pass config=model_config(..., n_head=...)")
    n_head = dim // _LLAMAGEN_HEAD_DIM
    fields = dict(dim=dim, n_layer=n_layer, n_head=n_head, vocab_size=vocab_size,
                  num_classes=sd["cls_embedding.embedding_table.weight"].shape[0] - 1,
                  class_dropout_prob=0.1)
    wqkv = sd.get("layers.0.attention.wqkv.weight")
    if wqkv is not None:
        n_kv = (wqkv.shape[0] // _LLAMAGEN_HEAD_DIM - n_head) // 2
        fields["n_kv_head"] = None if n_kv == n_head else n_kv
    w1 = sd.get("layers.0.feed_forward.w1.weight")
    if w1 is not None:
        base = int(2 * (4 * dim) / 3)
        hidden = w1.shape[0]
        # 256 reproduces every LlamaGen size; otherwise any rounding that lands on `hidden`.
        fields["multiple_of"] = 256 if -(-base // 256) * 256 == hidden else hidden
    if grid is None:
        grid = (16, 16)
    return fields | dict(grid=tuple(grid), block_size=int(grid[0] * grid[1]))


def _build_config(path, sd, config, grid) -> ml_collections.ConfigDict:
    """The transformer config: `config` if given, else the file's JSON, else shape inference."""
    if config is not None:
        config = ml_collections.ConfigDict(config)
        if grid is not None:
            config.grid = tuple(grid)
            config.block_size = int(grid[0] * grid[1])
        transformer.validate_config(config)
        return config
    json_config = load_npz_config(path)
    if json_config is not None:
        if json_config.get("model_type", "c2i") != "c2i":
            raise ValueError(f"{path!r} is a {json_config['model_type']!r} model: only class-"
                             "conditional (c2i) LlamaGen GPTs are supported")
        fields = {k: v for k, v in json_config.items() if k not in _IGNORED_FIELDS}
        if grid is not None:
            fields |= dict(grid=tuple(grid), block_size=int(grid[0] * grid[1]))
        logging.info("Transformer config from the JSON entry of %s: %s", path, fields)
    else:
        fields = _infer_config(sd, grid)
        logging.info("Transformer config inferred from the tensor shapes of %s: %s (pass "
                     "config=... if any field is wrong)", path, fields)
    # LlamaGen's ModelArgs defaults fill the fields the file does not give: model_config('B')
    # holds them, and its size-specific fields (dim, n_layer, n_head) must come from the file.
    missing = [k for k in ("dim", "n_layer", "n_head") if k not in fields]
    if missing:
        raise ValueError(f"the config of {path!r} lacks {missing}: pass config=model_config(...)")
    return transformer.model_config("B", **fields)


def load_llamagen_gpt(path: str | os.PathLike, config=None, grid=None):
    """Loads a LlamaGen c2i GPT checkpoint as (config, params) for `Transformer`.

    Args:
      path: LlamaGen `.pt` (torch needed), `.npz` (keys `sd/<name>` and an optional JSON
        `config` of LlamaGen's ModelArgs names, like the parity fixture) or `.safetensors`.
      config: optional transformer config (ConfigDict or dict of its fields); when given it wins
        over the file's JSON config and over inference from shapes.
      grid: optional (H, W) token grid; sets block_size = H*W (e.g. (24, 24) for 384px models).

    Returns:
      (config, params): an ml_collections.ConfigDict for `Transformer`, and a plain nested dict
      of float32 numpy arrays (no Partitioned boxes) with a fresh `prompt_embedding`.

    Raises:
      ValueError: unreadable file; a key of the file that has no Flax counterpart, or a Flax
        parameter absent from the file (both listed); a tensor whose shape does not match the
        config (the key and both shapes are named).
    """
    path = os.fspath(path)
    sd = {k: v for k, v in load_state_dict(path).items() if not _DROPPED.search(k)}
    config = _build_config(path, sd, config, grid)
    shapes = jax.eval_shape(lambda: transformer.init_params(config, jax.random.key(0)))

    flat_expected = {tuple(p.key for p in path_): leaf.shape for path_, leaf in
                     jax.tree_util.tree_flatten_with_path(shapes)[0]}
    converted, unexpected = {}, []
    for key, value in sd.items():
        flax_path = _flax_path(key)
        if flax_path is None or flax_path not in flat_expected:
            unexpected.append(key)
            continue
        value = np.asarray(value, np.float32)
        if flax_path[-1] == "kernel":
            value = value.T  # torch Linear stores (out, in); nn.Dense wants (in, out).
        want = tuple(flat_expected[flax_path])
        if value.shape != want:
            raise ValueError(
                f"{key!r} has shape {tuple(sd[key].shape)} (as {'/'.join(flax_path)}: "
                f"{value.shape}) but the config needs {want}: the checkpoint and the config "
                "disagree; pass the matching config= (or grid=)")
        converted[flax_path] = np.ascontiguousarray(value)

    prompt = ("prompt_embedding",)
    missing = sorted("/".join(p) for p in flat_expected if p not in converted and p != prompt)
    if unexpected or missing:
        raise ValueError(f"{path!r} does not match a LlamaGen c2i GPT of this config: "
                         f"unexpected keys {sorted(unexpected)}; missing parameters {missing}")
    prompt_key = jax.random.key(PROMPT_INIT_SEED)
    converted[prompt] = np.asarray(config.initializer_range * jax.random.normal(
        prompt_key, flat_expected[prompt]), np.float32)
    logging.info("LlamaGen has no prompt embedding: initialised prompt_embedding ~ N(0, %g) "
                 "with seed %d", config.initializer_range, PROMPT_INIT_SEED)

    params: dict[str, Any] = {}
    for flax_path, value in converted.items():
        node = params
        for part in flax_path[:-1]:
            node = node.setdefault(part, {})
        node[flax_path[-1]] = value
    return config, params
