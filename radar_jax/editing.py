"""Zero-shot editing on images: out-painting, in-painting and class editing (docs/method.md,
"Zero-shot uses"), with the one sampler (`sampling.sample`'s fixed_codes / fixed_mask) and a
schedule.

Every operation is the same four steps: encode the image with the tokenizer; build the (H, W)
mask of the tokens that stay; pick the schedule the sampler grows the canvas with; sample with
those tokens fixed (they hold their codes from the start and after every step, so the output
keeps every one of them exactly), then decode.

- `outpaint(gen, images, labels, grid=...)`: the image's tokens (or the part inside `keep`) are
  the inner canvas of a larger or other-aspect grid, center-aligned the way a crop is (rows
  c - (h-1)//2 .. c + h//2 around the grid center c = ((H-1)//2, (W-1)//2)); the rings continue
  outward. The schedule is the trained kind rebuilt on the new grid (`samples.schedule_on_grid`)
  and reordered by `region_first_schedule` so that the given block is exactly one canvas C_k:
  its first steps are the schedule's own rings cut to the block (teacher forcing with the real
  tokens, as in training), the later ones its rings outside the block. When the block already
  is a canvas (a 'crops' schedule, a whole image) the schedule is unchanged.
  RoPE positions are absolute on the new grid: block token (i, j) sits at (top + i, left + j).
  The model has no absolute position embedding and the class token's query and key are zero,
  so attention scores depend only on the offsets between tokens: where the block sits changes
  nothing (tests/test_editing.py checks that the logits of a shifted layout are equal); what is
  new to the model on a larger grid are offsets longer than the trained grid has.
- `inpaint(gen, images, region, labels, prefill=...)`: regenerates the tokens of `region` (a
  pixel box or a token mask), keeps the rest. prefill=False (default) samples with the
  trained schedule and the kept tokens fixed: the model sees a kept token only once the rings
  reach it (a hole at the center is drawn first with no context; correction then revises it
  as the context comes into the known area). prefill=True uses `context_first_schedule`: one kept
  token, then every other kept token, then the hole in layers from its border inward, so the
  whole kept region is the known area before any hole token is drawn. See docs/editing.md.
- `edit_class(gen, images, region, new_labels)`: in-painting of `region` (None = the whole
  image) under another class label.
- `pixel_box_to_token_mask(box, image_size, grid)`: pixel rectangles -> token masks.

Each returns an `EditResult` (decoded images, codes, and the mask of the tokens that were
given). `write_edit` is `--mode=edit`: a PNG with the input, the mask and the results.
"""

from __future__ import annotations

import dataclasses
import io
import logging

import numpy as np
from PIL import Image
from scipy import ndimage

from radar_jax import config_io
from radar_jax import fileio
from radar_jax import reporting
from radar_jax import schedules
from radar_jax import workdir as workdir_lib

OPS = ("outpaint", "inpaint", "class")


@dataclasses.dataclass(frozen=True)
class EditResult:
    """What an edit returns (N = number of inputs x num_samples, input-major).

    images: (N, S, S', 3) float32 in [-1, 1], the decoded results.
    codes: (N, H, W) int32 token maps.
    given: (H, W) bool, True at the tokens that were fixed (codes there equal given_codes).
    given_codes: (N, H, W) int32 fixed codes, -1 where the model generated.
    labels: (N,) int32 class of each result.
    schedule: the RingSchedule the canvas grew with.
    """
    images: np.ndarray
    codes: np.ndarray
    given: np.ndarray
    given_codes: np.ndarray
    labels: np.ndarray
    schedule: schedules.RingSchedule


