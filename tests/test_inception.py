"""The Flax FID Inception-v3 against torch-fidelity's FeatureExtractorInceptionV3 (CPU torch).

torch-fidelity (`pip install --no-deps torch-fidelity`) is read as the reference, with random
weights: its network is built without loading the released weights, its batch norms are
calibrated on a few batches so activations keep a sensible scale, and its state dict goes
through our converter. torch_fidelity/__init__ imports torchvision (which does not load against
the local CPU torch), so the module file is loaded under a stub package instead.
"""

import importlib.util
import os
import sys
import types
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from radar_jax.convert import inception as convert  # noqa: E402
from radar_jax.metrics import inception as inception_lib  # noqa: E402

_PACKAGE = "torch_fidelity"


def _load_torch_fidelity_inception():
    """torch_fidelity.feature_extractor_inceptionv3 without running torch_fidelity/__init__."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torch-fidelity is not installed: pip install --no-deps torch-fidelity")
    package_dir = list(spec.submodule_search_locations)[0]
    saved = {k: v for k, v in sys.modules.items() if k == _PACKAGE or k.startswith(_PACKAGE + ".")}
    stub = types.ModuleType(_PACKAGE)
    stub.__path__ = [package_dir]   # its absolute imports (helpers, ...) resolve to the files
    sys.modules[_PACKAGE] = stub
    try:
        name = f"{_PACKAGE}.feature_extractor_inceptionv3"
        file_spec = importlib.util.spec_from_file_location(
            name, os.path.join(package_dir, "feature_extractor_inceptionv3.py"))
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[name] = module
        file_spec.loader.exec_module(module)
        return module
    finally:
        for k in [k for k in sys.modules if k == _PACKAGE or k.startswith(_PACKAGE + ".")]:
            del sys.modules[k]
        sys.modules.update(saved)


def _smooth_images(rng, n, h, w):
    """uint8 images with some spatial structure (upsampled noise), not white noise."""
    coarse = rng.uniform(0, 255, (n, 3, max(2, h // 8), max(2, w // 8))).astype(np.float32)
    x = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=(h, w), mode="bilinear")
    x = x + torch.from_numpy(rng.normal(0, 12, (n, 3, h, w)).astype(np.float32))
    return x.clamp(0, 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(torch FeatureExtractorInceptionV3 with calibrated random weights, path of its .pth)."""
    tfi = _load_torch_fidelity_inception()
    torch.manual_seed(0)
    cls = tfi.FeatureExtractorInceptionV3
    features = ["2048", "logits_unbiased", "logits"]
    # The constructor downloads (or torch.load-s) the released weights and loads them: skip
    # both, keeping PyTorch's default random initialisation.
    with mock.patch.object(tfi, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(cls, "load_state_dict", lambda self, sd, *a, **k: None):
        net = cls("inception-v3-compat", features)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)   # nonzero, so ReLUs cut and the bias path is tested
                m.reset_running_stats()
                m.momentum = None          # cumulative average over the calibration batches
        net.fc.bias.normal_(0.0, 1.0)
        net.train()
        for _ in range(2):
            net(_smooth_images(rng, 3, 96, 96))
        net.eval()
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(net.state_dict(), path)
    return net, path


@pytest.fixture(scope="module")
def variables(reference):
    return convert.load_inception(reference[1])


def _torch_features(net, images_nchw):
    spatial = {}
    hook = net.Mixed_6d.branch1x1.register_forward_hook(
        lambda mod, inp, out: spatial.setdefault("x", out.detach().clone()))
    try:
        with torch.no_grad():
            pool, unbiased, logits = net(images_nchw)
    finally:
        hook.remove()
    s = spatial["x"][:, :7].permute(0, 2, 3, 1).reshape(images_nchw.shape[0], -1)  # NHWC flat
    return dict(pool=pool.numpy(), logits_unbiased=unbiased.numpy(), logits=logits.numpy(),
                spatial=s.numpy())


def _rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("size", [(37, 53), (64, 64)])
def test_features_match_torch_fidelity(reference, variables, size):
    net, _ = reference
    images = _smooth_images(np.random.default_rng(sum(size)), 2, *size)     # (2, 3, H, W)
    want = _torch_features(net, images)
    # Activations are neither vanished nor exploded, so the comparison is meaningful.
    assert 0.05 < np.std(want["pool"]) < 20.0 and np.std(want["spatial"]) > 0.05
    got = inception_lib.features(variables, images.permute(0, 2, 3, 1).numpy(), batch_size=2)
    for key in ("pool", "logits_unbiased", "logits", "spatial"):
        assert got[key].shape == want[key].shape and got[key].dtype == np.float32
        assert _rel_err(got[key], want[key]) < 1e-4, key
    # The two images differ, so per-image features are not just a constant.
    assert _rel_err(want["pool"][0], want["pool"][1]) > 1e-2


def test_tf1_resize_matches_torch_fidelity():
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None:
        pytest.skip("torch-fidelity is not installed")
    file_spec = importlib.util.spec_from_file_location(
        "tf1_resize", os.path.join(list(spec.submodule_search_locations)[0],
                                   "interpolate_compat_tensorflow.py"))
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    x = np.random.default_rng(3).uniform(0, 255, (1, 3, 13, 300)).astype(np.float32)
    want = module.interpolate_bilinear_2d_like_tensorflow1x(
        torch.from_numpy(x), size=(299, 299), align_corners=False).numpy()
    got = np.asarray(inception_lib.resize_like_tf1(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(got.transpose(0, 3, 1, 2), want, rtol=0, atol=1e-4)


def test_padded_last_batch_does_not_change_features(variables):
    # 3 images in batches of 2: image 2 shares its batch with padding, then with image 0.
    images = _smooth_images(np.random.default_rng(5), 3, 40, 40).permute(0, 2, 3, 1).numpy()
    padded = inception_lib.features(variables, images, batch_size=2, keys=("pool",))["pool"]
    paired = inception_lib.features(variables, images[[2, 0]], batch_size=2, keys=("pool",))
    assert padded.shape == (3, 2048)
    np.testing.assert_allclose(padded[[2, 0]], paired["pool"], rtol=1e-5, atol=1e-6)


def test_converter_names_missing_and_misshaped_keys(reference):
    sd = {k: v.numpy() for k, v in reference[0].state_dict().items()}
    missing = dict(sd)
    del missing["Mixed_6d.branch1x1.bn.running_var"]
    with pytest.raises(ValueError, match=r"missing keys \['Mixed_6d.branch1x1.bn.running_var'\]"):
        convert.variables_from_state_dict(missing)
    bad = dict(sd)
    bad["fc.weight"] = bad["fc.weight"][:1000]
    with pytest.raises(ValueError, match=r"fc.weight has shape \(1000, 2048\), expected "
                                         r"\(1008, 2048\)"):
        convert.variables_from_state_dict(bad)
    extra = dict(sd, **{"AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)})
    with pytest.raises(ValueError, match=r"unexpected keys \['AuxLogits.fc.weight'\]"):
        convert.variables_from_state_dict(extra)


def test_converter_rejects_missing_file(tmp_path):
    with pytest.raises(ValueError, match="do not exist"):
        convert.load_inception(tmp_path / "nope.pth")


def test_npz_round_trip(tmp_path, variables):
    import jax  # pylint: disable=import-outside-toplevel
    path = tmp_path / "inception.npz"
    np.savez(path, **convert.to_state_dict(variables))
    again = convert.load_inception(path)
    a, b = jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(again)
    assert len(a) == len(b) == 472 and all(np.array_equal(x, y) for x, y in zip(a, b))
