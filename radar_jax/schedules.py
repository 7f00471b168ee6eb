"""Ring schedules and their step ladders; the layouts built from them are re-exported here.

A schedule assigns every token of an HxW grid to a generation step: `ring_map[h, w]` in
`0..K-1`. The canvas of step k is `C_k = {p : ring_map[p] <= k}`, its new ring is
`N_k = C_k \\ C_{k-1}` and its known area is `C_{k-1}` (see docs/method.md, "Ring schedules").

The packed teacher-forcing layouts, the correction band and the nested mask live in
`radar_jax.layouts`; `train_layout`, `layout_metadata`, `pad_layout`, `nested_mask`,
`block_bounds` (and the band helpers) stay importable from here, the contract other modules use.
Everything here is numpy and runs at trace time.
"""

import dataclasses
import hashlib
from typing import Sequence

import numpy as np

# Re-exported: the layout API is part of this module's contract (DESIGN.md).
from radar_jax.layouts import (  # noqa: F401
    block_bounds, block_sizes, check_correction_band, effective_correction_band, known_rings,
    layout_metadata, nested_mask, pad_layout, train_layout)

KINDS = ("euclidean", "crops", "raster", "custom")
# Crop sizes of the paper-style presets on a 16x16 token grid (docs/method.md, "Ring schedules").
CROP_PRESETS = {
    "crops10": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    "crops13": (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16),
}
# Kinds whose ring 0 must be the grid's center token c = ((H-1)//2, (W-1)//2).
_CENTERED_KINDS = ("euclidean", "crops")


