"""Tests for radar_jax.sampling and radar_jax.sampling_plan.

The KV-cached sampler is checked against a slow reference written here: at every step it runs
the full, uncached Transformer forward over the whole teacher-forced layout
(`schedules.train_layout`, with the case's correction band), with each block's known inputs set
to the canvas as it was before that block's step, takes the argmax at the block's positions and
writes it back (so positions outside the block keep their value). Greedy
decoding must give exactly the same tokens at every step. The raster sampler must also
reproduce the reference PyTorch LlamaGen's greedy `generate` (../shared/fixtures).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import shared_fixture
from radar_jax import sampling, sampling_plan, schedules
from radar_jax.convert.gpt import load_llamagen_gpt
from radar_jax.models import transformer as T

LABELS = np.array([3, 7], np.int32)


@pytest.fixture(scope="module")
def tiny():
    """Tiny random model (8x8 grid, vocab 64) whose greedy samples are diverse.

    The output head is zero-initialised (every argmax would be token 0) and with std-0.02
    weights greedy decoding collapses onto 2-3 tokens, which would make token equality a weak
    check. So every matrix and embedding is re-drawn with std 0.2 (RMSNorm scales stay 1).
    """
    config = T.model_config("tiny")
    params = T.init_params(config, jax.random.key(0))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    redrawn = [x if path[-1].key == "weight" else 0.2 * jax.random.normal(key, x.shape)
               for (path, x), key in zip(leaves, keys)]
    return config, jax.device_put(jax.tree_util.tree_unflatten(treedef, redrawn))


def _forward(config, params):
    """Jitted uncached forward over a whole layout: (tokens, labels, layout...) -> logits."""
    model = T.Transformer(config)
    return jax.jit(lambda tokens, labels, flat_pos, is_new, is_class, mask: model.apply(
        {"params": params}, tokens, labels, flat_pos, is_new, is_class, mask)[0])


@pytest.fixture(scope="module")
def full_forward(tiny):
    config, params = tiny
    return _forward(config, params)


# A non-square grid for the same tiny weights (no parameter depends on the grid or length).
GRID_6X9 = (6, 9)


@pytest.fixture(scope="module")
def tiny_6x9(tiny):
    """(config, params, full forward) of the tiny model on a 6x9 grid."""
    config = T.model_config("tiny", grid=GRID_6X9, block_size=54)
    return config, tiny[1], _forward(config, tiny[1])


def reference_greedy(full_forward, config, schedule, labels, cfg_scale=1.0, linear=False,
                     correct=True, fixed_codes=None, fixed_mask=None, correction_band=None):
    """Slow greedy sampler: one full teacher-forced forward per step, no cache, no padding.

    Returns (codes (B, H, W), canvases (K, B, H, W)), -1 where nothing is generated yet.
    """
    lay = schedules.train_layout(schedule, correction_band=correction_band)
    batch, num_pos = len(labels), schedule.grid[0] * schedule.grid[1]
    raster = schedule.kind == "raster"
    # Raster: index 0 (class) predicts position 0, index i feeds token i-1 and predicts i.
    num_steps = num_pos if raster else schedule.num_steps
    ring = schedule.ring_map.ravel()
    canvas = np.full((batch, num_pos), -1, np.int64)
    if fixed_mask is not None:
        fixed_codes, fixed_mask = fixed_codes.reshape(batch, -1), fixed_mask.reshape(batch, -1)
        canvas = np.where(fixed_mask, fixed_codes, canvas)
    tokens = np.zeros((batch, len(lay["flat_pos"])), np.int32)
    history = []
    for k in range(num_steps):
        rows = np.array([k]) if raster else np.flatnonzero(lay["step"] == k)
        feed = rows[~lay["is_new"][rows] & ~lay["is_class"][rows]]
        tokens[:, feed] = canvas[:, lay["flat_pos"][feed]]  # the canvas before this step
        meta = (lay["flat_pos"], lay["is_new"], lay["is_class"], lay["mask"])
        logits = np.asarray(full_forward(tokens, labels, *meta))[:, rows]
        if cfg_scale != 1.0:
            null = np.full_like(labels, config.num_classes)
            uncond = np.asarray(full_forward(tokens, null, *meta))[:, rows]
            scale = 1 + (cfg_scale - 1) * k / (num_steps - 1) if linear else cfg_scale
            logits = uncond + scale * (logits - uncond)
        targets = lay["target_pos"][rows]
        keep = targets >= 0
        if not correct:
            keep &= ring[np.maximum(targets, 0)] == k  # only the new ring
        canvas[:, targets[keep]] = logits.argmax(-1)[:, keep]
        if fixed_mask is not None:
            canvas = np.where(fixed_mask, fixed_codes, canvas)
        history.append(canvas.copy())
    grid = schedule.grid
    return canvas.reshape(batch, *grid), np.stack(history).reshape(num_steps, batch, *grid)


def _fixed_center(grid, batch, vocab, seed=5):
    """Out-painting inputs: a 3x3 patch around the center fixed to random codes."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, vocab, (batch, *grid)).astype(np.int32)
    mask = np.zeros((batch, *grid), bool)
    ch, cw = schedules.grid_center(grid)
    mask[:, ch - 1:ch + 2, cw - 1:cw + 2] = True
    return codes, mask


