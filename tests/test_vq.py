"""Tests for radar_jax/models/vq.py, discriminator.py and lpips.py: invariants and hand values.

Parity with the reference PyTorch LlamaGen is in tests/test_convert_vq.py.
"""

import math
import os
import runpy

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from radar_jax.convert.state_dict import load_state_dict
from radar_jax.models import discriminator as disc_lib
from radar_jax.models import lpips as lpips_lib
from radar_jax.models import vq

# A tiny tokenizer: 16x16 images -> 8x8 codes from 64 entries; dropout on so train mode differs.
TINY = dict(codebook_size=64, codebook_embed_dim=8, ch=32, encoder_ch_mult=(1, 2),
            decoder_ch_mult=(1, 2), z_channels=32, num_res_blocks=1, dropout_p=0.1)


def _images(seed, shape=(2, 16, 16, 3)):
    return jax.random.uniform(jax.random.PRNGKey(seed), shape, jnp.float32, -1.0, 1.0)


# ------------------------------------------------------------------------------ quantiser
def _quantizer(l2_norm, entropy_loss_ratio=0.0, k=16, d=4):
    q = vq.VectorQuantizer(k, d, beta=0.25, entropy_loss_ratio=entropy_loss_ratio,
                           l2_norm=l2_norm)
    z = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 5, d))
    # A codebook spread over the sphere (LlamaGen's U(-1/K, 1/K) init is for training).
    table = jax.random.normal(jax.random.PRNGKey(2), (k, d))
    params = {"embedding": {"embedding": table}}
    return q, params, z


@pytest.mark.parametrize("l2_norm", [True, False])
def test_codes_are_bruteforce_argmin(l2_norm):
    q, params, z = _quantizer(l2_norm)
    zq, aux = q.apply({"params": params}, z)
    zn = np.asarray(z, np.float64)
    table = np.asarray(params["embedding"]["embedding"], np.float64)
    if l2_norm:
        zn = zn / np.linalg.norm(zn, axis=-1, keepdims=True)
        table = table / np.linalg.norm(table, axis=-1, keepdims=True)
    # Brute force: every latent against every code, in float64.
    dist = ((zn[..., None, :] - table[None, None, None]) ** 2).sum(-1)
    want = dist.argmin(-1)
    assert aux["codes"].dtype == jnp.int32 and aux["codes"].shape == (2, 3, 5)
    np.testing.assert_array_equal(np.asarray(aux["codes"]), want)
    # The forward value of z_q is the chosen (normalised) code vector.
    np.testing.assert_allclose(np.asarray(zq), table[want], atol=1e-6)


def test_straight_through_gradient_is_identity():
    q, params, z = _quantizer(l2_norm=False)
    w = jax.random.normal(jax.random.PRNGKey(3), z.shape)
    g = jax.grad(lambda z_: jnp.sum(q.apply({"params": params}, z_)[0] * w))(z)
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6)


def test_straight_through_with_l2_norm_passes_through_the_normalisation():
    q, params, z = _quantizer(l2_norm=True)
    w = jax.random.normal(jax.random.PRNGKey(3), z.shape)
    g = jax.grad(lambda z_: jnp.sum(q.apply({"params": params}, z_)[0] * w))(z)
    # d/dz sum(w * z/|z|) = (w - (w.u) u) / |z|, u = z/|z|: identity up to the normalisation.
    zn = np.asarray(z, np.float64)
    norm = np.linalg.norm(zn, axis=-1, keepdims=True)
    u = zn / norm
    wn = np.asarray(w, np.float64)
    want = (wn - (wn * u).sum(-1, keepdims=True) * u) / norm
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-4, atol=1e-6)


