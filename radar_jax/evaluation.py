"""Quality metrics for the tokenizer and generator demos (numpy, scikit-learn, scipy).

- `psnr`: reconstruction quality of images in [-1, 1].
- `codebook_usage`, `codebook_perplexity`: how much of the VQ codebook the codes use.
- `DigitClassifier`: a fixed classifier fitted on the real 8x8 training digits; it scores
  generated digits (accuracy w.r.t. the requested class) and embeds them in a feature space.
- `frechet_distance`: the FID formula on any feature sets; `digits_quality` combines both on
  the embedded digits dataset (a small-scale stand-in for FID / Inception accuracy).
"""

from __future__ import annotations

import numpy as np
from sklearn import decomposition, svm

from radar_jax.metrics import adm

DIGITS_MAX = 16.0  # sklearn's digits hold gray levels 0..16


def psnr(x, y, data_range: float = 2.0) -> float:
    """Mean over the batch of per-image PSNR in dB.

    Args:
      x, y: float (B, ...) images of the same shape, e.g. (B, H, W, C) in [-1, 1] (hence the
        default data_range 2). Axis 0 is the batch; every other axis belongs to one image.
      data_range: max - min of the pixel range.

    Returns:
      mean_b 10 log10(data_range^2 / mse_b); +inf if some image is reproduced exactly.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim < 2:
        raise ValueError(f"psnr needs two batches (B, ...) of the same shape, got {x.shape} and "
                         f"{y.shape}; add a batch axis with x[None] for a single image")
    mse_B = np.mean((x - y) ** 2, axis=tuple(range(1, x.ndim)))
    with np.errstate(divide="ignore"):
        psnr_B = 10.0 * np.log10(data_range ** 2 / mse_B)
    return float(np.mean(psnr_B))


def _code_counts(codes, codebook_size: int) -> np.ndarray:
    codes = np.asarray(codes).ravel()
    if codes.size == 0:
        raise ValueError("codes is empty; pass at least one code")
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
    if codes.min() < 0 or codes.max() >= codebook_size:
        raise ValueError(f"codes span {int(codes.min())}..{int(codes.max())} but the codebook has "
                         f"{codebook_size} entries; pass the matching codebook_size")
    return np.bincount(codes, minlength=codebook_size)


def codebook_usage(codes, codebook_size: int) -> float:
    """Fraction of the `codebook_size` entries that occur at least once in `codes` (any shape)."""
    return float(np.count_nonzero(_code_counts(codes, codebook_size)) / codebook_size)


def codebook_perplexity(codes, codebook_size: int) -> float:
    """exp(entropy) of the empirical code distribution: 1 if one code is used, up to
    codebook_size if all are used equally often."""
    counts = _code_counts(codes, codebook_size)
    p = counts[counts > 0] / counts.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def frechet_distance(feats_a, feats_b, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (the FID formula).

    d = ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)), with unbiased
    covariances (ddof 1), computed by `radar_jax.metrics.adm.frechet_distance` (ADM's handling:
    eps * I added to both covariances if the square root is not finite; round-off imaginary
    parts dropped).

    Args:
      feats_a: (Na, D) float; feats_b: (Nb, D) float; Na, Nb >= 2.

    Returns:
      The distance (>= 0 up to round-off), a float.
    """
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with the same D, got {a.shape} and "
                         f"{b.shape}")
    if min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(f"need at least 2 samples per set for a covariance, got {a.shape[0]} "
                         f"and {b.shape[0]}")
    return adm.frechet_distance(*adm.statistics(a), *adm.statistics(b), eps=eps)