def grid_center(grid: tuple[int, int]) -> tuple[int, int]:
    """Center token of an (H, W) grid: ((H-1)//2, (W-1)//2), e.g. (7, 7) on 16x16."""
    return ((grid[0] - 1) // 2, (grid[1] - 1) // 2)


@dataclasses.dataclass(frozen=True, eq=False)
class RingSchedule:
    """A validated ring schedule over an (H, W) token grid.

    Attributes:
      kind: 'euclidean', 'crops', 'raster' or 'custom'. Schedules made by `merge_rings` keep
        their parent's kind (their canvases are a subset of the parent's canvases).
      ring_map: (H, W) int32, read-only; the step at which each token is generated.
      base_steps: for a schedule made by `merge_rings` / `sub_ladder`, the step of the
        original (unmerged) schedule whose canvas equals each of this schedule's canvases,
        (K,) ints; None for an original schedule.

    Equality and hashing go by content (kind, ring_map, base_steps), so a schedule can be a
    static argument of `jax.jit`. Construction validates the map (see `make_schedule`).
    """

    kind: str
    ring_map: np.ndarray
    base_steps: tuple[int, ...] | None = None

    def __post_init__(self):
        ring_map = np.array(self.ring_map, copy=True)
        _validate_ring_map(self.kind, ring_map)
        ring_map = ring_map.astype(np.int32)
        ring_map.setflags(write=False)
        object.__setattr__(self, "ring_map", ring_map)
        if self.base_steps is not None:
            base_steps = tuple(int(s) for s in self.base_steps)
            if len(base_steps) != self.num_steps:
                raise ValueError(f"base_steps has {len(base_steps)} entries but the schedule has "
                                 f"{self.num_steps} steps; give one parent step per step")
            object.__setattr__(self, "base_steps", base_steps)

    @property
    def grid(self) -> tuple[int, int]:
        """(H, W) of the token grid."""
        return (int(self.ring_map.shape[0]), int(self.ring_map.shape[1]))

    @property
    def is_next_token(self) -> bool:
        """True for plain next-token AR (the 'raster' baseline): one token per step, no known
        area re-fed, no sub-ladders. Consumers ask this instead of comparing kind strings."""
        return self.kind == "raster"

    @property
    def num_steps(self) -> int:
        """K, the number of generation steps."""
        return int(self.ring_map.max()) + 1

    @property
    def ring_sizes(self) -> np.ndarray:
        """(K,) int64: |N_k|, the number of new tokens at each step."""
        return np.bincount(self.ring_map.ravel(), minlength=self.num_steps)

    @property
    def canvas_sizes(self) -> np.ndarray:
        """(K,) int64: |C_k|, the number of tokens on the canvas after each step."""
        return np.cumsum(self.ring_sizes)

    @property
    def start(self) -> tuple[int, int]:
        """(h, w) of the single token of ring 0."""
        h, w = np.argwhere(self.ring_map == 0)[0]
        return (int(h), int(w))

    def canvas(self, k: int) -> np.ndarray:
        """(H, W) bool: C_k, the tokens generated at steps 0..k."""
        return self.ring_map <= self._check_step(k)

    def new_ring(self, k: int) -> np.ndarray:
        """(H, W) bool: N_k, the tokens first generated at step k."""
        return self.ring_map == self._check_step(k)

    def _check_step(self, k: int) -> int:
        if not 0 <= k < self.num_steps:
            raise ValueError(f"step {k} is out of range for a schedule with {self.num_steps} "
                             f"steps; use 0..{self.num_steps - 1}")
        return int(k)

    def __eq__(self, other):
        if not isinstance(other, RingSchedule):
            return NotImplemented
        return (self.kind == other.kind and self.base_steps == other.base_steps
                and self.ring_map.shape == other.ring_map.shape
                and np.array_equal(self.ring_map, other.ring_map))

    def __hash__(self):
        digest = hashlib.sha1(self.ring_map.tobytes()).hexdigest()
        return hash((self.kind, self.ring_map.shape, digest, self.base_steps))

    def __repr__(self):
        return (f"RingSchedule(kind={self.kind!r}, grid={self.grid}, num_steps={self.num_steps}, "
                f"ring_sizes={self.ring_sizes.tolist()})")


# --------------------------------------------------------------------------------------------
# Validation.
# --------------------------------------------------------------------------------------------
def _validate_ring_map(kind: str, ring_map: np.ndarray) -> None:
    """Raises ValueError naming the problem if `ring_map` is not a valid schedule of `kind`."""
    if kind not in KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; valid kinds are {list(KINDS)}")
    if ring_map.ndim != 2 or ring_map.size == 0:
        raise ValueError(f"ring_map must be a non-empty 2D (H, W) array, got shape "
                         f"{ring_map.shape}")
    if not np.issubdtype(ring_map.dtype, np.integer):
        raise ValueError(f"ring_map must hold integer ring ids, got dtype {ring_map.dtype}; "
                         "cast it with .astype(np.int32)")
    if ring_map.min() < 0:
        bad = [tuple(int(v) for v in p) for p in np.argwhere(ring_map < 0)[:4]]
        raise ValueError(f"ring_map does not cover the grid: tokens {bad} have negative ring "
                         f"ids (min {int(ring_map.min())}); give every token a ring in 0..K-1")
    counts = np.bincount(ring_map.ravel())
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise ValueError(f"ring ids {empty.tolist()[:8]} are empty: ids must be 0..K-1 "
                         f"(K={counts.size}) with every ring non-empty; renumber the rings "
                         "consecutively, e.g. np.unique(ring_map, return_inverse=True)[1]")
    if counts[0] != 1:
        where = [tuple(int(v) for v in p) for p in np.argwhere(ring_map == 0)[:4]]
        raise ValueError(f"ring 0 has {int(counts[0])} tokens (at {where}...); generation starts "
                         "from one token, so give ring 0 a single start token")
    if kind in _CENTERED_KINDS:
        center = grid_center(ring_map.shape)
        if ring_map[center] != 0:
            raise ValueError(f"a {kind!r} schedule must start at the grid center {center}, but "
                             f"ring 0 is at {tuple(int(v) for v in np.argwhere(ring_map == 0)[0])}"
                             "; use kind='custom' for other start tokens")
    if kind == "raster":
        height, width = ring_map.shape
        if not np.array_equal(ring_map, np.arange(height * width).reshape(height, width)):
            raise ValueError("a 'raster' schedule must have ring_map[h, w] == h*W + w (one token "
                             "per step); use kind='custom' for other one-token orders")
    bad_step, pieces = _first_disconnected_canvas(ring_map)
    if bad_step is not None:
        raise ValueError(f"canvas C_{bad_step} (rings 0..{bad_step}) is not 4-connected: it has "
                         f"{pieces} separate pieces; every canvas must be one 4-connected region "
                         "grown from the start token, so reassign the isolated tokens to later "
                         "rings")


def _first_disconnected_canvas(ring_map: np.ndarray) -> tuple[int | None, int]:
    """First step k whose canvas C_k is not 4-connected, and its piece count; (None, 1) if none.

    Adds tokens ring by ring into a union-find and tracks the number of connected pieces, so the
    check costs O(H*W) in total instead of one flood fill per canvas.
    """
    height, width = ring_map.shape
    flat = ring_map.ravel()
    parent = list(range(flat.size))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    order = np.argsort(flat, kind="stable").tolist()
    pieces = 0
    for n, idx in enumerate(order):
        pieces += 1
        h, w = divmod(idx, width)
        for nh, nw in ((h - 1, w), (h + 1, w), (h, w - 1), (h, w + 1)):
            if 0 <= nh < height and 0 <= nw < width and flat[nh * width + nw] <= flat[idx]:
                ra, rb = find(idx), find(nh * width + nw)
                if ra != rb:
                    parent[ra] = rb
                    pieces -= 1
        ring_done = n + 1 == len(order) or flat[order[n + 1]] != flat[idx]
        if ring_done and pieces != 1:
            return int(flat[idx]), pieces
    return None, 1


# --------------------------------------------------------------------------------------------
# Construction.
# --------------------------------------------------------------------------------------------
def _as_grid(grid) -> tuple[int, int]:
    if isinstance(grid, (int, np.integer)):
        grid = (grid, grid)
    try:
        height, width = (int(g) for g in grid)
    except (TypeError, ValueError):
        raise ValueError(f"grid must be an int or an (H, W) pair, got {grid!r}") from None
    if height < 1 or width < 1:
        raise ValueError(f"grid sides must be positive, got {(height, width)}")
    return (height, width)


def _euclidean_map(grid: tuple[int, int]) -> np.ndarray:
    """ring = ceil(||p - c||_2), computed exactly on integer squared distances."""
    ch, cw = grid_center(grid)
    hh, ww = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    d2_HW = (hh - ch) ** 2 + (ww - cw) ** 2
    # Smallest r with r*r >= d2. The float sqrt only guesses isqrt(d2); integer checks fix it,
    # so exact squares (d2 = 25 -> 5, not 6) never round the wrong way.
    root_HW = np.floor(np.sqrt(d2_HW)).astype(np.int64)
    root_HW -= root_HW * root_HW > d2_HW
    root_HW += (root_HW + 1) ** 2 <= d2_HW
    r_HW = root_HW + (root_HW * root_HW < d2_HW)
    # Renumber consecutively in case some ceil distance has no lattice point on this grid.
    return np.unique(r_HW, return_inverse=True)[1].reshape(grid)


def _crops_map(grid: tuple[int, int], sizes: Sequence[int]) -> np.ndarray:
    """ring = index of the smallest crop that contains the token.

    A crop of size P spans c - (P-1)//2 .. c + P//2 on each axis, clipped to the grid. A token
    at offset d from the center along one axis needs P >= 2d (d >= 0) or P >= 1 - 2d (d < 0).
    """
    ch, cw = grid_center(grid)

    def need(offsets):
        return np.where(offsets >= 0, np.maximum(1, 2 * offsets), 1 - 2 * offsets)

    need_h = need(np.arange(grid[0]) - ch)
    need_w = need(np.arange(grid[1]) - cw)
    need_HW = np.maximum(need_h[:, None], need_w[None, :])
    return np.searchsorted(np.asarray(sizes), need_HW, side="left")


def _crop_sizes(grid: tuple[int, int], sizes, preset) -> tuple[int, ...]:
    side = max(grid)
    if sizes is not None and preset is not None:
        raise ValueError(f"give either sizes= or preset= for 'crops', not both (got sizes={sizes}"
                         f", preset={preset!r})")
    if preset is not None:
        if preset not in CROP_PRESETS:
            raise ValueError(f"unknown crops preset {preset!r}; valid presets are "
                             f"{list(CROP_PRESETS)}")
        if side != 16:
            raise ValueError(f"preset {preset!r} is defined for a 16x16 grid, got {grid}; pass "
                             "sizes=[1, ..., max(H, W)] explicitly")
        return CROP_PRESETS[preset]
    if sizes is None:
        return tuple(range(1, side + 1))
    sizes = tuple(int(s) for s in sizes)
    if not sizes or sizes[0] != 1:
        raise ValueError(f"crop sizes must start at 1 (the center token), got {list(sizes)}")
    if any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"crop sizes must be strictly increasing, got {list(sizes)}")
    if sizes[-1] != side:
        raise ValueError(f"the last crop size must be max(H, W) = {side} so that the crops cover "
                         f"the {grid} grid, got {list(sizes)}")
    return sizes