def test_codebook_gets_gradient_only_from_vq_loss():
    q, params, z = _quantizer(l2_norm=False)
    w = jax.random.normal(jax.random.PRNGKey(3), z.shape)

    def grad_of(fn):
        return np.asarray(jax.grad(
            lambda p: fn(*q.apply({"params": p}, z)))(params)["embedding"]["embedding"])

    assert np.all(grad_of(lambda zq, aux: jnp.sum(zq * w)) == 0)
    assert np.all(grad_of(lambda zq, aux: aux["commit_loss"]) == 0)
    g_vq = grad_of(lambda zq, aux: aux["vq_loss"])
    # Hand form of d mean((e[c] - z)^2) / d e_k = 2 / (N D) * sum_{n: c_n = k} (e_k - z_n).
    codes = np.asarray(q.apply({"params": params}, z)[1]["codes"]).ravel()
    table = np.asarray(params["embedding"]["embedding"], np.float64)
    zf = np.asarray(z, np.float64).reshape(-1, z.shape[-1])
    want = np.zeros_like(table)
    for n, c in enumerate(codes):
        want[c] += 2.0 * (table[c] - zf[n]) / zf.size
    np.testing.assert_allclose(g_vq, want, rtol=1e-4, atol=1e-7)
    assert np.abs(g_vq).sum() > 0
    # The encoder side: the commitment loss moves z, the vq loss does not.
    gz = jax.grad(lambda z_: q.apply({"params": params}, z_)[1]["vq_loss"])(z)
    assert np.all(np.asarray(gz) == 0)


def test_losses_and_usage_values():
    q, params, z = _quantizer(l2_norm=True, entropy_loss_ratio=0.5)
    zq, aux = q.apply({"params": params}, z)
    for name in ("vq_loss", "commit_loss", "entropy_loss", "codebook_usage"):
        assert aux[name].shape == () and np.isfinite(float(aux[name])), name
    assert float(aux["vq_loss"]) > 0
    # Same squared error, the commitment term weighted by beta.
    np.testing.assert_allclose(float(aux["commit_loss"]), 0.25 * float(aux["vq_loss"]),
                               rtol=1e-6)
    zn = np.asarray(z) / np.linalg.norm(np.asarray(z), axis=-1, keepdims=True)
    np.testing.assert_allclose(float(aux["vq_loss"]), np.mean((np.asarray(zq) - zn) ** 2),
                               rtol=1e-5)
    # Entropy of a mean >= mean entropy, so the entropy loss is <= 0 (up to LlamaGen's 1e-5).
    assert float(aux["entropy_loss"]) <= 1e-4
    used = len(np.unique(np.asarray(aux["codes"])))
    assert float(aux["codebook_usage"]) == pytest.approx(used / 16)


def test_entropy_loss_hand_values():
    # Confident, all-distinct assignments: sample entropy 0, batch entropy log K.
    confident = vq.entropy_loss(100.0 * jnp.eye(4))
    assert float(confident) == pytest.approx(-math.log(4), abs=1e-3)
    # Uniform affinities: both entropies are log K, the loss vanishes.
    assert float(vq.entropy_loss(jnp.zeros((3, 8)))) == pytest.approx(0.0, abs=1e-3)


# ------------------------------------------------------------------------------ VQ model
@pytest.fixture(scope="module")
def tiny():
    model = vq.VQModel(vq.vq_config(**TINY))
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), _images(0))["params"])
    fns = dict(
        encode=jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode")),
        decode=jax.jit(lambda p, c: model.apply({"params": p}, c, method="decode_codes")),
        forward=jax.jit(lambda p, x: model.apply({"params": p}, x)),
        train=jax.jit(lambda p, x, r: model.apply({"params": p}, x, train=True,
                                                  rngs={"dropout": r})),
    )
    return model, params, fns


def test_tiny_round_trip_shapes(tiny):
    _, params, fns = tiny
    x = _images(1)
    codes = fns["encode"](params, x)
    assert codes.shape == (2, 8, 8) and codes.dtype == jnp.int32
    assert 0 <= int(codes.min()) and int(codes.max()) < 64
    images = fns["decode"](params, codes)
    assert images.shape == (2, 16, 16, 3) and images.dtype == jnp.float32
    recon, aux = fns["forward"](params, x)
    # The straight-through forward value is the code vector, so the full forward equals
    # decode(encode(x)).
    np.testing.assert_array_equal(np.asarray(aux["codes"]), np.asarray(codes))
    np.testing.assert_allclose(np.asarray(recon), np.asarray(images), atol=1e-5)
    assert set(aux) == {"codes", "vq_loss", "commit_loss", "entropy_loss", "codebook_usage"}


def test_dropout_only_in_train_mode(tiny):
    _, params, fns = tiny
    x = _images(2)
    eval_a, _ = fns["forward"](params, x)
    eval_b, _ = fns["forward"](params, x)
    np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))
    train_a, _ = fns["train"](params, x, jax.random.PRNGKey(5))
    train_b, _ = fns["train"](params, x, jax.random.PRNGKey(6))
    assert not np.allclose(np.asarray(train_a), np.asarray(train_b))