# ----------------------------------------------------------------------------------------------
# Masks and schedules (numpy)
# ----------------------------------------------------------------------------------------------
def pixel_box_to_token_mask(box, image_size, grid) -> np.ndarray:
    """(H, W) bool: the tokens whose pixel cell overlaps a pixel rectangle.

    Args:
      box: (top, left, bottom, right) pixels, half-open (rows top..bottom-1), inside the image.
      image_size: S or (S, S') pixels of the image.
      grid: (H, W) token grid of the image; token (i, j) covers rows [i S/H, (i+1) S/H).
    """
    size = (int(image_size), int(image_size)) if np.isscalar(image_size) else tuple(
        int(s) for s in image_size)
    grid = tuple(int(g) for g in grid)
    if len(box) != 4:
        raise ValueError(f"box={tuple(box)}: give (top, left, bottom, right) in pixels")
    top, left, bottom, right = (int(v) for v in box)
    if not (0 <= top < bottom <= size[0] and 0 <= left < right <= size[1]):
        raise ValueError(f"box={tuple(box)} is not a non-empty rectangle inside the {size[0]}x"
                         f"{size[1]} image: use 0 <= top < bottom <= {size[0]} and 0 <= left < "
                         f"right <= {size[1]}")
    # Cell i spans [i S / H, (i + 1) S / H): it overlaps [top, bottom) iff
    # i S < bottom H and (i + 1) S > top H (integer arithmetic, no rounding).
    rows = np.arange(grid[0])
    cols = np.arange(grid[1])
    in_rows = (rows * size[0] < bottom * grid[0]) & ((rows + 1) * size[0] > top * grid[0])
    in_cols = (cols * size[1] < right * grid[1]) & ((cols + 1) * size[1] > left * grid[1])
    return in_rows[:, None] & in_cols[None, :]


def _token_mask(region, image_size, grid, name: str) -> np.ndarray:
    """A region given as a pixel box or an (H, W) bool token mask -> (H, W) bool."""
    arr = np.asarray(region)
    if arr.dtype == bool:
        if arr.shape != tuple(grid):
            raise ValueError(f"{name} mask has shape {arr.shape} but the image has a {grid} "
                             "token grid: pass an (H, W) bool mask or a pixel box")
        return arr.copy()
    return pixel_box_to_token_mask(arr.tolist(), image_size, grid)


def center_offset(block, grid) -> tuple[int, int]:
    """(top, left) of an (h, w) block center-aligned on an (H, W) grid as a crop is: rows
    c - (h-1)//2 .. c + h//2 around c = ((H-1)//2, (W-1)//2)."""
    (h, w), (big_h, big_w) = block, grid
    if h > big_h or w > big_w:
        raise ValueError(f"a {h}x{w}-token image does not fit in the {big_h}x{big_w} grid: "
                         "out-paint to a grid at least as large as the image")
    ch, cw = schedules.grid_center((big_h, big_w))
    return ch - (h - 1) // 2, cw - (w - 1) // 2


def region_first_schedule(schedule: schedules.RingSchedule, region) -> schedules.RingSchedule:
    """`schedule` reordered so that `region` (H, W) bool is one of its canvases.

    Steps 0..m-1 are the schedule's rings cut to the region (canvases C_k & R), steps m.. its
    rings outside the region (canvases R | C_k), each keeping the schedule's order. The
    region must hold the start token. If the region already is a canvas C_k, this returns the
    schedule itself. 'raster' is returned unchanged: next-token AR has no rings to reorder.
    """
    region = np.asarray(region, bool)
    if schedule.is_next_token:
        return schedule
    ring = schedule.ring_map
    if not region[schedule.start]:
        raise ValueError(f"the kept region does not contain the schedule's start token "
                         f"{schedule.start}: center the given tokens on the grid")
    inner = np.unique(ring[region])
    outer = np.unique(ring[~region])
    new = np.where(region, np.searchsorted(inner, ring),
                   inner.size + np.searchsorted(outer, ring))
    if np.array_equal(new, ring):
        return schedule
    return schedules.RingSchedule("custom", new)