def make_schedule(kind: str, grid, **kw) -> RingSchedule:
    """Builds and validates a ring schedule.

    Args:
      kind: one of
        'euclidean': ring = ceil(||p - c||_2) around c = ((H-1)//2, (W-1)//2); 13 rings of sizes
          1,4,8,16,20,32,32,36,46,36,20,4,1 on 16x16.
        'crops': nested square center crops; kw `sizes=[1 = P_1 < ... < P_K = max(H, W)]` or
          `preset='crops10'|'crops13'` (16x16 only); default sizes 1..max(H, W). A crop of size
          P spans c-(P-1)//2 .. c+P//2 on each axis. On a non-square grid the square crops are
          clipped to the grid: once P exceeds the short side, crops grow along the long axis only
          (every P still adds tokens there, so no ring is empty).
        'raster': ring_map[h, w] = h*W + w, plain next-token AR (LlamaGen).
        'custom': kw `ring_map` (H, W) ints. Its canvases must be 4-connected and ring 0 a
          single token (which need not be the center).
      grid: int (square) or (H, W). For 'custom' it may be None to take the map's shape.

    Returns:
      The validated RingSchedule.

    Raises:
      ValueError: unknown kind, bad arguments, or a map that violates the schedule rules
        (not covering the grid, an empty ring id, a ring 0 of more than one token, a canvas that
        is not 4-connected); the message names the problem and the fix.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; valid kinds are {list(KINDS)}")
    allowed = {"euclidean": set(), "crops": {"sizes", "preset"}, "raster": set(),
               "custom": {"ring_map"}}[kind]
    extra = set(kw) - allowed
    if extra:
        raise ValueError(f"unexpected arguments {sorted(extra)} for kind {kind!r}; it accepts "
                         f"{sorted(allowed) or 'none'}")
    if kind == "custom":
        if kw.get("ring_map") is None:
            raise ValueError("kind 'custom' needs ring_map=<(H, W) int array>")
        ring_map = np.asarray(kw["ring_map"])
        if grid is not None and ring_map.shape != _as_grid(grid):
            raise ValueError(f"ring_map has shape {ring_map.shape} but the grid is "
                             f"{_as_grid(grid)}; the map must give one ring id per grid token")
        return RingSchedule("custom", ring_map)
    grid = _as_grid(grid)
    if kind == "euclidean":
        ring_map = _euclidean_map(grid)
    elif kind == "crops":
        ring_map = _crops_map(grid, _crop_sizes(grid, kw.get("sizes"), kw.get("preset")))
    else:
        ring_map = np.arange(grid[0] * grid[1]).reshape(grid)
    return RingSchedule(kind, ring_map)


# --------------------------------------------------------------------------------------------
# Step ladders (RDS: Random Dropout Sampling; fewer-step sampling).
# --------------------------------------------------------------------------------------------
def merge_rings(schedule: RingSchedule, keep: Sequence[int]) -> RingSchedule:
    """Keeps only the steps in `keep`; every dropped step is merged into the next kept step.

    Args:
      schedule: a ring schedule with K steps (not 'raster': raster is plain next-token AR).
      keep: strictly increasing step indices in 0..K-1 that include 0 and K-1.

    Returns:
      A schedule of the same kind and grid with len(keep) steps whose canvases are exactly
      C_k for k in keep; `base_steps` records those k in the original (unmerged) schedule,
      composed through repeated merges.
    """
    if schedule.is_next_token:
        raise ValueError("merge_rings does not apply to 'raster' (plain next-token AR has no "
                         "rings to merge); use a ring kind such as 'euclidean' or 'crops'")
    keep_arr = np.asarray(keep, dtype=np.int64).ravel()
    num_steps = schedule.num_steps
    if (keep_arr.size == 0 or keep_arr[0] != 0 or keep_arr[-1] != num_steps - 1
            or np.any(np.diff(keep_arr) <= 0)):
        raise ValueError(f"keep must be strictly increasing step indices that start at 0 and end "
                         f"at K-1 = {num_steps - 1}, got {keep_arr.tolist()}")
    ring_map = np.searchsorted(keep_arr, schedule.ring_map, side="left")
    base = schedule.base_steps or tuple(range(num_steps))
    return RingSchedule(schedule.kind, ring_map, base_steps=tuple(base[k] for k in keep_arr))


def sample_sub_ladder(num_steps: int, rng: np.random.Generator, min_steps: int = 2,
                      keep_prob: float = 0.5) -> np.ndarray:
    """Random step subset for RDS: steps 0 and K-1 always kept, others with prob `keep_prob`.

    If fewer than `min_steps` steps survive (min_steps is capped at K), random dropped steps
    are added back until there are min_steps.

    Returns:
      keep: (n,) int32, strictly increasing, for `merge_rings`.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 <= keep_prob <= 1.0:
        raise ValueError(f"keep_prob must be in [0, 1], got {keep_prob}")
    if num_steps == 1:
        return np.zeros((1,), np.int32)
    inner = np.arange(1, num_steps - 1)
    kept = rng.random(inner.size) < keep_prob
    missing = min(min_steps, num_steps) - 2 - int(kept.sum())
    if missing > 0:
        kept[rng.choice(np.flatnonzero(~kept), size=missing, replace=False)] = True
    return np.concatenate([[0], inner[kept], [num_steps - 1]]).astype(np.int32)


def sub_ladder(schedule: RingSchedule, num_steps: int) -> RingSchedule:
    """Deterministic evenly spaced ladder of `num_steps` steps from a K-step schedule.

    Rule: keep step round_half_up(i * (K-1) / (n-1)) for i = 0..n-1, computed in integers, so
    steps 0 and K-1 are always kept and the kept steps are distinct. On the 13-ring euclidean
    schedule: 4 -> [0,4,8,12], 6 -> [0,2,5,7,10,12], 8 -> [0,2,3,5,7,9,10,12],
    10 -> [0,1,3,4,5,7,8,9,11,12], 13 -> all.
    """
    total = schedule.num_steps
    if num_steps == total:
        return schedule
    if not 2 <= num_steps <= total:
        raise ValueError(f"num_steps must be in 2..{total} for this {total}-step schedule, got "
                         f"{num_steps}")
    i = np.arange(num_steps)
    keep = (2 * i * (total - 1) + (num_steps - 1)) // (2 * (num_steps - 1))
    return merge_rings(schedule, keep)