def test_param_names_and_logical_axes(tiny):
    model, params, _ = tiny
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    # LlamaGen's state-dict layout, with '_' joining list indices.
    assert flat["encoder/conv_blocks_0/res_0/conv1/kernel"].shape == (3, 3, 32, 32)
    assert flat["encoder/conv_blocks_1/res_0/nin_shortcut/kernel"].shape == (1, 1, 32, 64)
    assert flat["encoder/conv_blocks_0/downsample/conv/kernel"].shape == (3, 3, 32, 32)
    assert flat["encoder/mid_1/q/kernel"].shape == (1, 1, 64, 64)
    assert flat["decoder/conv_blocks_0/attn_1/proj_out/bias"].shape == (64,)
    assert flat["decoder/conv_blocks_0/upsample/conv/kernel"].shape == (3, 3, 64, 64)
    assert flat["decoder/norm_out/scale"].shape == (32,)
    assert flat["quantize/embedding/embedding"].shape == (64, 8)
    assert flat["quant_conv/kernel"].shape == (1, 1, 32, 8)
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), _images(0))["params"]
    names = {k: v.names for k, v in flax.traverse_util.flatten_dict(boxed, sep="/").items()}
    assert len(names) == len(flat)  # Every parameter is boxed with logical names.
    assert names["encoder/conv_in/kernel"] == ("conv_height", "conv_width", "conv_in", "conv_out")
    assert names["quantize/embedding/embedding"] == ("codebook", "codebook_dim")
    assert names["decoder/mid_0/norm1/scale"] == ("norm",)


def test_bfloat16_compute_stays_close(tiny):
    _, params, fns = tiny
    model16 = vq.VQModel(vq.vq_config(**{**TINY, "dtype": "bfloat16"}))
    codes = fns["encode"](params, _images(3))
    out16 = jax.jit(lambda p, c: model16.apply({"params": p}, c, method="decode_codes"))(
        params, codes)
    out32 = fns["decode"](params, codes)
    assert out16.dtype == jnp.float32
    scale = float(jnp.abs(out32).max())
    assert float(jnp.abs(out16 - out32).max()) < 0.05 * scale


def test_vq16_builds_with_72m_params():
    config = vq.vq16_model_config()
    assert config.codebook_size == 16384 and config.codebook_embed_dim == 8
    model = vq.VQModel(config)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 256, 256, 3)))
    n = vq.count_params(shapes["params"])
    assert 71.5e6 <= n <= 72.5e6, n
    out = jax.eval_shape(lambda p, x: model.apply(p, x, method="encode"), shapes,
                         jnp.zeros((2, 256, 256, 3)))
    assert out.shape == (2, 16, 16) and out.dtype == jnp.int32


@pytest.mark.parametrize("overrides, match", [
    (dict(ch=48), "divisible by the 32"),
    (dict(codebok_size=3), "unknown VQ config field"),
    (dict(dtype="float16"), "dtype"),
    (dict(decoder_ch_mult=(1, 2, 2)), "same length"),
])
def test_bad_config_is_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        vq.resolve_vq_config({**TINY, **overrides})


def test_bad_image_shape_is_named(tiny):
    model, params, _ = tiny
    with pytest.raises(ValueError, match="not a multiple"):
        model.apply({"params": params}, _images(0, (1, 17, 17, 3)), method="encode")
    with pytest.raises(ValueError, match="NHWC"):
        model.apply({"params": params}, _images(0, (1, 3, 16, 16)), method="encode")


