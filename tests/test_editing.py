"""Zero-shot editing and other canvases (radar_jax/editing.py, samples.schedule_on_grid,
Generator(grid=...)).

The numpy parts (token masks, reordered schedules, schedules on other grids) are checked on
hand-computed cases; RoPE's shift invariance, which out-painting relies on, on a random model.
The rest (marked slow) runs on one small digits demo model trained once for this module, judged
by the digit classifier of radar_jax/evaluation.py (fitted on the real training digits), so
its expectations are independent of the sampler: out-painted digits from a 4x4-token center of
held-out digits are recognised as their class, whole-image class edits as the new class.
"""

import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from radar_jax import config_io
from radar_jax import data as data_lib
from radar_jax import editing
from radar_jax import evaluation
from radar_jax import generator as generator_lib
from radar_jax import pipeline
from radar_jax import reporting
from radar_jax import samples as samples_lib
from radar_jax import schedules
from radar_jax import workdir as workdir_lib
from radar_jax.models import transformer

REPO = pathlib.Path(__file__).resolve().parents[1]

# The demo (configs/demo.py) on 8x8-pixel digits, i.e. sklearn's own resolution: a tokenizer
# without downsampling (one token per digit pixel) and a 32-entry codebook, a 2-layer, 64-wide
# transformer on the demo's 8x8 token grid with correction band 1 and no RDS or dropout: the
# smallest budget found whose classifier rates are meaningful (out-painting 0.86, whole-image
# class edits 0.76 with the demo's 3-group sampler plan; 0.84 and 0.78 with the default plan,
# where 150 generator steps gave 0.78 and 0.62). The generator's 200 steps take
# about 30 s on 2 idle cores (the demo's 96-wide, 3-layer one took 100 s for 300 steps).
DEMO_OVERRIDES = {
    "tokenizer.data.image_size": 8, "tokenizer.model.encoder_ch_mult": (1,),
    "tokenizer.model.decoder_ch_mult": (1,), "tokenizer.model.codebook_size": 32,
    "tokenizer.num_steps": 100, "tokenizer.optim.lr": 1e-3, "tokenizer.loss.disc_start": 10 ** 6,
    "tokenizer.ckpt_every": 100, "tokenizer.eval_every": 10 ** 6,
    "model.vocab_size": 32, "model.dim": 64, "model.n_layer": 2, "model.token_dropout_p": 0.0,
    "model.resid_dropout_p": 0.0, "model.ffn_dropout_p": 0.0, "schedule.correction_band": 1,
    "train.num_steps": 200, "train.ckpt_every": 200, "train.warmup_steps": 20, "train.lr": 3e-3,
    "train.rds": False, "sample.num_per_class": 1, "sample.batch_size": 100,
}


# ----------------------------------------------------------------------------------------------
# Masks and schedules, by hand
# ----------------------------------------------------------------------------------------------
def test_pixel_box_to_token_mask_marks_every_token_the_box_touches():
    mask = editing.pixel_box_to_token_mask((8, 8, 24, 24), 32, (8, 8))
    want = np.zeros((8, 8), bool)
    want[2:6, 2:6] = True
    np.testing.assert_array_equal(mask, want)
    # Rows 9..9 sit in token row 2 (pixels 8..11); columns 0..4 touch token columns 0 and 1.
    mask = editing.pixel_box_to_token_mask((9, 0, 10, 5), (32, 48), (8, 12))
    assert mask.shape == (8, 12) and set(map(tuple, np.argwhere(mask))) == {(2, 0), (2, 1)}
    with pytest.raises(ValueError, match="inside the 32x32 image"):
        editing.pixel_box_to_token_mask((0, 0, 40, 8), 32, (8, 8))
    with pytest.raises(ValueError, match="top, left, bottom, right"):
        editing.pixel_box_to_token_mask((0, 0, 8), 32, (8, 8))