def context_first_schedule(schedule: schedules.RingSchedule, keep) -> schedules.RingSchedule:
    """A schedule whose early steps are the kept region (in-painting with prefill).

    Step 0 is the kept token the schedule generates first, step 1 every other kept token, and
    then the hole in layers of Manhattan distance to the kept region (its border first). The
    kept region must be 4-connected (every canvas of a schedule is).
    """
    keep = np.asarray(keep, bool)
    pieces = ndimage.label(keep)[1]  # 4-connected components (the default cross structure)
    if pieces != 1:
        raise ValueError(f"the kept region has {pieces} separate pieces; prefill needs one "
                         "4-connected kept region: use prefill=False, or a region that does "
                         "not cut the image apart")
    ring = schedule.ring_map
    flat = np.where(keep, ring, ring.max() + 1).ravel()
    start = np.unravel_index(int(np.argmin(flat)), keep.shape)  # first kept token
    layers = ndimage.distance_transform_cdt(~keep, metric="taxicab")
    new = np.where(keep, 1, 1 + layers)
    new[start] = 0
    return schedules.RingSchedule("custom", np.unique(new, return_inverse=True)[1].reshape(
        keep.shape))


# ----------------------------------------------------------------------------------------------
# The operations
# ----------------------------------------------------------------------------------------------
def _batch(images, labels, num_samples: int):
    images = np.asarray(images, np.float32)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (S, S', 3) or (N, S, S', 3) RGB in [-1, 1], got shape "
                         f"{images.shape}")
    labels = np.broadcast_to(np.asarray(labels, np.int32).reshape(-1), (len(images),))
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples}: use 1 or more results per image")
    return images, np.repeat(labels, num_samples)


def _sample(gen, schedule, labels, given_codes, given, *, seed, options) -> EditResult:
    n = len(labels)
    fixed = {} if not given.any() else dict(
        fixed_codes=np.maximum(given_codes, 0),
        fixed_mask=np.broadcast_to(given, (n,) + given.shape).copy())
    codes = gen.sample_with(schedule, labels, seed=seed, **fixed, **options)
    return EditResult(gen.decode(codes), codes, given, given_codes, labels, schedule)


