"""ADM's metrics against independent computations, and the evaluate_fid command end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
from scipy.spatial import distance

from radar_jax.metrics import adm


# ------------------------------------------------------------------------------ FID
def test_statistics_are_float64_mean_and_unbiased_covariance():
    x = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]], np.float32)
    mu, sigma = adm.statistics(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, [2.0, 2.0])
    # By hand: deviations (-2,-1), (0,-1), (2,2); sum of outer products / (3 - 1).
    np.testing.assert_allclose(sigma, [[4.0, 3.0], [3.0, 3.0]])


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    want = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2.0 * np.sqrt(s1 * s2))
    assert adm.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(want,
                                                                                   rel=1e-10)


def test_frechet_full_covariances_against_symmetric_form():
    # Independent route: tr((S1 S2)^1/2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)) (a symmetric PSD
    # matrix similar to S1 S2), on covariances of random Gaussian samples.
    rng = np.random.default_rng(1)
    a = rng.normal(size=(400, 12)) @ rng.normal(size=(12, 12))
    b = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)) + 0.5
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    root1 = scipy.linalg.sqrtm(s1).real
    tr_covmean = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)))
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean
    assert adm.frechet_distance(*adm.statistics(a), *adm.statistics(b)) == pytest.approx(
        want, rel=1e-8)
    assert adm.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def _scipy_sqrtm_fid(mu1, s1, mu2, s2, eps=1e-6):
    """The original FID code's formula (and ADM's): sqrtm of the product, eps retry, real part."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean.real)


@pytest.mark.parametrize("dim,n1,n2", [(5, 40, 30), (24, 200, 100), (16, 9, 12)])
def test_frechet_equals_scipy_sqrtm_formula(dim, n1, n2):
    # Random SPD covariances, and (16, 9, 12) singular ones: fewer samples than dimensions, as
    # sFID's 2023-d features with a small sample batch.
    rng = np.random.default_rng(dim)
    a = rng.normal(size=(n1, dim)) @ rng.normal(size=(dim, dim))
    b = rng.normal(size=(n2, dim)) * rng.uniform(0.2, 2.0, dim) + 0.3
    stats_a, stats_b = adm.statistics(a), adm.statistics(b)
    want = _scipy_sqrtm_fid(*stats_a, *stats_b)
    got = adm.frechet_distance(*stats_a, *stats_b)
    assert np.isfinite(got)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6 * np.trace(stats_a[1]))


def test_frechet_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="same layer"):
        adm.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ------------------------------------------------------------------------------ IS
def test_inception_score_hand_cases():
    classes = 7
    confident = 50.0 * np.eye(classes)[np.arange(70) % classes]     # one-hot, uniform classes
    assert adm.inception_score(confident) == pytest.approx(classes, rel=1e-6)
    same = np.tile(np.random.default_rng(0).normal(size=(1, classes)), (40, 1))
    assert adm.inception_score(same) == pytest.approx(1.0, abs=1e-9)
    # Splits: 2 chunks of 10, one confident over 2 classes (IS 2), one all the same (IS 1).
    two = np.concatenate([50.0 * np.eye(5)[np.arange(10) % 2], np.zeros((10, 5))])
    assert adm.inception_score(two, split_size=10) == pytest.approx(1.5, rel=1e-6)


# ------------------------------------------------------------------------------ P / R
def test_precision_recall_identical_and_disjoint_sets():
    x = np.random.default_rng(2).normal(size=(60, 8))
    assert adm.precision_recall(x, x.copy()) == (1.0, 1.0)
    assert adm.precision_recall(x, x + 1000.0) == (0.0, 0.0)


def test_precision_recall_hand_case():
    def points(xs):  # 1-D positions embedded in 3-D
        return np.array([[x, 0.0, 0.0] for x in xs], np.float32)
    real = points([0, 1, 2, 3, 10])            # 1-NN radii: 1, 1, 1, 1, 7
    fake = points([0.5, 2.9, 5, 40, 41])       # 1-NN radii: 2.4, 2.1, 2.1, 1, 1
    # Precision: 0.5, 2.9 and 5 (|5 - 10| <= 7) lie in real balls; 40, 41 do not -> 3/5.
    # Recall: 0, 1, 2, 3 lie in fake balls; 10 does not (5 away from 5, radius 2.1) -> 4/5.
    precision, recall = adm.precision_recall(real, fake, k=1)
    assert precision == pytest.approx(0.6) and recall == pytest.approx(0.8)


@pytest.mark.parametrize("batch_size", [7, 1000])
def test_precision_recall_against_brute_force(batch_size):
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(45, 6)), rng.normal(size=(38, 6)) * 0.6 + 0.8

    def brute(a, b, k=3):   # scipy distances, full sort; the ball's radius is the k-th NN
        r_a = np.sort(distance.cdist(a, a), axis=1)[:, k]
        r_b = np.sort(distance.cdist(b, b), axis=1)[:, k]
        d = distance.cdist(a, b)
        return np.mean(np.any(d <= r_a[:, None], 0)), np.mean(np.any(d <= r_b[None], 1))

    got = adm.precision_recall(real, fake, batch_size=batch_size)
    assert got == pytest.approx(brute(real, fake), abs=1e-12)
    assert 0.0 < got[0] < 1.0 and 0.0 < got[1] < 1.0