def test_region_first_schedule_makes_the_block_a_canvas():
    crops = schedules.make_schedule("crops", (8, 8))
    block = np.zeros((8, 8), bool)
    block[2:6, 2:6] = True  # the 4x4 center crop: already canvas C_3 of 'crops'
    assert editing.region_first_schedule(crops, block) is crops
    euclid = schedules.make_schedule("euclidean", (8, 8))
    reordered = editing.region_first_schedule(euclid, block)
    # Euclidean-8x8 rings around (3, 3), at offsets -1..2 on each axis inside the block:
    # ring 1 = 4 tokens at distance 1; ring 2 (distance in (1, 2]) = 4 diagonals + (2,0), (0,2);
    # ring 3 (in (2, 3]) = (+-1,2), (2,+-1), (2,2). They come first, in ring order.
    m = int(reordered.ring_map[block].max()) + 1
    assert reordered.ring_sizes[:m].tolist() == [1, 4, 6, 5]
    np.testing.assert_array_equal(reordered.canvas(m - 1), block)
    # Then the rings outside the block in euclidean order, starting with what ring 2 has
    # outside it, (1, 3) and (3, 1): the canvases are block | C_2, block | C_3, ..., C_6.
    assert set(map(tuple, np.argwhere(reordered.new_ring(m)))) == {(1, 3), (3, 1)}
    assert reordered.num_steps == m + 5
    for j in range(5):
        np.testing.assert_array_equal(reordered.canvas(m + j), block | euclid.canvas(2 + j))
    with pytest.raises(ValueError, match="start token"):
        off = np.zeros((8, 8), bool)
        off[:2, :2] = True
        editing.region_first_schedule(euclid, off)


def test_context_first_schedule_feeds_the_kept_region_then_the_hole_inward():
    schedule = schedules.make_schedule("euclidean", (5, 5))
    keep = np.ones((5, 5), bool)
    keep[1:4, 1:4] = False  # a 3x3 hole at the center; the kept frame has 16 tokens
    prefill = editing.context_first_schedule(schedule, keep)
    assert prefill.ring_sizes.tolist() == [1, 15, 8, 1]
    np.testing.assert_array_equal(prefill.canvas(1), keep)
    assert prefill.ring_map[2, 2] == 3  # the hole's center comes last
    split = np.ones((5, 5), bool)
    split[:, 2] = False  # a column through the image cuts the kept region in two
    with pytest.raises(ValueError, match="2 separate pieces"):
        editing.context_first_schedule(schedule, split)


def test_schedule_on_grid_rebuilds_the_trained_kind():
    euclid = schedules.make_schedule("euclidean", (8, 8))
    assert samples_lib.schedule_on_grid(euclid, ()) is euclid
    assert samples_lib.schedule_on_grid(euclid, (8, 12)) == schedules.make_schedule(
        "euclidean", (8, 12))
    # crops 1..8 on 8x8 continue by their last increment (1) up to the long side 12.
    wide = samples_lib.schedule_on_grid(schedules.make_schedule("crops", (8, 8)), (8, 12))
    assert wide == schedules.make_schedule("crops", (8, 12), sizes=range(1, 13))
    # crops10 (..., 10, 13, 16) on 16x16 -> 16x24 continues with steps of 3: 19, 22, then 24.
    ladder = samples_lib.schedule_on_grid(
        schedules.make_schedule("crops", (16, 16), preset="crops10"), (16, 24))
    assert ladder == schedules.make_schedule(
        "crops", (16, 24), sizes=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 19, 22, 24))
    custom = schedules.make_schedule("custom", None, ring_map=euclid.ring_map)
    with pytest.raises(ValueError, match="'custom' ring map"):
        samples_lib.schedule_on_grid(custom, (8, 12))


def test_rope_positions_are_relative_so_a_shifted_canvas_gives_the_same_logits():
    """Out-painting places tokens at absolute positions of a larger grid; the model must not
    care where: the same packed layout shifted by 2 columns on an 8x12 grid gives the same
    logits as on the 8x8 grid (random weights, teacher-forced forward)."""
    config = transformer.model_config("tiny")
    params = transformer.init_params(config, jax.random.key(0))
    layout = schedules.train_layout(schedules.make_schedule("euclidean", (8, 8)))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, len(layout["flat_pos"]))))
    labels = jnp.asarray([1, 7])
    pos = np.asarray(layout["flat_pos"])
    h, w = np.divmod(pos, 8)
    shifted = np.where(pos < 0, pos, h * 12 + w + 2)
    args = (layout["is_new"], layout["is_class"], layout["mask"])

    def forward(model_config, flat_pos):  # jitted: one compile, not one per op
        model = transformer.Transformer(model_config)
        return jax.jit(lambda *a: model.apply({"params": params}, *a)[0])(
            tokens, labels, flat_pos, *args)
    base = forward(config, pos)
    moved = forward(samples_lib.model_config_on_grid(config, (8, 12)), shifted)
    np.testing.assert_allclose(np.asarray(moved), np.asarray(base), atol=2e-5)


