"""Tokenizer post-training (radar_jax/tpt.py): frozen encoder and codebook, the generator's
tokens mixed in at the configured ratio, gradients of the semantic term, bit-identical resume.

One tiny trained workdir (tokenizer, token cache, generator: configs/demo.py with tiny
overrides) is shared by the module, and one straight post-training run by two tests.
"""

import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_DEMO, kill_at_batch

from radar_jax import checkpoint as ckpt_lib
from radar_jax import config_io
from radar_jax import data as data_lib
from radar_jax import pipeline
from radar_jax import tpt
from radar_jax import train_step as ts
from radar_jax import workdir as workdir_lib
from radar_jax.models import dinov2 as dinov2_lib
from radar_jax.models import transformer
from radar_jax.models import vq as vq_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
# The end-to-end tests' tiny pipeline (conftest.TINY_DEMO: its tokenizer and generator stages
# are the very programs those tests compile, so they come from the session's compilation cache)
# and a 4-step post-training run with checkpoints every 2.
OVERRIDES = {
    **TINY_DEMO,
    "tpt.num_steps": 4, "tpt.batch_size": 8, "tpt.ckpt_every": 2, "tpt.log_every": 1,
    "tpt.disc_start": 2, "tpt.projector_hidden": 16, "tpt.dino_image_size": 28,
    "tpt.lr": 1e-3,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(config, path) of a workdir whose tokenizer, token cache and generator are trained."""
    config = config_io.load_config(str(REPO / "configs/demo.py"), **OVERRIDES)
    root = tmp_path_factory.mktemp("tpt") / "base"
    for mode in ("train_vq", "cache_tokens", "train"):
        pipeline.run(config, str(root), mode=mode)
    return config, root


@pytest.fixture(scope="module")
def tiny_dino():
    """A random-weight DINOv2 (width 32, one layer): 28px images -> a 2x2 patch grid."""
    config = dinov2_lib.dinov2_config("small", hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, image_size=28)
    params = dinov2_lib.DINOv2(config).init(jax.random.key(1),
                                            jnp.zeros((1, 28, 28, 3)))["params"]
    return config, params


def _copy(trained, dest) -> workdir_lib.Workdir:
    shutil.copytree(trained[1], dest)
    return workdir_lib.Workdir(dest)


def _leaves(tree):
    return jax.tree_util.tree_leaves_with_path(jax.tree.map(np.asarray, tree))


@pytest.fixture(scope="module")
def straight(trained, tiny_dino, tmp_path_factory):
    """A post-training run of 4 steps with the semantic term and the GAN from step 3."""
    wd = _copy(trained, tmp_path_factory.mktemp("straight") / "wd")
    metrics = tpt.train_and_evaluate(trained[0], wd, dinov2=tiny_dino)
    return wd, metrics


def test_post_training_changes_only_decoder_and_projector(straight):
    wd, metrics = straight
    before = ckpt_lib.load_params(str(wd.params_path(workdir_lib.TOKENIZER)))
    after = ckpt_lib.load_params(str(wd.params_path(workdir_lib.TOKENIZER_TPT)))
    assert jax.tree.structure(before) == jax.tree.structure(after)
    assert set(before) == {"encoder", "quant_conv", "quantize", "post_quant_conv", "decoder"}
    for key in ("encoder", "quant_conv", "quantize"):  # bit-unchanged
        for (path, x), (_, y) in zip(_leaves(before[key]), _leaves(after[key])):
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), (key, path)
    for key in ("post_quant_conv", "decoder"):
        changed = [not np.array_equal(x, y) for (_, x), (_, y) in
                   zip(_leaves(before[key]), _leaves(after[key]))]
        # Every trainable array moves: the L2 and GAN losses reach the whole decoder.
        assert all(changed), key
    projector = ckpt_lib.load_params(str(wd.stage(workdir_lib.TOKENIZER_TPT) / "projector"))
    assert set(projector) == {"fc1", "fc2", "fc3"}
    assert projector["fc3"]["kernel"].shape == (16, 32)  # hidden -> DINOv2 width
    assert np.isfinite(metrics["psnr"])
    rows = [r for r in _metric_rows(wd) if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(0 < r["train/semantic_loss"] < 2 for r in rows)
    assert all(0 < r["train/tokens_changed"] <= 0.5 + 0.2 for r in rows)


def _metric_rows(wd):
    path = wd.stage(workdir_lib.TOKENIZER_TPT) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_after_kill_is_bit_identical(straight, trained, tiny_dino, tmp_path,
                                            monkeypatch):
    wd = _copy(trained, tmp_path / "crashed")
    # Killed while fetching the batch of step 4: after the step-2 checkpoint and after step 3
    # changed the state in memory.
    restore = kill_at_batch(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        tpt.train_and_evaluate(trained[0], wd, dinov2=tiny_dino)
    restore()
    assert ckpt_lib.latest_step(wd.checkpoints_path(workdir_lib.TOKENIZER_TPT)) == 2
    tpt.train_and_evaluate(trained[0], workdir_lib.Workdir(wd.root), dinov2=tiny_dino)
    for name in ("params", "projector"):
        a = ckpt_lib.load_params(str(straight[0].stage(workdir_lib.TOKENIZER_TPT) / name))
        b = ckpt_lib.load_params(str(wd.stage(workdir_lib.TOKENIZER_TPT) / name))
        assert jax.tree.structure(a) == jax.tree.structure(b)
        for (path, x), (_, y) in zip(_leaves(a), _leaves(b)):
            assert x.tobytes() == y.tobytes(), (name, path)


def test_mixed_token_maps_hold_generator_tokens_at_the_ratio(trained):
    config, root = trained
    wd = workdir_lib.Workdir(root)
    schedule, _ = wd.trained_schedule()
    meta = ts.LayoutSampler(schedule, config.train, config.model.cls_token_num).full
    index = tpt.final_canvas_index(meta, schedule.grid)
    # Euclidean rings with the whole known area re-fed: the last block holds the whole canvas.
    assert (meta["step"][index] == schedule.num_steps - 1).all()
    assert (meta["target_pos"][index] == np.arange(64)).all()

    codes, labels, _ = data_lib.load_token_cache(str(wd.token_cache))
    codes, labels = jnp.asarray(codes[:128], jnp.int32), jnp.asarray(labels[:128], jnp.int32)
    model, params = transformer.Transformer(config.model), wd.params(workdir_lib.GENERATOR)
    meta = {k: jnp.asarray(v) for k, v in meta.items()}
    pred = jax.jit(lambda r: tpt.generator_predictions(
        model, params, meta, index, codes, labels, r, prediction="sample",
        temperature=1.0))(jax.random.key(0))
    differs = np.asarray(pred != codes)
    assert differs.mean() > 0.3  # a barely trained generator: many wrong tokens to mix in
    ratio = 0.3
    mixed = tpt.mix_tokens(codes, pred, ratio, jax.random.key(5))
    assert bool(jnp.all((mixed == codes) | (mixed == pred)))
    took = np.asarray((mixed == pred) & (mixed != codes))
    # Among the M positions where the prediction differs, each is taken with p = ratio.
    m, n = differs.sum(), differs.size
    assert abs(took.sum() - ratio * m) < 4 * np.sqrt(m * ratio * (1 - ratio)), (took.sum(), m)
    assert not took[~differs].any()
    np.testing.assert_array_equal(tpt.mix_tokens(codes, pred, 0.0, jax.random.key(1)), codes)
    np.testing.assert_array_equal(tpt.mix_tokens(codes, pred, 1.0, jax.random.key(1)), pred)
    assert n == 128 * 64


def test_semantic_loss_has_gradients_into_the_decoder(trained, tiny_dino):
    config, root = trained
    wd = workdir_lib.Workdir(root)
    vq = vq_lib.VQModel(config.tokenizer.model)
    trainable, frozen = tpt.split_tokenizer_params(wd.params(workdir_lib.TOKENIZER))
    digits, _ = data_lib.load_digits_split("eval")
    images = jnp.asarray(data_lib.digits_to_images(digits[:4], 16))
    dino = dinov2_lib.DINOv2(tiny_dino[0])
    projector = tpt.Projector(16, 32)
    level = 0
    pp = projector.init(jax.random.key(2), jnp.zeros((1, 8, 8, 64)))["params"]

    def loss(trainable, images):
        full = tpt.merge_tokenizer_params(frozen, trainable)
        codes = vq.apply({"params": full}, images, method="encode")
        _, features = vq.apply({"params": full}, codes, method="decode_codes_with_features")
        assert features[level].shape == (4, 8, 8, 64)  # conv_blocks_0 at the token grid
        targets = tpt.dino_targets(dino, tiny_dino[1], images, 28)
        assert targets.shape == (4, 2, 2, 32)
        return tpt.semantic_loss(projector, pp, features[level], targets)

    # One compiled program (op-by-op autodiff would compile every primitive on its own).
    value, grads = jax.jit(jax.value_and_grad(loss))(trainable, images)
    assert 0 < float(value) < 2
    norm = lambda tree: float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(tree))))
    for part in (grads["post_quant_conv"], grads["decoder"]["conv_in"],
                 grads["decoder"]["mid_0"], grads["decoder"]["conv_blocks_0"]["res_0"]):
        assert norm(part) > 0
    # Layers after the aligned features cannot change them: exactly zero gradient there.
    for part in (grads["decoder"]["conv_blocks_0"]["upsample"],
                 grads["decoder"]["conv_blocks_1"], grads["decoder"]["conv_out"]):
        assert norm(part) == 0.0


def test_bad_tpt_fields_are_named(trained):
    config = trained[0].copy_and_resolve_references()
    config.tpt.prediction = "beam"
    with pytest.raises(ValueError, match="config.tpt.prediction"):
        tpt.check_config(config)
    config.tpt.prediction, config.tpt.feature_level = "argmax", 5
    with pytest.raises(ValueError, match="config.tpt.feature_level"):
        tpt.check_config(config)
    assert os.path.basename(str(workdir_lib.Workdir("x").stage("tokenizer_tpt"))) == \
        "tokenizer_tpt"
