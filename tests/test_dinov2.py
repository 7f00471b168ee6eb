"""Tests for radar_jax/models/dinov2.py and radar_jax/convert/dinov2.py: parity with transformers.

The references are `transformers.Dinov2Model` / `Dinov2WithRegistersModel` built offline from
tiny random configs (width 32, 2 blocks, 4 heads, patch 14, 56px -> a 4x4 position grid) whose
weights are re-drawn so that LayerScale, norms, biases and position embeddings are far from
their trivial init. Inputs are normalised for the reference here, from the published ImageNet
statistics, independently of the model's own normalisation.
"""

import flax
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from radar_jax.convert import dinov2 as convert  # pylint: disable=g-import-not-at-top
from radar_jax.models import dinov2

TOL = 1e-4
WIDTH = 32
SQUARE = (56, 56)  # The config's image_size: the position table is used unresampled.
NON_SQUARE = (42, 70)  # A 3x5 grid: the 4x4 table is resampled.
RAGGED = (57, 71)  # Not multiples of 14: the conv drops the last row / column (grid 4x5).
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def _tiny(**kw):
    return dict(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4, patch_size=14,
                image_size=56, **kw)


def _randomise(model, seed):
    """Re-draws every parameter so that no layer is near the identity or zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "lambda1" in name or ("norm" in name and name.endswith("weight")):
                p.copy_(0.5 + 0.25 * noise.abs())  # LayerScale / LayerNorm gains in [0.5, ~1.3].
            elif name.endswith("weight") and p.ndim >= 2:
                p.copy_(noise * (1.0 / np.sqrt(np.prod(p.shape[1:]))))
            else:  # Biases, CLS, registers, mask and position embeddings.
                p.copy_(0.5 * noise)
    return model.eval()


def _reference(model, images_bhwc, registers=0):
    """(cls (B, D), patches (B, L, D), registers (B, R, D)) of the torch model."""
    x = ((images_bhwc + 1.0) / 2.0 - MEAN) / STD
    pixels = torch.tensor(x.transpose(0, 3, 1, 2), dtype=torch.float32)
    with torch.no_grad():
        out = model(pixel_values=pixels).last_hidden_state.numpy()
    return out[:, 0], out[:, 1 + registers:], out[:, 1:1 + registers]


def _images(hw, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (2, *hw, 3)).astype(np.float32)


def _flat(params):
    return flax.traverse_util.flatten_dict(params)


def _assert_same_params(a, b):
    fa, fb = _flat(a), _flat(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg="/".join(k))


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A random HF Dinov2Model saved as HF does (save_pretrained: model.safetensors in the hub
    file layout plus config.json), converted once, with a jitted forward."""
    model = _randomise(transformers.Dinov2Model(
        transformers.Dinov2Config(**_tiny(layerscale_value=0.5))), seed=0)
    directory = tmp_path_factory.mktemp("dinov2_plain")
    model.save_pretrained(directory)
    config, params = convert.load_dinov2(directory / "model.safetensors")
    forward = jax.jit(lambda p, x: dinov2.DINOv2(config).apply({"params": p}, x))
    return dict(model=model, dir=directory, config=config, params=params, forward=forward)


@pytest.fixture(scope="module")
def registers(tmp_path_factory):
    """A random HF Dinov2WithRegistersModel (2 registers, SwiGLU MLP), converted once."""
    if not hasattr(transformers, "Dinov2WithRegistersModel"):
        pytest.skip(f"transformers {transformers.__version__} has no Dinov2WithRegistersModel "
                    "(added in 4.48): the register-token parity test needs it")
    model = _randomise(transformers.Dinov2WithRegistersModel(
        transformers.Dinov2WithRegistersConfig(
            **_tiny(num_register_tokens=2, use_swiglu_ffn=True))), seed=1)
    directory = tmp_path_factory.mktemp("dinov2_registers")
    model.save_pretrained(directory)
    config, params = convert.load_dinov2(directory / "model.safetensors")
    forward = jax.jit(lambda p, x: dinov2.DINOv2(config).apply({"params": p}, x))
    return dict(model=model, dir=directory, config=config, params=params, forward=forward)


# ------------------------------------------------------------------------------ parity
def test_config_comes_from_config_json(plain, registers):
    c = plain["config"]
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (WIDTH, 2, 4)
    assert (c.patch_size, c.image_size, c.num_register_tokens) == (14, 56, 0)
    assert not c.use_swiglu_ffn and not c.interpolate_antialias and c.interpolate_offset == 0
    r = registers["config"]
    assert r.num_register_tokens == 2 and r.use_swiglu_ffn and r.interpolate_antialias
    for leaf in _flat(plain["params"]).values():
        assert isinstance(leaf, np.ndarray) and leaf.dtype == np.float32


