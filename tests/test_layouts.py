"""Tests for radar_jax/layouts.py (through its re-exports in radar_jax.schedules, the contract)
against hand-written layouts and masks, including the correction band."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from radar_jax import layouts, schedules

EUCLID16_RINGS = [1, 4, 8, 16, 20, 32, 32, 36, 46, 36, 20, 4, 1]


def _rows(*rows):
    """Literal 0/1 strings -> bool matrix."""
    return np.array([[c == "1" for c in row] for row in rows], dtype=bool)


def test_sequence_lengths():
    euclid = schedules.make_schedule("euclidean", 16)
    crops10 = schedules.make_schedule("crops", 16, preset="crops10")
    raster = schedules.make_schedule("raster", 16)
    assert len(schedules.train_layout(euclid)["step"]) == 1629
    assert len(schedules.train_layout(crops10)["step"]) == 681
    assert len(schedules.train_layout(raster)["step"]) == 256
    assert schedules.train_layout(euclid)["mask"].shape == (1629, 1629)


# ------------------------------------------------------------------------------ layouts
def _crops_4x4():
    # Grid 4x4, center (1, 1). Crop 1: {(1,1)}; crop 2: rows/cols 1..2; crop 4: everything.
    #   2 2 2 2
    #   2 0 1 2
    #   2 1 1 2
    #   2 2 2 2
    return schedules.make_schedule("crops", 4, sizes=[1, 2, 4])


def test_crops_4x4_layout_by_hand():
    sched = _crops_4x4()
    assert sched.ring_map.tolist() == [[2, 2, 2, 2], [2, 0, 1, 2], [2, 1, 1, 2], [2, 2, 2, 2]]
    layout = schedules.train_layout(sched)
    # class | B0: new 5 | B1: known 5, new 6 9 10 | B2: known 5 6 9 10, new the border.
    assert layout["flat_pos"].tolist() == [-1, 5, 5, 6, 9, 10, 5, 6, 9, 10,
                                           0, 1, 2, 3, 4, 7, 8, 11, 12, 13, 14, 15]
    assert layout["target_pos"].tolist() == layout["flat_pos"].tolist()
    assert layout["step"].tolist() == [-1, 0, 1, 1, 1, 1] + [2] * 16
    assert layout["is_new"].tolist() == [False, True, False, True, True, True] + \
        [False] * 4 + [True] * 12
    assert layout["is_class"].tolist() == [True] + [False] * 21
    assert schedules.block_bounds(sched).tolist() == [1, 2, 6, 22]
    expected = _rows(
        "1000000000000000000000",  # class: itself only
        "1100000000000000000000",  # B0 new (5): class + itself
        "1110000000000000000000",  # B1 known (5): class, step 0, itself; not the new ring
        "1111110000000000000000",  # B1 new (6): class, step 0, whole block 1
        "1111110000000000000000",  # B1 new (9)
        "1111110000000000000000",  # B1 new (10)
        "1111111111000000000000",  # B2 known (5): steps 0-1 + known part of block 2
        "1111111111000000000000",  # B2 known (6)
        "1111111111000000000000",  # B2 known (9)
        "1111111111000000000000",  # B2 known (10)
        *["1111111111111111111111"] * 12,  # B2 new: everything
    )
    np.testing.assert_array_equal(layout["mask"], expected)


def test_mask_invariants_euclidean():
    layout = schedules.train_layout(schedules.make_schedule("euclidean", 16))
    mask, step, new = layout["mask"], layout["step"], layout["is_new"]
    s_i, s_j = step[:, None], step[None, :]
    assert mask[:, 0].all()                                   # class key visible to all
    assert not mask[s_j > s_i].any()                          # nothing attends a later step
    known_to_new = (s_i == s_j) & ~new[:, None] & new[None, :]
    assert known_to_new.any() and not mask[known_to_new].any()
    assert mask[(s_j < s_i)].all()                            # every earlier step is visible
    assert np.diagonal(mask).all()


def test_raster_layout_is_causal():
    raster = schedules.make_schedule("raster", (4, 4))
    layout = schedules.train_layout(raster)
    assert layout["flat_pos"].tolist() == [-1] + list(range(15))
    assert layout["target_pos"].tolist() == list(range(16))   # the class token predicts 0
    assert not layout["is_new"].any()
    np.testing.assert_array_equal(layout["mask"], np.tril(np.ones((16, 16), bool)))
    # Several class tokens: a prefix; only the last one predicts position 0.
    layout2 = schedules.train_layout(schedules.make_schedule("raster", 16), num_class_tokens=3)
    assert len(layout2["step"]) == 258
    assert layout2["target_pos"][:4].tolist() == [-1, -1, 0, 1]
    assert layout2["flat_pos"][:4].tolist() == [-1, -1, -1, 0]
    np.testing.assert_array_equal(layout2["mask"], np.tril(np.ones((258, 258), bool)))


def test_several_class_tokens_ring_layout():
    layout = schedules.train_layout(_crops_4x4(), num_class_tokens=2)
    assert len(layout["step"]) == 23
    mask = layout["mask"]
    # Class queries are causal among class tokens; every token sees both class keys.
    assert mask[0, :2].tolist() == [True, False] and mask[1, :2].tolist() == [True, True]
    assert mask[2:, :2].all() and not mask[:2, 2:].any()


def test_padded_mask_inside_jit_matches_numpy():
    base = schedules.make_schedule("euclidean", 8)
    full_len = len(schedules.layout_metadata(base)["step"])
    merged = schedules.merge_rings(base, [0, 2, base.num_steps - 1])
    reference = schedules.train_layout(merged)
    real = len(reference["step"])
    padded = schedules.pad_layout(schedules.layout_metadata(merged), full_len)
    assert padded["valid"].sum() == real
    assert padded["step"][real:].min() > padded["step"][:real].max()

    @jax.jit
    def mask_fn(step, is_new, is_class, valid):
        return schedules.nested_mask(step, is_new, is_class, valid, xp=jnp)

    # A batch of two examples with different ladders, as in RDS.
    other = schedules.pad_layout(schedules.layout_metadata(base), full_len)
    batch = {k: np.stack([padded[k], other[k]]) for k in ("step", "is_new", "is_class", "valid")}
    mask = np.asarray(mask_fn(batch["step"], batch["is_new"], batch["is_class"], batch["valid"]))
    assert mask.shape == (2, full_len, full_len)
    np.testing.assert_array_equal(mask[0, :real, :real], reference["mask"])
    assert not mask[0, :real, real:].any()                   # valid rows never see padding
    np.testing.assert_array_equal(mask[0, real:], np.eye(full_len, dtype=bool)[real:])
    np.testing.assert_array_equal(mask[1], schedules.train_layout(base)["mask"])
    # pad_layout rebuilds a mask it is given, identically to the jitted one.
    np.testing.assert_array_equal(
        schedules.pad_layout(reference, full_len)["mask"], mask[0])


# ------------------------------------------------------------------------------ correction band
def _strip_2x3():
    # A 4-ring map on a 2x3 grid (flat positions 0..5 in raster order):
    #   1 0 2        N_0 = {1}, N_1 = {0, 4}, N_2 = {2, 5}, N_3 = {3}
    #   3 1 2
    return schedules.make_schedule("custom", (2, 3), ring_map=[[1, 0, 2], [3, 1, 2]])


def test_band_1_layout_and_mask_by_hand():
    layout = schedules.train_layout(_strip_2x3(), correction_band=1)
    # class | B0: new 1 | B1: known 1, new 0 4 | B2: known 0 4, new 2 5 | B3: known 2 5, new 3.
    assert layout["flat_pos"].tolist() == [-1, 1, 1, 0, 4, 0, 4, 2, 5, 2, 5, 3]
    assert layout["target_pos"].tolist() == layout["flat_pos"].tolist()
    assert layout["step"].tolist() == [-1, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]
    assert layout["is_new"].tolist() == [bool(int(c)) for c in "010110011001"]
    assert layout["is_class"].tolist() == [True] + [False] * 11
    assert schedules.block_bounds(_strip_2x3(), correction_band=1).tolist() == [1, 2, 5, 9, 12]
    expected = _rows(
        "100000000000",  # class
        "110000000000",  # B0 new (1)
        "111000000000",  # B1 known (1): class, step 0, itself; not its new ring
        "111110000000",  # B1 new (0)
        "111110000000",  # B1 new (4)
        "111111100000",  # B2 known (0): steps 0-1 + the known band of step 2
        "111111100000",  # B2 known (4)
        "111111111000",  # B2 new (2): steps 0-1 + all of block 2
        "111111111000",  # B2 new (5)
        "111111111110",  # B3 known (2): ring 0 is no longer fed, but its block 0/1 keys are
        "111111111110",  # B3 known (5)
        "111111111111",  # B3 new (3): everything
    )
    np.testing.assert_array_equal(layout["mask"], expected)


def test_band_2_layout_and_mask_by_hand():
    layout = schedules.train_layout(_strip_2x3(), correction_band=2)
    # B2 re-feeds rings 0-1 (positions 0 1 4), B3 rings 1-2 (positions 0 2 4 5): ring 0 left.
    assert layout["flat_pos"].tolist() == [-1, 1, 1, 0, 4, 0, 1, 4, 2, 5, 0, 2, 4, 5, 3]
    assert layout["step"].tolist() == [-1, 0, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3]
    assert layout["is_new"].tolist() == [bool(int(c)) for c in "010110001100001"]
    expected = _rows(
        "100000000000000",  # class
        "110000000000000",  # B0 new (1)
        "111000000000000",  # B1 known (1)
        "111110000000000",  # B1 new (0)
        "111110000000000",  # B1 new (4)
        *["111111110000000"] * 3,   # B2 known (0, 1, 4)
        *["111111111100000"] * 2,   # B2 new (2, 5)
        *["111111111111110"] * 4,   # B3 known (0, 2, 4, 5)
        "111111111111111",  # B3 new (3)
    )
    np.testing.assert_array_equal(layout["mask"], expected)
    # A band of K-1 = 3 rings (or more) is the whole known area: B3 re-feeds 0 1 2 4 5.
    full = schedules.train_layout(_strip_2x3())
    assert full["flat_pos"][-6:].tolist() == [0, 1, 2, 4, 5, 3] and len(full["step"]) == 16
    for band in (3, 7):
        banded = schedules.train_layout(_strip_2x3(), correction_band=band)
        for key in full:
            np.testing.assert_array_equal(banded[key], full[key])


def _banded_length(ring_sizes, band):
    """1 + sum_k (|N_k| + |K_k|) from a literal list of ring sizes."""
    total = 1
    for k, new in enumerate(ring_sizes):
        first = 0 if band is None else max(0, k - band)
        total += new + sum(ring_sizes[first:k])
    return total


CROPS10_RINGS = [1, 3, 5, 7, 9, 11, 28, 36, 69, 87]


@pytest.mark.parametrize("kind,kw,rings,band,want", [
    # b = 1 feeds every ring twice but the last once: 1 + 2*256 - |N_12| = 512.
    ("euclidean", {}, EUCLID16_RINGS, 1, 512),
    ("euclidean", {}, EUCLID16_RINGS, 2, 763),       # 1 + 256 + 255 + (255 - 4)
    ("euclidean", {}, EUCLID16_RINGS, None, 1629),
    ("crops", {"preset": "crops10"}, CROPS10_RINGS, 1, 426),   # 1 + 2*256 - 87
    ("crops", {"preset": "crops10"}, CROPS10_RINGS, 2, 526),   # 1 + 256 + 169 + 100
    ("crops", {"preset": "crops10"}, CROPS10_RINGS, None, 681),
])
def test_banded_packed_length_by_hand(kind, kw, rings, band, want):
    schedule = schedules.make_schedule(kind, 16, **kw)
    assert schedule.ring_sizes.tolist() == rings
    assert _banded_length(rings, band) == want
    layout = schedules.layout_metadata(schedule, correction_band=band)
    assert len(layout["step"]) == want
    assert schedules.block_bounds(schedule, correction_band=band)[-1] == want


def test_band_keeps_every_known_position_visible():
    # Older rings are not re-fed but stay visible through earlier blocks' keys: at step k a
    # known query sees every position of C_{k-1}, a new query every position of C_k.
    schedule = schedules.make_schedule("euclidean", (6, 9))
    for band in (1, 2):
        layout = schedules.train_layout(schedule, correction_band=band)
        for i in range(1, len(layout["step"])):
            k = layout["step"][i]
            seen = set(layout["flat_pos"][layout["mask"][i]].tolist()) - {-1}
            canvas = schedule.canvas(k) if layout["is_new"][i] else (
                schedule.canvas(k - 1) if k else np.zeros(schedule.grid, bool))
            assert seen == set(np.flatnonzero(canvas).tolist()), (band, i)
        # ...and a known query of step k is fed only rings k-b..k-1.
        known = ~layout["is_new"] & ~layout["is_class"]
        ring = schedule.ring_map.ravel()[layout["flat_pos"][known]]
        lag = layout["step"][known] - ring
        assert lag.min() == 1 and lag.max() == band


def test_band_on_an_rds_sub_ladder_counts_merged_rings():
    base = schedules.make_schedule("euclidean", 16)
    merged = schedules.merge_rings(base, [0, 2, 5, 12])
    # Merged rings: |C_0| = 1, |C_2| - 1 = 12, |C_5| - 13 = 68, 256 - 81 = 175.
    assert merged.ring_sizes.tolist() == [1, 12, 68, 175]
    layout = schedules.layout_metadata(merged, correction_band=1)
    assert len(layout["step"]) == 1 + 256 + (256 - 175)
    # Block 3 re-feeds merged ring 2 = base rings 3..5 only.
    last = layout["step"] == 3
    fed = layout["flat_pos"][last & ~layout["is_new"]]
    assert sorted(set(base.ring_map.ravel()[fed].tolist())) == [3, 4, 5]
    # Any sub-ladder's banded layout fits in the full schedule's banded layout, so per-example
    # RDS can pad every example to the full length.
    full_len = len(schedules.layout_metadata(base, correction_band=1)["step"])
    padded = schedules.pad_layout(layout, full_len)
    assert padded["valid"].sum() == len(layout["step"]) <= full_len
    rng = np.random.default_rng(0)
    for band in (1, 2):
        full_len = len(schedules.layout_metadata(base, correction_band=band)["step"])
        for _ in range(20):
            sub = schedules.merge_rings(base, schedules.sample_sub_ladder(13, rng))
            assert len(schedules.layout_metadata(sub, correction_band=band)["step"]) <= full_len


def test_raster_ignores_the_band():
    raster = schedules.make_schedule("raster", (4, 4))
    plain = schedules.train_layout(raster)
    for band in (1, 2):
        banded = schedules.train_layout(raster, correction_band=band)
        for key in plain:
            np.testing.assert_array_equal(banded[key], plain[key])
    assert schedules.effective_correction_band(raster, 1) is None


def test_effective_band():
    euclid = schedules.make_schedule("euclidean", 16)    # 13 steps
    assert [schedules.effective_correction_band(euclid, b) for b in (None, 1, 11, 12, 40)] == [
        None, 1, 11, None, None]


@pytest.mark.parametrize("band", [0, -1, 1.5, True, "all", np.float32(2)])
def test_bad_band_is_rejected_with_its_value(band):
    schedule = _strip_2x3()
    for fn in (schedules.layout_metadata, schedules.train_layout):
        with pytest.raises(ValueError, match=r"correction_band=.*int >= 1.*None") as err:
            fn(schedule, correction_band=band)
        assert repr(band) in str(err.value)


def test_schedules_reexports_the_layout_api():
    for name in ("train_layout", "layout_metadata", "pad_layout", "nested_mask", "block_bounds",
                 "check_correction_band", "effective_correction_band"):
        assert getattr(schedules, name) is getattr(layouts, name)
