"""DINOv2 checkpoint (Hugging Face or torch-hub) -> (config, Flax params) for models/dinov2.DINOv2.

Three key layouts are recognised, each by a table of name templates below ({i} = block index,
{leaf} = weight | bias; a torch `weight` becomes a Flax `kernel`, or `scale` for LayerNorms):
  HF file (`facebook/dinov2-base` model.safetensors, what `save_pretrained` writes):
    embeddings.patch_embeddings.projection.weight, encoder.layer.{i}.attention.attention.query
    .weight, ...attention.output.dense, ...layer_scale1.lambda1, ...mlp.fc1 (or SwiGLU's fused
    mlp.weights_in, split in halves into gate_proj / up_proj, and mlp.weights_out), layernorm.
  HF in memory (transformers >= 5 `model.state_dict()`): the same with attention.q_proj/k_proj/
    v_proj/o_proj and mlp.gate_proj/up_proj/down_proj.
  torch-hub (`dinov2_vitb14_pretrain.pth`): cls_token, pos_embed, patch_embed.proj.weight,
    blocks.{i}.attn.qkv (split in thirds into q/k/v), blocks.{i}.attn.proj, blocks.{i}.ls1.gamma,
    blocks.{i}.mlp.fc1 (or w12 / w3), norm.
The mask token (masked pre-training only) is dropped. Linear weights (out, in) become (in, out)
kernels, the patch conv OIHW becomes HWIO. Every other key, a missing parameter or a shape that
the config does not expect raises a ValueError naming the checkpoint key and the expected shape.

The config comes from, in increasing priority: the tensor shapes (width, depth, patch, grid,
registers, MLP kind and width; heads from the size table, else width / 64 as in every DINOv2),
the reference's resampling of the position table (HF Dinov2: bicubic by size; HF with registers
and torch-hub *_reg: antialiased; torch-hub without registers: its 0.1 scale-factor offset), a
`config.json` next to the file or the `.npz`'s JSON `config`, then the caller's `config`.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from radar_jax.convert.state_dict import load_npz_config, load_state_dict
from radar_jax.models import dinov2 as dinov2_lib

# Flax names of every layer-indexed module, to build both directions of each table.
_L = "layer_{i}"

# (checkpoint key template, Flax path templates: several when the tensor is split along dim 0).
_HF_COMMON = [
    ("embeddings.cls_token", ["embeddings/cls_token"]),
    ("embeddings.position_embeddings", ["embeddings/position_embeddings"]),
    ("embeddings.register_tokens", ["embeddings/register_tokens"]),
    ("embeddings.patch_embeddings.projection.{leaf}", ["embeddings/patch_embeddings/{leaf}"]),
    ("encoder.layer.{i}.norm1.{leaf}", [f"{_L}/norm1/{{leaf}}"]),
    ("encoder.layer.{i}.norm2.{leaf}", [f"{_L}/norm2/{{leaf}}"]),
    ("encoder.layer.{i}.layer_scale1.lambda1", [f"{_L}/layer_scale1/lambda1"]),
    ("encoder.layer.{i}.layer_scale2.lambda1", [f"{_L}/layer_scale2/lambda1"]),
    ("encoder.layer.{i}.mlp.fc1.{leaf}", [f"{_L}/mlp/fc1/{{leaf}}"]),
    ("encoder.layer.{i}.mlp.fc2.{leaf}", [f"{_L}/mlp/fc2/{{leaf}}"]),
    ("layernorm.{leaf}", ["layernorm/{leaf}"]),
]
HF_FILE_RULES = _HF_COMMON + [
    ("encoder.layer.{i}.attention.attention.query.{leaf}", [f"{_L}/attention/q_proj/{{leaf}}"]),
    ("encoder.layer.{i}.attention.attention.key.{leaf}", [f"{_L}/attention/k_proj/{{leaf}}"]),
    ("encoder.layer.{i}.attention.attention.value.{leaf}", [f"{_L}/attention/v_proj/{{leaf}}"]),
    ("encoder.layer.{i}.attention.output.dense.{leaf}", [f"{_L}/attention/o_proj/{{leaf}}"]),
    ("encoder.layer.{i}.mlp.weights_in.{leaf}",
     [f"{_L}/mlp/gate_proj/{{leaf}}", f"{_L}/mlp/up_proj/{{leaf}}"]),
    ("encoder.layer.{i}.mlp.weights_out.{leaf}", [f"{_L}/mlp/down_proj/{{leaf}}"]),
]
HF_MEMORY_RULES = _HF_COMMON + [
    (f"encoder.layer.{{i}}.{m}.{{leaf}}", [f"{_L}/{m.replace('.', '/')}/{{leaf}}"])
    for m in ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
]
HUB_RULES = [
    ("cls_token", ["embeddings/cls_token"]),
    ("pos_embed", ["embeddings/position_embeddings"]),
    ("register_tokens", ["embeddings/register_tokens"]),
    ("patch_embed.proj.{leaf}", ["embeddings/patch_embeddings/{leaf}"]),
    ("blocks.{i}.norm1.{leaf}", [f"{_L}/norm1/{{leaf}}"]),
    ("blocks.{i}.norm2.{leaf}", [f"{_L}/norm2/{{leaf}}"]),
    ("blocks.{i}.attn.qkv.{leaf}", [f"{_L}/attention/{p}/{{leaf}}"
                                    for p in ("q_proj", "k_proj", "v_proj")]),
    ("blocks.{i}.attn.proj.{leaf}", [f"{_L}/attention/o_proj/{{leaf}}"]),
    ("blocks.{i}.ls1.gamma", [f"{_L}/layer_scale1/lambda1"]),
    ("blocks.{i}.ls2.gamma", [f"{_L}/layer_scale2/lambda1"]),
    ("blocks.{i}.mlp.fc1.{leaf}", [f"{_L}/mlp/fc1/{{leaf}}"]),
    ("blocks.{i}.mlp.fc2.{leaf}", [f"{_L}/mlp/fc2/{{leaf}}"]),
    ("blocks.{i}.mlp.w12.{leaf}", [f"{_L}/mlp/gate_proj/{{leaf}}", f"{_L}/mlp/up_proj/{{leaf}}"]),
    ("blocks.{i}.mlp.w3.{leaf}", [f"{_L}/mlp/down_proj/{{leaf}}"]),
    ("norm.{leaf}", ["layernorm/{leaf}"]),
]
LAYOUTS = {"hf_file": HF_FILE_RULES, "hf_memory": HF_MEMORY_RULES, "hub": HUB_RULES}

# Mask tokens exist only for masked-image pre-training; the forward pass never reads them.
DROPPED_KEYS = ("embeddings.mask_token", "mask_token")

# Prefixes of task wrappers (Dinov2ForImageClassification, ...) stripped when every key has one.
WRAPPER_PREFIXES = ("dinov2.", "dinov2_with_registers.", "backbone.")

# LayerNorm modules, whose torch `weight` is a Flax `scale` (every other weight is a `kernel`).
_NORMS = ("norm1", "norm2", "layernorm")


def _pattern(template: str, leaf: str) -> re.Pattern:
    out = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)")
    return re.compile(out.replace(r"\{leaf\}", f"(?P<leaf>{leaf})"))


def detect_layout(sd: dict[str, Any]) -> str:
    """'hub' (torch-hub names), 'hf_memory' (transformers >= 5 module names) or 'hf_file'."""
    if "pos_embed" in sd or any(k.startswith("blocks.") for k in sd):
        return "hub"
    if any(re.search(r"\.(attention\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.", k) for k in sd):
        return "hf_memory"
    return "hf_file"


def _flax_path(template: str, groups: dict[str, str]) -> tuple[str, ...]:
    parts = template.format(i=groups.get("i", ""), leaf=groups.get("leaf", "")).split("/")
    if parts[-1] == "weight":
        parts[-1] = "scale" if parts[-2] in _NORMS else "kernel"
    return tuple(parts)


def _to_flax(value: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)  # conv (out, in, kh, kw) -> (kh, kw, in, out)
    if leaf == "kernel" and value.ndim == 2:
        return value.T  # linear (out, in) -> (in, out)
    return value


def _torch_shape(flax_shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    """The checkpoint-layout shape of a Flax leaf of shape `flax_shape`."""
    if leaf == "kernel" and len(flax_shape) == 4:
        kh, kw, cin, cout = flax_shape
        return (cout, cin, kh, kw)
    if leaf == "kernel" and len(flax_shape) == 2:
        return flax_shape[::-1]
    return tuple(flax_shape)


def rename_state_dict(sd: dict[str, np.ndarray], layout: str, what: str
                      ) -> tuple[dict[tuple[str, ...], np.ndarray], dict, list[str]]:
    """Checkpoint {key: array} -> ({Flax path: array in Flax layout}, {Flax path: (key, number
    of parts it was split into, its shape)}, [keys no rule matches]). Fused tensors (qkv, w12)
    are split in equal parts along dim 0.

    Raises:
      ValueError: a fused tensor whose first dimension is not divisible by its part count.
    """
    rules = [(_pattern(src, "weight|bias"), dst) for src, dst in LAYOUTS[layout]]
    flat, origin, unexpected = {}, {}, []
    for key, value in sd.items():
        if key in DROPPED_KEYS:
            continue
        match = next(((m, dst) for pat, dst in rules if (m := pat.fullmatch(key))), None)
        if match is None:
            unexpected.append(key)
            continue
        m, dst = match
        value = np.asarray(value)
        n = len(dst)
        if n > 1 and (value.ndim == 0 or value.shape[0] % n):
            parts = ", ".join(d.split("/")[-2] for d in dst)
            raise ValueError(f"{what}: {key!r} has shape {value.shape}, whose first dimension "
                             f"should hold {n} equal parts ({parts})")
        for template, part in zip(dst, np.split(value, n) if n > 1 else [value]):
            path = _flax_path(template, m.groupdict())
            flat[path] = _to_flax(part, path[-1])
            origin[path] = (key, n, tuple(value.shape))
    return flat, origin, unexpected


def _source_key(path: tuple[str, ...], layout: str) -> str:
    """The checkpoint key that holds the Flax leaf `path` in `layout` (for error messages)."""
    joined = "/".join(path[:-1] + (("weight",) if path[-1] in ("kernel", "scale") else path[-1:]))
    for src, dst in LAYOUTS[layout]:
        for template in dst:
            m = _pattern(template, "weight|bias").fullmatch(joined)
            if m:
                return src.format(i=m.groupdict().get("i", ""), leaf=m.groupdict().get("leaf", ""))
    return joined


def infer_config(flat: dict[tuple[str, ...], np.ndarray], layout: str, what: str
                 ) -> dict[str, Any]:
    """Config fields that the tensor shapes (and the layout's reference) determine."""
    out: dict[str, Any] = {}
    cls = flat.get(("embeddings", "cls_token"))
    if cls is None:
        return out  # The missing-key check names it.
    d = int(cls.shape[-1])
    out["hidden_size"] = d
    layers = [int(p[0].split("_")[1]) for p in flat if p[0].startswith("layer_")]
    if layers:
        out["num_hidden_layers"] = max(layers) + 1
    kernel = flat.get(("embeddings", "patch_embeddings", "kernel"))
    if kernel is not None and kernel.ndim == 4:
        out["patch_size"], out["num_channels"] = int(kernel.shape[0]), int(kernel.shape[2])
        pos = flat.get(("embeddings", "position_embeddings"))
        if pos is not None and pos.ndim == 3:
            side = math.isqrt(pos.shape[1] - 1)
            if side * side != pos.shape[1] - 1:
                raise ValueError(f"{what}: the position table has {pos.shape[1] - 1} patch "
                                 "entries, not a square grid: it is not a DINOv2 checkpoint")
            out["image_size"] = side * out["patch_size"]
    regs = flat.get(("embeddings", "register_tokens"))
    out["num_register_tokens"] = int(regs.shape[1]) if regs is not None and regs.ndim == 3 else 0
    out["use_swiglu_ffn"] = ("layer_0", "mlp", "gate_proj", "kernel") in flat
    hidden = flat.get(("layer_0", "mlp", "gate_proj" if out["use_swiglu_ffn"] else "fc1", "kernel"))
    if hidden is not None and hidden.ndim == 2:
        out["mlp_ratio"] = _mlp_ratio(d, int(hidden.shape[1]), out["use_swiglu_ffn"])
    out["qkv_bias"] = ("layer_0", "attention", "q_proj", "bias") in flat
    by_width = {s["hidden_size"]: s["num_attention_heads"] for s in dinov2_lib.SIZES.values()}
    if d in by_width or d % 64 == 0:
        out["num_attention_heads"] = by_width.get(d, d // 64)  # DINOv2's heads are 64 wide.
    # Each reference's resampling of the position table (see models/dinov2.py).
    registers = out["num_register_tokens"] > 0
    out["interpolate_antialias"] = registers
    out["interpolate_offset"] = 0.1 if layout == "hub" and not registers else 0.0
    return out


def _mlp_ratio(d: int, hidden: int, swiglu: bool) -> float | int:
    """The mlp_ratio whose MLP width is `hidden` (SwiGLU rounds 2/3 of it up to 8)."""
    if not swiglu:
        ratio = hidden / d
    else:
        ratio = next((r for r in range(1, 17) if (int(d * r * 2 / 3) + 7) // 8 * 8 == hidden),
                     hidden * 3 / 2 / d)
    return int(ratio) if float(ratio).is_integer() else ratio


def _file_config(path: str) -> dict[str, Any]:
    """Known fields of a config.json next to `path`, or of an .npz's JSON config entry."""
    found: dict[str, Any] = dict(load_npz_config(path) or {})
    json_path = os.path.join(os.path.dirname(path), "config.json")
    if os.path.isfile(json_path):
        with open(json_path, encoding="utf-8") as f:
            try:
                hf = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{json_path!r} is not valid JSON: {e}") from e
        # HF's `dtype` is the stored torch dtype, not our compute dtype.
        found.update({k: v for k, v in hf.items() if k != "dtype"})
        if hf.get("model_type") == "dinov2_with_registers":
            found.setdefault("interpolate_antialias", True)
    return {k: v for k, v in found.items() if k in dinov2_lib.CONFIG_FIELDS}


def dinov2_param_shapes(config: Any) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """Flat {path: ShapeDtypeStruct} of DINOv2(config)'s params, without allocating them."""
    hp = dinov2_lib.resolve_dinov2_config(config)
    images = jnp.zeros((1, hp.image_size, hp.image_size, hp.num_channels), jnp.float32)
    shapes = jax.eval_shape(dinov2_lib.DINOv2(hp).init, jax.random.PRNGKey(0), images)
    return flax.traverse_util.flatten_dict(shapes["params"])


def check_against(flat: dict, origin: dict, unexpected: list[str], layout: str,
                  target: dict, what: str) -> dict[tuple[str, ...], np.ndarray]:
    """Float32 copies of `flat`'s arrays once every target leaf is present with its shape.

    Raises:
      ValueError: naming checkpoint keys that are unexpected, missing, or mis-shaped (with the
        shape the config expects, in the checkpoint's layout).
    """
    unexpected = sorted(set(unexpected) | {origin[p][0] for p in set(flat) - set(target)})
    missing = sorted({_source_key(p, layout) for p in set(target) - set(flat)})
    if unexpected or missing:
        raise ValueError(
            f"{what} does not match the DINOv2 config: unexpected keys {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''}, missing keys {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}: check that it is a complete DINOv2 "
            "checkpoint (HF Dinov2Model or torch-hub ViT-*/14) and that the config matches it")
    out = {}
    for path, value in flat.items():
        want = tuple(target[path].shape)
        if tuple(value.shape) != want:
            key, n, shape = origin[path]
            torch_want = _torch_shape(want, path[-1])
            if n > 1:  # A fused tensor: n parts stacked along dim 0.
                torch_want = (torch_want[0] * n,) + torch_want[1:]
            raise ValueError(
                f"{what}: shape mismatch for {key!r}: the checkpoint has {shape}, the config "
                f"expects {torch_want} (Flax {'/'.join(path)} {want}): check hidden_size, "
                "mlp_ratio, patch_size, image_size and num_register_tokens")
        out[path] = np.asarray(value, np.float32)
    return out


def _strip_prefix(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for prefix in WRAPPER_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_dinov2(path: str | os.PathLike, config: Any = None
                ) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """Loads a DINOv2 checkpoint as (config, params) for `radar_jax.models.dinov2.DINOv2`.

    Args:
      path: HF `model.safetensors` (e.g. from facebook/dinov2-base; a `config.json` beside it is
        read), torch-hub `dinov2_vitb14_pretrain.pth` (torch.load(weights_only=True)), or an
        `.npz` / `.safetensors` / `.pt` with either layout's keys.
      config: optional ConfigDict/dict of DINOv2 fields (see `dinov2.dinov2_config`) that win
        over the file's and the shapes' (e.g. num_attention_heads for a width not in the size
        table, interpolate_offset=0 to resample a torch-hub model as HF does, dtype).

    Returns:
      (config ConfigDict, params): params a nested dict of float32 numpy arrays, usable as
      `DINOv2(config).apply({'params': params}, images_BHWC)`.

    Raises:
      ValueError: an unreadable file, or a checkpoint key that is unexpected, missing or
        mis-shaped (naming it and the expected shape).
    """
    path = os.fspath(path)
    what = f"DINOv2 checkpoint {path!r}"
    sd = _strip_prefix(load_state_dict(path))
    layout = detect_layout(sd)
    flat, origin, unexpected = rename_state_dict(sd, layout, what)
    fields = infer_config(flat, layout, what)
    fields.update(_file_config(path))
    given = {} if config is None else dict(
        config.to_dict() if hasattr(config, "to_dict") else config)
    fields.update(given)
    if "num_attention_heads" not in fields:
        raise ValueError(f"{what}: hidden_size={fields.get('hidden_size')} is not a released "
                         "DINOv2 width and no config.json gives the head count: pass "
                         "config=dict(num_attention_heads=...)")
    config = dinov2_lib.dinov2_config(**fields)
    target = dinov2_param_shapes(config)
    checked = check_against(flat, origin, unexpected, layout, target, what)
    return config, flax.traverse_util.unflatten_dict(checked)