def _as_digit_rows(images_8x8) -> np.ndarray:
    """(N, 8, 8) or (N, 8, 8, 1) in 0..16 -> (N, 64) float64 in 0..1."""
    x = np.asarray(images_8x8, np.float64)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != 3 or x.shape[1:] != (8, 8):
        raise ValueError(f"digit images must be (N, 8, 8), got shape {x.shape}; map generated "
                         "RGB images back with radar_jax.data.images_to_digits")
    if x.size and (x.min() < -0.5 or x.max() > DIGITS_MAX + 0.5):
        raise ValueError(f"digit images must hold gray levels in 0..16 (sklearn's scale), got "
                         f"range {x.min():.2f}..{x.max():.2f}; convert [-1, 1] images with "
                         "(x + 1) * 8 or radar_jax.data.images_to_digits")
    return x.reshape(x.shape[0], 64) / DIGITS_MAX


class DigitClassifier:
    """A fixed digit classifier and feature space, fitted on real 8x8 training digits.

    Classifier: an RBF SVC (C=10, gamma='scale') on the 64 pixels / 16; libsvm is
    deterministic, and it reaches ~98% on the held-out split of `radar_jax.data` (standardizing
    the pixels first does no better: it amplifies the nearly constant border pixels).
    Features (for `frechet_distance`): the first 16 principal components of the training
    pixels / 16 (PCA, full SVD, so deterministic). A pixel-statistics space rather than the
    classifier's decision function, so it also reacts to blur, noise and stroke style, the
    way Inception features do for FID; 16 dims keep covariances well estimated from a few
    hundred samples.

    Args:
      images_8x8: float (N, 8, 8) training digits in 0..16; None loads
        `radar_jax.data.load_digits_split('train')`.
      labels: int (N,) class ids 0..9 (None with images_8x8 None).
      num_features: PCA dimensions of `features`.
    """

    def __init__(self, images_8x8=None, labels=None, num_features: int = 16):
        if images_8x8 is None:
            if labels is not None:
                raise ValueError("labels given without images_8x8; pass both or neither")
            from radar_jax import data as data_lib  # pylint: disable=import-outside-toplevel
            images_8x8, labels = data_lib.load_digits_split("train")
        x_NF = _as_digit_rows(images_8x8)
        labels = np.asarray(labels).ravel()
        if labels.shape[0] != x_NF.shape[0]:
            raise ValueError(f"{x_NF.shape[0]} images but {labels.shape[0]} labels; pass one "
                             "label per image")
        self.classes = np.unique(labels)
        self._classifier = svm.SVC(kernel="rbf", C=10.0, gamma="scale")
        self._classifier.fit(x_NF, labels)
        self._pca = decomposition.PCA(n_components=num_features, svd_solver="full")
        self._pca.fit(x_NF)

    def predict(self, images_8x8) -> np.ndarray:
        """(N, 8, 8) digits in 0..16 -> (N,) int32 predicted classes."""
        return self._classifier.predict(_as_digit_rows(images_8x8)).astype(np.int32)

    def accuracy(self, images_8x8, labels) -> float:
        """Fraction of (N, 8, 8) digits classified as their (N,) labels."""
        labels = np.asarray(labels).ravel()
        predicted = self.predict(images_8x8)
        if labels.shape != predicted.shape:
            raise ValueError(f"{predicted.shape[0]} images but {labels.shape[0]} labels")
        return float(np.mean(predicted == labels))

    def features(self, images_8x8) -> np.ndarray:
        """(N, 8, 8) digits in 0..16 -> (N, num_features) float64 PCA coordinates."""
        return self._pca.transform(_as_digit_rows(images_8x8))


def digits_quality(samples_8x8, labels, reference_8x8, classifier: DigitClassifier) -> dict:
    """Quality of generated digits.

    Args:
      samples_8x8: (N, 8, 8) generated digits in 0..16.
      labels: (N,) the classes they were generated for.
      reference_8x8: (M, 8, 8) real digits (e.g. the eval split) for the Frechet distance.
      classifier: a fitted DigitClassifier.

    Returns:
      dict(accuracy=fraction classified as their label, fd=Frechet distance between the
      samples' and the references' classifier.features).
    """
    return dict(accuracy=classifier.accuracy(samples_8x8, labels),
                fd=frechet_distance(classifier.features(samples_8x8),
                                    classifier.features(reference_8x8)))
