"""Random-access record sources: embedded digits, image folders, TFDS.

Every source has `len()`, `source[i] -> {'image': uint8 (H, W, 3) RGB, 'label': int}` and a
`num_classes` attribute, which is what `grain.MapDataset.source` needs. Images come at their
stored size; `pipeline.py` resizes and crops them.

A record that cannot be decoded (a truncated JPEG, a text file named .jpg) raises
`BadImageError`, which names the file; the pipeline turns it into a counted, logged skip.
A dataset that is not there at all (missing or empty folder, a TFDS dataset that is not
prepared) raises one `DataUnavailableError` that says what to do.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Any

from etils import epath
import numpy as np
from PIL import Image

from radar_jax.data import digits as digits_lib

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
SOURCES = ("digits", "imagefolder", "tfds")


class DataUnavailableError(ValueError):
    """The dataset itself is missing, empty or not prepared (not a single bad file)."""


class BadImageError(ValueError):
    """One record could not be decoded; `.where` names the file (or TFDS record)."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"cannot decode image {where}: {reason}")
        self.where = where


# ---------------------------------------------------------------------------------------------
# Decoding and colour modes
# ---------------------------------------------------------------------------------------------

def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL image -> uint8 (H, W, 3) RGB.

    Transparent images (RGBA, LA, PA, palette or gray/RGB with a transparency key) are
    composited on WHITE: transparent web images (logos, product shots) are usually drawn for a
    white page, and dropping alpha instead would expose arbitrary colours under it. CMYK,
    YCbCr, 1-bit, gray and palette images go through PIL's conversion; 16/32-bit gray ('I',
    'I;16') is scaled from 0..65535 to 0..255 and float gray ('F') is clipped to 0..255.
    """
    mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), np.uint8)
    if mode.startswith("I") or mode == "F":
        gray = np.asarray(img, np.float64)
        if mode != "F":
            gray = gray / 257.0  # 65535 -> 255
        gray = np.clip(np.round(gray), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, np.uint8)


def array_to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> uint8 (H, W, 3) RGB (alpha on white)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image of shape {image.shape}; expected (H, W) or (H, W, 1|3|4).")
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    if image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    if image.shape[-1] == 4:
        return pil_to_rgb(Image.fromarray(image, "RGBA"))
    return image


def decode_image_bytes(data: bytes, where: str) -> np.ndarray:
    """Encoded image bytes -> uint8 (H, W, 3) RGB; raises BadImageError naming `where`."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # PIL opens lazily: truncation only shows when the pixels are read
            return pil_to_rgb(img)
    except Exception as e:  # pylint: disable=broad-except
        # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ... for bad files.
        raise BadImageError(where, f"{type(e).__name__}: {e}") from e


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------

