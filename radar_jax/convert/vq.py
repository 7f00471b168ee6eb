"""LlamaGen VQ tokenizer checkpoint -> (config, Flax params) for `radar_jax.models.vq.VQModel`.

The Flax parameter names mirror LlamaGen's state dict (see models/vq.py), so the mapping is a
name rule plus transposes:
  torch key                                  Flax path                                 transform
  encoder.conv_blocks.0.res.1.conv1.weight   encoder/conv_blocks_0/res_1/conv1/kernel  OIHW->HWIO
  encoder.mid.1.q.bias                       encoder/mid_1/q/bias                      -
  decoder.norm_out.weight                    decoder/norm_out/scale                    -
  quantize.embedding.weight                  quantize/embedding/embedding              -
  quantize.codebook_used                     dropped (LlamaGen's rolling usage buffer)
A 2-D linear weight (out, in), should one appear, becomes an (in, out) kernel. Every tensor's
shape is checked against `jax.eval_shape(VQModel(config).init, ...)`.
"""

from __future__ import annotations

import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from radar_jax.convert.state_dict import load_npz_config, load_state_dict
from radar_jax.models import vq as vq_lib

# State-dict entries that are buffers, not parameters.
DROPPED_KEYS = ("quantize.codebook_used",)


def torch_key_to_flax(key: str) -> tuple[str, ...]:
    """Module path of a torch key plus its leaf name, e.g. 'encoder.mid.1.q.weight' ->
    ('encoder', 'mid_1', 'q', 'weight'): numeric list indices join their parent with '_'."""
    parts: list[str] = []
    for seg in key.split("."):
        if seg.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{seg}"
        else:
            parts.append(seg)
    return tuple(parts)


def _to_flax_leaf(value: np.ndarray, leaf: str) -> np.ndarray:
    """Transposes a torch tensor into the layout of the Flax leaf `leaf`."""
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)  # conv (out, in, kh, kw) -> (kh, kw, in, out)
    if leaf == "kernel" and value.ndim == 2:
        return value.T  # linear (out, in) -> (in, out)
    return value


def convert_state_dict(sd: dict[str, np.ndarray], target: dict[tuple[str, ...], Any],
                       what: str = "state dict") -> dict[tuple[str, ...], np.ndarray]:
    """Maps a flat torch state dict onto the flat Flax target {path tuple: ShapeDtypeStruct}.

    A torch leaf `weight` becomes whichever of `kernel` (transposed), `scale` or `embedding`
    the target has at that module path; `bias` stays `bias`.

    Raises:
      ValueError: naming the offending key(s): unexpected keys, missing parameters, or a shape
        mismatch (with both shapes, in torch and Flax layouts).
    """
    out: dict[tuple[str, ...], np.ndarray] = {}
    unexpected = []
    for key, value in sd.items():
        if key in DROPPED_KEYS:
            continue
        *module, leaf = torch_key_to_flax(key)
        candidates = ("kernel", "scale", "embedding") if leaf == "weight" else (leaf,)
        path = next((tuple(module) + (c,) for c in candidates
                     if tuple(module) + (c,) in target), None)
        if path is None:
            unexpected.append(key)
            continue
        value = _to_flax_leaf(np.asarray(value), path[-1])
        want = tuple(target[path].shape)
        if tuple(value.shape) != want:
            raise ValueError(
                f"shape mismatch for {key!r} in the {what}: the checkpoint has "
                f"{tuple(np.shape(sd[key]))} (Flax layout {tuple(value.shape)}), the model "
                f"expects {want} at {'/'.join(path)}: the checkpoint was made for another "
                "config (check ch, ch_mult, z_channels, codebook size)")
        out[path] = value.astype(target[path].dtype)
    missing = sorted("/".join(p) for p in set(target) - set(out))
    if unexpected or missing:
        raise ValueError(
            f"the {what} does not match the model: unexpected keys {sorted(unexpected)[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''}, missing parameters {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}: check that it is a LlamaGen VQ tokenizer "
            "checkpoint and that the config matches it")
    return out


def _merge_config(file_config: dict | None, config: Any, path: str) -> ml_collections.ConfigDict:
    """The file's own config wins; the caller's config fills fields the file does not set."""
    given = {} if config is None else dict(
        config.to_dict() if hasattr(config, "to_dict") else config)
    file_config = file_config or {}
    for name, value in file_config.items():
        if name in given and _norm(given[name]) != _norm(value):
            raise ValueError(f"config {name}={given[name]!r} contradicts {path!r}, which was "
                             f"saved with {name}={value!r}: drop it from the config you pass")
    return vq_lib.vq_config(**{**given, **file_config})


def _norm(v: Any) -> Any:
    return tuple(v) if isinstance(v, (list, tuple)) else v


def vq_param_shapes(config: Any) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """Flat {path: ShapeDtypeStruct} of VQModel(config)'s params, without allocating them."""
    hp = vq_lib.resolve_vq_config(config)
    images = jnp.zeros((1, hp.downsample, hp.downsample, 3), jnp.float32)
    shapes = jax.eval_shape(vq_lib.VQModel(config).init, jax.random.PRNGKey(0), images)
    return flax.traverse_util.flatten_dict(flax.linen.meta.unbox(shapes["params"]))


def load_llamagen_vq(path: str | os.PathLike, config: Any = None
                     ) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """Loads a LlamaGen VQ tokenizer checkpoint as (config, params) for VQModel.

    Args:
      path: LlamaGen `.pt` (e.g. vq_ds16_c2i.pt), or `.npz` / `.safetensors` with the same keys
        (`sd/` prefix allowed, as in the parity fixtures).
      config: VQ config (ConfigDict/dict, LlamaGen field names). An `.npz` with a JSON `config`
        entry uses that; fields it does not set (e.g. dtype) come from `config`, then from the
        VQ-16 defaults.

    Returns:
      (config ConfigDict, params): params is a plain nested dict of float32 numpy arrays, usable
      as `VQModel(config).apply({'params': params}, images, method='encode')`.

    Raises:
      ValueError: unreadable file, config contradicting the file, or a key/shape mismatch
        (naming the key and both shapes).
    """
    path = os.fspath(path)
    config = _merge_config(load_npz_config(path), config, path)
    sd = load_state_dict(path)
    flat = convert_state_dict(sd, vq_param_shapes(config), what=f"VQ checkpoint {path!r}")
    return config, flax.traverse_util.unflatten_dict(flat)
