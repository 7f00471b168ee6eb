"""Generator training (radar_jax/train.py): sharding, exact resume, gradients on the real
layout, the loss split, RNI/RDS, learning on digits, bad input and gradient accumulation.

Every run is a tiny transformer (dim 64, 2 layers) for a handful of steps; the expensive parts
(JAX compiles) are what the time goes to.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import kill_at_batch

from radar_jax import checkpoint as ckpt_lib
from radar_jax import config_defaults as cd
from radar_jax import data as data_lib
from radar_jax import schedules
from radar_jax import train
from radar_jax.models import transformer


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def tiny_config(num_steps, *, grid=(4, 4), vocab_size=32, num_classes=4, kind="euclidean",
                mesh=None, model_overrides=None, **train_overrides):
    """A pipeline config around transformer 'tiny' (dim 64, 4 heads, SwiGLU hidden 192).

    Every sharded dimension divides by 2 (embed 64, qkv 192, mlp 192, vocab 32), so a
    (data=2, fsdp=2, tensor=2) mesh shards every matrix without padding.
    """
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = transformer.model_config(
        "tiny", vocab_size=vocab_size, num_classes=num_classes, block_size=grid[0] * grid[1],
        grid=grid, **(model_overrides or {}))
    config.schedule = cd.schedule(kind)
    train_kw = dict(batch_size=8, num_steps=num_steps, lr=1e-3, log_every=1, ckpt_every=1000)
    train_kw.update(train_overrides)
    config.train = cd.generator_train(**train_kw)
    config.mesh = mesh or cd.mesh()
    return config


def write_random_cache(path, n=32, grid=(4, 4), vocab_size=32, num_classes=4, seed=0):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, vocab_size, (n,) + tuple(grid)).astype(np.int32)
    labels = rng.integers(0, num_classes, (n,)).astype(np.int32)
    data_lib.save_token_cache(str(path), codes, labels, {"what": "test_train random codes"})
    return str(path)


def exported_params(workdir, model_config=None):
    """The params a run exported, as numpy. With `model_config`, they are read into a
    one-device template of that model, which params saved from a multi-device mesh need."""
    template = None
    if model_config is not None:
        one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shapes = jax.eval_shape(lambda key: transformer.init_params(model_config, key),
                                jax.random.key(0))
        template = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device), shapes)
    path = os.path.join(workdir, "params")
    return jax.tree.map(np.asarray, ckpt_lib.load_params(path, template))


def train_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if "train/loss" in r]


def random_head_params(config, seed=0):
    """Random init with the (normally zero-initialised) output head re-drawn, so logits and
    their gradients depend on the inputs."""
    params = jax.jit(lambda key: transformer.init_params(config, key))(jax.random.key(seed))
    kernel = params["output"]["kernel"]
    params["output"]["kernel"] = 0.5 * jax.random.normal(jax.random.key(seed + 1), kernel.shape)
    return params


def log_softmax_np(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


# ----------------------------------------------------------------------------------------------
# a. A (data=2, fsdp=2, tensor=2) mesh trains exactly like one device
# ----------------------------------------------------------------------------------------------
# Runs in a subprocess: the 8 host devices must be requested before JAX initialises, and this
# pytest process has already initialised it with one.
_SHARDED_SCRIPT = textwrap.dedent("""
    import json
    import sys
    import jax
    from radar_jax import checkpoint as ckpt_lib
    from radar_jax import config_defaults as cd
    from radar_jax import sharding
    from radar_jax import train
    sys.path.insert(0, sys.argv[1])
    import test_train as tt

    root = sys.argv[2]
    print("DEVICES", jax.device_count())
    cache = tt.write_random_cache(root + "/tokens.npz")
    # RNI, per-example RDS and class dropout on: their randomness must not depend on the mesh.
    kw = dict(rni_range=(0.0, 0.5), rds=True, rds_mode="per_example")

    real_export = ckpt_lib.export_params
    def recording_export(path, params):
        for keypath, leaf in jax.tree_util.tree_leaves_with_path(params):
            print("PARAM " + json.dumps(dict(
                name=jax.tree_util.keystr(keypath), shape=list(leaf.shape),
                shard_shape=list(leaf.addressable_shards[0].data.shape),
                devices=len(leaf.sharding.device_set), spec=str(leaf.sharding.spec))))
        real_export(path, params)
    ckpt_lib.export_params = recording_export

    train.train_and_evaluate(tt.tiny_config(3, mesh=cd.mesh(2, 2, 2), **kw), root + "/sharded",
                             cache)
    print("END sharded")
    # The same run on a one-device mesh: make_mesh gets only the first device.
    real_make_mesh = sharding.make_mesh
    sharding.make_mesh = lambda mesh_config, devices=None: real_make_mesh(mesh_config,
                                                                         jax.devices()[:1])
    train.train_and_evaluate(tt.tiny_config(3, mesh=cd.mesh(1, 1, 1), **kw), root + "/single",
                             cache)
    print("END single")