class ImageFolderSource:
    """Images under `root/<class>/**/<file>.{jpg,jpeg,png,webp}` (extensions any case).

    Classes are the sorted names of root's subfolders (hidden ones ignored); files are found
    recursively inside each class folder and sorted, so indices are stable across runs.
    Hidden files (names starting with '.', e.g. macOS '._x.jpg') are ignored. Symlinked
    folders are followed, each real folder once in the whole listing (in sorted walk order),
    so a symlink loop cannot repeat images.
    `root` may be local or gs://... (all IO through etils.epath).
    """

    def __init__(self, root: str):
        root = os.path.expanduser(str(root))  # a string operation: gs:// paths pass unchanged
        folder = epath.Path(root)
        if not root or not folder.is_dir():
            raise DataUnavailableError(
                f"image folder {root!r} does not exist. Set --config.tokenizer.data.path to a "
                "folder holding one subfolder per class (e.g. train/n01440764/*.JPEG), or use "
                "--config.tokenizer.data.source=digits for the embedded demo data.")
        self.root = root
        self.classes = sorted(e.name for e in folder.iterdir()
                              if not e.name.startswith(".") and e.is_dir())
        paths, labels = [], []
        # One visited set for the whole listing, the root included: a link from one class
        # folder to the root or to another class cannot list (and mislabel) images twice.
        visited = {_real_folder(folder)}
        for label, name in enumerate(self.classes):
            found = _find_images(folder / name, visited=visited)
            paths += found
            labels += [label] * len(found)
        if not paths:
            loose = _find_images(folder, recursive=False)
            hint = (f" It holds {len(loose)} image files directly: move them into one "
                    "subfolder per class." if loose else "")
            raise DataUnavailableError(
                f"image folder {root!r} holds no image files in class subfolders (looked for "
                f"{', '.join(IMAGE_EXTENSIONS)} in {len(self.classes)} subfolders).{hint} Point "
                "--config.tokenizer.data.path at a folder laid out as <path>/<class>/<image>.")
        self._paths = paths
        self._labels = np.asarray(labels, np.int32)
        self.num_classes = len(self.classes)
        self.description = (f"image folder {root}: {len(paths)} images in "
                            f"{self.num_classes} classes")

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, index: int) -> str:
        return self._paths[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self._paths[index]
        try:
            data = epath.Path(path).read_bytes()
        except OSError as e:
            raise BadImageError(path, f"{type(e).__name__}: {e}") from e
        return {"image": decode_image_bytes(data, path), "label": int(self._labels[index])}


def _real_folder(folder: epath.Path) -> str:
    """The key of a folder in the visited set: its real path locally (symlinks resolved);
    object stores have no symlinks, so there the path itself."""
    if "://" in str(folder):
        return str(folder)
    return os.path.realpath(folder)


def _list_folder(folder: epath.Path) -> tuple[list[str], list[str]]:
    """(subfolder names, other names) in `folder`, symlinks to folders counted as folders.

    Local folders use os.scandir, whose entries know their type without a stat per file:
    ImageNet's 1.28M files list in seconds (epath objects cost ~25 us per entry, and a stat
    each on top). gs:// etc. go through epath; a name with an image extension is taken to be
    a file there without asking (one listing call per folder instead of one call per file).
    """
    if "://" not in str(folder):
        with os.scandir(folder) as it:
            entries = [(e.name, e.is_dir()) for e in it]
    else:
        entries = [(e.name, not e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_dir())
                   for e in folder.iterdir()]
    return ([n for n, is_dir in entries if is_dir], [n for n, is_dir in entries if not is_dir])


def _find_images(folder: epath.Path, recursive: bool = True,
                 visited: set[str] | None = None) -> list[str]:
    """Sorted paths (str) of the image files under `folder` (hidden names skipped).

    Folders are walked top-down in sorted order, following symlinks, but each real folder is
    entered once (`visited`, resolved paths, updated in place): a link back to an ancestor
    lists nothing twice, and several loops cannot make the walk explode. A folder reached
    through two paths is listed under the first one in that order. Unreadable folders are
    skipped with a warning.
    """
    found, visited = [], set() if visited is None else visited
    stack = [folder]
    while stack:
        current = stack.pop()
        key = _real_folder(current)
        if key in visited:
            continue
        visited.add(key)
        try:
            subfolders, files = _list_folder(current)
        except OSError as e:
            logging.warning("Skipping folder %s: %s", current, e)
            continue
        prefix = str(current)
        found += [os.path.join(prefix, name) for name in files
                  if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)]
        if recursive:
            # Reverse-sorted onto the stack, so pop() visits them in sorted order.
            stack += [current / name for name in sorted(subfolders, reverse=True)
                      if not name.startswith(".")]
    return sorted(found)


def _tfds_help(name: str, data_dir: str) -> str:
    where = data_dir or "the TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    msg = (f"Prepare it once, on a machine with tensorflow and tensorflow-datasets installed: "
           f"`tfds build {name} --data_dir={data_dir or '<DIR>'} --file_format=array_record` "
           "(random access needs array_record files, not tfrecord), then pass "
           "--config.tokenizer.data.tfds_data_dir=<DIR>. Looked in: " + where + ".")
    if name.startswith("imagenet2012"):
        msg = ("ImageNet cannot be downloaded automatically: download ILSVRC2012_img_train.tar "
               "and ILSVRC2012_img_val.tar from https://image-net.org into "
               "<DIR>/downloads/manual/. " + msg)
    return msg