# (schedule kind, cfg_scale, linear cfg, correct, fixed region, correction band, grid, max
# groups). Few cases: each ring case is a compile of the sampler (one scan body per group of
# steps); raster compiles are cheap. The band cases cover each b in {1, 2, None} on euclidean,
# crops and the 6x9 grid, each b with CFG on and off and with correct=False somewhere, in 7
# compiles instead of 36. Three cases keep the default plan (6-8 groups, the cache grown
# between them); the others cap it at 2 groups (half the compile time, more padding) or 1 (one
# scan over every step, no growth): the cached sampler must equal the reference whatever the
# grouping.
D = sampling_plan.DEFAULT_MAX_GROUPS
CASES = {
    "euclidean": ("euclidean", 1.0, False, True, False, None, None, D),
    "euclidean-cfg-linear-nocorrect": ("euclidean", 2.0, True, False, False, None, None, 2),
    "crops-cfg-fixed": ("crops", 3.0, False, True, True, None, None, D),
    "crops-nocorrect": ("crops", 1.0, False, False, False, None, None, 1),
    "raster": ("raster", 1.0, False, True, False, None, None, D),
    "raster-cfg": ("raster", 2.5, False, True, False, None, None, D),
    "euclidean-b1": ("euclidean", 1.0, False, True, False, 1, None, 2),
    "euclidean-b2-cfg-linear-nocorrect": ("euclidean", 2.0, True, False, False, 2, None, 2),
    "crops-b1-cfg-fixed": ("crops", 3.0, False, True, True, 1, None, 2),
    "crops-b2-nocorrect": ("crops", 1.0, False, False, False, 2, None, 1),
    "euclidean6x9-cfg": ("euclidean", 2.0, False, True, False, None, GRID_6X9, D),
    "euclidean6x9-b1-cfg-nocorrect": ("euclidean", 2.0, False, False, False, 1, GRID_6X9, 2),
    "euclidean6x9-b2": ("euclidean", 1.0, False, True, False, 2, GRID_6X9, 2),
}


@pytest.fixture(scope="module")
def greedy_runs(tiny, full_forward, tiny_6x9):
    """For each case: (schedule, sampler codes, sampler canvases, reference codes/canvases)."""
    runs = {}
    for name, (kind, cfg_scale, linear, correct, fixed, band, grid, max_groups) in CASES.items():
        config, params = tiny
        forward = full_forward
        if grid is not None:
            config, params, forward = tiny_6x9
        schedule = schedules.make_schedule(kind, config.grid)
        fixed_codes, fixed_mask = (_fixed_center(config.grid, len(LABELS), config.vocab_size)
                                   if fixed else (None, None))
        codes, canvases = sampling.sample(
            params, config, schedule, LABELS, jax.random.key(0), cfg_scale=cfg_scale,
            cfg_schedule="linear" if linear else "constant", top_k=1, correct=correct,
            return_canvases=True, fixed_codes=fixed_codes, fixed_mask=fixed_mask,
            correction_band=band, max_groups=max_groups)
        ref_codes, ref_canvases = reference_greedy(
            forward, config, schedule, LABELS, cfg_scale, linear, correct, fixed_codes,
            fixed_mask, band)
        plan = sampling.plan_for_config(schedule, config, band, max_groups)
        runs[name] = dict(schedule=schedule, band=band, groups=len(plan.groups),
                          codes=np.asarray(codes),
                          canvases=np.asarray(canvases), ref_codes=ref_codes,
                          ref_canvases=ref_canvases, fixed=(fixed_codes, fixed_mask))
    return runs


