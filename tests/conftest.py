"""Shared pytest fixtures: the location of ../shared and its reference fixtures."""

import os
import pathlib

import jax
from jax.experimental.compilation_cache import compilation_cache
import pytest

# Keep tests on the CPU and deterministic, whatever the machine has.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
FIXTURES_DIR = SHARED_DIR / "fixtures"


# The demo pipeline at the smallest budget that runs every stage (tokenizer with and without the
# discriminator, encode, generator, TPT, samples, digits eval), for the end-to-end tests. One
# dict, so their subprocesses compile the same programs and share the compilation cache below
# (the learning-rate schedule is pinned to 4 steps, so a run resumed to 4 steps, as the gs://
# test does, runs the same generator step).
# 16px digits with one downsampling level keep the demo's 8x8 token grid; with a one-layer,
# 8-channel discriminator the tokenizer programs compile in about half the time of the demo's
# 32px ones (a whole cold tiny pipeline: 90 s against 119 s on 2 cores). A handful of images
# per sampler setting: one group of steps (one scan body) compiles in a third of the time of
# the demo's three (test_sampling checks every grouping against the uncached reference).
TINY_TOKENIZER = {"tokenizer.data.image_size": 16, "tokenizer.model.encoder_ch_mult": (1, 2),
                  "tokenizer.model.decoder_ch_mult": (1, 2), "tokenizer.loss.disc_ndf": 8,
                  "tokenizer.loss.disc_layers": 1}
TINY_DEMO = {**TINY_TOKENIZER, "tokenizer.num_steps": 2, "tokenizer.loss.disc_start": 1,
             "tokenizer.log_every": 1, "tokenizer.ckpt_every": 2,
             "train.num_steps": 2, "train.log_every": 1, "train.ckpt_every": 2,
             "train.decay_steps": 4, "train.rds": False, "sample.num_per_class": 1,
             "sample.batch_size": 10, "sample.eval_per_class": 2, "sample.max_groups": 1,
             "tpt.num_steps": 2, "tpt.log_every": 1}


def tiny_demo_flags(**overrides) -> list[str]:
    """TINY_DEMO (plus overrides) as `--config.x=y` flags for `python -m radar_jax.main`."""
    return [f"--config.{k}={v}" for k, v in {**TINY_DEMO, **overrides}.items()]


def shared_fixture(name: str) -> pathlib.Path:
    """Path of a reference fixture in ../shared/fixtures, or skips the test if it is absent."""
    path = FIXTURES_DIR / name
    if not path.exists():
        pytest.skip(f"reference fixture {path} not found: clone the repo next to shared/ "
                    "(the team's ../shared folder) to run the parity tests")
    return path


def kill_at_batch(monkeypatch, n, is_batch=lambda batch: True):
    """Simulates a kill: `sharding.shard_batch` raises KeyboardInterrupt on its n-th call whose
    argument passes `is_batch` (the training loops call it once per step to place the batch).
    Returns a function that puts the real shard_batch back."""
    from radar_jax import sharding  # pylint: disable=g-import-not-at-top
    real = sharding.shard_batch
    seen = {"n": 0}

    def killing_shard_batch(batch, mesh):
        if is_batch(batch):
            seen["n"] += 1
            if seen["n"] == n:
                raise KeyboardInterrupt("simulated kill")
        return real(batch, mesh)
    monkeypatch.setattr(sharding, "shard_batch", killing_shard_batch)
    return lambda: monkeypatch.setattr(sharding, "shard_batch", real)


def pytest_collection_modifyitems(items):
    """Test files with a slow-marked test run first. Under pytest-xdist (`--dist loadfile
    --no-loadscope-reorder`, pytest.ini) a worker takes the next file in this order when it is
    free, so the long files start at once and the short ones fill in around them, instead of
    one long file starting last and running alone."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: in-file order is kept


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    if not FIXTURES_DIR.is_dir():
        pytest.skip(f"{FIXTURES_DIR} not found: the parity tests need ../shared/fixtures")
    return FIXTURES_DIR


@pytest.fixture(scope="session", autouse=True)
def persistent_compilation_cache(tmp_path_factory):
    """Many tests rerun the very same program (a resumed run recompiles the step it ran before
    the kill; several tests and their `python -m radar_jax.main` subprocesses train the same
    tiny model). A persistent compilation cache, private to this session and shared with every
    pytest-xdist worker and every subprocess through the environment, turns those repeats into
    cache hits; the executables are the same."""
    # Under pytest-xdist every worker has its own basetemp under one shared root: the cache
    # goes in that root, so the workers share it too.
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    cache_dir = root / "jax_compilation_cache"
    cache_dir.mkdir(exist_ok=True)
    values = {"jax_compilation_cache_dir": str(cache_dir),
              "jax_persistent_cache_min_compile_time_secs": 0.0,
              "jax_persistent_cache_min_entry_size_bytes": 0}
    saved = {name: getattr(jax.config, name) for name in values}
    saved_env = {name.upper(): os.environ.get(name.upper()) for name in values}
    compilation_cache.reset_cache()  # the cache is set up once per process; redo it
    for name, value in values.items():
        jax.config.update(name, value)
        os.environ[name.upper()] = str(value)  # subprocesses read JAX_COMPILATION_CACHE_DIR...
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    for name, value in saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    compilation_cache.reset_cache()