class TfdsSource:
    """A prepared TFDS dataset read with `tfds.data_source` (array_record, random access).

    Works without TensorFlow: tfds decodes images with its numpy/PIL path. Never downloads
    (download=False); a dataset that is not prepared raises DataUnavailableError.
    """

    def __init__(self, name: str, split: str, data_dir: str = ""):
        # Imported here: tfds is slow to import and only this source needs it.
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

        self.name, self.split = name, split
        try:
            self._source = tfds.data_source(
                name, split=split, data_dir=data_dir or None, download=False)
        except Exception as e:  # pylint: disable=broad-except
            # tfds signals "not prepared" in several ways (DatasetNotFoundError, AssertionError,
            # NotImplementedError for tfrecord-only data): report them all as one clear error.
            raise DataUnavailableError(
                f"TFDS dataset {name!r} (split {split!r}) is not available for reading: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
                + _tfds_help(name, data_dir)) from e
        if len(self._source) == 0:
            raise DataUnavailableError(
                f"TFDS dataset {name!r} split {split!r} is empty. " + _tfds_help(name, data_dir))
        self.num_classes = _tfds_num_classes(self._source)
        self.description = f"TFDS {name}[{split}]: {len(self._source)} records"

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        where = f"tfds {self.name}[{self.split}] record {index}"
        try:
            record = self._source[index]
            image = array_to_rgb(record["image"])
        except Exception as e:  # pylint: disable=broad-except
            raise BadImageError(where, f"{type(e).__name__}: {e}") from e
        return {"image": image, "label": int(record["label"])}


def _tfds_num_classes(source: Any) -> int | None:
    """The label feature's class count, if the dataset declares one."""
    try:
        return int(source.dataset_info.features["label"].num_classes)
    except Exception:  # pylint: disable=broad-except
        return None


def _split_folder(path: str, split: str) -> str:
    """`path/split` when that folder exists (root/train, root/validation), else `path`."""
    candidate = epath.Path(os.path.expanduser(str(path))) / split
    return str(candidate) if split and candidate.is_dir() else path


def make_source(data_config: Any, split: str):
    """The random-access source of one split (a grain MapDataset source).

    Args:
      data_config: `config.tokenizer.data` (see the package docstring for its fields).
      split: a split name, usually data_config.train_split or data_config.eval_split.
        imagefolder: `path/<split>` if that folder exists, else `path` itself for every split.
        digits: 'train' is the training split, any other name the fixed held-out split.

    Returns:
      A source with `len()`, `num_classes`, `description`, and `source[i]` ->
      {'image': uint8 (H, W, 3) RGB, 'label': int}; `source[i]` raises BadImageError for a
      record that cannot be decoded.

    Raises:
      DataUnavailableError (a ValueError): missing/empty folder, TFDS data not prepared.
    """
    kind = data_config.source
    if kind == "digits":
        # Any split name other than the training one is the fixed held-out split, so configs
        # written for ImageNet ('validation') work unchanged.
        which = "train" if split in ("train", data_config.train_split) else "eval"
        return digits_lib.DigitsSource(which, data_config.image_size)
    if kind == "imagefolder":
        return ImageFolderSource(_split_folder(data_config.path, split))
    if kind == "tfds":
        return TfdsSource(data_config.tfds_name, split, data_config.tfds_data_dir)
    raise ValueError(f"config.tokenizer.data.source={kind!r}; use one of {SOURCES}.")


def check_data_available(data_config: Any) -> str:
    """Raises DataUnavailableError at once if the training data cannot be read.

    The CLI calls this before building models, so a run on a machine without the data (e.g.
    configs/xl.py without prepared ImageNet) stops in seconds with instructions.

    Returns:
      A one-line description of the training split, for the log.
    """
    source = make_source(data_config, data_config.train_split)
    logging.info("Data: %s", source.description)
    return source.description
