"""Tests for radar_jax/convert (state_dict.py, vq.py): parity with the reference LlamaGen VQ.

The fixture ../shared/fixtures/llamagen_vq_tiny.npz holds a random-weight LlamaGen VQ (ch 32,
ch_mult (1,2,2), 64 x 8 codebook), its inputs and PyTorch's outputs (NCHW).
"""

import argparse
import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from radar_jax.convert import load_llamagen_vq, load_state_dict
from radar_jax.convert.state_dict import load_npz_config
from radar_jax.models import vq

FIXTURE = "llamagen_vq_tiny.npz"
TOL = 1e-3  # The fixture README's float32 tolerance.


def _nhwc(a):
    return np.asarray(a).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def ref(fixtures_dir):
    """(fixture arrays, config, params, jitted apply functions), converted once."""
    path = fixtures_dir / FIXTURE
    if not path.exists():
        pytest.skip(f"{path} not found: the VQ parity tests need ../shared/fixtures")
    data = dict(np.load(path))
    config, params = load_llamagen_vq(path)
    model = vq.VQModel(config)
    fns = {m: jax.jit(lambda p, x, m=m: model.apply({"params": p}, x, method=m))
           for m in ("encode_latents", "encode", "decode_codes")}
    fns["forward"] = jax.jit(lambda p, x: model.apply({"params": p}, x))
    return path, data, config, params, fns


# ------------------------------------------------------------------------------ parity
def test_config_comes_from_the_file(ref):
    path, _, config, params, _ = ref
    assert (config.ch, config.z_channels, config.num_res_blocks) == (32, 32, 2)
    assert tuple(config.encoder_ch_mult) == (1, 2, 2) and config.codebook_size == 64
    assert config.codebook_l2_norm is True  # Not in the file: LlamaGen's default.
    assert load_npz_config(path)["codebook_embed_dim"] == 8
    # A plain nested dict of float32 arrays: a Partitioned box would be a leaf here.
    for leaf in flax.traverse_util.flatten_dict(params).values():
        assert isinstance(leaf, np.ndarray) and leaf.dtype == np.float32


def test_encoder_latents_match(ref):
    _, data, _, params, fns = ref
    latents = fns["encode_latents"](params, jnp.asarray(_nhwc(data["images_nchw"])))
    assert latents.shape == (2, 8, 8, 8)
    np.testing.assert_allclose(np.asarray(latents), _nhwc(data["prequant_nchw"]), atol=TOL)


def test_codes_identical(ref):
    _, data, _, params, fns = ref
    codes = fns["encode"](params, jnp.asarray(_nhwc(data["images_nchw"])))
    np.testing.assert_array_equal(np.asarray(codes), data["codes"])


def test_decoded_images_match(ref):
    _, data, _, params, fns = ref
    images = fns["decode_codes"](params, jnp.asarray(data["codes"]))
    np.testing.assert_allclose(np.asarray(images), _nhwc(data["decoded_nchw"]), atol=TOL)


def test_full_forward_matches(ref):
    _, data, _, params, fns = ref
    recon, aux = fns["forward"](params, jnp.asarray(_nhwc(data["images_nchw"])))
    np.testing.assert_allclose(np.asarray(recon), _nhwc(data["reconstruction_nchw"]), atol=TOL)
    np.testing.assert_array_equal(np.asarray(aux["codes"]), data["codes"])
    used = len(np.unique(data["codes"])) / 64
    assert float(aux["codebook_usage"]) == pytest.approx(used)


# ------------------------------------------------------------------------------ formats
def _state_dict(data):
    return {k[3:]: v for k, v in data.items() if k.startswith("sd/")}


def _assert_same_params(a, b):
    fa, fb = (flax.traverse_util.flatten_dict(p, sep="/") for p in (a, b))
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_safetensors_and_bare_npz_give_the_same_params(ref, tmp_path):
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    path, data, _, params, _ = ref
    sd = _state_dict(data)
    config = load_npz_config(path)
    save_file(sd, str(tmp_path / "vq.safetensors"))
    _, from_st = load_llamagen_vq(tmp_path / "vq.safetensors", config=config)
    _assert_same_params(from_st, params)
    np.savez(tmp_path / "bare.npz", **sd)  # No sd/ prefix, no config entry.
    _, from_bare = load_llamagen_vq(tmp_path / "bare.npz", config=config)
    _assert_same_params(from_bare, params)
    # The fixture has sd/ keys, so its other arrays (images, codes...) are not parameters.
    assert set(load_state_dict(path)) == set(sd)


def _write_fixture_variant(tmp_path, data, change):
    out = dict(data)
    change(out)
    np.savez(tmp_path / "variant.npz", **out)
    return tmp_path / "variant.npz"


