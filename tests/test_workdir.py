"""The workdir layout and its records (radar_jax/workdir.py, fileio.py)."""

import json

import numpy as np
import pytest

from radar_jax import checkpoint as ckpt_lib
from radar_jax import fileio
from radar_jax import schedules
from radar_jax import workdir as workdir_lib


def test_stage_paths_and_unknown_stage(tmp_path):
    wd = workdir_lib.Workdir(tmp_path)
    assert wd.stage("generator") == tmp_path / "generator"
    assert wd.params_path("tokenizer") == tmp_path / "tokenizer" / "params"
    with pytest.raises(ValueError, match="unknown stage 'decoder'"):
        wd.stage("decoder")


def test_finished_needs_the_record_the_steps_and_no_newer_checkpoint(tmp_path):
    wd = workdir_lib.Workdir(tmp_path)
    assert not wd.is_finished("tokenizer", 4)
    ckpt_lib.export_params(wd.params_path("tokenizer"), {"w": np.ones(3, np.float32)})
    assert not wd.is_finished("tokenizer", 4)          # params alone: no record yet
    wd.mark_finished("tokenizer", 4, metrics={"psnr": 20.0})
    assert wd.is_finished("tokenizer", 4)
    assert not wd.is_finished("tokenizer", 6)          # the user asked for more steps
    assert wd.record("tokenizer")["metrics"] == {"psnr": 20.0}
    # A later checkpoint than the record: resumed with more steps and not finished again.
    ckpt = ckpt_lib.Checkpointer(wd.checkpoints_path("tokenizer"), async_save=False)
    ckpt.save(5, {"w": np.ones(3, np.float32)})
    ckpt.close()
    assert not wd.is_finished("tokenizer", 4)


def test_trained_schedule_round_trips(tmp_path):
    wd = workdir_lib.Workdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="--mode=train"):
        wd.trained_schedule()
    sub = schedules.sub_ladder(schedules.make_schedule("euclidean", (6, 9)), 4)
    wd.save_schedule(sub, correction_band=2)
    schedule, band = wd.trained_schedule()
    assert schedule == sub and band == 2 and schedule.grid == (6, 9)
    raster = schedules.make_schedule("raster", (4, 4))
    wd.save_schedule(raster)
    schedule, band = wd.trained_schedule()
    assert schedule.is_next_token and band is None


def test_params_are_loaded_once(tmp_path, monkeypatch):
    wd = workdir_lib.Workdir(tmp_path)
    ckpt_lib.export_params(wd.params_path("generator"), {"w": np.arange(3.0)})
    calls = []
    real = ckpt_lib.load_params
    monkeypatch.setattr(ckpt_lib, "load_params", lambda p: calls.append(p) or real(p))
    first, again = wd.params("generator"), wd.params("generator")
    assert first is again and len(calls) == 1
    np.testing.assert_array_equal(first["w"], np.arange(3.0))
    with pytest.raises(FileNotFoundError, match="--mode=train_vq"):
        wd.params("tokenizer")


def test_atomic_json_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "sub" / "record.json"
    fileio.write_json(target, {"a": 1})
    fileio.write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["record.json"]
    assert fileio.read_json(tmp_path / "missing.json") is None
