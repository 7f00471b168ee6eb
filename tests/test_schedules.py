"""Tests for radar_jax/schedules.py against hand-derived schedules, layouts and masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from radar_jax import schedules

# Cumulative canvas sizes |C_k| of euclidean-13 on 16x16, from the ring sizes in RADAR.md.
EUCLID16_RINGS = [1, 4, 8, 16, 20, 32, 32, 36, 46, 36, 20, 4, 1]


def _rows(*rows):
    """Literal 0/1 strings -> bool matrix."""
    return np.array([[c == "1" for c in row] for row in rows], dtype=bool)


# ------------------------------------------------------------------------------ schedules
def test_euclidean_16x16_rings():
    sched = schedules.make_schedule("euclidean", 16)
    assert sched.grid == (16, 16)
    assert sched.num_steps == 13
    assert sched.ring_sizes.tolist() == EUCLID16_RINGS
    ring = sched.ring_map
    assert ring.dtype == np.int32 and ring.shape == (16, 16)
    # Hand values: ceil of the distance to the center (7, 7).
    assert ring[7, 7] == 0 and sched.start == (7, 7)
    assert ring[6, 7] == 1 and ring[7, 8] == 1        # d = 1
    assert ring[6, 6] == 2 and ring[5, 7] == 2        # d = sqrt(2) -> 2, d = 2 exactly -> 2
    assert ring[4, 3] == 5 and ring[7, 12] == 5       # d = 5 exactly (3-4-5), d = 5
    assert ring[0, 0] == 10                           # d = sqrt(98) = 9.90
    assert ring[15, 15] == 12                         # d = sqrt(128) = 11.3, the last ring alone


def test_euclidean_is_immutable_and_hashable():
    a = schedules.make_schedule("euclidean", 16)
    b = schedules.make_schedule("euclidean", (16, 16))
    assert a == b and hash(a) == hash(b)
    assert a != schedules.make_schedule("crops", 16, preset="crops13")
    with pytest.raises(ValueError):
        a.ring_map[0, 0] = 3
    # Usable as a static jit argument.
    fn = jax.jit(lambda x, sched: x * sched.num_steps, static_argnums=1)
    assert float(fn(jnp.float32(2.0), a)) == 26.0


def test_crops_presets_sizes():
    crops10 = schedules.make_schedule("crops", 16, preset="crops10")
    crops13 = schedules.make_schedule("crops", 16, preset="crops13")
    # Ring sizes are differences of squares of the crop sizes.
    assert crops10.ring_sizes.tolist() == [1, 3, 5, 7, 9, 11, 28, 36, 69, 87]
    assert crops13.ring_sizes.tolist() == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 44, 52, 60]
    assert crops10.start == (7, 7)
    # A crop of size 2 spans 7..8 on each axis; of size 3 spans 6..8.
    assert np.argwhere(crops10.canvas(1)).tolist() == [[7, 7], [7, 8], [8, 7], [8, 8]]
    assert crops10.canvas(2)[6:9, 6:9].all() and crops10.canvas(2).sum() == 9
    explicit = schedules.make_schedule("crops", 16, sizes=[1, 2, 3, 4, 5, 6, 8, 10, 13, 16])
    assert explicit == crops10
    assert schedules.make_schedule("crops", 16).num_steps == 16   # default sizes 1..16


def test_sequence_lengths():
    euclid = schedules.make_schedule("euclidean", 16)
    crops10 = schedules.make_schedule("crops", 16, preset="crops10")
    raster = schedules.make_schedule("raster", 16)
    assert len(schedules.train_layout(euclid)["step"]) == 1629
    assert len(schedules.train_layout(crops10)["step"]) == 681
    assert len(schedules.train_layout(raster)["step"]) == 256
    assert schedules.train_layout(euclid)["mask"].shape == (1629, 1629)


def test_non_square_grid_6x10():
    # Euclidean: center (2, 4); hand-counted lattice points per ceil-distance shell.
    euclid = schedules.make_schedule("euclidean", (6, 10))
    assert euclid.grid == (6, 10) and euclid.start == (2, 4)
    assert euclid.ring_sizes.tolist() == [1, 4, 8, 15, 14, 13, 5]
    assert euclid.ring_map[5, 9] == 6 and euclid.ring_map[0, 0] == 5   # d2 = 34, d2 = 20
    # Crops (default sizes 1..10): square crops clipped to 6 rows; the canvas of size P is
    # min(P, 6) x P, so the rings are 1, 3, 5, 7, 9, 11, then 6 per new column.
    crops = schedules.make_schedule("crops", (6, 10))
    assert crops.ring_sizes.tolist() == [1, 3, 5, 7, 9, 11, 6, 6, 6, 6]
    assert crops.start == (2, 4)
    assert len(schedules.layout_metadata(crops)["step"]) == 1 + 295


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


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("kind, grid, kw, message", [
    ("custom", 2, dict(ring_map=[[0, 1], [1, -1]]), "does not cover"),
    ("custom", 3, dict(ring_map=np.zeros((2, 3), int)), "shape"),
    ("custom", 2, dict(ring_map=[[0, 1], [3, 1]]), "empty"),
    ("custom", 2, dict(ring_map=[[0, 1], [1, 0]]), "ring 0 has 2 tokens"),
    ("custom", (1, 3), dict(ring_map=[[0, 2, 1]]), "not 4-connected"),
    ("custom", 3, dict(ring_map=[[1, 1, 1], [1, 0, 2], [1, 2, 1]]), "C_1"),
    ("spiral", 16, {}, "valid kinds"),
    ("crops", 16, dict(sizes=[2, 8, 16]), "start at 1"),
    ("crops", 16, dict(sizes=[1, 8, 12]), "cover"),
    ("crops", 8, dict(preset="crops10"), "16x16"),
    ("euclidean", 16, dict(sizes=[1]), "unexpected"),
])
def test_validation_errors(kind, grid, kw, message):
    with pytest.raises(ValueError, match=message):
        schedules.make_schedule(kind, grid, **kw)


def test_custom_map_accepted():
    # A diagonal sweep from the corner: every canvas is a connected staircase.
    ring = np.add.outer(np.arange(3), np.arange(4))
    sched = schedules.make_schedule("custom", (3, 4), ring_map=ring)
    assert sched.num_steps == 6 and sched.start == (0, 0)
    assert sched.ring_sizes.tolist() == [1, 2, 3, 3, 2, 1]


# ------------------------------------------------------------------------------ ladders
def test_merge_rings_canvases_and_length():
    base = schedules.make_schedule("euclidean", 16)
    keep = [0, 2, 5, 12]
    merged = schedules.merge_rings(base, keep)
    assert merged.kind == "euclidean" and merged.grid == (16, 16)
    assert merged.num_steps == 4 and merged.base_steps == (0, 2, 5, 12)
    for k, kept in enumerate(keep):
        np.testing.assert_array_equal(merged.canvas(k), base.canvas(kept))
    # 1 + |C_0| + |C_2| + |C_5| + |C_12| = 1 + 1 + 13 + 81 + 256.
    assert len(schedules.layout_metadata(merged)["step"]) == 352
    again = schedules.merge_rings(merged, [0, 2, 3])        # composes base_steps
    assert again.base_steps == (0, 5, 12)
    for bad in ([2, 12], [0, 5], [0, 5, 5, 12], [0, 13]):
        with pytest.raises(ValueError, match="keep"):
            schedules.merge_rings(base, bad)
    with pytest.raises(ValueError, match="raster"):
        schedules.merge_rings(schedules.make_schedule("raster", 4), [0, 15])


def test_sub_ladder_rule():
    base = schedules.make_schedule("euclidean", 16)
    assert schedules.sub_ladder(base, 4).base_steps == (0, 4, 8, 12)
    assert schedules.sub_ladder(base, 6).base_steps == (0, 2, 5, 7, 10, 12)  # 2.4, 4.8, 7.2, 9.6
    assert schedules.sub_ladder(base, 13) is base
    assert schedules.sub_ladder(base, 10).num_steps == 10
    with pytest.raises(ValueError, match="num_steps"):
        schedules.sub_ladder(base, 14)


def test_sample_sub_ladder():
    rng = np.random.default_rng(0)
    for _ in range(50):
        keep = schedules.sample_sub_ladder(13, rng, min_steps=5, keep_prob=0.2)
        assert keep[0] == 0 and keep[-1] == 12 and len(keep) >= 5
        assert np.all(np.diff(keep) > 0)
    assert schedules.sample_sub_ladder(13, rng, keep_prob=1.0).tolist() == list(range(13))
    assert schedules.sample_sub_ladder(13, rng, keep_prob=0.0).tolist() == [0, 12]
    a = schedules.sample_sub_ladder(13, np.random.default_rng(7))
    b = schedules.sample_sub_ladder(13, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)


def test_padded_mask_inside_jit_matches_numpy():
    base = schedules.make_schedule("euclidean", 8)
    full_len = len(schedules.layout_metadata(base)["step"])
    merged = schedules.merge_rings(base, [0, 2, base.num_steps - 1])
    reference = schedules.train_layout(merged)
    real = len(reference["step"])
    padded = schedules.pad_layout(schedules.layout_metadata(merged), full_len)
    assert padded["valid"].sum() == real and padded["step"][real:].min() > padded["step"][:real].max()

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
