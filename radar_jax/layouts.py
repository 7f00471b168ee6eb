"""Packed teacher-forcing layouts, the correction band and the nested attention mask.

A layout is the packed sequence that training teacher-forces and that the KV-cached sampler
replays one block at a time (`radar_jax.sampling_plan`): class tokens, then one block B_k per
step k of a ring schedule (`radar_jax.schedules`). With a correction band b, block B_k is

  K_k = {p : k-b <= ring[p] < k}   the known band: the last b rings, carrying the canvas,
  N_k = {p : ring[p] == k}         the new ring, carrying the learnable prompt,

known band first, raster order inside each part. b = None ("all", the paper) re-feeds the
whole known area C_{k-1}; b = 1 re-feeds each sampled ring once, while the next ring is made.
Positions older than the band are not re-fed: queries still see the keys/values their earlier
blocks wrote (causal across steps), and the sampler keeps the value they had when they left
the band. The band counts rings of the schedule being laid out, so on an RDS sub-ladder
(`schedules.merge_rings`) it counts merged rings. A band of K-1 or more rings is "all".

Layouts are dicts of (L,) numpy arrays:
  flat_pos    int32  h*W+w of the token whose embedding is fed at this position; -1 for class
                     tokens. It is also the token's 2D-RoPE position.
  target_pos  int32  flat position whose ground-truth token this position predicts; -1 if none.
  step        int32  generation step of the position; -1 for class tokens.
  is_new      bool   True for positions of the new ring (their input is the learnable prompt).
  is_class    bool   True for class-token positions.
  mask        bool   (L, L), True where query i may attend to key j (`train_layout` only).
  valid       bool   False on padding (`pad_layout` only).

Everything here is numpy and runs at trace time, except `nested_mask`, which also accepts
`xp=jax.numpy` so that per-example (RDS) masks can be derived inside jit from metadata.
This module only reads a schedule's `ring_map`, `num_steps`, `grid` and `is_next_token`, so it
does not import `radar_jax.schedules` (which re-exports everything public here).
"""

from __future__ import annotations

import numpy as np


def check_correction_band(correction_band) -> int | None:
    """Validates a correction band: None (all of the known area) or an int >= 1.

    Returns:
      the band as a Python int, or None.
    Raises:
      ValueError naming the value: anything else (0, negatives, floats, bools, strings).
    """
    if correction_band is None:
        return None
    if isinstance(correction_band, (bool, np.bool_)) or not isinstance(
            correction_band, (int, np.integer)) or correction_band < 1:
        raise ValueError(f"correction_band={correction_band!r} is invalid: give an int >= 1 (the "
                         "number of most recent known rings re-fed at each step, 1 = cheapest) "
                         "or None for the whole known area (the paper)")
    return int(correction_band)


def effective_correction_band(schedule, correction_band) -> int | None:
    """The band that changes the layout of `schedule`: None where it equals "all".

    A band of b >= K-1 rings re-feeds every known ring at every step (the known area of step k
    has k <= K-1 rings), and 'raster' layouts ignore the band (next-token AR already feeds each
    token exactly once and re-feeds nothing). Layouts of b and of its effective band are
    identical, so callers can use this as a cache key (e.g. a static jit argument).
    """
    band = check_correction_band(correction_band)
    if band is None or schedule.is_next_token or band >= schedule.num_steps - 1:
        return None
    return band


def known_rings(schedule, correction_band=None) -> list[tuple[int, int]]:
    """[(first, stop), ...]: step k re-feeds the rings first..stop-1 (ring ids), K entries.

    first = max(0, k - b) (0 for b = None) and stop = k; step 0 re-feeds nothing.
    """
    band = check_correction_band(correction_band)
    return [(0 if band is None else max(0, k - band), k) for k in range(schedule.num_steps)]


