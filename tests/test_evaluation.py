"""Tests for radar_jax/evaluation.py: closed-form Frechet cases, PSNR and codebook statistics
by hand, and the digit classifier on real held-out digits versus noise."""

import math

import numpy as np
import pytest

from radar_jax import evaluation


def _with_moments(rng, n, mean, cov):
    """n points whose EMPIRICAL mean and (ddof 1) covariance are exactly `mean` and `cov`."""
    d = len(mean)
    z = rng.normal(size=(n, d))
    z -= z.mean(axis=0)
    whiten = np.linalg.inv(np.linalg.cholesky(np.atleast_2d(np.cov(z, rowvar=False))))
    return z @ whiten.T @ np.linalg.cholesky(cov).T + np.asarray(mean)


def _digit_splits():
    """(train, eval) digits: the package's split when radar_jax.data provides it, else a
    fixed split of sklearn's bundled digits."""
    try:
        from radar_jax.data import load_digits_split  # pylint: disable=import-outside-toplevel
    except ImportError:
        from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
        bunch = load_digits()
        x, y = bunch.images.astype(np.float32), bunch.target.astype(np.int32)
        return (x[:1500], y[:1500]), (x[1500:], y[1500:])
    return load_digits_split("train"), load_digits_split("eval")


@pytest.fixture(scope="module")
def digits():
    return _digit_splits()


@pytest.fixture(scope="module")
def classifier(digits):
    (x_train, y_train), _ = digits
    return evaluation.DigitClassifier(x_train, y_train)


# ------------------------------------------------------------------------------ Frechet
def test_frechet_identical_sets_is_zero():
    feats = np.random.default_rng(0).normal(size=(200, 5))
    assert abs(evaluation.frechet_distance(feats, feats)) < 1e-6


def test_frechet_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(1)
    a = _with_moments(rng, 300, [0.0, 0.0], np.diag([4.0, 9.0]))
    b = _with_moments(rng, 500, [3.0, 4.0], np.diag([1.0, 16.0]))
    # |mu_a - mu_b|^2 = 25; commuting covariances: sum (sqrt(s_a) - sqrt(s_b))^2 = 1 + 1.
    assert evaluation.frechet_distance(a, b) == pytest.approx(27.0, abs=1e-6)
    assert evaluation.frechet_distance(b, a) == pytest.approx(27.0, abs=1e-6)


def test_frechet_one_dimensional_and_rotation_invariant():
    rng = np.random.default_rng(2)
    a = _with_moments(rng, 100, [1.0], np.array([[0.25]]))
    b = _with_moments(rng, 100, [-1.0], np.array([[4.0]]))
    # 1-D: (m_a - m_b)^2 + (sd_a - sd_b)^2 = 4 + 2.25.
    assert evaluation.frechet_distance(a, b) == pytest.approx(6.25, abs=1e-6)
    # Non-commuting covariances: rotating both sets by the same rotation changes nothing.
    a2 = _with_moments(rng, 400, [1.0, 2.0], np.array([[2.0, 0.8], [0.8, 1.0]]))
    b2 = _with_moments(rng, 400, [0.0, -1.0], np.array([[1.0, -0.3], [-0.3, 3.0]]))
    angle = 0.7
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    d = evaluation.frechet_distance(a2, b2)
    assert d == pytest.approx(evaluation.frechet_distance(a2 @ rot.T, b2 @ rot.T), abs=1e-6)
    assert d > 10.0   # the mean term alone is 1 + 9


def test_frechet_singular_covariance_is_finite():
    # Rank-1 features in 3-D: the covariances are singular.
    t = np.linspace(-1, 1, 50)[:, None]
    a, b = t * np.array([1.0, 2.0, 0.0]), t * np.array([1.0, 2.0, 0.0]) + 1.0
    d = evaluation.frechet_distance(a, b)
    assert np.isfinite(d) and d == pytest.approx(3.0, abs=1e-3)   # same cov, mean shift (1,1,1)