""")


def test_sharded_mesh_matches_single_device(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT, tests_dir, str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "DEVICES 8" in out

    # The sharded run really split the parameters (read from the exported arrays themselves).
    sharded = {}
    for line in out[:out.index("END sharded")].splitlines():
        if line.startswith("PARAM "):
            row = json.loads(line[len("PARAM "):])
            sharded[row["name"]] = row
    wqkv = sharded["['layers_0']['attention']['wqkv']['kernel']"]
    # ('embed', 'qkv') -> ('fsdp', 'tensor'): each device holds a quarter of (64, 192).
    assert wqkv["shape"] == [64, 192] and wqkv["shard_shape"] == [32, 96], wqkv
    assert wqkv["devices"] == 8 and "fsdp" in wqkv["spec"] and "tensor" in wqkv["spec"]
    w2 = sharded["['layers_1']['feed_forward']['w2']['kernel']"]
    assert w2["shard_shape"] == [96, 32], w2  # ('mlp', 'embed') -> ('tensor', 'fsdp')
    head = sharded["['output']['kernel']"]
    assert head["shard_shape"] == [32, 16], head  # ('embed', 'vocab') -> ('fsdp', 'tensor')
    single = [json.loads(line[len("PARAM "):]) for line in
              out[out.index("END sharded"):out.index("END single")].splitlines()
              if line.startswith("PARAM ")]
    assert single and all(row["devices"] == 1 for row in single)

    # Same losses step by step, same final parameters.
    sharded_rows = train_rows(tmp_path / "sharded")
    single_rows = train_rows(tmp_path / "single")
    assert [r["step"] for r in sharded_rows] == [r["step"] for r in single_rows] == [1, 2, 3]
    for a, b in zip(sharded_rows, single_rows):
        for key in ("train/loss", "train/loss_new", "train/loss_known", "train/grad_norm"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
    model_config = tiny_config(3).model
    a = exported_params(tmp_path / "sharded", model_config)
    b = exported_params(tmp_path / "single", model_config)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)
    # The comparison means something only if three steps changed the parameters.
    init = jax.jit(lambda key: transformer.init_params(model_config, key))(jax.random.key(0))
    moved = max(float(np.abs(x - np.asarray(y)).max())
                for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(init)))
    assert moved > 1e-3


# ----------------------------------------------------------------------------------------------
# b. A run killed mid-way and resumed equals the uninterrupted run, bit for bit
# ----------------------------------------------------------------------------------------------
def test_resume_after_kill_is_bit_identical(tmp_path, monkeypatch):
    cache = write_random_cache(tmp_path / "tokens.npz")
    # RNI, per-example RDS, class dropout and EMA on: all of their per-step randomness and
    # state must come back exactly from the checkpoint.
    config = lambda: tiny_config(6, ckpt_every=3, rni_range=(0.0, 0.5), rds=True,
                                 rds_mode="per_example", ema_decay=0.5)
    straight = str(tmp_path / "straight")
    train.train_and_evaluate(config(), straight, cache)

    # Kill the second run while it fetches the batch of step 5: after the step-3 checkpoint,
    # with step 4 already applied in memory only. shard_batch also places per-example layout
    # metadata, so count only the calls that carry the (codes, labels) batch.
    crashed = str(tmp_path / "crashed")
    restore = kill_at_batch(monkeypatch, 5, is_batch=lambda batch: isinstance(batch, tuple))
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config(), crashed, cache)
    restore()
    assert ckpt_lib.Checkpointer(os.path.join(crashed, "checkpoints")).latest_step() == 3
    train.train_and_evaluate(config(), crashed, cache)

    a, b = exported_params(straight), exported_params(crashed)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    # The resumed run logged steps 4..6 again with the straight run's exact losses.
    straight_loss = {r["step"]: r["train/loss"] for r in train_rows(straight)}
    resumed = train_rows(crashed)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 4, 5, 6]
    for r in resumed:
        assert r["train/loss"] == straight_loss[r["step"]]


# ----------------------------------------------------------------------------------------------
# e. The model learns the spatial structure of real digits
# ----------------------------------------------------------------------------------------------
def test_learns_digit_token_maps(tmp_path):
    # Token maps without a tokenizer: sklearn's 8x8 digits have integer intensities 0..16, so
    # each pixel is one of 17 codes, with a digit's real spatial structure.
    images, labels = data_lib.load_digits_split("train")
    codes = np.rint(images).astype(np.int32)
    assert codes.min() == 0 and codes.max() == 16
    cache = str(tmp_path / "digits.npz")
    data_lib.save_token_cache(cache, codes, labels, {"what": "digit intensities as codes"})
    # The loss of predicting every token from its marginal frequency (about 2.06 nats: half
    # the pixels are background).
    freq = np.bincount(codes.ravel(), minlength=17) / codes.size
    marginal_entropy = float(-np.sum(freq[freq > 0] * np.log(freq[freq > 0])))

    # Crops 1, 2, 4, 8: 4 steps and a short sequence (86 positions), so 100 steps take ~25 s.
    config = tiny_config(100, grid=(8, 8), vocab_size=17, num_classes=10, kind="crops",
                         batch_size=32, lr=1e-2, warmup_steps=10, log_every=10)
    config.schedule.sizes = (1, 2, 4, 8)
    train.train_and_evaluate(config, str(tmp_path / "run"), cache)
    rows = train_rows(tmp_path / "run")
    assert rows[-1]["step"] == 100
    # Logged alongside the loss by the trainer: the same baseline as computed here.
    np.testing.assert_allclose(rows[-1]["train/marginal_entropy"], marginal_entropy, rtol=1e-6)
    final = {k: np.mean([r[f"train/{k}"] for r in rows[-3:]])
             for k in ("loss", "loss_new", "loss_known")}
    # The zero-initialised head starts at ln(17) = 2.83 nats on every token.
    assert final["loss"] < 0.7 * marginal_entropy, (final, marginal_entropy)
    # New-ring tokens (generation proper) beat the baseline too; known-area tokens (correction
    # of clean context) are nearly free.
    assert final["loss_new"] < 0.9 * marginal_entropy, (final, marginal_entropy)
    assert final["loss_known"] < 0.1, final


# ----------------------------------------------------------------------------------------------
# f. Bad input, and gradient accumulation
# ----------------------------------------------------------------------------------------------
def test_token_cache_grid_mismatch_is_a_clear_error(tmp_path):
    cache = write_random_cache(tmp_path / "tokens.npz", grid=(4, 4))
    with pytest.raises(ValueError, match=r"\(4, 4\) token maps but config.model.grid=\(8, 8\)"):
        train.train_and_evaluate(tiny_config(1, grid=(8, 8)), str(tmp_path / "run"), cache)
    big = write_random_cache(tmp_path / "big.npz", vocab_size=64)
    with pytest.raises(ValueError, match="vocab_size=32"):
        train.train_and_evaluate(tiny_config(1), str(tmp_path / "run"), big)


def test_batch_not_divisible_by_grad_accum(tmp_path):
    cache = write_random_cache(tmp_path / "tokens.npz")
    with pytest.raises(ValueError, match=r"batch_size=8 is not divisible by grad_accum=3"):
        train.train_and_evaluate(tiny_config(1, grad_accum=3), str(tmp_path / "run"), cache)


def test_grad_accum_gives_the_same_update(tmp_path):
    """Two micro-batches of 4 average to the gradient of the batch of 8 (dropout, class dropout,
    RNI and RDS off, so both see the same inputs), hence the same loss, gradient norm and
    parameters after two AdamW steps."""
    cache = write_random_cache(tmp_path / "tokens.npz")
    runs = {}
    for accum in (1, 2):
        config = tiny_config(2, grad_accum=accum, model_overrides=dict(class_dropout_prob=0.0))
        workdir = str(tmp_path / f"accum{accum}")
        train.train_and_evaluate(config, workdir, cache)
        runs[accum] = (train_rows(workdir), exported_params(workdir))
    for a, b in zip(runs[1][0], runs[2][0]):
        for key in ("train/loss", "train/loss_new", "train/loss_known", "train/grad_norm"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)
    for x, y in zip(jax.tree.leaves(runs[1][1]), jax.tree.leaves(runs[2][1])):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)
