"""Sampling a trained workdir: the options, the schedule, batched generation, PNG grid and GIF.

Everything that samples a trained generator (the pipeline's sample stage, `--mode=sample`, the
quality evaluation and the notebook's `Generator`) goes through `generate` with a
`SampleOptions` and a schedule from `sampling_schedule`, so the same workdir, seed and options
give the same images from every entry point.

The schedule is the one the generator was trained with (the workdir's record), changed only by
`config.sample`: `schedule` (another kind), `grid` (another canvas: the trained kind rebuilt on
an (H', W') token grid, `schedule_on_grid`), `num_steps` (a sub-ladder, which RDS trains for),
`correction_band`.

Other canvases: the transformer's parameters do not depend on the grid (no absolute position
embedding; 2D RoPE rotates by each token's (h, w)), so the same params sample an (H', W') grid
with the model config's `grid` and `block_size` changed (`model_config_on_grid`). Positions are
absolute on the new grid, and because RoPE scores depend only on the offset between two tokens
(and the class token's query and key are zero), where the canvas sits on the grid changes
nothing; what is new to the model are offsets longer than the trained grid has.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from radar_jax import config_defaults as cd
from radar_jax import config_io
from radar_jax import reporting
from radar_jax import sampling
from radar_jax import sampling_plan
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
    re-predict the known area at every step; max_groups >= 1: at most this many compiled scan
    bodies (`sampling.sample`).
    """
    cfg_scale: float = 1.0
    cfg_schedule: str = "constant"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    correct: bool = True
    max_groups: int = sampling_plan.DEFAULT_MAX_GROUPS

    def __post_init__(self):
        checks = (
            ("cfg_scale", self.cfg_scale >= 0, "use a scale >= 0 (1 = no guidance)"),
            ("cfg_schedule", self.cfg_schedule in sampling.CFG_SCHEDULES,
             f"use one of {', '.join(sampling.CFG_SCHEDULES)}"),
            ("temperature", self.temperature > 0, "use a temperature > 0 (top_k=1 is greedy)"),
            ("top_k", int(self.top_k) == self.top_k and self.top_k >= 0,
             "use an int >= 0 (0 = off)"),
            ("top_p", 0 < self.top_p <= 1, "use 0 < top_p <= 1 (1 = off)"),
            ("max_groups", int(self.max_groups) == self.max_groups and self.max_groups >= 1,
             "use an int >= 1 (fewer compiles faster, pads more)"),
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


def _crop_sizes_of(schedule: schedules.RingSchedule) -> list[int]:
    """The crop size P_k of every canvas of a 'crops' schedule: the long side of C_k's
    bounding box (crops are clipped to the grid only along its short axis)."""
    sizes = []
    for k in range(schedule.num_steps):
        rows, cols = np.nonzero(schedule.canvas(k))
        sizes.append(int(max(np.ptp(rows), np.ptp(cols))) + 1)
    return sizes


def schedule_on_grid(trained: schedules.RingSchedule, grid) -> schedules.RingSchedule:
    """The trained schedule's kind rebuilt on another (H', W') token grid.

    'euclidean' and 'raster' are defined on any grid. 'crops' keeps the trained crop sizes
    below the new long side N' = max(H', W') and continues with the trained ladder's last
    increment up to N' (e.g. 1..8 on 8x8 -> 1..8, 9, ..., 12 on 8x12). A 'custom' ring map
    has no rule to grow by, and a trained sub-ladder is rebuilt as its kind's full ladder
    (`config.sample.num_steps` still picks a sub-ladder of it).

    Args:
      trained: the schedule the generator was trained with.
      grid: (H', W') ints, or () / None for the trained grid.
    Returns:
      A RingSchedule on `grid` (`trained` itself when the grid is the trained one).
    Raises:
      ValueError: a 'custom' schedule on another grid, or a bad grid.
    """
    if not grid or tuple(int(g) for g in grid) == trained.grid:
        return trained
    grid = tuple(int(g) for g in grid)
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"config.sample.grid={grid}: give the token grid as (H, W), e.g. "
                         "'(8,12)', or () for the trained grid.")
    if trained.kind == "custom":
        raise ValueError(f"config.sample.grid={grid}: the generator was trained with a 'custom' "
                         f"ring map on {trained.grid}, which cannot be rebuilt on another grid; "
                         "sample on the trained grid (config.sample.grid=()) or pass "
                         "config.sample.schedule='euclidean'.")
    if trained.base_steps is not None:
        logging.warning("The generator was trained on a %d-step sub-ladder; on the %s grid it "
                        "samples the full %s ladder (set config.sample.num_steps for fewer "
                        "steps).", trained.num_steps, grid, trained.kind)
    if trained.kind != "crops":
        return schedules.make_schedule(trained.kind, grid)
    side = max(grid)
    sizes = [p for p in _crop_sizes_of(trained) if p < side]
    step = max(1, sizes[-1] - sizes[-2]) if len(sizes) > 1 else 1
    while sizes and sizes[-1] + step < side:
        sizes.append(sizes[-1] + step)
    return schedules.make_schedule("crops", grid, sizes=sizes + [side])