# ----------------------------------------------------------------------------------------------
# KV cache: the cached, padded, grouped sampler equals the full teacher-forced forward.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_cached_sampler_equals_uncached_reference(greedy_runs, case):
    run = greedy_runs[case]
    assert run["codes"].dtype == np.int32 and run["codes"].shape == (2, *run["schedule"].grid)
    # Every step, not only the end: a wrong mask or cache slot shows up as soon as it happens.
    np.testing.assert_array_equal(run["canvases"], run["ref_canvases"])
    np.testing.assert_array_equal(run["codes"], run["ref_codes"])
    # A random model with a live head must not collapse onto one token (that would make the
    # equality above vacuous).
    assert len(np.unique(run["codes"])) >= 16
    # The grouping is the one the case names: capped, or the default plan's several groups
    # (raster's one-token blocks are one group).
    kind, cap = CASES[case][0], CASES[case][-1]
    if kind != "raster":
        assert run["groups"] == cap if cap < D else run["groups"] > 2, run["groups"]


def test_band_cases_are_distinct_from_the_full_known_area(greedy_runs):
    # The band must change what the model sees: otherwise the band cases would only repeat the
    # b = None ones.
    for banded, full in (("euclidean-b1", "euclidean"), ("euclidean6x9-b2", "euclidean6x9-cfg"),
                         ("crops-b2-nocorrect", "crops-nocorrect")):
        assert np.any(greedy_runs[banded]["codes"] != greedy_runs[full]["codes"]), banded


def test_rings_that_left_the_band_keep_their_value(greedy_runs):
    # With correction on, step k re-predicts rings k-b..k-1 only: older rings are frozen, and
    # the band itself does get corrected at some step.
    for name in ("euclidean-b1", "crops-b1-cfg-fixed", "euclidean6x9-b2"):
        run = greedy_runs[name]
        schedule, band, canvases = run["schedule"], run["band"], run["canvases"]
        corrected = False
        for k in range(1, schedule.num_steps):
            old = schedule.ring_map < k - band
            np.testing.assert_array_equal(canvases[k][:, old], canvases[k - 1][:, old])
            in_band = (schedule.ring_map >= k - band) & (schedule.ring_map < k)
            corrected |= bool(np.any(canvases[k][:, in_band] != canvases[k - 1][:, in_band]))
        assert corrected, name


def test_plans_of_the_tested_cases_use_several_padded_groups(tiny):
    # The equality test above must exercise padding and several cache lengths.
    config, _ = tiny
    for kind in ("euclidean", "crops"):
        plan = sampling.plan_for_config(schedules.make_schedule(kind, config.grid), config)
        assert len(plan.groups) >= 3 and plan.padded_token_forwards > 0


def test_correction_changes_the_known_area(greedy_runs):
    # With correction the known area is re-predicted; without it, it is frozen once written.
    corrected = greedy_runs["euclidean"]["canvases"]
    frozen = greedy_runs["euclidean-cfg-linear-nocorrect"]
    schedule = frozen["schedule"]
    for k in range(1, schedule.num_steps):
        known = schedule.canvas(k - 1)
        np.testing.assert_array_equal(frozen["canvases"][k][:, known],
                                      frozen["canvases"][k - 1][:, known])
    changed = [np.any(corrected[k][:, schedule.canvas(k - 1)]
                      != corrected[k - 1][:, schedule.canvas(k - 1)])
               for k in range(1, schedule.num_steps)]
    assert any(changed)


