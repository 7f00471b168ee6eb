"""FID, sFID, Inception Score and improved Precision / Recall as ADM's evaluator defines them.

ADM = openai/guided-diffusion `evaluations/evaluator.py`, the evaluator LlamaGen, VAR and
RadAR report with. Same definitions, on features from our Flax port of the same network
(`metrics.inception`):
- FID / sFID: Frechet distance of Gaussians (mean, ddof-1 covariance) fitted to the pool
  (2048-d) / spatial (mixed_6/conv, 2023-d) features; the trace of the matrix square root
  comes from two symmetric eigendecompositions instead of scipy's sqrtm (the same number,
  seconds instead of minutes at D = 2048; see `trace_sqrt_product`).
- Inception Score: exp(E KL(p(y|x) || p(y))) over consecutive chunks of 5000 samples (10
  splits for 50k samples), averaged; p(y|x) = softmax of the *unbiased* logits (pool @ W).
- Precision / Recall (Kynkaanniemi et al. 2019, k = 3): the k-NN radius of each feature
  vector within its own set defines a ball; precision = fraction of samples inside some
  reference ball, recall = fraction of references inside some sample ball. Distances are exact
  float32 (ADM's TensorFlow graph tries float16 first), computed in blocks on the accelerator
  so 50k x 50k needs O(block^2) memory.

Reference statistics (`reference_stats`) are computed once with our network from an ADM
reference batch (`arr_0`, e.g. VIRTUAL_imagenet256_labeled.npz) or an image folder, and cached
next to it as `<REF>.radar_jax_stats.<weights id>.npz`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import logging

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
IS_SPLIT_SIZE = 5000  # ADM's chunk size: 10 splits for the standard 50k samples


# ------------------------------------------------------------------------------ FID
def statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> (mu (D,), sigma (D, D)), float64; sigma is the ddof-1 covariance."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2 for a covariance, got shape "
                         f"{x.shape}")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """The symmetric PSD square root of a symmetric (D, D) matrix, from eigh: V sqrt(L) V^T.
    Round-off negative eigenvalues (a covariance of fewer samples than dimensions is singular)
    are clipped to 0."""
    eigenvalues, vectors = np.linalg.eigh(sigma)
    return (vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ vectors.T


def trace_sqrt_product(sigma1, sigma2) -> float:
    """tr((sigma1 sigma2)^(1/2)) of two symmetric PSD (D, D) matrices, exactly, via two eighs.

    With A = sigma1^(1/2), sigma1 sigma2 = A (A sigma2 A) A^-1 is similar to the symmetric PSD
    matrix A sigma2 A, so the eigenvalues of sigma1 sigma2 are those of A sigma2 A (all real and
    >= 0) and the trace of its principal square root is sum_i sqrt(lambda_i(A sigma2 A)). This
    is the quantity scipy.linalg.sqrtm(sigma1 @ sigma2) gives the trace of (the original FID
    code and ADM), in two symmetric eigendecompositions (about 3 s for D = 2048 on a CPU core,
    against minutes for sqrtm's Schur method), and with no imaginary round-off to drop.
    float64 throughout; tiny negative eigenvalues from round-off are clipped to 0.
    """
    root1 = _sqrt_psd(np.asarray(sigma1, np.float64))
    middle = root1 @ np.asarray(sigma2, np.float64) @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2.0)  # symmetric up to round-off
    return float(np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None))))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 0.0) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), as ADM defines it.

    d = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)). ADM (and the
    original FID code) take the last trace from scipy's sqrtm of the product, with an eps * I
    retry for a singular product and a check on the imaginary round-off; here it comes from the
    symmetric eigenvalue route (`trace_sqrt_product`), which is the same number without
    either problem: a singular product (fewer samples than dimensions) has eigenvalues 0, not
    NaNs, and the eigenvalues are real by construction.

    Args:
      mu1, mu2: (D,) means; sigma1, sigma2: (D, D) symmetric PSD covariances (any float dtype).
      eps: kept for callers of ADM's signature; the eigenvalue route needs no regularisation,
        so it is ignored.

    Returns:
      The distance as a float.
    """
    del eps
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2,
                                                                                   np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics disagree in dimension: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}; compare features of the same "
                         "layer (pool with pool, spatial with spatial)")
    for name, value in (("mu", (mu1, mu2)), ("sigma", (sigma1, sigma2))):
        if not all(np.isfinite(v).all() for v in value):
            raise ValueError(f"Frechet distance: {name} has NaN or inf entries; the features "
                             "are not finite (check the Inception weights and the images)")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
                 - 2.0 * trace_sqrt_product(sigma1, sigma2))