# ------------------------------------------------------------------------------ images
def test_load_images_rejects_bad_arrays(tmp_path):
    np.savez(tmp_path / "f.npz", np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="dtype float32, expected uint8"):
        adm.load_images(tmp_path / "f.npz")
    np.savez(tmp_path / "s.npz", np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"shape \(2, 8, 8\), expected \(N, H, W, 3\)"):
        adm.load_images(tmp_path / "s.npz")
    np.savez(tmp_path / "k.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="no 'arr_0'"):
        adm.load_images(tmp_path / "k.npz")


def test_load_images_from_folder(tmp_path):
    from PIL import Image  # pylint: disable=import-outside-toplevel
    images = np.random.default_rng(4).integers(0, 256, (3, 5, 6, 3), np.uint8)
    (tmp_path / "sub").mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / ("sub" if i else ".") / f"{i}.png")
    np.testing.assert_array_equal(adm.load_images(tmp_path), images)


# ------------------------------------------------------------------------------ reference stats
class _CountingInception:
    """Stands in for metrics.inception.Inception: features are a fixed function of the pixels."""
    weights_id = "test0123"

    def __init__(self):
        self.calls = 0

    def features(self, images, *, batch_size, keys):
        self.calls += 1
        flat = images.reshape(images.shape[0], -1).astype(np.float64) / 255.0
        dims = {"pool": 2048, "spatial": 2023}
        return {k: np.resize(flat, (flat.shape[0], dims[k])).astype(np.float32) for k in keys}


def test_reference_stats_cached_and_npz_stats(tmp_path):
    images = np.random.default_rng(6).integers(0, 256, (5, 4, 4, 3), np.uint8)
    ref_path = tmp_path / "REF.npz"
    np.savez(ref_path, images, mu=np.full(2048, 7.0), sigma=np.eye(2048),
             mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    net = _CountingInception()
    first = adm.reference_stats(ref_path, net)
    assert (tmp_path / "REF.radar_jax_stats.test0123.npz").exists()
    second = adm.reference_stats(ref_path, net)
    assert net.calls == 1     # the second call read the cache
    for key in ("mu", "sigma", "mu_s", "sigma_s", "pool"):
        np.testing.assert_array_equal(getattr(first, key), getattr(second, key))
    np.testing.assert_allclose(first.mu, np.resize(images.reshape(5, -1) / 255.0,
                                                   (5, 2048)).mean(0), rtol=1e-6)
    from_npz = adm.reference_stats(ref_path, net, use_npz_stats=True)
    assert from_npz.source == "npz" and np.all(from_npz.mu == 7.0)
    assert from_npz.pool.shape == (5, 2048)    # Precision / Recall still use our features
    np.savez(tmp_path / "plain.npz", images)
    with pytest.raises(ValueError, match=r"has no \['mu', 'sigma', 'mu_s', 'sigma_s'\]"):
        adm.reference_stats(tmp_path / "plain.npz", net, use_npz_stats=True)


# ------------------------------------------------------------------------------ the command
def _run_cli(cwd, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "radar_jax.evaluate_fid", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    from radar_jax.convert import inception as convert  # pylint: disable=C0415
    from radar_jax.metrics import inception as inception_lib  # pylint: disable=C0415
    d = tmp_path_factory.mktemp("evaluate_fid")
    np.savez(d / "inception.npz", **convert.to_state_dict(inception_lib.random_variables(0)))
    # Tiny images and few of them: the cost is the Inception compile and the two 2048-d / 2023-d
    # Frechet distances, not the images.
    rng = np.random.default_rng(5)
    np.savez(d / "ref.npz", rng.integers(0, 256, (6, 8, 8, 3), np.uint8))
    np.savez(d / "samples.npz", rng.integers(0, 256, (4, 8, 8, 3), np.uint8))
    np.savez(d / "floats.npz", rng.uniform(0, 1, (4, 8, 8, 3)))
    return d


def test_evaluate_fid_command_prints_one_json_line(cli_files):
    proc = _run_cli(cli_files, "--inception=inception.npz", "--ref=ref.npz",
                    "--samples=samples.npz", "--batch_size=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert set(result) == {"fid", "sfid", "inception_score", "precision", "recall",
                           "num_samples"}
    assert result["num_samples"] == 4 and all(np.isfinite(v) for v in result.values())
    assert 0.0 <= result["precision"] <= 1.0 and 0.0 <= result["recall"] <= 1.0
    assert list(cli_files.glob("ref.radar_jax_stats.*.npz"))   # reference features cached


def test_evaluate_fid_command_bad_input(cli_files):
    proc = _run_cli(cli_files, "--inception=inception.npz", "--ref=ref.npz",
                    "--samples=floats.npz")
    assert proc.returncode == 2 and not proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("evaluate_fid: --samples=floats.npz:") and "uint8" in lines[0]