@pytest.mark.parametrize("hw", [SQUARE, NON_SQUARE, RAGGED])
def test_matches_hf_dinov2(plain, hw):
    images = _images(hw)
    cls, patches, _ = _reference(plain["model"], images)
    out = plain["forward"](plain["params"], images)
    grid = (hw[0] // 14, hw[1] // 14)
    assert out["patch_tokens"].shape == (2, *grid, WIDTH)
    assert out["cls_token"].shape == (2, WIDTH) and out["register_tokens"].shape == (2, 0, WIDTH)
    # HF flattens the patch grid row-major, as our (B, h, w, D) reshape.
    np.testing.assert_allclose(np.asarray(out["patch_tokens"]).reshape(2, -1, WIDTH), patches,
                               atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out["cls_token"]), cls, atol=TOL, rtol=0)


@pytest.mark.parametrize("hw", [SQUARE, NON_SQUARE])
def test_matches_hf_dinov2_with_registers(registers, hw):
    images = _images(hw, seed=1)
    cls, patches, regs = _reference(registers["model"], images, registers=2)
    out = registers["forward"](registers["params"], images)
    np.testing.assert_allclose(np.asarray(out["patch_tokens"]).reshape(2, -1, WIDTH), patches,
                               atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out["cls_token"]), cls, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out["register_tokens"]), regs, atol=TOL, rtol=0)


_MODES = [dict(antialias=False, offset=0.0), dict(antialias=True, offset=0.0),
          dict(antialias=False, offset=0.1), dict(antialias=True, offset=0.1)]


@pytest.mark.parametrize("mode", _MODES, ids=["hf", "antialias", "hub_offset", "aa_offset"])
def test_position_resampling_matches_torch_interpolate(mode):
    """Against torch's own F.interpolate, called as each reference calls it: by size, or (the
    torch-hub offset) by scale_factor=(out + 0.1) / M; up, down, and one axis unchanged."""
    rng = np.random.default_rng(2)
    for m, (h, w) in [(4, (3, 5)), (5, (5, 9)), (37, (16, 23)), (16, (1, 40))]:
        table = rng.normal(size=(m, m, 8)).astype(np.float32)
        kwargs = (dict(scale_factor=((h + mode["offset"]) / m, (w + mode["offset"]) / m))
                  if mode["offset"] else dict(size=(h, w)))
        want = torch.nn.functional.interpolate(
            torch.tensor(table.transpose(2, 0, 1)[None]), mode="bicubic", align_corners=False,
            antialias=mode["antialias"], **kwargs)[0].numpy().transpose(1, 2, 0)
        got = dinov2.interpolate_pos_embed(table, h, w, **mode)
        assert got.shape == want.shape == (h, w, 8)
        np.testing.assert_allclose(np.asarray(got), want, atol=3e-5, rtol=0, err_msg=f"{m}->{h, w}")


# ------------------------------------------------------------------------------ formats
def test_memory_layout_safetensors_and_npz_give_the_same_params(plain, tmp_path):
    """transformers >= 5's in-memory names (q_proj, o_proj) and an .npz, no config.json: the
    config is inferred from shapes, the head count passed in."""
    from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
    sd = {k: v.contiguous() for k, v in plain["model"].state_dict().items()}
    save_file(sd, str(tmp_path / "weights.safetensors"))
    np.savez(tmp_path / "weights.npz", **{k: v.numpy() for k, v in sd.items()})
    for name in ("weights.safetensors", "weights.npz"):
        config, params = convert.load_dinov2(tmp_path / name, dict(num_attention_heads=4))
        assert config.to_dict() == {**plain["config"].to_dict(), "layerscale_value": 1.0}
        _assert_same_params(params, plain["params"])
    with pytest.raises(ValueError, match="num_attention_heads"):
        convert.load_dinov2(tmp_path / "weights.npz")  # Width 32 is no released size.


