"""Sampling a trained workdir: the options, the schedule, batched generation, PNG grid and GIF.

Everything that samples a trained generator (the pipeline's sample stage, `--mode=sample`, the
quality evaluation and the notebook's `Generator`) goes through `generate` with a
`SampleOptions` and a schedule from `sampling_schedule`, so the same workdir, seed and options
give the same images from every entry point.

The schedule is the one the generator was trained with (the workdir's record), changed only by
`config.sample`: `schedule` (another kind), `num_steps` (a sub-ladder, which RDS trains for),
`correction_band`.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from radar_jax import config_defaults as cd
from radar_jax import reporting
from radar_jax import sampling
from radar_jax import schedules
from radar_jax import workdir as workdir_lib
from radar_jax.models import vq as vq_lib

# LlamaGen's demo classes, used when a dataset has too many classes to show them all.
_SHOWCASE_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """The sampler's options, validated once (from `config.sample`, or given in Python).

    cfg_scale: classifier-free guidance scale (1 = off); cfg_schedule: 'constant' | 'linear';
    temperature > 0; top_k >= 0 (0 = off, 1 = greedy); 0 < top_p <= 1 (1 = off); correct:
    re-predict the known area at every step.
    """
    cfg_scale: float = 1.0
    cfg_schedule: str = "constant"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    correct: bool = True

    def __post_init__(self):
        checks = (
            ("cfg_scale", self.cfg_scale >= 0, "use a scale >= 0 (1 = no guidance)"),
            ("cfg_schedule", self.cfg_schedule in sampling.CFG_SCHEDULES,
             f"use one of {', '.join(sampling.CFG_SCHEDULES)}"),
            ("temperature", self.temperature > 0, "use a temperature > 0 (top_k=1 is greedy)"),
            ("top_k", int(self.top_k) == self.top_k and self.top_k >= 0,
             "use an int >= 0 (0 = off)"),
            ("top_p", 0 < self.top_p <= 1, "use 0 < top_p <= 1 (1 = off)"),
        )
        for name, ok, fix in checks:
            if not ok:
                raise ValueError(f"config.sample.{name}={getattr(self, name)!r}: {fix}.")

    @classmethod
    def from_config(cls, s, **overrides) -> SampleOptions:
        """The options of a `sample` config section, with keyword overrides."""
        fields = {f.name: s[f.name] for f in dataclasses.fields(cls) if f.name in s}
        fields.update(overrides)
        return cls(**fields)

    def replace(self, **changes) -> SampleOptions:
        return dataclasses.replace(self, **changes)


def sampling_schedule(trained: schedules.RingSchedule, trained_band: int | None, *,
                      kind: str = "", num_steps: int = 0, band: int = -1
                      ) -> tuple[schedules.RingSchedule, int | None]:
    """(schedule, correction band) to sample with: the trained ones, or `config.sample`'s
    changes of them: another `kind` on the same grid, a `num_steps` sub-ladder, a `band`
    (-1 = as trained, 0 = all, b >= 1)."""
    schedule = trained
    if kind and kind != trained.kind:
        schedule = schedules.make_schedule(kind, trained.grid)
    if num_steps and not schedule.is_next_token and num_steps != schedule.num_steps:
        schedule = schedules.sub_ladder(schedule, num_steps)
    if band == -1:
        band = trained_band
    else:
        band = cd.correction_band(band)
        if band != trained_band:
            logging.warning("Sampling with correction band %s; the generator was trained with "
                            "%s.", band or "all", trained_band or "all")
    return schedule, band


def labels_of(config) -> np.ndarray:
    """(N,) int32: `config.sample.labels` (or every class, or LlamaGen's showcase classes),
    each repeated num_per_class times."""
    s, n = config.sample, config.model.num_classes
    classes = tuple(s.labels) or (tuple(range(n)) if n <= 16 else _SHOWCASE_CLASSES)
    bad = [c for c in classes if not 0 <= c < n]
    if bad:
        raise ValueError(f"config.sample.labels has class ids {bad} outside [0, {n}); use ids "
                         f"0..{n - 1}.")
    return np.repeat(np.asarray(classes, np.int32), s.num_per_class)


def generate(params, model_config, schedule, labels, seed: int, options: SampleOptions, *,
             batch_size: int, correction_band: int | None = None, canvases: bool = False):
    """Codes (N, H, W) int32 for `labels` (N,), in batches of `batch_size`.

    Batch i draws from fold_in(key(seed), i): the same seed gives the same images whichever
    entry point calls this. With `canvases`, also returns the first batch's canvas after
    every step, (K, B, H, W) int32 with -1 where nothing is generated yet.
    """
    out, frames = [], None
    for i in range(0, len(labels), batch_size):
        rng = jax.random.fold_in(jax.random.key(seed), i)
        first = canvases and i == 0
        result = sampling.sample(params, model_config, schedule,
                                 jnp.asarray(labels[i:i + batch_size]), rng,
                                 return_canvases=first, correction_band=correction_band,
                                 **dataclasses.asdict(options))
        if first:
            result, frames = result
            frames = np.asarray(frames)
        out.append(np.asarray(result))
    codes = np.concatenate(out)
    return (codes, frames) if canvases else codes


def make_decoder(vq_model_config, params):
    """codes (N, h, w) -> images (N, S, S', 3) float32 in [-1, 1], in jitted batches of 256."""
    model = vq_lib.VQModel(vq_model_config)
    decode = jax.jit(lambda p, c: model.apply({"params": p}, c, method="decode_codes"))

    def run(codes):
        images = [np.asarray(decode(params, jnp.asarray(codes[i:i + 256])))
                  for i in range(0, len(codes), 256)]
        return np.clip(np.concatenate(images), -1.0, 1.0)
    return run


def growth_frames(decode, frames_KBHW) -> list[np.ndarray]:
    """Decoded canvases, not-yet-generated token cells blacked out: one uint8 grid per step.
    Works on any (H, W) token grid: each token covers an (S/H, S'/W) pixel cell."""
    k, b, h, w = frames_KBHW.shape
    images = decode(np.maximum(frames_KBHW, 0).reshape(k * b, h, w))
    images = images.reshape((k, b) + images.shape[1:])
    cell_h, cell_w = images.shape[2] // h, images.shape[3] // w
    empty = np.repeat(np.repeat(frames_KBHW < 0, cell_h, axis=2), cell_w, axis=3)
    images = np.where(empty[..., None], 0.0, images)
    return [reporting.image_grid(reporting.to_uint8(f), ncol=min(b, 10)) for f in images]


def write_samples(config, wd: workdir_lib.Workdir) -> dict:
    """The sample stage: samples `config.sample` from the trained workdir into its samples
    folder (samples.png: a row per class; growth.gif: one image per class as its rings grow;
    codes.npz). Returns what it wrote."""
    s = config.sample
    options = SampleOptions.from_config(s)
    labels = labels_of(config)
    trained, trained_band = wd.trained_schedule()
    schedule, band = sampling_schedule(trained, trained_band, kind=s.schedule,
                                       num_steps=s.num_steps, band=s.correction_band)
    params = wd.params(workdir_lib.GENERATOR)
    t0 = time.perf_counter()
    codes, frames = generate(params, config.model, schedule, labels, s.seed, options,
                             batch_size=s.batch_size, correction_band=band, canvases=True)
    seconds = time.perf_counter() - t0
    decode = make_decoder(config.tokenizer.model, wd.params(workdir_lib.TOKENIZER))
    images = decode(codes)
    out = wd.stage(workdir_lib.SAMPLES)
    scale = max(1, 128 // images.shape[1])
    written = {}
    if wd.is_primary:
        grid = reporting.image_grid(reporting.to_uint8(images), ncol=s.num_per_class)
        written["png"] = reporting.save_png(out / "samples.png", grid, scale=scale)
        # The GIF follows one image per class (the first of each row) as its rings grow.
        first = np.arange(0, min(len(labels), s.batch_size), s.num_per_class)
        written["gif"] = reporting.save_gif(out / "growth.gif",
                                            growth_frames(decode, frames[:, first]), scale=scale)
        reporting.save_npz(out / "codes.npz", codes=codes, labels=labels)
    logging.info("Sampled %d images with %s (%d steps, band %s) in %.1fs into %s", len(labels),
                 schedule.kind, schedule.num_steps, band or "all", seconds, out)
    return dict(written, seconds=seconds, steps=schedule.num_steps)
