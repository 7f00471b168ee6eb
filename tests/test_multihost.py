"""Two JAX processes on this machine (jax.distributed over localhost, CPU devices) run the tiny
demo pipeline (tokenizer, encode, generator, samples, digits eval; TPT off) into one workdir: no
crash or hang, every metric row written once, the generator they train equals what one process
trains on the same global batches, and the training resumes and finishes with one process."""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import tiny_demo_flags
from radar_jax import checkpoint as ckpt_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
# Four steps (checkpoints at 2 and 4) and RDS on: each step's ladders are drawn for the global
# batch, which both processes must agree on (padded to one length: one compiled step, not one
# per length bucket drawn). The learning-rate schedule is pinned to the 6 steps of the resumed
# run, so the one-process runs compile one generator step between them. Tokenizer
# post-training is off: it shards its state with trainer.create_sharded_state, as the
# tokenizer and generator stages that two processes run here do, and each stage costs tens of
# seconds of compile per process on 2 cores (test_tpt covers the stage on one process).
FLAGS = ["--config=configs/demo.py",
         *tiny_demo_flags(**{"train.num_steps": 4, "train.decay_steps": 6, "train.rds": True,
                             "train.rds_buckets": 1, "tpt.enabled": False})]
TIMEOUT = 900


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(key, None)
    env.update(extra)
    return env


def _run_processes(workdir, n, *extra_flags):
    """Starts n cooperating processes; returns their (returncode, stderr)."""
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "radar_jax.main", *FLAGS, f"--workdir={workdir}", *extra_flags],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=_env(**({} if n == 1 else dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                            JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(i)))))
        for i in range(n)]
    out = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=TIMEOUT)
            out.append((p.returncode, err))
    finally:
        for p in procs:  # never leave a process waiting in a barrier
            if p.poll() is None:
                p.kill()
    return out


def _params(path):
    return jax.tree.map(np.asarray, ckpt_lib.load_params(str(path)))


@pytest.mark.slow
def test_two_processes_run_the_pipeline_and_one_resumes_it(tmp_path):
    two = tmp_path / "two"
    results = _run_processes(two, 2)
    for rc, err in results:
        assert rc == 0, err[-4000:]
    for stage in ("tokenizer", "generator"):
        rows = [json.loads(l) for l in (two / stage / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in rows if "train/loss" in r]
        assert steps == sorted(set(steps)) and len(steps) >= 2, (stage, steps)  # once each
    for name in ("samples.png", "growth.gif", "codes.npz", "metrics.json"):
        assert (two / "samples" / name).exists(), name
    assert not (two / "tokenizer_tpt").exists()
    assert not list(two.rglob("*.tmp-*"))  # no temporary file left behind

    # One process trains the generator on the same token cache: the same global batches.
    one = tmp_path / "one"
    one.mkdir()
    for stage in ("tokenizer", "tokens"):
        shutil.copytree(two / stage, one / stage)
    [(rc, err)] = _run_processes(one, 1, "--mode=train")
    assert rc == 0, err[-4000:]
    a, b = _params(two / "generator" / "params"), _params(one / "generator" / "params")
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))

    # The two-process training, resumed by one process with more steps, continues and
    # finishes (--mode=train: the samples and the eval were checked above).
    [(rc, err)] = _run_processes(two, 1, "--mode=train", "--config.train.num_steps=6")
    assert rc == 0, err[-4000:]
    assert "Resumed from" in err and "at step 4" in err, err[-3000:]
    assert ckpt_lib.latest_step(two / "generator" / "checkpoints") == 6
