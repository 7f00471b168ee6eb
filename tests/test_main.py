"""The main job (radar_jax/pipeline.py, main.py, config_io.py, encode.py): CLI errors, config
loading, the ten-crop views and a tiny end-to-end run (each stage's params loaded once; the
notebook helper samples what --mode=sample samples)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from conftest import TINY_DEMO
from radar_jax import checkpoint as ckpt_lib
from radar_jax import config_io
from radar_jax import encode
from radar_jax import generator as generator_lib
from radar_jax import pipeline
from radar_jax import samples as samples_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def _cli(*args, cwd=REPO):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "radar_jax.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_xl_without_imagenet_stops_at_once_with_the_fix(tmp_path):
    result = _cli("--config=configs/xl.py", f"--workdir={tmp_path}",
                  f"--config.tokenizer.data.tfds_data_dir={tmp_path / 'no_tfds'}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "imagenet2012" in result.stderr and "tfds build" in result.stderr
    # The flag it names is the one this (pipeline) config uses.
    assert "--config.tokenizer.data.tfds_data_dir" in result.stderr
    assert not (tmp_path / "tokenizer").exists()


def test_unknown_mode_is_a_usage_error(tmp_path):
    result = _cli("--config=configs/demo.py", f"--workdir={tmp_path}", "--mode=bogus")
    assert result.returncode != 0 and "mode" in result.stderr


def test_load_config_with_overrides():
    config = config_io.load_config(str(REPO / "configs/demo.py"),
                                  **{"train.num_steps": 7, "schedule.kind": "raster"})
    assert config.train.num_steps == 7 and config.schedule.kind == "raster"
    with pytest.raises(FileNotFoundError, match="configs/demo.py"):
        config_io.load_config(str(REPO / "configs/missing.py"))


def test_tencrop_views_are_the_corners_center_and_their_flips():
    images = np.arange(2 * 5 * 5 * 1, dtype=np.float32).reshape(2, 5, 5, 1)
    views = encode.augmented_views(images, "tencrop", 3)
    assert len(views) == 10 and all(v.shape == (2, 3, 3, 1) for v in views)
    np.testing.assert_array_equal(views[0], images[:, 0:3, 0:3])   # top left
    np.testing.assert_array_equal(views[3], images[:, 2:5, 2:5])   # bottom right
    np.testing.assert_array_equal(views[4], images[:, 1:4, 1:4])   # center
    np.testing.assert_array_equal(views[9], images[:, 1:4, 1:4][:, :, ::-1])
    assert len(encode.augmented_views(images, "flip", 5)) == 2


def test_imagenet_config_takes_the_size_and_the_aliases_equal_it(tmp_path):
    for size in ("B", "L", "XL"):
        alias = config_io.load_config(str(REPO / f"configs/{size.lower()}.py"))
        sized = config_io.load_config(str(REPO / f"configs/imagenet.py:{size}"))
        assert alias.to_dict() == sized.to_dict()
    assert config_io.load_config(str(REPO / "configs/imagenet.py:L")).model.n_layer == 24
    assert config_io.load_config(str(REPO / "configs/imagenet.py:XL")).model.dim == 1280
    with pytest.raises(ValueError, match="B, L, XL"):
        config_io.load_config(str(REPO / "configs/imagenet.py:M"))
    # The CLI treats both spellings the same way (here: the same stop without ImageNet).
    outs = [_cli(f"--config={spec}", f"--workdir={tmp_path / str(i)}",
                 f"--config.tokenizer.data.tfds_data_dir={tmp_path / 'no_tfds'}")
            for i, spec in enumerate(("configs/xl.py", "configs/imagenet.py:XL"))]
    assert [o.returncode for o in outs] == [2, 2]
    assert outs[0].stderr.splitlines()[-1] == outs[1].stderr.splitlines()[-1]


def test_tokenizer_only_configs_have_the_pipeline_shape():
    for name in ("demo_vq", "vq16"):
        config = config_io.load_config(str(REPO / f"configs/{name}.py"))
        assert pipeline.stages_of(config) == ("tokenizer",)
    demo = config_io.load_config(str(REPO / "configs/demo.py"))
    assert pipeline.stages_of(demo) == ("tokenizer", "tokens", "generator", "tokenizer_tpt",
                                        "samples")
    assert demo.tokenizer.to_dict() == config_io.load_config(
        str(REPO / "configs/demo_vq.py")).tokenizer.to_dict()


@pytest.mark.slow
def test_demo_pipeline_end_to_end_and_rerun_skips(tmp_path, monkeypatch):
    config = config_io.load_config(str(REPO / "configs/demo.py"), **TINY_DEMO)
    workdir = str(tmp_path / "demo")
    loads = []
    real_load = ckpt_lib.load_params
    monkeypatch.setattr(ckpt_lib, "load_params",
                        lambda path, *a, **k: loads.append(str(path)) or real_load(path, *a, **k))
    pipeline.run(config, workdir)
    # One full run reads each stage's exported params once (encode, samples, eval share them).
    assert sorted(os.path.basename(os.path.dirname(p)) for p in loads) == [
        "generator", "tokenizer", "tokenizer_tpt"]
    samples = tmp_path / "demo" / "samples"
    for name in ("samples.png", "growth.gif", "codes.npz", "metrics.json"):
        assert (samples / name).exists(), name
    rows = json.loads((samples / "metrics.json").read_text())["rows"]
    # The trained ladder decoded by both tokenizers (the TPT row shares its codes), then
    # correction off.
    assert [(r["steps"], r["correct"], r["decoder"]) for r in rows] == [
        (7, True, "original"), (7, True, "TPT"), (7, False, "original")]
    assert all(0.0 <= r["accuracy"] <= 1.0 and np.isfinite(r["fd"]) for r in rows)
    codes = np.load(samples / "codes.npz")
    assert codes["codes"].shape == (10, 8, 8) and codes["codes"].min() >= 0
    # The trained schedule is recorded beside the generator's params.
    record = json.loads((tmp_path / "demo" / "generator" / "schedule.json").read_text())
    assert record["kind"] == "euclidean" and np.array(record["ring_map"]).shape == (8, 8)

    # The notebook helper on the same workdir, seed and options samples the same codes and
    # images as the sample stage (it reads config.sample's CFG scale, temperature, top-k/p).
    gen = generator_lib.Generator(config, workdir)
    labels = samples_lib.labels_of(config)
    np.testing.assert_array_equal(gen.sample_codes(labels), codes["codes"])
    np.testing.assert_array_equal(gen.sample(labels), gen.decode(codes["codes"]))
    # Another seed gives other codes: the comparison above is not vacuous.
    assert not np.array_equal(gen.sample_codes(labels, seed=config.sample.seed + 1),
                              codes["codes"])

    # A second run finds every stage finished: it only samples and evaluates again.
    finished = [tmp_path / "demo" / "tokens" / "finished.json",
                tmp_path / "demo" / "tokenizer_tpt" / "finished.json",
                tmp_path / "demo" / "tokenizer" / "finished.json",
                tmp_path / "demo" / "generator" / "metrics.jsonl"]
    mtimes = [os.path.getmtime(p) for p in finished]
    pipeline.run(config, workdir)
    assert [os.path.getmtime(p) for p in finished] == mtimes
