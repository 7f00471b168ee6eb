"""The pipeline's last stages: write samples (PNG grid, growth GIF) and measure their quality.

`write_samples` samples `config.sample` from a trained workdir: samples.png (one row per class
label), growth.gif (the canvas after every ring, for one image per class) and codes.npz.
`evaluate` measures sample quality. On the digits: the accuracy of a digit classifier fitted on
the real 8x8 training digits, applied to samples resized to 8x8, against the intended class, and
the Frechet distance between samples and the held-out real digits in that classifier's feature
space; for the trained schedule, for the sub-ladders RDS trained it for, and with correction on
and off. Other datasets need Inception weights for FID, which radar_jax does not download.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from radar_jax import checkpoint as ckpt_lib
from radar_jax import data as data_lib
from radar_jax import evaluation
from radar_jax import pipeline
from radar_jax import reporting
from radar_jax import sampling
from radar_jax import schedules
from radar_jax import train as train_lib

# LlamaGen's demo classes, used when a dataset has too many classes to show them all.
_SHOWCASE_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)


def load_generator(config, workdir):
    """(model_config, params, trained schedule) of a finished generator stage."""
    path = os.path.join(workdir, "generator", "params")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"No generator params at {path}: run the generator stage first "
                                "(--mode=train, or --mode=all).")
    # Device arrays once here: the sampler would copy host (numpy) params at every call.
    params = jax.device_put(ckpt_lib.load_params(path))
    return config.model, params, train_lib.schedule_from_config(config)


def sampling_schedule(config, trained: schedules.RingSchedule, num_steps: int = 0,
                      kind: str = ""):
    """The schedule to sample with: the trained one, another kind, or a sub-ladder of it."""
    schedule = trained
    if kind and kind != trained.kind:
        override = config.copy_and_resolve_references()
        override.schedule.kind = kind
        schedule = train_lib.schedule_from_config(override)
    if num_steps and not schedule.is_next_token and num_steps != schedule.num_steps:
        schedule = schedules.sub_ladder(schedule, num_steps)
    return schedule


def _labels(config) -> np.ndarray:
    s, n = config.sample, config.model.num_classes
    classes = tuple(s.labels) or (tuple(range(n)) if n <= 16 else _SHOWCASE_CLASSES)
    bad = [c for c in classes if not 0 <= c < n]
    if bad:
        raise ValueError(f"config.sample.labels has class ids {bad} outside [0, {n}).")
    return np.repeat(np.asarray(classes, np.int32), s.num_per_class)


def generate(config, params, schedule, labels, seed, *, correct=True, canvases=False):
    """Codes (N, H, W) for `labels`, in batches of config.sample.batch_size."""
    s = config.sample
    out, frames = [], None
    for i in range(0, len(labels), s.batch_size):
        rng = jax.random.fold_in(jax.random.key(seed), i)
        result = sampling.sample(
            params, config.model, schedule, jnp.asarray(labels[i:i + s.batch_size]), rng,
            cfg_scale=s.cfg_scale, cfg_schedule=s.cfg_schedule, temperature=s.temperature,
            top_k=s.top_k, top_p=s.top_p, correct=correct,
            return_canvases=canvases and i == 0)
        if canvases and i == 0:
            result, frames = result
            frames = np.asarray(frames)
        out.append(np.asarray(result))
    codes = np.concatenate(out)
    return (codes, frames) if canvases else codes


def _decoder(config, workdir):
    vq_config, vq_workdir = pipeline.tokenizer_stage(config, workdir)
    model, params = pipeline.load_tokenizer(vq_config, vq_workdir)
    decode = jax.jit(lambda p, c: model.apply({"params": p}, c, method="decode_codes"))

    def run(codes):
        images = [np.asarray(decode(params, jnp.asarray(codes[i:i + 256])))
                  for i in range(0, len(codes), 256)]
        return np.clip(np.concatenate(images), -1.0, 1.0)
    return run


def _growth_frames(decode, frames_KBHW, image_size):
    """Decoded canvases, with not-yet-generated token cells greyed out: list of uint8 grids."""
    k, b, h, w = frames_KBHW.shape
    images = decode(np.maximum(frames_KBHW, 0).reshape(k * b, h, w))
    images = images.reshape(k, b, image_size, image_size, 3)
    cell = image_size // h
    empty = np.repeat(np.repeat(frames_KBHW < 0, cell, axis=2), cell, axis=3)
    images = np.where(empty[..., None], 0.0, images)
    return [reporting.image_grid(reporting.to_uint8(f), ncol=min(b, 10)) for f in images]


def write_samples(config, workdir: str, out: str) -> dict:
    """Samples config.sample from the trained workdir into `out`; returns what it wrote."""
    s = config.sample
    model_config, params, trained = load_generator(config, workdir)
    schedule = sampling_schedule(config, trained, s.num_steps, s.schedule)
    labels = _labels(config)
    t0 = time.perf_counter()
    codes, frames = generate(config, params, schedule, labels, s.seed, correct=s.correct,
                             canvases=True)
    seconds = time.perf_counter() - t0
    decode = _decoder(config, workdir)
    images = decode(codes)
    os.makedirs(out, exist_ok=True)
    size = images.shape[1]
    grid = reporting.image_grid(reporting.to_uint8(images), ncol=s.num_per_class)
    scale = max(1, 128 // size)
    png = reporting.save_png(os.path.join(out, "samples.png"), grid, scale=scale)
    # The GIF follows one image per class (the first of each row) as its rings grow.
    first = np.arange(0, min(len(labels), s.batch_size), s.num_per_class)
    gif = reporting.save_gif(os.path.join(out, "growth.gif"),
                             _growth_frames(decode, frames[:, first], size), scale=scale)
    np.savez(os.path.join(out, "codes.npz"), codes=codes, labels=labels)
    logging.info("Sampled %d images with %s (%d steps) in %.1fs: %s, %s", len(labels),
                 schedule.kind, schedule.num_steps, seconds, png, gif)
    return dict(png=png, gif=gif, seconds=seconds, steps=schedule.num_steps)


def evaluation_cases(config, trained):
    """(name, schedule, correct) rows: the trained ladder, RDS sub-ladders, no correction."""
    cases = [(trained.kind, trained, True)]
    if trained.is_next_token:
        return cases
    cases.append((trained.kind, trained, False))
    if config.train.rds:
        for n in range(trained.num_steps - 1, 2, -1):
            cases.append((trained.kind, schedules.sub_ladder(trained, n), True))
    return cases


def evaluate(config, workdir: str, out: str) -> list[dict] | None:
    """Quality table (digits only); writes out/metrics.json and returns its rows."""
    vq_config, _ = pipeline.tokenizer_stage(config, workdir)
    if vq_config.data.source != "digits":
        logging.info("Sample quality metrics need the digits dataset (FID on ImageNet needs "
                     "Inception weights, which radar_jax does not download): skipping.")
        return None
    _, params, trained = load_generator(config, workdir)
    decode = _decoder(config, workdir)
    classifier = evaluation.DigitClassifier()
    reference, reference_labels = data_lib.load_digits_split("eval")
    labels = np.repeat(np.arange(config.model.num_classes, dtype=np.int32),
                       config.sample.eval_per_class)
    rows = []
    for name, schedule, correct in evaluation_cases(config, trained):
        t0 = time.perf_counter()
        codes = generate(config, params, schedule, labels, config.sample.seed + 1,
                         correct=correct)
        seconds = time.perf_counter() - t0
        digits = data_lib.images_to_digits(decode(codes))
        quality = evaluation.digits_quality(digits, labels, reference, classifier)
        rows.append(dict(schedule=name, steps=schedule.num_steps, correct=correct,
                         accuracy=float(quality["accuracy"]), fd=float(quality["fd"]),
                         samples=len(labels), sample_seconds=round(seconds, 2)))
        logging.info("Quality %s", rows[-1])
    os.makedirs(out, exist_ok=True)
    real = evaluation.digits_quality(reference, reference_labels,
                                     reference, classifier)
    result = dict(rows=rows, real_heldout_accuracy=float(real["accuracy"]),
                  cfg_scale=config.sample.cfg_scale, temperature=config.sample.temperature)
    tmp = os.path.join(out, "metrics.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, os.path.join(out, "metrics.json"))
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table of evaluate()'s rows."""
    lines = ["| schedule | steps | correction | accuracy | Frechet distance |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['schedule']} | {r['steps']} | {'on' if r['correct'] else 'off'} | "
                     f"{r['accuracy']:.3f} | {r['fd']:.3f} |")
    return "\n".join(lines)


