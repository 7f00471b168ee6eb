"""The main job (radar_jax/pipeline.py, radar_jax/main.py): CLI errors and a tiny end-to-end run."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from radar_jax import pipeline

REPO = pathlib.Path(__file__).resolve().parents[1]


def _cli(*args, cwd=REPO):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "radar_jax.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_xl_without_imagenet_stops_at_once_with_the_fix(tmp_path):
    result = _cli("--config=configs/xl.py", f"--workdir={tmp_path}",
                  f"--config.tokenizer.data.tfds_data_dir={tmp_path / 'no_tfds'}")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "imagenet2012" in result.stderr and "tfds build" in result.stderr
    # The flag it names is the one this (pipeline) config uses.
    assert "--config.tokenizer.data.tfds_data_dir" in result.stderr
    assert not (tmp_path / "tokenizer").exists()


def test_unknown_mode_is_a_usage_error(tmp_path):
    result = _cli("--config=configs/demo.py", f"--workdir={tmp_path}", "--mode=bogus")
    assert result.returncode != 0 and "mode" in result.stderr


def test_load_config_with_overrides():
    config = pipeline.load_config(str(REPO / "configs/demo.py"),
                                  **{"train.num_steps": 7, "schedule.kind": "raster"})
    assert config.train.num_steps == 7 and config.schedule.kind == "raster"
    with pytest.raises(FileNotFoundError, match="configs/demo.py"):
        pipeline.load_config(str(REPO / "configs/missing.py"))


def test_tencrop_views_are_the_corners_center_and_their_flips():
    images = np.arange(2 * 5 * 5 * 1, dtype=np.float32).reshape(2, 5, 5, 1)
    views = pipeline.augmented_views(images, "tencrop", 3)
    assert len(views) == 10 and all(v.shape == (2, 3, 3, 1) for v in views)
    np.testing.assert_array_equal(views[0], images[:, 0:3, 0:3])   # top left
    np.testing.assert_array_equal(views[3], images[:, 2:5, 2:5])   # bottom right
    np.testing.assert_array_equal(views[4], images[:, 1:4, 1:4])   # center
    np.testing.assert_array_equal(views[9], images[:, 1:4, 1:4][:, :, ::-1])
    assert len(pipeline.augmented_views(images, "flip", 5)) == 2


def test_demo_pipeline_end_to_end_and_rerun_skips(tmp_path):
    overrides = {"tokenizer.num_steps": 2, "tokenizer.loss.disc_start": 1,
                 "tokenizer.log_every": 1, "tokenizer.ckpt_every": 2,
                 "train.num_steps": 2, "train.log_every": 1, "train.ckpt_every": 2,
                 "train.rds": False, "sample.num_per_class": 1, "sample.batch_size": 10,
                 "sample.eval_per_class": 2}
    config = pipeline.load_config(str(REPO / "configs/demo.py"), **overrides)
    workdir = str(tmp_path / "demo")
    pipeline.run(config, workdir)
    samples = tmp_path / "demo" / "samples"
    for name in ("samples.png", "growth.gif", "codes.npz", "metrics.json"):
        assert (samples / name).exists(), name
    rows = json.loads((samples / "metrics.json").read_text())["rows"]
    assert [(r["steps"], r["correct"]) for r in rows] == [(7, True), (7, False)]
    assert all(0.0 <= r["accuracy"] <= 1.0 and np.isfinite(r["fd"]) for r in rows)
    codes = np.load(samples / "codes.npz")
    assert codes["codes"].shape == (10, 8, 8) and codes["codes"].min() >= 0
    # A second run finds every stage finished: it only samples and evaluates again.
    finished = [tmp_path / "demo" / "tokens" / "train.npz",
                tmp_path / "demo" / "tokenizer" / "eval.json",
                tmp_path / "demo" / "generator" / "metrics.jsonl"]
    mtimes = [os.path.getmtime(p) for p in finished]
    pipeline.run(config, workdir)
    assert [os.path.getmtime(p) for p in finished] == mtimes