# ------------------------------------------------------------------------------ discriminator
def test_discriminator_shapes_count_and_batch_stats():
    disc = disc_lib.PatchGANDiscriminator()  # LlamaGen's default: ndf 64, 3 layers.
    x = _images(4, (2, 32, 32, 3))
    variables = jax.jit(disc.init)(jax.random.PRNGKey(0), x)
    # Hand count: convs 4*4*3*64+64, 4*4*64*128, 4*4*128*256, 4*4*256*512, 4*4*512+1 and
    # three BatchNorms (scale + bias) of 128, 256, 512 channels.
    want = (4 * 4 * 3 * 64 + 64 + 4 * 4 * 64 * 128 + 4 * 4 * 128 * 256 + 4 * 4 * 256 * 512
            + 4 * 4 * 512 + 1 + 2 * (128 + 256 + 512))
    assert vq.count_params(variables["params"]) == want
    logits, updated = disc.apply(variables, x, mutable=["batch_stats"])
    # 32 -> 16 -> 8 -> 4 (stride 2), then two 4x4 stride-1 pad-1 convs: 4 -> 3 -> 2.
    assert logits.shape == (2, 2, 2, 1) and logits.dtype == jnp.float32
    before = nn.meta.unbox(variables["batch_stats"])["main_3"]["mean"]
    assert not np.allclose(np.asarray(updated["batch_stats"]["main_3"]["mean"]),
                           np.asarray(before))
    eval_logits = disc.apply(variables, x, train=False)
    assert eval_logits.shape == (2, 2, 2, 1)


def test_gan_losses_hand_values():
    real = jnp.array([2.0, 0.5, -1.0])
    fake = jnp.array([-2.0, 0.0, 1.5])
    # relu(1 - real) = [0, .5, 2], relu(1 + fake) = [0, 1, 2.5]: 0.5 * (2.5/3 + 3.5/3) = 1.
    assert float(disc_lib.hinge_d_loss(real, fake)) == pytest.approx(1.0)
    assert float(disc_lib.hinge_g_loss(fake)) == pytest.approx(0.5 / 3)
    sp = lambda v: math.log1p(math.exp(v))  # softplus
    want_d = 0.5 * (sum(sp(-r) for r in (2.0, 0.5, -1.0)) / 3
                    + sum(sp(f) for f in (-2.0, 0.0, 1.5)) / 3)
    assert float(disc_lib.vanilla_d_loss(real, fake)) == pytest.approx(want_d, rel=1e-6)
    assert float(disc_lib.non_saturating_d_loss(real, fake)) == pytest.approx(want_d, rel=1e-6)
    want_g = sum(sp(-f) for f in (-2.0, 0.0, 1.5)) / 3
    assert float(disc_lib.non_saturating_g_loss(fake)) == pytest.approx(want_g, rel=1e-6)
    assert disc_lib.get_d_loss("hinge") is disc_lib.hinge_d_loss
    with pytest.raises(ValueError, match="unknown discriminator loss 'wgan'"):
        disc_lib.get_d_loss("wgan")


# ------------------------------------------------------------------------------ LPIPS
@pytest.fixture(scope="module")
def lpips_setup():
    model = lpips_lib.LPIPS()
    x = _images(7)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), x, x)["params"])
    dist = jax.jit(lambda p, a, b: model.apply({"params": p}, a, b))
    taps = jax.jit(lambda p, a: lpips_lib.VGG16Features().apply(
        {"params": p["net"]}, lpips_lib.scaling_layer(a)))
    return params, dist, taps


def test_lpips_metric_properties(lpips_setup):
    params, dist, _ = lpips_setup
    x, y = _images(8), _images(9)
    d_xy = np.asarray(dist(params, x, y))
    assert d_xy.shape == (2,) and np.all(d_xy > 0)
    np.testing.assert_allclose(np.asarray(dist(params, y, x)), d_xy, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dist(params, x, x)), 0.0, atol=1e-7)
    # Linear in the lin weights: tripling them triples the distance.
    tripled = {k: (jax.tree.map(lambda a: 3 * a, v) if k.startswith("lin") else v)
               for k, v in params.items()}
    np.testing.assert_allclose(np.asarray(dist(tripled, x, y)), 3 * d_xy, rtol=1e-5)


