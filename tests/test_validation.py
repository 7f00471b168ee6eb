"""Bad input is caught up front (radar_jax/validate.py, pipeline.py, main.py): each case ends
in one line that names the field, with exit status 2, within seconds, and nothing in the
workdir is lost or half-made."""

import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

from radar_jax import checkpoint as ckpt_lib
from radar_jax import config_io
from radar_jax import data as data_lib
from radar_jax import pipeline
from radar_jax import workdir as workdir_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs/demo.py")

# (override, value, text the one-line message must contain)
CASES = [
    ("train.num_steps", -3, "config.train.num_steps=-3"),
    ("tokenizer.num_steps", -1, "config.tokenizer.num_steps=-1"),
    ("train.log_every", 0, "config.train.log_every=0"),
    ("train.lr", -0.01, "config.train.lr=-0.01"),
    ("train.ckpt_every", 0, "config.train.ckpt_every=0"),
    ("schedule.kind", "spiral", "config.schedule.kind='spiral'"),
    ("tokenizer.data.source", "webdataset", "config.tokenizer.data.source='webdataset'"),
    ("tokens.augment", "rotate", "config.tokens.augment='rotate'"),
    ("sample.labels", (3, 12), "config.sample.labels=(3, 12)"),
    ("sample.top_p", 0.0, "config.sample.top_p=0.0"),
    ("train.rni_range", (0.5, 0.1), "config.train.rni_range=(0.5, 0.1)"),
    ("model.vocab_size", 300, "config.model.vocab_size=300"),
    ("tokenizer.data.image_size", 30, "config.tokenizer.data.image_size=30"),
]


@pytest.mark.parametrize("key, value, text", CASES, ids=[c[0] for c in CASES])
def test_bad_config_stops_before_any_work(tmp_path, key, value, text):
    config = config_io.load_config(DEMO, **{key: value})
    workdir = tmp_path / "run"
    t0 = time.perf_counter()
    with pytest.raises(config_io.ConfigError) as e:
        pipeline.run(config, str(workdir))
    assert time.perf_counter() - t0 < 5.0
    message = str(e.value)
    assert text in message and "\n" not in message, message
    # Nothing was started: no stage folder exists (hours of tokenizer training not wasted).
    assert not workdir.exists() or not any(workdir.iterdir())


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "radar_jax.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_prints_one_line_and_exits_2(tmp_path):
    t0 = time.perf_counter()
    out = _cli(f"--config={DEMO}", f"--workdir={tmp_path / 'run'}",
               "--config.train.num_steps=-3")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("radar_jax: config.train.num_steps=-3"), last
    assert time.perf_counter() - t0 < 60


def test_unwritable_workdir_is_reported_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    config = config_io.load_config(DEMO)
    with pytest.raises(config_io.ConfigError, match="--workdir=.*cannot write there"):
        pipeline.run(config, str(blocker / "run"))


def _finished_tokens(wd, labels, augment="none", grid=(8, 8)):
    codes = np.zeros((len(labels),) + grid, np.int32)
    data_lib.save_token_cache(str(wd.token_cache), codes, np.asarray(labels, np.int32),
                              {"augment": augment, "vocab_size": 256})
    wd.mark_finished(workdir_lib.TOKENS, 0, augment=augment, image_size=32, source="digits",
                     split="train", codebook_size=256)


def test_changed_augment_after_the_cache_exists_stops(tmp_path):
    wd = workdir_lib.Workdir(tmp_path)
    _finished_tokens(wd, [0, 1])
    config = config_io.load_config(DEMO, **{"tokens.augment": "flip"})
    from radar_jax import encode  # pylint: disable=g-import-not-at-top
    with pytest.raises(config_io.ConfigError, match="augment='none' but the config has "
                                                    "augment='flip'.*tokens.rebuild=True"):
        encode.encode_dataset(config, wd)
    assert data_lib.token_cache_state(str(wd.token_cache)) == "complete"  # kept


def test_token_cache_with_a_negative_label_stops(tmp_path):
    wd = workdir_lib.Workdir(tmp_path)
    _finished_tokens(wd, [0, 1, 2])
    labels_file = next(pathlib.Path(wd.token_cache).glob("labels-*.npy"))
    np.save(labels_file, np.array([0, -1, 2], np.int32))
    config = config_io.load_config(DEMO, **{"train.num_steps": 1})
    from radar_jax import train  # pylint: disable=g-import-not-at-top
    with pytest.raises(config_io.ConfigError, match="-1"):
        train.train_and_evaluate(config, str(wd.stage("generator")), str(wd.token_cache))


def test_checkpoint_of_another_model_shape_names_the_array(tmp_path):
    wd = workdir_lib.Workdir(tmp_path)
    _finished_tokens(wd, list(range(10)) * 4)
    from radar_jax import train  # pylint: disable=g-import-not-at-top
    config = config_io.load_config(DEMO, **{"train.num_steps": 1, "train.rds": False})
    gen = str(wd.stage("generator"))
    train.train_and_evaluate(config, gen, str(wd.token_cache))
    wider = config_io.load_config(DEMO, **{"train.num_steps": 2, "model.dim": 128})
    with pytest.raises(config_io.ConfigError, match=r"shape \(.*96.*\) but this config builds"):
        train.train_and_evaluate(wider, gen, str(wd.token_cache))
    assert ckpt_lib.latest_step(wd.checkpoints_path("generator")) == 1   # nothing lost