def block_sizes(schedule, correction_band=None) -> np.ndarray:
    """(K,) int64: |K_k| + |N_k|, the positions of block B_k (class tokens not counted).

    Ring kinds only ('raster' has no blocks). |C_k| for b = None; the packed length of
    `layout_metadata` is num_class_tokens + block_sizes(...).sum().
    """
    _require_rings(schedule, "block_sizes")
    sizes = np.bincount(schedule.ring_map.ravel(), minlength=schedule.num_steps)
    starts = np.concatenate([[0], np.cumsum(sizes)])  # starts[r]: tokens in rings < r
    bounds = np.asarray(known_rings(schedule, correction_band))
    return starts[bounds[:, 1]] - starts[bounds[:, 0]] + sizes


def block_bounds(schedule, num_class_tokens: int = 1, correction_band=None) -> np.ndarray:
    """(K+1,) int64 offsets: block B_k occupies sequence positions [b[k], b[k+1]).

    b[0] = num_class_tokens. Ring kinds only ('raster' has no blocks).
    """
    _require_rings(schedule, "block_bounds")
    sizes = block_sizes(schedule, correction_band)
    return np.concatenate([[num_class_tokens], num_class_tokens + np.cumsum(sizes)])


def _require_rings(schedule, what: str) -> None:
    if schedule.is_next_token:
        raise ValueError(f"'raster' layouts have no blocks; {what} needs a ring schedule")


def layout_metadata(schedule, num_class_tokens: int = 1,
                    correction_band=None) -> dict[str, np.ndarray]:
    """Per-position metadata of the packed teacher-forcing sequence (see module docstring).

    Ring kinds: sequence = class tokens + B_0 + ... + B_{K-1}; block B_k holds the known band
    K_k first, then the new ring N_k, raster order inside each part; every block position
    predicts its own ground-truth token (target_pos = flat_pos). Length num_class_tokens +
    sum_k (|K_k| + |N_k|): with b = None, K_k = C_{k-1} and the length is 1 + sum_k |C_k| (1629
    for euclidean on 16x16, 681 for crops10); with b = 1 it is 1 + 2*H*W - |N_{K-1}| (512).

    'raster': sequence = class tokens + the first H*W-1 tokens (inputs shifted by one, as in
    LlamaGen). Index i >= n (n = num_class_tokens) feeds token f = i-n (flat_pos = f, its RoPE
    position) and predicts f+1; the last class token predicts position 0. Step convention:
    step = flat_pos (the input token's own raster index), -1 for class tokens, is_new all False.
    Each input token is then the whole "known area" of its own step, so the nested-mask rule
    yields exactly the causal (lower-triangular) mask. Length n + H*W - 1. The correction band
    is validated but ignored: next-token AR feeds every token once and re-feeds none.

    Args:
      schedule: a RingSchedule.
      num_class_tokens: class tokens at the head (>= 1).
      correction_band: None (re-feed the whole known area) or an int b >= 1.

    Returns:
      dict of (L,) arrays: flat_pos, target_pos, step (int32), is_new, is_class (bool).
    """
    if num_class_tokens < 1:
        raise ValueError(f"num_class_tokens must be >= 1, got {num_class_tokens}")
    check_correction_band(correction_band)
    n_cls = int(num_class_tokens)
    cls_neg = np.full((n_cls,), -1, np.int64)
    if schedule.is_next_token:
        num_tokens = schedule.grid[0] * schedule.grid[1]
        flat_pos = np.concatenate([cls_neg, np.arange(num_tokens - 1)])
        target_pos = np.concatenate([cls_neg[1:], np.arange(num_tokens)])
        step = flat_pos.copy()
        is_new = np.zeros(flat_pos.shape, bool)
    else:
        flat_ring = schedule.ring_map.ravel()
        pos_parts, step_parts, new_parts = [cls_neg], [cls_neg], [np.zeros((n_cls,), bool)]
        for k, (first, stop) in enumerate(known_rings(schedule, correction_band)):
            known = np.flatnonzero((flat_ring >= first) & (flat_ring < stop))
            new = np.flatnonzero(flat_ring == k)
            pos_parts += [known, new]
            step_parts.append(np.full((known.size + new.size,), k))
            new_parts += [np.zeros((known.size,), bool), np.ones((new.size,), bool)]
        flat_pos = np.concatenate(pos_parts)
        target_pos = flat_pos.copy()
        step = np.concatenate(step_parts)
        is_new = np.concatenate(new_parts)
    is_class = np.zeros(flat_pos.shape, bool)
    is_class[:n_cls] = True
    return dict(flat_pos=flat_pos.astype(np.int32), target_pos=target_pos.astype(np.int32),
                step=step.astype(np.int32), is_new=is_new, is_class=is_class)


