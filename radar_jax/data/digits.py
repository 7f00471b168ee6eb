"""The embedded dataset: scikit-learn's 8x8 handwritten digits, upsampled to RGB images.

scikit-learn ships `load_digits` (1,797 grayscale 8x8 images, values 0..16, white digit on
black) inside the wheel, so the demo runs with no download. This module fixes a held-out split,
maps 8x8 digits to (S, S, 3) images in [-1, 1] for the tokenizer, and maps images back to 8x8
digits so that evaluation can classify generated samples with a classifier fitted on real digits.

Resizing is linear algebra on one axis at a time: `digits_to_images` applies the bilinear
upsampling matrix U (S, 8) on each spatial axis, and `images_to_digits` applies its least-squares
inverse P = pinv(U) (8, S). P @ U = I, so `images_to_digits(digits_to_images(x)) == x` up to
float rounding, and for any other image P returns the 8x8 digit whose upsampling is closest in
L2. P is an area-style weighted average (every row sums to 1, with small negative side lobes).
Why not a plain area (box) resize: box-averaging a bilinear upsampling blurs the digit (mean
error 1.1 and max 6.3 on the 0..16 scale at S=32), which would cost the digit classifier accuracy
on real images and bias every metric built on it.
"""

import numpy as np

# The held-out split: this many images of each class (10 classes) go to 'eval' -> 300 eval,
# 1,497 train. A fixed per-class count keeps the eval set balanced and the split hand-checkable.
EVAL_PER_CLASS = 30
# Seed of the permutation that picks the held-out images inside each class. Changing it changes
# the split, which would make metrics incomparable with earlier runs: keep it fixed.
SPLIT_SEED = 0
DIGIT_SIZE = 8
DIGIT_MAX = 16.0


def load_digits_split(split):
    """Returns one fixed split of scikit-learn's bundled 8x8 digits.

    Args:
      split: 'train' (1,497 images) or 'eval' (300 images, 30 per class). The two are disjoint
        and together cover all 1,797 images; the split never changes between runs or machines.

    Returns:
      images_N88: float32 (N, 8, 8), values 0..16 (sklearn's range, white digit on black).
      labels_N: int32 (N,), values 0..9.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"digits split must be 'train' or 'eval', got {split!r}.")
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

    digits = load_digits()
    images_N88 = np.asarray(digits.images, np.float32)
    labels_N = np.asarray(digits.target, np.int32)
    rng = np.random.default_rng(SPLIT_SEED)
    is_eval_N = np.zeros(len(labels_N), bool)
    for label in range(10):
        # Permute the class's indices (sorted, so the result depends only on the seed) and hold
        # out the first EVAL_PER_CLASS of them.
        members = np.flatnonzero(labels_N == label)
        is_eval_N[rng.permutation(members)[:EVAL_PER_CLASS]] = True
    keep_N = is_eval_N if split == "eval" else ~is_eval_N
    return images_N88[keep_N], labels_N[keep_N]


def _bilinear_matrix(size_in, size_out):
    """Returns U (size_out, size_in) float64: bilinear resampling with half-pixel centers.

    Output pixel o samples the input at x = (o + 0.5) * size_in / size_out - 0.5, clamped to the
    valid range (edge pixels replicate), as `jax.image.resize(..., 'linear')` does when
    upsampling. Every row is a convex combination, so U maps [0, 16] into [0, 16].
    """
    x_O = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0, size_in - 1)
    lo_O = np.floor(x_O).astype(int)
    hi_O = np.minimum(lo_O + 1, size_in - 1)
    frac_O = x_O - lo_O
    u_OI = np.zeros((size_out, size_in))
    np.add.at(u_OI, (np.arange(size_out), lo_O), 1 - frac_O)
    np.add.at(u_OI, (np.arange(size_out), hi_O), frac_O)
    return u_OI


def _check_size(image_size):
    if not isinstance(image_size, (int, np.integer)) or image_size < DIGIT_SIZE:
        raise ValueError(
            f"digits image_size must be an integer >= {DIGIT_SIZE}, got {image_size!r}; "
            "set config.tokenizer.data.image_size to e.g. 32."
        )


def digits_to_images(images_8x8, image_size):
    """Upsamples 8x8 digits to RGB images.

    Args:
      images_8x8: float (N, 8, 8), values 0..16 (as from `load_digits_split`).
      image_size: output side S, an integer >= 8.

    Returns:
      float32 (N, S, S, 3) in [-1, 1]: bilinear upsampling, gray replicated to the 3 channels;
      0 -> -1 (black background), 16 -> +1 (white ink).
    """
    _check_size(image_size)
    images_N88 = np.asarray(images_8x8, np.float64)
    if images_N88.ndim != 3 or images_N88.shape[1:] != (DIGIT_SIZE, DIGIT_SIZE):
        raise ValueError(f"images_8x8 must have shape (N, 8, 8), got {images_N88.shape}.")
    u_S8 = _bilinear_matrix(DIGIT_SIZE, image_size)
    gray_NSS = np.einsum("hi,nij,wj->nhw", u_S8, images_N88, u_S8)
    gray_NSS = gray_NSS * (2.0 / DIGIT_MAX) - 1.0
    return np.repeat(gray_NSS[..., None], 3, axis=-1).astype(np.float32)


def images_to_digits(images):
    """Maps RGB images back to 8x8 digits: the inverse of `digits_to_images`.

    Args:
      images: float (N, S, S, 3) in [-1, 1], S >= 8 (real or generated).

    Returns:
      float32 (N, 8, 8) in 0..16: gray = mean of the channels, then the least-squares inverse
      of the bilinear upsampling on each axis (see the module docstring), clipped to 0..16.
    """
    images_NSS3 = np.asarray(images, np.float64)
    shape = images_NSS3.shape
    if len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2]:
        raise ValueError(f"images must have shape (N, S, S, 3), got {images_NSS3.shape}.")
    size = images_NSS3.shape[1]
    _check_size(size)
    gray_NSS = (images_NSS3.mean(axis=-1) + 1.0) * (DIGIT_MAX / 2.0)
    p_8S = np.linalg.pinv(_bilinear_matrix(DIGIT_SIZE, size))
    digits_N88 = np.einsum("hi,nij,wj->nhw", p_8S, gray_NSS, p_8S)
    return np.clip(digits_N88, 0.0, DIGIT_MAX).astype(np.float32)


class DigitsSource:
    """Grain random-access source over one digits split: records {'image', 'label'}.

    'image' is uint8 (S, S, 3) RGB: `digits_to_images` quantized to 0..255 (a rounding error of
    at most 1/255 in [-1, 1] units), made on access so that a large S costs no memory up front
    in every worker process.
    """

    num_classes = 10

    def __init__(self, split, image_size):
        _check_size(image_size)
        self._images_N88, self._labels_N = load_digits_split(split)
        self._image_size = int(image_size)
        self.split = split
        self.description = f"digits ({split} split): {len(self._labels_N)} images, 10 classes"

    def __len__(self):
        return len(self._labels_N)

    def __getitem__(self, index):
        image_SS3 = digits_to_images(self._images_N88[index][None], self._image_size)[0]
        image_SS3 = np.round((image_SS3 + 1.0) * 127.5).astype(np.uint8)
        return {"image": image_SS3, "label": int(self._labels_N[index])}

    def __repr__(self):
        return f"DigitsSource(split={self.split!r}, image_size={self._image_size}, n={len(self)})"