# ----------------------------------------------------------------------------------------------
# On a trained digits model
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(config, workdir, Generator) of the demo trained once for this module."""
    config = config_io.load_config(str(REPO / "configs/demo.py"), **DEMO_OVERRIDES)
    if "tpt" in config:
        config.tpt.enabled = False
    workdir = tmp_path_factory.mktemp("edit_demo")
    t0 = time.perf_counter()
    for mode in ("train_vq", "cache_tokens", "train"):
        pipeline.run(config, str(workdir), mode)
    print(f"demo fixture trained in {time.perf_counter() - t0:.0f}s")
    return config, workdir, generator_lib.Generator(config, workdir)


@pytest.fixture(scope="module")
def heldout(demo):
    """50 held-out digits (5 per class) as the tokenizer's images, their labels, and a
    classifier fitted on the real training digits."""
    config = demo[0]
    digits, labels = data_lib.load_digits_split("eval")
    pick = np.arange(0, len(labels), 6)
    images = data_lib.digits_to_images(digits[pick], config.tokenizer.data.image_size)
    return images, labels[pick], evaluation.DigitClassifier()


def _classify(classifier, images):
    return classifier.predict(data_lib.images_to_digits(images))


@pytest.mark.slow
def test_outpainting_a_4x4_center_keeps_it_and_grows_the_right_digit(demo, heldout):
    _, _, gen = demo
    images, labels, classifier = heldout
    f = gen.downsample
    result = gen.outpaint(images, labels, keep=(2 * f, 2 * f, 6 * f, 6 * f))
    assert result.codes.shape == (len(labels), 8, 8)
    center = gen.encode(images)[:, 2:6, 2:6]
    np.testing.assert_array_equal(result.codes[:, 2:6, 2:6], center)  # every given token
    assert result.given.sum() == 16
    accuracy = float(np.mean(_classify(classifier, result.images) == labels))
    print(f"out-painted 4x4 centers recognised as their class: {accuracy:.2f}")
    assert accuracy >= 0.6


@pytest.mark.slow
def test_outpainting_to_a_wider_grid_places_the_image_at_its_center(demo, heldout):
    _, _, gen = demo
    images, labels, _ = heldout
    result = gen.outpaint(images[:4], labels[:4], grid=(8, 12), num_samples=2)
    assert result.codes.shape == (8, 8, 12) and result.images.shape[1:3] == (8 * gen.downsample,
                                                                             12 * gen.downsample)
    # 8x8 tokens centred on 8x12 (center column 5): columns 5-3 = 2 .. 9.
    np.testing.assert_array_equal(result.codes[:, :, 2:10],
                                  np.repeat(gen.encode(images[:4]), 2, axis=0))
    assert result.given[:, 2:10].all() and not result.given[:, [0, 1, 10, 11]].any()


@pytest.mark.slow
@pytest.mark.parametrize("prefill", [True, False])
def test_inpainting_changes_only_the_masked_tokens(demo, heldout, prefill):
    _, _, gen = demo
    images, labels, _ = heldout
    box = (0, 0, 3 * gen.downsample, 8 * gen.downsample)  # token rows 0..2, the top
    result = gen.inpaint(images[:20], box, labels[:20], prefill=prefill)
    before = gen.encode(images[:20])
    changed = result.codes != before
    regen = np.zeros((8, 8), bool)
    regen[:3] = True
    np.testing.assert_array_equal(result.given, ~regen)
    np.testing.assert_array_equal(result.codes[:, ~regen], before[:, ~regen])
    assert changed[:, regen].any()  # the region was regenerated, not copied
    if prefill:  # the kept region is the known area before any region token is drawn
        np.testing.assert_array_equal(result.schedule.canvas(1), ~regen)
        with pytest.raises(ValueError, match="2 separate pieces"):  # rows 2..4 cut it in two
            f = gen.downsample
            gen.inpaint(images[:2], (2 * f, 0, 5 * f, 8 * f), labels[:2], prefill=True)


@pytest.mark.slow
def test_class_editing_a_whole_image_flips_the_classifier(demo, heldout):
    _, _, gen = demo
    images, labels, classifier = heldout
    new = (labels + 1 + np.arange(len(labels)) % 9) % 10  # another class for every image
    assert not np.any(new == labels)
    # Guidance 4 (the config's is 2): a whole-image edit is a fresh sample of the new class, so
    # this measures how well the small model follows its label.
    result = gen.edit_class(images, None, new, cfg_scale=4.0)
    predicted = _classify(classifier, result.images)
    flipped = float(np.mean(predicted == new))
    print(f"whole-image class edits recognised as the new class: {flipped:.2f}")
    assert flipped >= 0.6 and np.mean(predicted == labels) <= 0.2


@pytest.mark.slow
def test_sampling_another_canvas_from_the_api_and_the_sample_stage(demo, tmp_path):
    config, workdir, gen = demo
    images, frames = gen.sample(np.arange(10), grid=(8, 12), return_canvases=True)
    f = gen.downsample
    assert images.shape == (10, 8 * f, 12 * f, 3)
    codes = gen.sample_codes(np.arange(10), grid=(8, 12))
    steps = schedules.make_schedule("euclidean", (8, 12)).num_steps
    assert codes.shape == (10, 8, 12) and codes.min() >= 0 and len(frames) == steps
    gif = reporting.save_gif(tmp_path / "growth.gif", frames)
    with Image.open(gif) as img:
        assert img.n_frames == steps and img.size == frames[0].shape[1::-1]
    # The sample stage (--mode=sample --config.sample.grid='(8,12)').
    wide = config.copy_and_resolve_references()
    wide.sample.grid = (8, 12)
    written = samples_lib.write_samples(wide, workdir_lib.Workdir(workdir))
    assert str(written["gif"]).endswith("growth_8x12.gif")
    with Image.open(written["gif"]) as img:
        assert img.n_frames == steps
    codes = np.load(pathlib.Path(workdir) / "samples" / "codes_8x12.npz")["codes"]
    assert codes.shape == (10, 8, 12)


@pytest.mark.slow
def test_cli_edit_writes_input_mask_and_results(demo, heldout):
    config, workdir, _ = demo
    images, labels, _ = heldout
    path = pathlib.Path(workdir) / "digit.png"
    Image.fromarray(reporting.to_uint8(images[0])).save(path)
    flags_ = [f"--config.{k}={v}" for k, v in DEMO_OVERRIDES.items()]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "radar_jax.main", f"--config={REPO / 'configs/demo.py'}",
         f"--workdir={workdir}", "--mode=edit", *flags_, f"--config.edit.input={path}",
         "--config.edit.op=outpaint", "--config.edit.box=(2,2,6,6)", "--config.edit.grid=(8,12)",
         f"--config.edit.label={int(labels[0])}", "--config.edit.num_samples=3"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    png = pathlib.Path(workdir) / "samples" / "edit_outpaint.png"
    with Image.open(png) as img:
        # One row of 2 + 3 panels of 8x12 pixels (the 8x8 input centered), 2-pixel gaps,
        # upscaled 16x (128 // 8).
        assert img.size == ((5 * 14 + 2) * 16, (10 + 2) * 16)
    saved = np.load(png.with_suffix(".npz"))
    assert saved["codes"].shape == (3, 8, 12)
    # The 4x4 center sits around the 8x12 center (3, 5): rows 2..5, columns 4..7.
    before = generator_lib.Generator(config, workdir).encode(images[:1])[:, 2:6, 2:6]
    np.testing.assert_array_equal(saved["codes"][:, 2:6, 4:8], np.repeat(before, 3, 0))