# An independent table HF file name -> torch-hub name (facebookresearch/dinov2's ViT).
_HUB_NAMES = [("embeddings.cls_token", "cls_token"), ("embeddings.mask_token", "mask_token"),
              ("embeddings.position_embeddings", "pos_embed"),
              ("embeddings.register_tokens", "register_tokens"),
              ("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
              ("encoder.layer.", "blocks."), ("attention.output.dense.", "attn.proj."),
              ("layer_scale1.lambda1", "ls1.gamma"), ("layer_scale2.lambda1", "ls2.gamma"),
              ("mlp.weights_in.", "mlp.w12."), ("mlp.weights_out.", "mlp.w3."),
              ("layernorm.", "norm.")]


def _to_hub(hf_file_sd):
    out = {}
    for key, value in hf_file_sd.items():
        if ".attention.attention." in key:
            if ".query." not in key:
                continue  # Fused below, with the query.
            parts = [hf_file_sd[key.replace(".query.", f".{n}.")]
                     for n in ("query", "key", "value")]
            key = key.replace("attention.attention.query.", "attn.qkv.")
            value = np.concatenate(parts)
        for old, new in _HUB_NAMES:
            key = key.replace(old, new)
        out[key] = torch.tensor(value)
    return out


@pytest.mark.parametrize("which", ["plain", "registers"])
def test_torch_hub_layout(which, plain, registers, tmp_path):
    """A torch-hub .pth (fused qkv / w12, pos_embed, ls1.gamma, norm) gives the same params;
    the resampling follows torch-hub's (0.1 offset without registers, antialias with)."""
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    ref = {"plain": plain, "registers": registers}[which]
    hub = _to_hub(load_file(str(ref["dir"] / "model.safetensors")))
    assert "blocks.0.attn.qkv.weight" in hub and "pos_embed" in hub
    torch.save(hub, tmp_path / "dinov2_hub_pretrain.pth")
    config, params = convert.load_dinov2(tmp_path / "dinov2_hub_pretrain.pth",
                                         dict(num_attention_heads=4))
    _assert_same_params(params, ref["params"])
    regs = which == "registers"
    assert config.interpolate_offset == (0.0 if regs else 0.1)
    assert config.interpolate_antialias == regs and config.num_register_tokens == 2 * regs


# ------------------------------------------------------------------------------ errors
def _npz(tmp_path, sd):
    path = tmp_path / "broken.npz"
    np.savez(path, **sd)
    return path


@pytest.fixture(scope="module")
def file_sd(plain):
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    return load_file(str(plain["dir"] / "model.safetensors"))


def test_missing_key_is_named(file_sd, tmp_path):
    sd = dict(file_sd)
    del sd["encoder.layer.1.mlp.fc2.weight"]
    with pytest.raises(ValueError, match=r"missing keys \['encoder.layer.1.mlp.fc2.weight'\]"):
        convert.load_dinov2(_npz(tmp_path, sd), dict(num_attention_heads=4))


def test_misshaped_key_is_named_with_the_expected_shape(file_sd, tmp_path):
    sd = dict(file_sd)
    sd["encoder.layer.0.attention.attention.value.weight"] = np.zeros((WIDTH, WIDTH + 1))
    with pytest.raises(ValueError, match=r"'encoder.layer.0.attention.attention.value.weight'.*"
                                         r"has \(32, 33\), the config expects \(32, 32\)"):
        convert.load_dinov2(_npz(tmp_path, sd), dict(num_attention_heads=4))
    hub = {k: v.numpy() for k, v in _to_hub(file_sd).items()}
    hub["blocks.1.attn.qkv.bias"] = np.zeros(3 * WIDTH + 3)
    with pytest.raises(ValueError, match=r"'blocks.1.attn.qkv.bias'.*expects \(96,\)"):
        convert.load_dinov2(_npz(tmp_path, hub), dict(num_attention_heads=4))


def test_unexpected_key_is_named(file_sd, tmp_path):
    sd = {**file_sd, "encoder.layer.0.attention.attention.rotary.weight": np.zeros(3)}
    with pytest.raises(ValueError, match=r"unexpected keys \['encoder.layer.0.attention"):
        convert.load_dinov2(_npz(tmp_path, sd), dict(num_attention_heads=4))
    # A config asking for more blocks than the file has names the first block's keys missing.
    with pytest.raises(ValueError, match=r"missing keys \['encoder.layer.2"):
        convert.load_dinov2(_npz(tmp_path, file_sd),
                            dict(num_attention_heads=4, num_hidden_layers=3))


# ------------------------------------------------------------------------------ config
def test_size_table_and_config_errors():
    giant = dinov2.resolve_dinov2_config(dinov2.dinov2_config("giant"))
    assert (giant.hidden_size, giant.num_hidden_layers, giant.num_attention_heads) == (1536, 40, 24)
    assert giant.mlp_hidden == 4096  # ViT-g/14's SwiGLU width (torch-hub's w12 is 8192 x 1536).
    assert dinov2.resolve_dinov2_config(dinov2.dinov2_config()).mlp_hidden == 3072
    with pytest.raises(ValueError, match="num_heads"):
        dinov2.dinov2_config(num_heads=12)
    with pytest.raises(ValueError, match="hidden_act"):
        dinov2.resolve_dinov2_config(dinov2.dinov2_config(hidden_act="relu"))
    with pytest.raises(ValueError, match="size"):
        dinov2.dinov2_config("huge")