def test_canvas_after_step_k_fills_exactly_c_k(greedy_runs):
    for name in ("euclidean", "crops-nocorrect", "raster", "euclidean-b1",
                 "euclidean6x9-b1-cfg-nocorrect"):
        run = greedy_runs[name]
        schedule = run["schedule"]
        num_steps = run["canvases"].shape[0]
        assert num_steps == (schedule.grid[0] * schedule.grid[1] if schedule.kind == "raster"
                             else schedule.num_steps)
        for k in range(num_steps):
            filled = run["canvases"][k] >= 0
            np.testing.assert_array_equal(filled, np.broadcast_to(schedule.canvas(k),
                                                                  filled.shape))
        np.testing.assert_array_equal(run["canvases"][-1], run["codes"])


@pytest.mark.parametrize("case", ["crops-cfg-fixed", "crops-b1-cfg-fixed"])
def test_fixed_codes_are_kept_at_every_step(greedy_runs, case):
    run = greedy_runs[case]
    fixed_codes, fixed_mask = run["fixed"]
    np.testing.assert_array_equal(run["codes"][fixed_mask], fixed_codes[fixed_mask])
    for canvas in run["canvases"]:
        np.testing.assert_array_equal(canvas[fixed_mask], fixed_codes[fixed_mask])
    # Outside the fixed region, everything generated: C_k plus the fixed patch.
    assert np.all(run["codes"] >= 0)


# ----------------------------------------------------------------------------------------------
# Parity with the reference PyTorch LlamaGen sampler.
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llamagen():
    path = shared_fixture("llamagen_gpt_tiny.npz")
    config, params = load_llamagen_gpt(path)
    return config, jax.device_put(params), np.load(path)


@pytest.mark.parametrize("cfg_scale,key", [(1.0, "greedy_cfg1"), (3.0, "greedy_cfg3")])
def test_raster_greedy_matches_llamagen_generate(llamagen, cfg_scale, key):
    config, params, fx = llamagen
    schedule = schedules.make_schedule("raster", config.grid)
    codes = sampling.sample(params, config, schedule, fx["greedy_labels"], jax.random.key(0),
                            cfg_scale=cfg_scale, top_k=1)
    want = fx[key].reshape(-1, *config.grid)
    np.testing.assert_array_equal(np.asarray(codes), want)


# ----------------------------------------------------------------------------------------------
# Stochastic sampling.
# ----------------------------------------------------------------------------------------------
def test_sampling_is_reproducible_per_key_and_varies_across_keys(tiny):
    config, params = tiny
    schedule = schedules.make_schedule("raster", config.grid)
    draw = lambda seed: np.asarray(sampling.sample(  # noqa: E731
        params, config, schedule, LABELS, jax.random.key(seed), top_k=8, top_p=0.9))
    first, again, other = draw(1), draw(1), draw(2)
    np.testing.assert_array_equal(first, again)
    assert np.mean(first != other) > 0.5
    assert first.min() >= 0 and first.max() < config.vocab_size


def test_filter_logits_hand_cases():
    logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
    kept = lambda x: np.isfinite(np.asarray(x)).tolist()  # noqa: E731
    assert kept(sampling.filter_logits(logits, top_k=2)) == [True, True, False, False]
    # Nucleus: smallest set with cumulative probability >= top_p.
    assert kept(sampling.filter_logits(logits, top_p=0.8)) == [True, True, False, False]
    assert kept(sampling.filter_logits(logits, top_p=0.81)) == [True, True, True, False]
    assert kept(sampling.filter_logits(logits, top_p=0.3)) == [True, False, False, False]
    assert kept(sampling.filter_logits(logits, top_p=1.0)) == [True] * 4
    # Order: temperature, then top-k, then top-p on the renormalised survivors.
    out = sampling.filter_logits(logits, temperature=2.0, top_k=3, top_p=0.5)
    np.testing.assert_allclose(np.asarray(out)[:1], np.log(0.5) / 2.0, rtol=1e-6)
    scaled = np.exp(np.log([0.5, 0.3, 0.15]) / 2)
    first_two = scaled[:1].sum() / scaled.sum()  # ~0.43 < 0.5, so the second token stays
    assert first_two < 0.5
    assert kept(out) == [True, True, False, False]