def nested_mask(step, is_new, is_class, valid=None, xp=np):
    """Nested attention mask from per-token metadata (docs/method.md, "Nested attention").

    Rule for a valid query i and key j:
      - class keys are visible to every valid non-class query;
      - a class query sees only class keys at or before it (causal among class tokens, as in
        LlamaGen with several class tokens);
      - s(j) < s(i): visible; s(j) > s(i): hidden;
      - s(j) == s(i): visible iff is_new(i) or not is_new(j) (the known area never sees the new
        ring of its own step).
    Padding (valid False) is never attended by valid queries; a padded query attends to itself
    only, so no softmax row is empty (padded outputs are then ignored by the loss).

    Args:
      step: (..., L) int step per token (class tokens -1).
      is_new, is_class: (..., L) bool.
      valid: (..., L) bool or None (all valid).
      xp: numpy or jax.numpy; works on traced arrays inside jit.

    Returns:
      (..., L, L) bool, True where query i (axis -2) may attend to key j (axis -1).
    """
    step, is_new, is_class = xp.asarray(step), xp.asarray(is_new), xp.asarray(is_class)
    length = step.shape[-1]
    s_i, s_j = step[..., :, None], step[..., None, :]
    new_i, new_j = is_new[..., :, None], is_new[..., None, :]
    cls_i, cls_j = is_class[..., :, None], is_class[..., None, :]
    idx = xp.arange(length)
    causal_LL = idx[None, :] <= idx[:, None]
    same_step = (s_j == s_i) & (new_i | ~new_j)
    token_rows = cls_j | (s_j < s_i) | same_step
    mask = xp.where(cls_i, cls_j & causal_LL, token_rows)
    if valid is not None:
        valid = xp.asarray(valid).astype(bool)
        valid_i, valid_j = valid[..., :, None], valid[..., None, :]
        eye_LL = idx[None, :] == idx[:, None]
        mask = (mask & valid_i & valid_j) | (~valid_i & eye_LL)
    return mask


def train_layout(schedule, num_class_tokens: int = 1,
                 correction_band=None) -> dict[str, np.ndarray]:
    """`layout_metadata` plus `mask`: (L, L) bool nested mask, True where query i sees key j."""
    layout = layout_metadata(schedule, num_class_tokens, correction_band)
    layout["mask"] = nested_mask(layout["step"], layout["is_new"], layout["is_class"])
    return layout


def pad_layout(layout: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """Pads every (L,) array of a layout to (length,) and adds `valid` (L real, then False).

    Padding values: flat_pos -1, target_pos -1, step = `length` (larger than any real step,
    since a layout has fewer steps than positions), is_new False, is_class False. A `mask`
    entry, if present, is rebuilt for the padded metadata with `nested_mask`. Used by RDS, where
    per-example sub-ladders give different lengths and the mask is derived inside jit.
    """
    real = int(layout["step"].shape[0])
    if length < real:
        raise ValueError(f"cannot pad a layout of length {real} to {length}; pad to at least "
                         f"{real} (e.g. the full schedule's layout length)")
    if "valid" in layout:
        raise ValueError("layout is already padded; pad the unpadded layout instead")
    fill = dict(flat_pos=-1, target_pos=-1, step=length, is_new=False, is_class=False)
    out = {}
    for key, value in layout.items():
        if key == "mask":
            continue
        if key not in fill:
            raise ValueError(f"pad_layout does not know how to pad {key!r}; expected keys "
                             f"{sorted(fill)} (+ 'mask')")
        out[key] = np.concatenate(
            [value, np.full((length - real,), fill[key], dtype=value.dtype)])
    out["valid"] = np.arange(length) < real
    if "mask" in layout:
        out["mask"] = nested_mask(out["step"], out["is_new"], out["is_class"], out["valid"])
    return out
