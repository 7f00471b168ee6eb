"""Tests for radar_jax/schedules.py against hand-derived schedules and step ladders.

Layouts and masks (radar_jax/layouts.py, re-exported by schedules) are in test_layouts.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from radar_jax import schedules

# Cumulative canvas sizes |C_k| of euclidean-13 on 16x16, from the ring sizes in docs/method.md.
EUCLID16_RINGS = [1, 4, 8, 16, 20, 32, 32, 36, 46, 36, 20, 4, 1]


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
