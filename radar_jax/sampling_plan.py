"""Static plans of the KV-cached sampler: what each step feeds, where it goes, what it sees.

The sampler (`radar_jax.sampling`) runs the teacher-forcing layout of a schedule and a
correction band (`schedules.layout_metadata(schedule, n, correction_band)`) one *sampler step*
at a time against a KV cache:

  ring kinds  step k feeds block B_k = known band K_k + new ring N_k (the class tokens join
              step 0, whose block is then [class, center prompt]); K steps, one per ring.
  'raster'    step 0 feeds the class token(s), whose output predicts position 0; step t >= 1
              feeds token t-1 at its own RoPE position and predicts token t; H*W steps.

Step k occupies the layout's index range [offset_k, offset_k + L_k) and writes its keys/values
into exactly those cache slots, so the cache is the packed training sequence and the mask of a
step is a slice of the training mask: rows of its block, columns of the cache. Training and
sampling therefore cannot disagree about the band: both read it from the same layout. A step
writes samples only at its block's positions, so with a band a position that left the band
keeps its value, and later steps see it through the keys/values of the blocks that fed it.

`lax.scan` needs one block shape per scan, so the steps are bucketed into a few contiguous
groups; a group pads every block to its longest block P_g and attends over a cache of S_g slots
(the end of its last padded block). A small dynamic program picks the groups that minimise
  sum_k P_g * (1 + slot_cost * S_g)  +  group_cost * (number of groups),
i.e. padded token-forwards, plus attention over the cache (one slot costs `slot_cost`
token-forwards), plus a fixed price per group (one more compiled scan body and one cache copy).

Padding never leaks into real tokens: a padded token of step k is written into slots that
belong to later steps (or past the sequence end), which the nested mask hides from every real
query of step k, and the later step overwrites those slots with its real keys before any real
query can see them.

Everything here is numpy and runs once, at trace time.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from radar_jax import schedules

# Price of one extra group (one more compiled scan body and one cache copy), as a fraction of
# the useful token-forwards: a group must save 2% of the work to be worth its compile time;
# and at least MIN_GROUP_COST token-forwards, so that small grids do not compile a scan body
# per step to save a handful of tokens.
DEFAULT_GROUP_COST_FRACTION = 0.02
MIN_GROUP_COST = 16.0
# More groups buy little and cost compile time; the DP never uses more than this.
DEFAULT_MAX_GROUPS = 8


def slot_cost_for_dim(dim: int) -> float:
    """Price of attending one cache slot, in token-forwards, for model width `dim`: 1/dim.

    FLOPs alone say 1/(6*dim): a token costs ~24*dim^2 FLOPs per layer (qkv/out projections and
    SwiGLU), a slot 4*dim (QK^T and PV). But the masked softmax over the cache runs far below
    matmul speed: on CPU (XLA, GPT-B, 256 queries) a slot measured ~1/750 token-forwards, about
    6x the FLOP ratio, hence 1/dim.
    """
    return 1.0 / dim


DEFAULT_SLOT_COST = slot_cost_for_dim(768)


@dataclasses.dataclass(frozen=True, eq=False)
class StepGroup:
    """A run of consecutive sampler steps that share one padded block shape (one lax.scan).

    Attributes:
      first_step: sampler step index of the group's first step.
      block_len: P, the padded block length of every step of the group.
      cache_len: S, the cache slots the group's steps attend over (and write into).
      arrays: per-step inputs of the scan, each with a leading axis of the group's n steps:
        step         (n,) int32     sampler step index.
        cache_index  (n,) int32     first cache slot of the step's block (its layout offset).
        flat_pos     (n, P) int32   RoPE position h*W+w of each block token; -1 class/padding.
        input_pos    (n, P) int32   canvas position whose current token is fed (0 where the
                                    token is ignored: class, new-ring prompt, padding).
        is_new       (n, P) bool    new-ring tokens (fed the learnable prompt).
        is_class     (n, P) bool    class tokens.
        mask         (n, P, S) bool nested mask of the block's queries over the cache slots.
        src          (n, H*W) int32 block index whose sample lands on each canvas position.
        writes       (n, H*W) bool  canvas positions predicted at this step (correction on).
        writes_new   (n, H*W) bool  positions first generated at this step (correction off).
    """

    first_step: int
    block_len: int
    cache_len: int
    arrays: dict[str, np.ndarray]

    @property
    def num_steps(self) -> int:
        return int(self.arrays["step"].shape[0])


@dataclasses.dataclass(frozen=True, eq=False)
class SamplingPlan:
    """The static plan of one schedule: the steps, their groups and their cost.

    Attributes:
      schedule: the RingSchedule.
      num_class_tokens: class tokens at the head of the sequence.
      correction_band: the effective band of the layout (`schedules.effective_correction_band`):
        None = the whole known area is re-fed at every step.
      block_lens: (K,) int, real tokens fed at each sampler step (class tokens in step 0).
      offsets: (K,) int, first cache slot (= layout index) of each step's block.
      groups: the StepGroups, in step order.
      useful_token_forwards: real tokens fed per image and CFG branch: num_class_tokens +
        sum_k (|K_k| + |N_k|) for ring kinds (sum_k |C_k| without a band), num_class_tokens +
        H*W - 1 for raster.
      padded_token_forwards: padding tokens fed per image and CFG branch.
      num_forward_passes: K, the sequential transformer calls per image.
      useful_slot_queries / computed_slot_queries: sum over steps of (queries x cache slots)
        that the nested attention needs / that the padded groups compute.
    """

    schedule: schedules.RingSchedule
    num_class_tokens: int
    correction_band: int | None
    block_lens: np.ndarray
    offsets: np.ndarray
    groups: tuple[StepGroup, ...]

    @property
    def num_steps(self) -> int:
        return int(self.block_lens.shape[0])

    @property
    def num_forward_passes(self) -> int:
        return self.num_steps

    @property
    def cache_len(self) -> int:
        return self.groups[-1].cache_len

    @property
    def group_sizes(self) -> list[int]:
        return [g.block_len for g in self.groups]

    @property
    def useful_token_forwards(self) -> int:
        return int(self.block_lens.sum())

    @property
    def padded_token_forwards(self) -> int:
        return sum(g.num_steps * g.block_len for g in self.groups) - self.useful_token_forwards

    @property
    def padding_waste(self) -> float:
        """padded / useful token-forwards."""
        return self.padded_token_forwards / self.useful_token_forwards

    @property
    def useful_slot_queries(self) -> int:
        return int(np.sum(self.block_lens * (self.offsets + self.block_lens)))

    @property
    def computed_slot_queries(self) -> int:
        return sum(g.num_steps * g.block_len * g.cache_len for g in self.groups)

    def summary(self) -> dict:
        """JSON-friendly figures for benchmarks and logs."""
        return dict(correction_band=self.correction_band,
                    num_forward_passes=self.num_forward_passes,
                    useful_token_forwards=self.useful_token_forwards,
                    padded_token_forwards=self.padded_token_forwards,
                    padding_waste=round(self.padding_waste, 4),
                    group_block_lens=self.group_sizes,
                    group_num_steps=[g.num_steps for g in self.groups],
                    cache_len=self.cache_len,
                    useful_slot_queries=self.useful_slot_queries,
                    computed_slot_queries=self.computed_slot_queries)


# ----------------------------------------------------------------------------------------------
# Grouping: a dynamic program over contiguous runs of steps.
# ----------------------------------------------------------------------------------------------
def group_steps(block_lens, offsets, *, slot_cost: float = DEFAULT_SLOT_COST,
                group_cost: float = 0.0,
                max_groups: int = DEFAULT_MAX_GROUPS) -> list[tuple[int, int]]:
    """Splits steps 0..K-1 into at most `max_groups` contiguous groups of least cost.

    A group of steps a..b has block length P = max(L_a..L_b) and cache length S = o_b + P
    (o = offsets); it costs (b-a+1) * P * (1 + slot_cost * S) + group_cost.

    Args:
      block_lens: (K,) ints L_k > 0. offsets: (K,) increasing ints o_k.
    Returns:
      [(start, stop), ...] half-open step ranges covering 0..K in order.
    """
    lens = np.asarray(block_lens, np.float64)
    offs = np.asarray(offsets, np.float64)
    k_steps = lens.shape[0]
    if max_groups < 1:
        raise ValueError(f"max_groups={max_groups} must be >= 1")
    n_max = min(max_groups, k_steps)
    # best[g, j]: least cost of steps 0..j-1 in exactly g groups; arg[g, j]: start of the last.
    best = np.full((n_max + 1, k_steps + 1), np.inf)
    best[0, 0] = 0.0
    arg = np.zeros((n_max + 1, k_steps + 1), np.int64)
    for end in range(k_steps):
        # Every candidate start a = 0..end of a group that ends at step `end`, vectorised.
        block_A = np.maximum.accumulate(lens[end::-1])[::-1]
        count_A = end + 1 - np.arange(end + 1)
        cost_A = count_A * block_A * (1.0 + slot_cost * (offs[end] + block_A)) + group_cost
        for g in range(1, n_max + 1):
            total_A = best[g - 1, : end + 1] + cost_A
            a = int(np.argmin(total_A))
            best[g, end + 1], arg[g, end + 1] = total_A[a], a
    g = int(np.argmin(best[:, k_steps]))
    bounds, stop = [], k_steps
    while g > 0:
        start = int(arg[g, stop])
        bounds.append((start, stop))
        stop, g = start, g - 1
    return bounds[::-1]


# ----------------------------------------------------------------------------------------------
# The plan.
# ----------------------------------------------------------------------------------------------
def _sampler_steps(schedule, layout) -> np.ndarray:
    """(L,) sampler step of every layout index (see the module docstring)."""
    if schedule.is_next_token:
        return layout["step"] + 1  # class (-1) -> 0, token f (step f) -> f + 1
    return np.maximum(layout["step"], 0)  # class tokens join block 0


def sampling_plan(schedule: schedules.RingSchedule, num_class_tokens: int = 1, *,
                  correction_band: int | None = None, slot_cost: float = DEFAULT_SLOT_COST,
                  group_cost: float | None = None,
                  max_groups: int = DEFAULT_MAX_GROUPS) -> SamplingPlan:
    """Static plan of the KV-cached sampler for `schedule` and `correction_band`.

    Args:
      schedule: any RingSchedule ('raster' gives LlamaGen's next-token order).
      num_class_tokens: class tokens at the head of the sequence (1 for c2i models).
      correction_band: None (re-feed the whole known area, the paper) or an int b >= 1 (re-feed
        the last b rings); ignored by 'raster'. The model should be trained with the same band.
      slot_cost, group_cost, max_groups: the grouping cost model (see `group_steps`);
        group_cost None means DEFAULT_GROUP_COST_FRACTION of the useful token-forwards, at
        least MIN_GROUP_COST.

    Returns:
      A SamplingPlan; its groups' arrays are the per-step inputs of the sampler's scans.
    """
    if not isinstance(schedule, schedules.RingSchedule):
        raise ValueError(f"schedule must be a RingSchedule (from schedules.make_schedule), got "
                         f"{type(schedule).__name__}")
    band = schedules.effective_correction_band(schedule, correction_band)
    layout = schedules.layout_metadata(schedule, num_class_tokens, band)
    step_L = _sampler_steps(schedule, layout)
    num_steps = int(step_L.max()) + 1
    block_lens = np.bincount(step_L, minlength=num_steps)
    offsets = np.concatenate([[0], np.cumsum(block_lens)[:-1]])
    # Each step must be one contiguous run of the layout for its block to be a cache slice.
    assert np.all(np.diff(step_L) >= 0), "layout steps must be non-decreasing"

    if group_cost is None:
        group_cost = max(DEFAULT_GROUP_COST_FRACTION * float(block_lens.sum()), MIN_GROUP_COST)
    bounds = group_steps(block_lens, offsets, slot_cost=slot_cost, group_cost=group_cost,
                         max_groups=max_groups)
    group_dims = []
    for start, stop in bounds:
        block_len = int(block_lens[start:stop].max())
        group_dims.append((start, stop, block_len, int(offsets[stop - 1]) + block_len))
    total_slots = max(d[3] for d in group_dims)
    # Slots past the layout's end only ever hold padding: pad_layout marks them invalid, so the
    # nested mask hides them from every real query (a padded query sees only itself).
    padded = schedules.pad_layout(layout, total_slots)
    mask_SS = schedules.nested_mask(padded["step"], padded["is_new"], padded["is_class"],
                                    padded["valid"])

    ring_N = schedule.ring_map.ravel()
    num_pos = ring_N.shape[0]
    groups = []
    for start, stop, block_len, cache_len in group_dims:
        arrays = {key: [] for key in ("step", "cache_index", "flat_pos", "input_pos", "is_new",
                                      "is_class", "mask", "src", "writes", "writes_new")}
        for k in range(start, stop):
            lo, real = int(offsets[k]), int(block_lens[k])
            idx = np.arange(lo, lo + block_len)
            is_real = idx < lo + real
            take = np.where(is_real, idx, 0)
            flat_pos = np.where(is_real, padded["flat_pos"][take], -1)
            is_new = is_real & padded["is_new"][take]
            is_class = is_real & padded["is_class"][take]
            target = np.where(is_real, padded["target_pos"][take], -1)
            feeds = is_real & ~is_new & ~is_class
            src, writes = np.zeros((num_pos,), np.int32), np.zeros((num_pos,), bool)
            has_target = target >= 0
            src[target[has_target]] = np.flatnonzero(has_target)
            writes[target[has_target]] = True
            arrays["step"].append(k)
            arrays["cache_index"].append(lo)
            arrays["flat_pos"].append(flat_pos)
            arrays["input_pos"].append(np.where(feeds, flat_pos, 0))
            arrays["is_new"].append(is_new)
            arrays["is_class"].append(is_class)
            arrays["mask"].append(mask_SS[lo:lo + block_len, :cache_len])
            arrays["src"].append(src)
            arrays["writes"].append(writes)
            arrays["writes_new"].append(writes & (ring_N == k))
        dtypes = dict(step=np.int32, cache_index=np.int32, flat_pos=np.int32,
                      input_pos=np.int32, src=np.int32)
        arrays = {key: np.stack(v).astype(dtypes.get(key, bool)) for key, v in arrays.items()}
        groups.append(StepGroup(start, block_len, cache_len, arrays))

    # Every canvas position must be generated exactly once, at the step of its ring.
    first_writes = sum(g.arrays["writes_new"].sum(axis=0, dtype=np.int64) for g in groups)
    assert np.all(first_writes == 1), "each canvas position must be generated exactly once"
    return SamplingPlan(schedule, int(num_class_tokens), band, block_lens, offsets,
                        tuple(groups))