def test_lpips_matches_numpy_on_vgg_taps(lpips_setup):
    params, dist, taps = lpips_setup
    x, y = _images(10), _images(11)
    ones = {k: ({"kernel": jnp.ones_like(v["kernel"])} if k.startswith("lin") else v)
            for k, v in params.items()}
    fx, fy = taps(params, x), taps(params, y)
    assert [f.shape for f in fx] == [(2, 16, 16, 64), (2, 8, 8, 128), (2, 4, 4, 256),
                                     (2, 2, 2, 512), (2, 1, 1, 512)]
    want = np.zeros(2)
    for a, b in zip(fx, fy):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        a = a / (np.linalg.norm(a, axis=-1, keepdims=True) + 1e-10)
        b = b / (np.linalg.norm(b, axis=-1, keepdims=True) + 1e-10)
        per_tap = ((a - b) ** 2).sum(-1).mean((1, 2))
        # Unit vectors with nonnegative (ReLU) entries are at most sqrt(2) apart.
        assert np.all(per_tap <= 2 + 1e-6)
        want += per_tap
    np.testing.assert_allclose(np.asarray(dist(ones, x, y)), want, rtol=1e-4)
    # The first tap by hand: scaling layer, then relu(conv(relu(conv(.)))) in numpy.
    h = (np.asarray(x, np.float64) - np.array(lpips_lib.SHIFT)) / np.array(lpips_lib.SCALE)
    for name in ("features_0", "features_2"):
        k, bias = (np.asarray(params["net"][name][n], np.float64) for n in ("kernel", "bias"))
        hp = np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
        h = sum(np.einsum("bhwi,io->bhwo", hp[:, i:i + 16, j:j + 16], k[i, j])
                for i in range(3) for j in range(3)) + bias
        h = np.maximum(h, 0)
    np.testing.assert_allclose(np.asarray(fx[0]), h, rtol=1e-4, atol=1e-4)


def _torch_layout_state_dicts(params):
    """LPIPS params in PyTorch layouts under torchvision's and lpips's key names."""
    vgg_sd = {"classifier.0.weight": np.zeros((4, 4), np.float32)}  # Ignored by the converter.
    lin_sd = {}
    for path, v in flax.traverse_util.flatten_dict(params, sep="/").items():
        v = np.asarray(v)
        if path.startswith("lin"):  # (1, 1, C, 1) -> (1, C, 1, 1)
            lin_sd[f"{path.split('/')[0]}.model.1.weight"] = v.transpose(3, 2, 0, 1)
        else:
            index = path.split("/")[1].split("_")[1]
            leaf = "weight" if path.endswith("kernel") else "bias"
            vgg_sd[f"features.{index}.{leaf}"] = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v
    return vgg_sd, lin_sd


def test_lpips_weights_convert_save_and_load(lpips_setup, tmp_path):
    params, dist, _ = lpips_setup
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    vgg_sd, lin_sd = _torch_layout_state_dicts(params)
    np.savez(tmp_path / "vgg.npz", **vgg_sd)
    np.savez(tmp_path / "lin.npz", **lin_sd)
    script = os.path.join(os.path.dirname(__file__), "..", "launch", "convert_lpips.py")
    runpy.run_path(script, run_name="convert_lpips")["main"](
        ["--vgg", str(tmp_path / "vgg.npz"), "--lin", str(tmp_path / "lin.npz"),
         "--out", str(tmp_path / "lpips.npz")])
    loaded = lpips_lib.load_lpips_params(tmp_path / "lpips.npz")
    for path, v in flax.traverse_util.flatten_dict(loaded, sep="/").items():
        np.testing.assert_array_equal(v, np.asarray(flat[path]), err_msg=path)
    x, y = _images(12), _images(13)
    np.testing.assert_array_equal(np.asarray(dist(loaded, x, y)), np.asarray(dist(params, x, y)))
    bad = dict(lin_sd, **{"lin2.model.1.weight": np.zeros((1, 128, 1, 1), np.float32)})
    with pytest.raises(ValueError, match="lin2/kernel"):
        lpips_lib.lpips_params_from_state_dicts(vgg_sd, bad)
    with pytest.raises(ValueError, match="convert_lpips"):
        lpips_lib.load_lpips_params(tmp_path / "missing.npz")


def test_lpips_weights_from_pth_files(lpips_setup, tmp_path):
    torch = pytest.importorskip("torch", reason="torch not installed: .pth reading untested")
    params, _, _ = lpips_setup
    vgg_sd, lin_sd = _torch_layout_state_dicts(params)
    # lpips saves its lin layers as a plain state dict; a full LPIPS model names the VGG
    # convs net.slice{n}.{i}.*, which the converter also accepts.
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in lin_sd.items()},
               tmp_path / "vgg.pth")
    full = {k.replace("features.", "net.slice1.", 1): v for k, v in vgg_sd.items()}
    flat = lpips_lib.lpips_params_from_state_dicts(full, load_state_dict(tmp_path / "vgg.pth"))
    want = flax.traverse_util.flatten_dict(params, sep="/")
    for k, v in flat.items():
        np.testing.assert_array_equal(v, np.asarray(want[k]), err_msg=k)