class Generator:
    """A trained workdir, ready to sample from Python (the Colab notebook uses this).

    gen = Generator.from_workdir("configs/demo.py", "workdirs/demo")
    images = gen.sample([3, 5, 8], num_steps=4, cfg_scale=2.0)       # (3, S, S, 3) in [-1, 1]
    """

    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, workdir
        self.model_config, self.params, self.schedule = load_generator(config, workdir)
        self.decode = _decoder(config, workdir)

    @classmethod
    def from_workdir(cls, config_path: str, workdir: str, **overrides):
        return cls(pipeline.load_config(config_path, **overrides), workdir)

    def sample(self, labels, *, num_steps: int = 0, schedule: str = "", seed: int = 0,
               return_canvases: bool = False, **sampler_kw):
        """Images (N, S, S, 3) in [-1, 1] for class `labels`; sampler_kw go to sampling.sample
        (cfg_scale, cfg_schedule, temperature, top_k, top_p, correct, fixed_codes, ...)."""
        schedule = sampling_schedule(self.config, self.schedule, num_steps, schedule)
        out = sampling.sample(self.params, self.model_config, schedule,
                              jnp.asarray(labels, jnp.int32), jax.random.key(seed),
                              return_canvases=return_canvases, **sampler_kw)
        if not return_canvases:
            return self.decode(np.asarray(out))
        codes, canvases = out
        size = self.config.tokenizer.data.image_size
        return self.decode(np.asarray(codes)), _growth_frames(self.decode, np.asarray(canvases),
                                                              size)