def outpaint(gen, images, labels, *, grid=None, keep=None, num_samples: int = 1,
             seed: int | None = None, **options) -> EditResult:
    """Out-paints images: their tokens are the inner canvas, the rings continue outward.

    Args:
      gen: a `radar_jax.generator.Generator`.
      images: (S, S', 3) or (N, S, S', 3) float in [-1, 1].
      labels: int or (N,) class of each image.
      grid: (H, W) token grid of the result (None = config.sample.grid, else the trained
        grid); at least the kept block's size.
      keep: None (every token of the image) or a pixel box / (h, w) token mask of the image
        whose bounding rectangle of tokens is kept.
      num_samples: results per image; seed and options (cfg_scale, temperature, top_k, top_p,
        correct) as `Generator.sample_with`.
    Returns:
      EditResult on the (H, W) grid; `given` marks the placed block.
    """
    images, labels_n = _batch(images, labels, num_samples)
    codes = gen.encode(images)
    h, w = codes.shape[1:]
    if keep is not None:
        rows, cols = np.nonzero(_token_mask(keep, images.shape[1:3], (h, w), "keep"))
        codes = codes[:, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        h, w = codes.shape[1:]
    target, _ = gen.schedule_for(grid=grid)
    top, left = center_offset((h, w), target.grid)
    given = np.zeros(target.grid, bool)
    given[top:top + h, left:left + w] = True
    given_codes = np.full((len(images),) + target.grid, -1, np.int32)
    given_codes[:, top:top + h, left:left + w] = codes
    schedule = region_first_schedule(target, given)
    return _sample(gen, schedule, labels_n, np.repeat(given_codes, num_samples, axis=0), given,
                   seed=seed, options=options)


def inpaint(gen, images, region, labels, *, prefill: bool = False, num_samples: int = 1,
            seed: int | None = None, **options) -> EditResult:
    """Regenerates `region` of images, keeping every other token.

    Args:
      gen: a Generator; images: (S, S', 3) or (N, S, S', 3) float in [-1, 1].
      region: a pixel box (top, left, bottom, right) or an (h, w) bool token mask (True =
        regenerate), the same for every image.
      labels: int or (N,) class the region is regenerated as.
      prefill: False (default): the trained schedule, kept tokens seen once the rings reach
        them; True: the kept tokens are the known area before any region token is drawn
        (`context_first_schedule`). 'raster' schedules always run as False. On the digits
        demo False gives the better digits (docs/editing.md).
      num_samples, seed, options: as `outpaint`.
    Returns:
      EditResult on the image's token grid; `given` = the kept tokens.
    """
    images, labels_n = _batch(images, labels, num_samples)
    codes = gen.encode(images)
    grid = codes.shape[1:]
    regen = _token_mask(region, images.shape[1:3], grid, "region")
    if not regen.any():
        raise ValueError("the region to regenerate covers no token: give a larger box")
    keep = ~regen
    schedule, _ = gen.schedule_for(grid=grid)
    if prefill and keep.any():
        if schedule.is_next_token:
            logging.info("A 'raster' generator reads the kept tokens in raster order: no "
                         "prefill schedule.")
        else:
            schedule = context_first_schedule(schedule, keep)
    given_codes = np.where(keep, codes, -1).astype(np.int32)
    return _sample(gen, schedule, labels_n, np.repeat(given_codes, num_samples, axis=0), keep,
                   seed=seed, options=options)


def edit_class(gen, images, region, new_labels, **kw) -> EditResult:
    """Class-conditional editing: `region` (pixel box, token mask, or None = the whole image)
    regenerated as class `new_labels`, the other tokens kept. Keyword arguments as
    `inpaint`. A whole-image edit keeps no token: it is a fresh sample of the new class."""
    images = np.asarray(images, np.float32)
    if region is None:
        f = gen.downsample
        region = np.ones((images.shape[-3] // f, images.shape[-2] // f), bool)
    return inpaint(gen, images, region, new_labels, **kw)


# ----------------------------------------------------------------------------------------------
# --mode=edit: images in, a PNG of input | mask | results out.
# ----------------------------------------------------------------------------------------------
def load_image(path) -> np.ndarray:
    """An image file (PNG/JPEG/..., any mode) -> (S, S', 3) float32 RGB in [-1, 1]."""
    with Image.open(io.BytesIO(fileio.path(path).read_bytes())) as img:
        rgb = np.asarray(img.convert("RGB"), np.float32)
    return rgb / 127.5 - 1.0


def _mask_view(gen, result: EditResult, op: str, images) -> np.ndarray:
    """(N_in, S, S', 3) float: what the model was given. Out-painting: the placed tokens,
    decoded, on a gray canvas; otherwise the input with the regenerated tokens tinted red."""
    f = gen.downsample
    given = np.repeat(np.repeat(result.given, f, axis=0), f, axis=1)[None, ..., None]
    if op == "outpaint":
        first = result.given_codes[::len(result.codes) // len(images)]
        return np.where(given, gen.decode(np.maximum(first, 0)), 0.0)
    red = np.asarray([1.0, -1.0, -1.0], np.float32)
    return np.where(given, images, 0.5 * images + 0.5 * red)


def edit_figure(gen, images, result: EditResult, op: str) -> np.ndarray:
    """uint8 figure, one row per input: the input, the mask view, then its results; panels of
    different sizes are centered on a common size."""
    views = [images, _mask_view(gen, result, op, images), result.images]
    height = max(v.shape[1] for v in views)
    width = max(v.shape[2] for v in views)

    def pad(v):
        out = np.full((len(v), height, width, 3), -0.6, np.float32)  # dark gray margin
        top, left = (height - v.shape[1]) // 2, (width - v.shape[2]) // 2
        out[:, top:top + v.shape[1], left:left + v.shape[2]] = v
        return out
    per = len(result.images) // len(images)
    rows = []
    for i in range(len(images)):
        rows += [pad(images[i:i + 1]), pad(views[1][i:i + 1]),
                 pad(result.images[i * per:(i + 1) * per])]
    return reporting.image_grid(reporting.to_uint8(np.concatenate(rows)), ncol=per + 2)


def stack_figures(figures) -> np.ndarray:
    """uint8 (H_i, W_i, 3) figures stacked top to bottom, narrower ones padded on the right."""
    width = max(f.shape[1] for f in figures)
    return np.concatenate([np.pad(f, ((0, 0), (0, width - f.shape[1]), (0, 0)))
                           for f in figures])


def _edit_args(e, num_classes: int):
    """Validated (op, inputs, labels) of a config.edit section, or a ConfigError."""
    if e.op not in OPS:
        raise config_io.ConfigError(f"config.edit.op={e.op!r}: choose one of {', '.join(OPS)}.")
    inputs = [p.strip() for p in str(e.input).split(",") if p.strip()]
    if not inputs:
        raise config_io.ConfigError("config.edit.input is empty: pass the image(s) to edit, "
                                    "e.g. --config.edit.input=digit.png (comma-separated).")
    name = "new_label" if e.op == "class" else "label"
    value = e[name]
    try:
        labels = np.asarray([int(v) for v in str(value).strip("()[] ").split(",") if v.strip()]
                            if isinstance(value, str) else value, np.int64).reshape(-1)
    except ValueError:
        labels = np.zeros((0,), np.int64)
    if labels.size not in (1, len(inputs)) or ((labels < 0) | (labels >= num_classes)).any():
        raise config_io.ConfigError(
            f"config.edit.{name}={e[name]}: give one class id in [0, {num_classes}) (or one "
            f"per input) for --config.edit.op={e.op}.")
    return e.op, inputs, np.broadcast_to(labels, (len(inputs),))


def write_edit(config, wd, gen) -> dict:
    """--mode=edit: edits config.edit.input with `gen` (the workdir's `Generator`) and writes
    samples/<edit.output or edit_<op>.png> (input | mask | results per row) and the codes
    (.npz beside it). Returns {'png': path, 'npz': path}."""
    if "edit" not in config:
        raise config_io.ConfigError("--mode=edit needs a config.edit section: add "
                                    "config.edit = config_defaults.edit() to the config.")
    e = config.edit
    op, inputs, labels = _edit_args(e, config.model.num_classes)
    try:
        images = np.stack([load_image(p) for p in inputs])
    except ValueError as err:
        raise config_io.ConfigError(f"config.edit.input: the images must all have the same "
                                    f"size ({err}).") from None
    except OSError as err:
        raise config_io.ConfigError(f"config.edit.input: cannot read an image: {err}") from None
    box = tuple(e.box) or None
    kw = dict(num_samples=int(e.num_samples), seed=int(e.seed))
    try:
        if op == "outpaint":
            result = outpaint(gen, images, labels, grid=tuple(e.grid) or None, keep=box, **kw)
        elif op == "inpaint":
            if box is None:
                raise ValueError("--config.edit.op=inpaint needs config.edit.box=(top, left, "
                                 "bottom, right), the pixels to regenerate")
            result = inpaint(gen, images, box, labels, prefill=bool(e.prefill), **kw)
        else:
            result = edit_class(gen, images, box, labels, prefill=bool(e.prefill), **kw)
    except ValueError as err:
        raise config_io.ConfigError(f"config.edit: {err}") from None
    out = wd.stage(workdir_lib.SAMPLES)
    path = out / (e.output or f"edit_{op}.png")
    written = {}
    if wd.is_primary:
        figure = edit_figure(gen, images, result, op)
        written["png"] = reporting.save_png(path, figure, scale=max(1, 128 // images.shape[1]))
        written["npz"] = reporting.save_npz(path.with_suffix(".npz"), codes=result.codes,
                                            given=result.given, labels=result.labels)
    logging.info("Edited %d image(s) (%s, %d steps on a %s grid) into %s", len(images), op,
                 result.schedule.num_steps, result.schedule.grid, path)
    return written
