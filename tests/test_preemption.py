"""A kill or preemption never loses the last good checkpoint (radar_jax/preemption.py,
checkpoint.py): a real SIGTERM to the CLI saves at the step it reached and exits 143; SIGKILLs
at random points, saves included, leave a run that still finishes bit-identically; an
unreadable latest checkpoint is set aside with a warning and the previous step resumes."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from radar_jax import checkpoint as ckpt_lib
from radar_jax import config_io
from radar_jax import data as data_lib
from radar_jax import pipeline
from radar_jax import preemption
from radar_jax import workdir as workdir_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs/demo.py")
# decay_steps pins the cosine schedule's length, so a run of 8 steps continued to 12 follows
# the same learning rates as a run of 12 (the demo's default decays over num_steps). The demo's
# RDS stays on, padded to one length: one compiled train step instead of one per length bucket
# that the 12 steps happen to draw (each run, and each resumed run, loads every one of them).
OVERRIDES = {"train.num_steps": 12, "train.log_every": 1, "train.ckpt_every": 4,
             "train.batch_size": 8, "train.decay_steps": 12, "train.rds_buckets": 1}

# Runs the real CLI with each step slowed down, so a signal can land mid-run.
_SLOW_CLI = textwrap.dedent("""
    import runpy, sys, time
    from radar_jax import sharding
    real, delay = sharding.shard_batch, float(sys.argv[1])
    def slow(batch, mesh):
        time.sleep(delay)
        return real(batch, mesh)
    sharding.shard_batch = slow
    sys.argv = ["radar_jax.main"] + sys.argv[2:]
    runpy.run_module("radar_jax.main", run_name="__main__")
""")


def _make_workdir(root) -> workdir_lib.Workdir:
    """A workdir whose token stage is finished (random 8x8 codes of the demo's codebook)."""
    wd = workdir_lib.Workdir(root)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (64, 8, 8)).astype(np.int32)
    labels = rng.integers(0, 10, (64,)).astype(np.int32)
    data_lib.save_token_cache(str(wd.token_cache), codes, labels, {"vocab_size": 256})
    wd.mark_finished(workdir_lib.TOKENS, 0)
    return wd


def _config(**extra):
    return config_io.load_config(DEMO, **{**OVERRIDES, **extra})


def _params(wd):
    return jax.tree.map(np.asarray, ckpt_lib.load_params(wd.params_path("generator")))


def _assert_same(a, b):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 12-step run's exported params."""
    wd = _make_workdir(tmp_path_factory.mktemp("reference"))
    pipeline.run(_config(), str(wd.root), mode="train")
    return _params(wd)


def _start_slow(wd, delay, **extra):
    flags = [f"--config.{k}={v}" for k, v in {**OVERRIDES, **extra}.items()]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, "-c", _SLOW_CLI, str(delay), f"--config={DEMO}",
         f"--workdir={wd.root}", "--mode=train", *flags],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(wd, proc, n, timeout=240):
    """Blocks until the run logged `n` training rows (or ended)."""
    path = pathlib.Path(wd.stage("generator")) / "metrics.jsonl"
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        if path.exists() and sum("train/loss" in l for l in path.read_text().splitlines()) >= n:
            return
        time.sleep(0.1)
    if proc.poll() is None:
        proc.kill()
    raise AssertionError(f"no {n} steps within {timeout}s: {proc.communicate()[1][-2000:]}")


def test_sigterm_saves_the_step_reached_and_resumes_bit_identically(tmp_path, reference):
    wd = _make_workdir(tmp_path)
    proc = _start_slow(wd, 0.5)
    _wait_for_steps(wd, proc, 5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == preemption.PREEMPTED_STATUS, err[-3000:]
    assert "Traceback" not in err
    rows = [json.loads(l) for l in
            (pathlib.Path(wd.stage("generator")) / "metrics.jsonl").read_text().splitlines()]
    reached = max(r["step"] for r in rows if "train/loss" in r)
    saved = ckpt_lib.latest_step(wd.checkpoints_path("generator"))
    # The step in flight when the signal came finishes, then is saved: not only step 4's.
    assert saved in (reached, reached + 1) and saved > 4, (saved, reached)
    assert not wd.is_finished("generator", 12)
    pipeline.run(_config(), str(wd.root), mode="train")
    _assert_same(_params(wd), reference)


@pytest.mark.slow
def test_sigkill_at_random_points_still_finishes_bit_identically(tmp_path, reference):
    wd = _make_workdir(tmp_path)
    rng = np.random.default_rng(1)
    for _ in range(3):
        proc = _start_slow(wd, 0.3, **{"train.ckpt_every": 1})   # saves at every step
        latest = ckpt_lib.latest_step(wd.checkpoints_path("generator")) or 0
        if latest >= 11:
            break
        _wait_for_steps(wd, proc, 1 + latest)
        time.sleep(float(rng.uniform(0.0, 1.2)))                  # anywhere, saves included
        proc.kill()
        proc.communicate(timeout=60)
    pipeline.run(_config(**{"train.ckpt_every": 1}), str(wd.root), mode="train")
    _assert_same(_params(wd), reference)


def test_unreadable_latest_checkpoint_is_set_aside_and_the_previous_step_resumes(
        tmp_path, reference, caplog):
    wd = _make_workdir(tmp_path)
    pipeline.run(_config(**{"train.num_steps": 8}), str(wd.root), mode="train")
    ckpt_dir = pathlib.Path(wd.checkpoints_path("generator"))
    assert ckpt_lib.latest_step(ckpt_dir) == 8
    # Damage step 8: every data file of its state is cut to nothing.
    for f in (ckpt_dir / "8" / "state").rglob("*"):
        if f.is_file() and f.name not in ("_CHECKPOINT_METADATA",):
            f.write_bytes(b"")
    with caplog.at_level("WARNING"):
        pipeline.run(_config(), str(wd.root), mode="train")
    warned = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert warned and str(ckpt_dir / "8") in warned[0] or f"{ckpt_dir}/8" in warned[0]
    assert (ckpt_dir.parent / "checkpoints_unreadable" / "8").is_dir()   # kept, not deleted
    _assert_same(_params(wd), reference)
