"""Tokenizer training: a run with its eval and records, and exact resume after a crash
(radar_jax/train_vq.py)."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import kill_at_batch

from radar_jax import checkpoint as ckpt_lib
from radar_jax import config_defaults as cd
from radar_jax import train_vq


def tiny_config(num_steps):
    model = cd.vq_model(codebook_size=64, codebook_embed_dim=8, ch=32, encoder_ch_mult=(1, 2),
                        decoder_ch_mult=(1, 2), z_channels=32, num_res_blocks=1)
    config = cd.tokenizer(model, cd.data("digits", image_size=16), batch_size=8,
                          num_steps=num_steps, log_every=1, eval_every=1000, ckpt_every=2,
                          eval_batch_size=300, eval_images=4)
    config.loss.disc_start = 2   # steps 3.. exercise the GAN path too
    config.loss.disc_ndf = 8
    config.loss.disc_layers = 1
    config.ema_decay = 0.9
    return config


def _params(workdir):
    return jax.tree.map(np.asarray, ckpt_lib.load_params(os.path.join(workdir, "params")))


def test_runs_and_resumes_after_a_crash_bit_identically(tmp_path, monkeypatch):
    straight = str(tmp_path / "straight")
    metrics = train_vq.train_and_evaluate(tiny_config(4), straight)
    assert np.isfinite(metrics["psnr"]) and 0 < metrics["codebook_usage"] <= 1
    # The digits evaluation reports how much classifier accuracy reconstructions keep.
    assert 0 <= metrics["classifier_accuracy_kept"] <= 1.05
    with open(os.path.join(straight, "eval.json")) as f:
        assert json.load(f)["step"] == 4
    rows = [json.loads(line) for line in open(os.path.join(straight, "metrics.jsonl"))]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["train/loss"]) for r in train_rows)
    assert os.path.exists(os.path.join(straight, "reconstructions.png"))

    # Crash while fetching the batch of step 4 (after the step-2 checkpoint, and after
    # step 3 has updated the state in memory), then run again in the same workdir.
    crashed = str(tmp_path / "crashed")
    restore = kill_at_batch(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        train_vq.train_and_evaluate(tiny_config(4), crashed)
    restore()
    assert ckpt_lib.Checkpointer(os.path.join(crashed, "checkpoints")).latest_step() == 2
    train_vq.train_and_evaluate(tiny_config(4), crashed)

    a, b = _params(straight), _params(crashed)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def _random_resolution_config():
    config = tiny_config(4)
    config.random_resolutions = (8, 16)
    config.loss.disc_start = 100  # no GAN: one compile per resolution
    return config


def test_random_resolutions_draw_by_step_and_resume_bit_identical(tmp_path, monkeypatch):
    sizes = [train_vq.resolution_for_step((8, 16), 0, step) for step in range(1, 5)]
    assert set(sizes) == {8, 16}  # both sizes train in 4 steps (seed 0)
    assert sizes == [train_vq.resolution_for_step((8, 16), 0, s) for s in range(1, 5)]
    straight = str(tmp_path / "straight")
    train_vq.train_and_evaluate(_random_resolution_config(), straight)
    rows = [json.loads(line) for line in open(os.path.join(straight, "metrics.jsonl"))]
    assert [r["train/resolution"] for r in rows if "train/loss" in r] == sizes

    crashed = str(tmp_path / "crashed")
    restore = kill_at_batch(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        train_vq.train_and_evaluate(_random_resolution_config(), crashed)
    restore()
    train_vq.train_and_evaluate(_random_resolution_config(), crashed)
    a, b = _params(straight), _params(crashed)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_random_resolutions_must_be_multiples_of_the_downsampling():
    config = tiny_config(1)
    config.random_resolutions = (16, 17)
    with pytest.raises(ValueError, match=r"random_resolutions=\(16, 17\) has \[17\]"):
        train_vq.check_resolutions(config)