def test_cfg_scales_linear_ramp():
    np.testing.assert_allclose(sampling.cfg_scales(3.0, 5, "linear"), [1, 1.5, 2, 2.5, 3])
    np.testing.assert_allclose(sampling.cfg_scales(3.0, 3, "constant"), [3, 3, 3])
    np.testing.assert_allclose(sampling.cfg_scales(3.0, 1, "linear"), [3])


# ----------------------------------------------------------------------------------------------
# The static plan: padding waste, masks, grouping.
# ----------------------------------------------------------------------------------------------
PAPER_SCHEDULES = [("euclidean", 16, {}, 13, 1629), ("crops", 16, {"preset": "crops10"}, 10, 681),
                   ("crops", 16, {"preset": "crops13"}, 13, 982), ("euclidean", 8, {}, 7, None)]


@pytest.mark.parametrize("kind,side,kw,steps,useful", PAPER_SCHEDULES)
def test_padding_waste_under_a_quarter(kind, side, kw, steps, useful):
    schedule = schedules.make_schedule(kind, side, **kw)
    for config in (T.model_config("B"), T.model_config("tiny", block_size=side * side)):
        plan = sampling.plan_for_config(schedule, config)
        assert plan.num_forward_passes == steps
        # Useful work = class token + sum_k |C_k| (docs/method.md: 1629 euclidean, 681 crops10).
        assert plan.useful_token_forwards == 1 + int(schedule.canvas_sizes.sum())
        if useful is not None:
            assert plan.useful_token_forwards == useful
        padded = sum(g.num_steps * g.block_len for g in plan.groups) - plan.useful_token_forwards
        assert plan.padded_token_forwards == padded
        assert plan.padded_token_forwards / plan.useful_token_forwards < 0.25


# (schedule kind, kw, band, useful token-forwards): 1 + sum_k (|K_k| + |N_k|), hand-computed in
# test_layouts.py from the ring sizes (b = 1: 1 + 2*256 - |N_{K-1}|).
BANDED_PLANS = [("euclidean", {}, 1, 512), ("euclidean", {}, 2, 763),
                ("crops", {"preset": "crops10"}, 1, 426), ("crops", {"preset": "crops10"}, 2, 526)]


@pytest.mark.parametrize("kind,kw,band,useful", BANDED_PLANS)
def test_banded_plans_feed_the_banded_layout_with_little_padding(kind, kw, band, useful):
    schedule = schedules.make_schedule(kind, 16, **kw)
    plan = sampling.plan_for_config(schedule, T.model_config("B"), band)
    assert plan.correction_band == band and plan.num_forward_passes == schedule.num_steps
    assert plan.useful_token_forwards == useful == plan.cache_len
    assert plan.summary()["correction_band"] == band
    assert plan.padding_waste < 0.1
    # A band of K-1 rings or more is the full known area, and plans say so.
    full = sampling.plan_for_config(schedule, T.model_config("B"), schedule.num_steps - 1)
    assert full.correction_band is None and full.useful_token_forwards == 1 + int(
        schedule.canvas_sizes.sum())


def test_raster_plan_is_one_token_per_step():
    plan = sampling_plan.sampling_plan(schedules.make_schedule("raster", 16))
    assert plan.num_forward_passes == 256 and plan.padded_token_forwards == 0
    assert plan.block_lens.tolist() == [1] * 256


@pytest.mark.parametrize("kind,band", [("euclidean", None), ("crops", None), ("raster", None),
                                       ("euclidean", 1), ("crops", 2)])