def model_config_on_grid(model_config, grid) -> ml_collections.ConfigDict:
    """A copy of the transformer config on another (H', W') token grid: `grid` and
    `block_size` = H' * W' changed; the params fit it unchanged (see the module docstring)."""
    config = ml_collections.ConfigDict(dict(model_config))
    grid = tuple(int(g) for g in grid)
    if tuple(config.grid) != grid:
        config.grid = grid
        config.block_size = grid[0] * grid[1]
    return config


def sampling_schedule(trained: schedules.RingSchedule, trained_band: int | None, *,
                      kind: str = "", num_steps: int = 0, band: int = -1, grid=()
                      ) -> tuple[schedules.RingSchedule, int | None]:
    """(schedule, correction band) to sample with: the trained ones, or `config.sample`'s
    changes of them: another `grid` ((H', W'), () = trained; see `schedule_on_grid`), another
    `kind` on that grid, a `num_steps` sub-ladder, a `band` (-1 = as trained, 0 = all,
    b >= 1)."""
    schedule = schedule_on_grid(trained, grid)
    if kind and kind != schedule.kind:
        schedule = schedules.make_schedule(kind, schedule.grid)
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
             batch_size: int, correction_band: int | None = None, canvases: bool = False,
             fixed_codes=None, fixed_mask=None):
    """Codes (N, H, W) int32 for `labels` (N,), in batches of `batch_size`.

    Batch i draws from fold_in(key(seed), i): the same seed gives the same images whichever
    entry point calls this. With `canvases`, also returns the first batch's canvas after
    every step, (K, B, H, W) int32 with -1 where nothing is generated yet. `fixed_codes`
    (N, H, W) int and `fixed_mask` (N, H, W) bool (both or neither) are `sampling.sample`'s,
    per image (editing). `model_config` is put on the schedule's grid when it differs.

    Every batch runs the sampler that also returns the canvases (K x B x H x W int32, small
    beside the KV cache; only the first batch's are kept): one compiled program serves the
    GIF's batch, the other batches and every other call with the same options, where a
    canvas-less variant would be a second compile of every scan body.
    """
    if tuple(model_config.grid) != schedule.grid:
        model_config = model_config_on_grid(model_config, schedule.grid)
    out, frames = [], None
    for i in range(0, len(labels), batch_size):
        rng = jax.random.fold_in(jax.random.key(seed), i)
        fixed = {} if fixed_mask is None else dict(
            fixed_codes=np.asarray(fixed_codes)[i:i + batch_size],
            fixed_mask=np.asarray(fixed_mask)[i:i + batch_size])
        result, batch_frames = sampling.sample(
            params, model_config, schedule, jnp.asarray(labels[i:i + batch_size]), rng,
            return_canvases=True, correction_band=correction_band, **fixed,
            **dataclasses.asdict(options))
        if canvases and i == 0:
            frames = np.asarray(batch_frames)
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
    codes.npz; on another `config.sample.grid` (H', W'): samples_HxW.png, growth_HxW.gif,
    codes_HxW.npz). Returns what it wrote."""
    s = config.sample
    options = SampleOptions.from_config(s)
    labels = labels_of(config)
    trained, trained_band = wd.trained_schedule()
    try:
        schedule, band = sampling_schedule(trained, trained_band, kind=s.schedule,
                                           num_steps=s.num_steps, band=s.correction_band,
                                           grid=tuple(s.get("grid", ())))
    except ValueError as e:
        raise config_io.ConfigError(str(e)) from None
    # Another canvas gets its own file names: the trained grid's samples stay.
    suffix = "" if schedule.grid == trained.grid else "_{}x{}".format(*schedule.grid)
    params = wd.params(workdir_lib.GENERATOR)
    t0 = time.perf_counter()
    codes, frames = generate(params, config.model, schedule, labels, s.seed, options,
                             batch_size=s.batch_size, correction_band=band, canvases=True)
    seconds = time.perf_counter() - t0
    decode = make_decoder(config.tokenizer.model, wd.decoder_params())  # TPT when run
    images = decode(codes)
    out = wd.stage(workdir_lib.SAMPLES)
    scale = max(1, 128 // images.shape[1])
    written = {}
    if wd.is_primary:
        grid = reporting.image_grid(reporting.to_uint8(images), ncol=s.num_per_class)
        written["png"] = reporting.save_png(out / f"samples{suffix}.png", grid, scale=scale)
        # The GIF follows one image per class (the first of each row) as its rings grow.
        first = np.arange(0, min(len(labels), s.batch_size), s.num_per_class)
        written["gif"] = reporting.save_gif(out / f"growth{suffix}.gif",
                                            growth_frames(decode, frames[:, first]), scale=scale)
        reporting.save_npz(out / f"codes{suffix}.npz", codes=codes, labels=labels)
    logging.info("Sampled %d images with %s (%d steps, band %s) in %.1fs into %s", len(labels),
                 schedule.kind, schedule.num_steps, band or "all", seconds, out)
    return dict(written, seconds=seconds, steps=schedule.num_steps)