def test_frechet_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same D"):
        evaluation.frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="at least 2"):
        evaluation.frechet_distance(np.zeros((1, 3)), np.zeros((4, 3)))


# ------------------------------------------------------------------------------ PSNR, codes
def test_psnr_hand_case():
    x = np.zeros((2, 4, 4, 3), np.float32)
    y = x.copy()
    y[0] += 0.2    # mse 0.04 -> 10 log10(4 / 0.04) = 20 dB
    y[1] -= 0.02   # mse 4e-4 -> 40 dB
    assert evaluation.psnr(x, y) == pytest.approx(30.0, abs=1e-4)
    assert evaluation.psnr(x[:1], y[:1], data_range=1.0) == pytest.approx(
        10 * math.log10(1 / 0.04), abs=1e-4)
    assert evaluation.psnr(x, x) == math.inf
    with pytest.raises(ValueError, match="same shape"):
        evaluation.psnr(x, y[:1])


def test_codebook_usage_and_perplexity():
    codes = np.array([[0, 1], [1, 3]])
    assert evaluation.codebook_usage(codes, 8) == 3 / 8
    # p = (1/4, 1/2, 1/4): entropy 1.5 bits -> perplexity 2^1.5.
    assert evaluation.codebook_perplexity(codes, 8) == pytest.approx(2 ** 1.5)
    assert evaluation.codebook_perplexity(np.arange(16) % 4, 8) == pytest.approx(4.0)
    assert evaluation.codebook_perplexity(np.zeros(10, int), 8) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="codebook"):
        evaluation.codebook_usage(np.array([0, 8]), 8)


# ------------------------------------------------------------------------------ digits
def test_classifier_accurate_on_held_out_and_chance_on_noise(digits, classifier):
    _, (x_eval, y_eval) = digits
    assert classifier.accuracy(x_eval, y_eval) > 0.9
    rng = np.random.default_rng(0)
    noise = rng.uniform(0, 16, size=(500, 8, 8))
    random_labels = rng.integers(0, 10, size=500)
    assert classifier.accuracy(noise, random_labels) < 0.2
    assert classifier.predict(x_eval[:5]).dtype == np.int32
    assert classifier.features(x_eval).shape == (len(x_eval), 16)


def test_digits_quality_separates_real_from_noise(digits, classifier):
    (x_train, _), (x_eval, y_eval) = digits
    real = evaluation.digits_quality(x_eval, y_eval, x_train, classifier)
    rng = np.random.default_rng(3)
    noise = evaluation.digits_quality(rng.uniform(0, 16, size=x_eval.shape), y_eval, x_train,
                                      classifier)
    blurred_x = (x_eval + np.roll(x_eval, 1, axis=2) + np.roll(x_eval, -1, axis=2)) / 3
    blurred = evaluation.digits_quality(blurred_x, y_eval, x_train, classifier)
    assert real["accuracy"] > 0.9 and noise["accuracy"] < 0.2
    assert real["fd"] < blurred["fd"] < noise["fd"]
    assert real["fd"] < 0.1 * noise["fd"]


def test_classifier_rejects_wrong_scale(classifier):
    with pytest.raises(ValueError, match="0..16"):
        classifier.predict(np.full((2, 8, 8), 100.0))
    with pytest.raises(ValueError, match=r"\(N, 8, 8\)"):
        classifier.features(np.zeros((2, 16, 16)))


def test_default_classifier_fits_the_package_train_split(digits, classifier):
    try:
        from radar_jax.data import load_digits_split  # pylint: disable=import-outside-toplevel
    except ImportError:
        pytest.skip("radar_jax.data.load_digits_split is not available yet")
    default = evaluation.DigitClassifier()
    (x_train, _), (x_eval, _) = digits
    x_pkg, _ = load_digits_split("train")
    np.testing.assert_array_equal(x_pkg, x_train)   # the fixture used the same split
    np.testing.assert_array_equal(default.predict(x_eval), classifier.predict(x_eval))
    np.testing.assert_allclose(default.features(x_eval), classifier.features(x_eval))