def test_plan_masks_are_the_training_mask_and_hide_padding(kind, band):
    schedule = schedules.make_schedule(kind, 8)
    lay = schedules.train_layout(schedule, correction_band=band)
    length = len(lay["step"])
    plan = sampling_plan.sampling_plan(schedule, slot_cost=1 / 64, correction_band=band)
    for group in plan.groups:
        for i, k in enumerate(group.arrays["step"]):
            lo, real = plan.offsets[k], plan.block_lens[k]
            mask_PS = group.arrays["mask"][i]
            end = min(group.cache_len, length)
            # Real queries: exactly the training rows over the slots that exist.
            np.testing.assert_array_equal(mask_PS[:real, :end], lay["mask"][lo:lo + real, :end])
            # ...and never a slot at or past the end of their own block (padding, later steps).
            assert not mask_PS[:real, lo + real:].any()
            # Every row (padded ones too) sees something, so no softmax row is empty.
            assert mask_PS.any(axis=1).all()
            np.testing.assert_array_equal(group.arrays["flat_pos"][i, :real],
                                          lay["flat_pos"][lo:lo + real])
            assert np.all(group.arrays["flat_pos"][i, real:] == -1)


def test_group_steps_dynamic_program_hand_case():
    # Two short then two long blocks: splitting 2+2 costs 2*1 + 2*10 + 2 groups = 24, which
    # beats one group (4*10 + 1 = 41) and four groups (22 + 4 = 26).
    lens, offsets = [1, 1, 10, 10], [0, 1, 2, 12]
    assert sampling_plan.group_steps(lens, offsets, slot_cost=0.0, group_cost=1.0) == [
        (0, 2), (2, 4)]
    assert sampling_plan.group_steps(lens, offsets, slot_cost=0.0, group_cost=100.0) == [
        (0, 4)]
    assert sampling_plan.group_steps(lens, offsets, slot_cost=0.0, group_cost=0.0,
                                     max_groups=1) == [(0, 4)]


# ----------------------------------------------------------------------------------------------
# Validation: errors name the argument and the valid range.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,labels,words", [
    ({}, [3, 10], ["labels", "[0, 10)"]),
    ({}, [-1], ["labels"]),
    ({"cfg_scale": -0.5}, [1], ["cfg_scale", ">= 0"]),
    ({"top_p": 0.0}, [1], ["top_p", "(0, 1]"]),
    ({"top_p": 1.5}, [1], ["top_p", "(0, 1]"]),
    ({"temperature": 0.0}, [1], ["temperature", "> 0"]),
    ({"top_k": -1}, [1], ["top_k", "[0, 64]"]),
    ({"top_k": 65}, [1], ["top_k", "[0, 64]"]),
    ({"cfg_schedule": "cosine"}, [1], ["cfg_schedule", "linear"]),
    ({"fixed_codes": np.zeros((1, 8, 8), np.int32)}, [1], ["fixed_mask"]),
    ({"correction_band": 0}, [1], ["correction_band=0", "int >= 1", "None"]),
    ({"correction_band": "all"}, [1], ["correction_band='all'"]),
    ({"max_groups": 0}, [1], ["max_groups=0", ">= 1"]),
])
def test_bad_arguments_raise_clear_errors(tiny, kwargs, labels, words):
    config, params = tiny
    schedule = schedules.make_schedule("euclidean", config.grid)
    with pytest.raises(ValueError) as err:
        sampling.sample(params, config, schedule, np.array(labels), jax.random.key(0), **kwargs)
    for word in words:
        assert word in str(err.value)


def test_sample_options_name_the_config_field():
    from radar_jax import samples  # pylint: disable=import-outside-toplevel
    with pytest.raises(ValueError, match=r"config.sample.max_groups=0: use an int >= 1"):
        samples.SampleOptions(max_groups=0)
    assert samples.SampleOptions().max_groups == sampling_plan.DEFAULT_MAX_GROUPS


def test_schedule_on_another_grid_is_rejected(tiny):
    config, params = tiny
    schedule = schedules.make_schedule("euclidean", 16)
    with pytest.raises(ValueError, match=r"schedule .* \(16, 16\) grid .* model grid is \(8, 8\)"):
        sampling.sample(params, config, schedule, LABELS, jax.random.key(0))