# ------------------------------------------------------------------------------ IS
def inception_score(logits, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's Inception Score of (N, C) unbiased logits (`features(...)['logits_unbiased']`).

    Consecutive chunks of `split_size` samples (the last may be shorter) each give
    exp(mean_i KL(p_i || mean_j p_j)); the score is their mean. float64 throughout.
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"logits must be (N, C) with N >= 1, got shape {logits.shape}")
    scores = []
    for start in range(0, logits.shape[0], int(split_size)):
        log_p = scipy.special.log_softmax(logits[start:start + int(split_size)], axis=1)
        log_marginal = scipy.special.logsumexp(log_p, axis=0) - np.log(log_p.shape[0])
        kl = np.sum(np.exp(log_p) * (log_p - log_marginal[None]), axis=1)
        scores.append(np.exp(np.mean(kl)))
    return float(np.mean(scores))


# ------------------------------------------------------------------------------ P / R
@jax.jit
def _sq_distances(u_RD, v_CD):
    """Squared Euclidean distances (R, C), float32, clamped at 0 (ADM's formula)."""
    norm_u = jnp.sum(u_RD * u_RD, axis=1)[:, None]
    norm_v = jnp.sum(v_CD * v_CD, axis=1)[None, :]
    cross = jnp.matmul(u_RD, v_CD.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(norm_u - 2.0 * cross + norm_v, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _smallest_block(rows_RD, cols_CD, cols_valid_C, k):
    d = jnp.where(cols_valid_C[None], _sq_distances(rows_RD, cols_CD), jnp.inf)
    return -jax.lax.top_k(-d, k)[0]          # (R, k) ascending


@jax.jit
def _inside_block(a_RD, radii_a_R, b_CD, radii_b_C):
    d = _sq_distances(a_RD, b_CD)
    a_in_b = jnp.any(d <= radii_b_C[None, :], axis=1)   # a inside some ball of b
    b_in_a = jnp.any(d <= radii_a_R[:, None], axis=0)
    return a_in_b, b_in_a


def _blocks(features, block: int) -> tuple[np.ndarray, int, int]:
    """Pads (N, D) to a multiple of `block` rows (block = min(block, N))."""
    x = np.asarray(features, np.float32)
    n = x.shape[0]
    block = min(block, n)
    padded = -(-n // block) * block
    return np.concatenate([x, np.zeros((padded - n, x.shape[1]), np.float32)]), n, block


def manifold_radii(features, k: int = 3, batch_size: int = 10000) -> np.ndarray:
    """Squared distance of each (N, D) feature vector to its k-th nearest neighbour in the set.

    As ADM, the vector itself (distance 0) counts as the 0-th neighbour. Exact, in blocks of
    batch_size x batch_size distances. Returns float32 (N,).
    """
    x, n, block = _blocks(features, batch_size)
    if n < k + 1:
        raise ValueError(f"need more than k={k} feature vectors for k-NN radii, got {n}")
    valid = np.arange(x.shape[0]) < n
    radii = []
    for r in range(0, x.shape[0], block):
        candidates = [np.asarray(_smallest_block(x[r:r + block], x[c:c + block],
                                                 valid[c:c + block], k=k + 1))
                      for c in range(0, x.shape[0], block)]
        radii.append(np.sort(np.concatenate(candidates, axis=1), axis=1)[:, k])
    return np.concatenate(radii)[:n]


def precision_recall(real_features, fake_features, k: int = 3,
                     batch_size: int = 10000) -> tuple[float, float]:
    """ADM's improved precision and recall of fake (samples) against real (reference) features.

    Args:
      real_features: (N1, D) reference pool features; fake_features: (N2, D) sample features.
      k: neighbourhood size of the manifold balls (ADM: 3).
      batch_size: rows / columns per distance block (memory ~ batch_size^2 floats).

    Returns:
      (precision, recall): fraction of fake vectors inside some real ball, fraction of real
      vectors inside some fake ball (ball: centre a vector, squared radius its k-NN distance).
    """
    real, fake = np.asarray(real_features), np.asarray(fake_features)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D, got {real.shape} and "
                         f"{fake.shape}")
    radii_real, radii_fake = (manifold_radii(f, k, batch_size) for f in (real, fake))
    a, na, block_a = _blocks(real, batch_size)
    b, nb, block_b = _blocks(fake, batch_size)
    # Padding rows get radius -1: their balls contain nothing; their own status is dropped.
    ra = np.concatenate([radii_real, -np.ones(a.shape[0] - na, np.float32)])
    rb = np.concatenate([radii_fake, -np.ones(b.shape[0] - nb, np.float32)])
    real_in_fake = np.zeros(a.shape[0], bool)
    fake_in_real = np.zeros(b.shape[0], bool)
    for i in range(0, a.shape[0], block_a):
        for j in range(0, b.shape[0], block_b):
            a_in, b_in = _inside_block(a[i:i + block_a], ra[i:i + block_a],
                                       b[j:j + block_b], rb[j:j + block_b])
            real_in_fake[i:i + block_a] |= np.asarray(a_in)
            fake_in_real[j:j + block_b] |= np.asarray(b_in)
    return float(np.mean(fake_in_real[:nb])), float(np.mean(real_in_fake[:na]))


# ------------------------------------------------------------------------------ images
def load_images(path) -> np.ndarray:
    """uint8 (N, H, W, 3) images from an ADM-format .npz (`arr_0`) or an image folder.

    A folder is read recursively ({png, jpg, jpeg, bmp, webp}, sorted paths, RGB); all images
    must have one size. Raises ValueError naming the path, the problem and the fix.
    """
    path = epath.Path(path)
    if path.is_dir():
        return _load_folder(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder; pass an ADM-format .npz (arr_0: uint8 "
                         "(N, H, W, 3)) or a folder of images")
    try:
        with path.open("rb") as f, np.load(f, allow_pickle=False) as data:
            if "arr_0" not in data.files:
                raise ValueError(f"{path}: no 'arr_0' array (keys {data.files}); save images "
                                 "with np.savez(path, images) as ADM's evaluator expects")
            images = data["arr_0"]
    except ValueError:
        raise
    except Exception as e:  # zipfile.BadZipFile, OSError, pickle refusals...
        raise ValueError(f"{path}: not a readable .npz ({e}); pass an ADM-format .npz or an "
                         "image folder") from e
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
        raise ValueError(f"{path}: arr_0 has shape {images.shape}, expected (N, H, W, 3) with "
                         "N >= 1 (NHWC RGB)")
    if images.dtype != np.uint8:
        raise ValueError(f"{path}: arr_0 has dtype {images.dtype}, expected uint8 in 0..255; "
                         "convert with np.clip(x, 0, 255).astype(np.uint8) (from [-1, 1]: "
                         "(x + 1) * 127.5 first)")
    return images


def _image_files(folder: epath.Path) -> list[epath.Path]:
    # epath's walk (not rglob('**'), which epath refuses on cloud paths).
    return sorted(root / name for root, _, names in folder.walk() for name in names
                  if epath.Path(name).suffix.lower() in IMAGE_SUFFIXES)


def _load_folder(folder: epath.Path) -> np.ndarray:
    from PIL import Image  # pylint: disable=import-outside-toplevel
    files = _image_files(folder)
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    images = []
    for p in files:
        with Image.open(io.BytesIO(p.read_bytes())) as im:
            images.append(np.asarray(im.convert("RGB"), np.uint8))
        if images[-1].shape != images[0].shape:
            raise ValueError(f"{p}: size {images[-1].shape[:2]} differs from {files[0]}'s "
                             f"{images[0].shape[:2]}; resize the folder to one size first")
    return np.stack(images)


# ------------------------------------------------------------------------------ reference
@dataclasses.dataclass(frozen=True)
class ReferenceStats:
    """What the metrics need of the reference batch.

    mu (2048,), sigma (2048, 2048), mu_s (2023,), sigma_s (2023, 2023): float64 Gaussians of
    the pool and spatial features; pool: float32 (N, 2048) reference features (Precision /
    Recall); source: where mu / sigma come from ('radar_jax' or 'npz').
    """
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray
    sigma_s: np.ndarray
    pool: np.ndarray
    source: str = "radar_jax"


def cache_path(ref_path, weights_id: str) -> epath.Path:
    """REF.npz -> REF.radar_jax_stats.<weights_id>.npz (a folder DIR -> DIR.radar_jax_...)."""
    ref = epath.Path(ref_path)
    stem = ref.name[:-4] if ref.name.lower().endswith(".npz") else ref.name
    return ref.parent / f"{stem}.radar_jax_stats.{weights_id}.npz"


def _fingerprint(ref: epath.Path) -> str:
    """Changes when the reference does (file size and mtime, or the folder's file list)."""
    if ref.is_dir():
        names = "\n".join(str(p.relative_to(ref)) for p in _image_files(ref))
        return f"folder:{hashlib.sha256(names.encode()).hexdigest()[:16]}"
    st = ref.stat()
    return f"file:{st.length}:{int(st.mtime)}"


def reference_stats(ref_path, inception, *, batch_size: int = 200, use_npz_stats: bool = False,
                    cache: bool = True) -> ReferenceStats:
    """Reference statistics of an ADM reference batch or image folder, computed once.

    Args:
      ref_path: ADM-format .npz (`arr_0` uint8 (N, H, W, 3), e.g. VIRTUAL_imagenet256_labeled.npz)
        or a folder of images.
      inception: a `metrics.inception.Inception` (variables + weights_id).
      batch_size: images per Inception step.
      use_npz_stats: take mu / sigma / mu_s / sigma_s from the npz itself (ADM's reference
        batches carry them) instead of our features; Precision / Recall still use our pool
        features of `arr_0`.
      cache: read / write `cache_path(ref_path, inception.weights_id)` (process 0 writes).

    Returns:
      ReferenceStats.
    """
    ref = epath.Path(ref_path)
    if not ref.exists():
        raise ValueError(f"{ref}: no such file or folder; pass ADM's reference batch .npz "
                         "(e.g. VIRTUAL_imagenet256_labeled.npz) or an image folder")
    cached = cache_path(ref, inception.weights_id)
    fingerprint = _fingerprint(ref)
    stats = None
    if cache and cached.exists():
        with cached.open("rb") as f, np.load(f, allow_pickle=False) as data:
            if str(data["fingerprint"]) == fingerprint:
                stats = {k: data[k] for k in ("mu", "sigma", "mu_s", "sigma_s", "pool")}
                logging.info("Reference statistics from the cache %s.", cached)
    if stats is None:
        images = load_images(ref)
        logging.info("Computing reference Inception features of %d images from %s.",
                     images.shape[0], ref)
        feats = inception.features(images, batch_size=batch_size, keys=("pool", "spatial"))
        mu, sigma = statistics(feats["pool"])
        mu_s, sigma_s = statistics(feats["spatial"])
        stats = dict(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, pool=feats["pool"])
        if cache and jax.process_index() == 0:
            _write_cache(cached, stats, fingerprint, inception.weights_id)
    if use_npz_stats:
        stats.update(_npz_stats(ref))
        logging.warning("Using the reference npz's own mu/sigma and mu_s/sigma_s: they were "
                        "computed with ADM's TensorFlow graph, not this network, so FID / sFID "
                        "include the small TF-vs-port difference. Precision / Recall use this "
                        "network's features.")
    return ReferenceStats(**stats, source="npz" if use_npz_stats else "radar_jax")


def _npz_stats(ref: epath.Path) -> dict:
    keys = ("mu", "sigma", "mu_s", "sigma_s")
    if ref.is_dir():
        raise ValueError(f"{ref}: a folder has no stored statistics; drop use_npz_stats")
    with ref.open("rb") as f, np.load(f, allow_pickle=False) as data:
        missing = [k for k in keys if k not in data.files]
        if missing:
            raise ValueError(f"{ref}: has no {missing} (keys {data.files}); drop use_npz_stats "
                             "to compute the statistics with this network")
        return {k: np.asarray(data[k], np.float64) for k in keys}


def _write_cache(path: epath.Path, stats: dict, fingerprint: str, weights_id: str) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, fingerprint=np.array(fingerprint), weights_id=np.array(weights_id),
             **stats)
    tmp = path.parent / f".{path.name}.tmp"
    try:
        tmp.write_bytes(buffer.getvalue())
        tmp.rename(path)   # atomic: a killed run leaves no half-written cache
        logging.info("Cached reference statistics in %s.", path)
    except OSError as e:   # a read-only reference folder: still evaluate, just do not cache
        logging.warning("Could not cache reference statistics at %s (%s).", path, e)


# ------------------------------------------------------------------------------ all metrics
def metrics_from_features(sample_features: dict, ref: ReferenceStats, *, k: int = 3) -> dict:
    """FID, sFID, IS, Precision, Recall from sample features and reference statistics.

    Args:
      sample_features: {'pool' (N, 2048), 'spatial' (N, 2023), 'logits_unbiased' (N, 1008)}.
      ref: ReferenceStats.

    Returns:
      dict(fid, sfid, inception_score, precision, recall, num_samples) of Python numbers.
    """
    pool = sample_features["pool"]
    mu, sigma = statistics(pool)
    mu_s, sigma_s = statistics(sample_features["spatial"])
    precision, recall = precision_recall(ref.pool, pool, k=k)
    return dict(fid=frechet_distance(mu, sigma, ref.mu, ref.sigma),
                sfid=frechet_distance(mu_s, sigma_s, ref.mu_s, ref.sigma_s),
                inception_score=inception_score(sample_features["logits_unbiased"]),
                precision=precision, recall=recall, num_samples=int(pool.shape[0]))


def compute_metrics(inception, sample_images, ref: ReferenceStats, *,
                    batch_size: int = 200) -> dict:
    """ADM's metrics of uint8 (N, H, W, 3) samples against reference statistics.

    Args:
      inception: a `metrics.inception.Inception`.
      sample_images: uint8 (N, H, W, 3), N > 3 (k-NN radii need 4 points).
      ref: from `reference_stats`.
      batch_size: images per Inception step.

    Returns:
      dict(fid, sfid, inception_score, precision, recall, num_samples).
    """
    feats = inception.features(sample_images, batch_size=batch_size,
                               keys=("pool", "spatial", "logits_unbiased"))
    return metrics_from_features(feats, ref)
