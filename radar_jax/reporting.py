"""Metrics, images and progress for training runs.

`create_writer(workdir)` gives a writer with clu's MetricWriter methods (write_scalars,
write_images, write_texts, flush, close). It always writes JSON lines (workdir/metrics.jsonl)
and PNGs (workdir/images/), which need nothing beyond numpy and pillow. When the `tensorboard`
extra is installed (TensorFlow + TensorBoard, which `clu.metric_writers` imports), it also
writes TensorBoard summaries through clu. `Progress` prints steps/s and ETA, with a tqdm bar on
interactive terminals.
"""

from __future__ import annotations

import io
import json
import logging
import sys
import time
from typing import Any, Mapping

import numpy as np
from PIL import Image

from radar_jax import fileio


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float images in [-1, 1] (..., H, W, C) -> uint8 in [0, 255]."""
    images = np.asarray(images, np.float32)
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, ncol: int, pad: int = 2) -> np.ndarray:
    """Tiles uint8 images (N, H, W, C) into one (rows*(H+pad)+pad, ncol*(W+pad)+pad, C) image."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    nrow = -(-n // ncol)
    grid = np.zeros((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), images.dtype)
    for i in range(n):
        r, col = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def _encoded(img: Image.Image, **save_kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, **save_kw)
    return buf.getvalue()


def save_png(path: fileio.PathLike, image_uint8: np.ndarray, scale: int = 1):
    """Writes an (H, W, 3) uint8 image, optionally upscaled by `scale` (nearest), atomically;
    returns its path. `path` may be local or gs://."""
    img = Image.fromarray(np.asarray(image_uint8))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return fileio.write_bytes(path, _encoded(img, format="PNG"))


def save_gif(path: fileio.PathLike, frames_uint8: list[np.ndarray], duration_ms: int = 400,
             scale: int = 1):
    """Writes frames (each (H, W, 3) uint8) as a looping animated GIF; the last frame lingers."""
    imgs = [Image.fromarray(np.asarray(f)) for f in frames_uint8]
    if scale > 1:
        imgs = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in imgs]
    durations = [duration_ms] * (len(imgs) - 1) + [duration_ms * 4]
    return fileio.write_bytes(path, _encoded(imgs[0], format="GIF", save_all=True,
                                             append_images=imgs[1:], duration=durations, loop=0))


def save_npz(path: fileio.PathLike, **arrays: np.ndarray):
    """Writes arrays as an .npz, atomically."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return fileio.write_bytes(path, buf.getvalue())


class JsonlWriter:
    """clu-style MetricWriter: scalars to metrics.jsonl, images to PNG files. No TensorFlow.

    A local file is appended to; cloud storage cannot append, so for a gs:// workdir the rows
    are kept and the whole file is rewritten (atomically) at each write: a few MB over a long
    run, and a reader never sees half a row.
    """

    def __init__(self, workdir: fileio.PathLike, filename: str = "metrics.jsonl"):
        self._workdir = fileio.path(workdir)
        self._workdir.mkdir(parents=True, exist_ok=True)
        self._path = self._workdir / filename
        self._local = not str(workdir).startswith(("gs://", "s3://"))
        if self._local:
            self._file = open(self._path, "a", encoding="utf-8")
        else:
            self._rows = self._path.read_text().splitlines() if self._path.exists() else []

    def _write(self, row: dict):
        line = json.dumps(row)
        if self._local:
            self._file.write(line + "\n")
            self._file.flush()
        else:
            self._rows.append(line)
            fileio.write_bytes(self._path, ("\n".join(self._rows) + "\n").encode("utf-8"))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        row = {"step": int(step)}
        row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
        self._write(row)

    def write_images(self, step: int, images: Mapping[str, np.ndarray]):
        for name, image in images.items():
            image = np.asarray(image)
            if image.ndim == 4:  # a batch: tile it
                image = image_grid(image, ncol=min(len(image), 8))
            save_png(self._workdir / "images" / f"{name}_{int(step):08d}.png", image)

    def write_texts(self, step: int, texts: Mapping[str, str]):
        for name, text in texts.items():
            self._write({"step": int(step), name: str(text)})

    def write_hparams(self, hparams: Mapping[str, Any]):
        self._write({"hparams": {k: str(v) for k, v in hparams.items()}})

    def flush(self):
        if self._local:
            self._file.flush()

    def close(self):
        if self._local:
            self._file.close()


class NullWriter:
    """The writer of every process but 0: metrics are global, so one process writes them."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class MultiWriter:
    """Forwards every call to several writers."""

    def __init__(self, writers):
        self._writers = list(writers)

    def __getattr__(self, name):
        def call(*args, **kwargs):
            for w in self._writers:
                getattr(w, name)(*args, **kwargs)
        return call


def create_writer(workdir: fileio.PathLike, tensorboard: bool = True):
    """JSON-lines + PNG writer, plus clu's TensorBoard writer when TensorFlow is installed; a
    writer that writes nothing on every process but 0 (each metric row is written once)."""
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_index() != 0:
        return NullWriter()
    writers = [JsonlWriter(workdir)]
    if tensorboard:
        try:
            from clu import metric_writers  # pylint: disable=g-import-not-at-top
        except ImportError:
            logging.info("TensorBoard summaries off: install radar_jax[tensorboard] for them; "
                         "metrics go to %s/metrics.jsonl.", workdir)
        else:
            writers.append(metric_writers.SummaryWriter(str(fileio.path(workdir) / "tensorboard")))
    return MultiWriter(writers)


def _fmt_seconds(s: float) -> str:
    s = int(max(s, 0))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


class Progress:
    """Steps/s and ETA for a loop of `total` steps starting at `start`.

    Logs one line every `every` steps (and at the end), and shows a tqdm bar when stderr is a
    terminal. `update(step, **metrics)` is cheap: call it every step. Only process 0 reports:
    on a pod every host runs the same loop, and one line per step is enough.
    """

    def __init__(self, name: str, total: int, start: int = 0, every: int = 50):
        import jax  # pylint: disable=g-import-not-at-top
        self.name, self.total, self.every = name, total, max(1, every)
        self._t0, self._s0 = time.perf_counter(), start
        self._bar = None
        self._quiet = jax.process_index() != 0
        if sys.stderr.isatty() and not self._quiet:
            from tqdm import tqdm  # pylint: disable=g-import-not-at-top
            self._bar = tqdm(total=total, initial=start, desc=name, dynamic_ncols=True)

    def rate(self, step: int) -> float:
        elapsed = time.perf_counter() - self._t0
        return (step - self._s0) / elapsed if elapsed > 0 else 0.0

    def update(self, step: int, **metrics):
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if metrics:
                self._bar.set_postfix({k: f"{float(v):.4g}" for k, v in metrics.items()},
                                      refresh=False)
        if (step % self.every == 0 or step == self.total) and not self._quiet:
            rate = self.rate(step)
            eta = (self.total - step) / rate if rate > 0 else float("inf")
            shown = " ".join(f"{k}={float(v):.4g}" for k, v in metrics.items())
            msg = (f"{self.name}: step {step}/{self.total} {shown} {rate:.2f} steps/s "
                   f"ETA {_fmt_seconds(eta) if np.isfinite(eta) else '?'}")
            if self._bar is not None:
                self._bar.write(msg)
            else:
                logging.info(msg)

    def close(self):
        if self._bar is not None:
            self._bar.close()