def test_shape_mismatch_names_the_key(ref, tmp_path):
    _, data, _, _, _ = ref

    def bad_shape(d):
        d["sd/decoder.mid.1.k.weight"] = np.zeros((64, 32, 1, 1), np.float32)

    with pytest.raises(ValueError, match=r"decoder\.mid\.1\.k\.weight.*\(64, 32, 1, 1\)"
                                         r".*\(1, 1, 64, 64\)"):
        load_llamagen_vq(_write_fixture_variant(tmp_path, data, bad_shape))


def test_missing_and_unexpected_keys_are_named(ref, tmp_path):
    _, data, _, _, _ = ref
    with pytest.raises(ValueError, match="missing parameters.*encoder/norm_out/scale"):
        load_llamagen_vq(_write_fixture_variant(
            tmp_path, data, lambda d: d.pop("sd/encoder.norm_out.weight")))
    with pytest.raises(ValueError, match="unexpected keys.*encoder.extra.weight"):
        load_llamagen_vq(_write_fixture_variant(
            tmp_path, data, lambda d: d.update({"sd/encoder.extra.weight": np.zeros(3)})))


def test_config_for_another_model_is_refused(ref, tmp_path):
    path, data, _, _, _ = ref
    with pytest.raises(ValueError, match="contradicts"):
        load_llamagen_vq(path, config={"ch": 64})
    # Without the file's config, the VQ-16 defaults do not fit the tiny weights.
    np.savez(tmp_path / "bare.npz", **_state_dict(data))
    with pytest.raises(ValueError, match="shape mismatch|does not match"):
        load_llamagen_vq(tmp_path / "bare.npz")
    # Fields the file does not set come from the caller's config.
    config, _ = load_llamagen_vq(path, config={"dtype": "bfloat16"})
    assert config.dtype == "bfloat16" and config.ch == 32


def test_load_state_dict_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match="unknown checkpoint extension '.h5'"):
        load_state_dict(tmp_path / "model.h5")
    with pytest.raises(ValueError, match="does not exist"):
        load_state_dict(tmp_path / "absent.npz")
    (tmp_path / "corrupt.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="corrupt.npz"):
        load_state_dict(tmp_path / "corrupt.npz")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="corrupt.safetensors"):
        load_state_dict(tmp_path / "corrupt.safetensors")
    np.savez(tmp_path / "cfg.npz", config=np.array(json.dumps([1, 2])), **{"sd/a": np.zeros(2)})
    with pytest.raises(ValueError, match="JSON object"):
        load_npz_config(tmp_path / "cfg.npz")


# ------------------------------------------------------------------------------ torch files
def test_pt_round_trip(ref, tmp_path):
    torch = pytest.importorskip("torch", reason="torch not installed: .pt reading untested")
    path, data, _, params, _ = ref
    sd = {k: torch.from_numpy(np.array(v)) for k, v in _state_dict(data).items()}
    # LlamaGen's training checkpoint layout: weights under 'model', argparse args beside them.
    torch.save({"model": sd, "steps": 10, "args": argparse.Namespace(vq_model="VQ-16")},
               tmp_path / "vq.pt")
    config = load_npz_config(path)
    _, loaded = load_llamagen_vq(tmp_path / "vq.pt", config=config)
    _assert_same_params(loaded, params)
    # DDP's 'module.' prefix and bfloat16 tensors (widened to float32) also load.
    torch.save({"ema": {f"module.{k}": v.bfloat16() for k, v in sd.items()}},
               tmp_path / "ema.pt")
    sd_ema = load_state_dict(tmp_path / "ema.pt")
    assert sd_ema["quant_conv.bias"].dtype == np.float32
    np.testing.assert_allclose(sd_ema["quant_conv.bias"], data["sd/quant_conv.bias"], rtol=1e-2)


class _Evil:  # A pickled global that weights_only=True must refuse.
    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


def test_pt_refuses_arbitrary_pickles(tmp_path):
    torch = pytest.importorskip("torch", reason="torch not installed: .pt reading untested")
    torch.save({"model": {"w": torch.zeros(2)}, "evil": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only"):
        load_state_dict(tmp_path / "evil.pt")


def test_pt_without_torch_says_how_to_fix(tmp_path):
    try:
        import torch  # pylint: disable=import-outside-toplevel,unused-import
        pytest.skip("torch is installed: the missing-torch message cannot be triggered")
    except ImportError:
        pass
    (tmp_path / "vq.pt").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(ImportError, match=r"pip install radar_jax\[torch\]"):
        load_state_dict(tmp_path / "vq.pt")
