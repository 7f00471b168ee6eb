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
# c. Gradients respect the nested mask on the real packed layout
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, grid, kw, block", [
    ("crops", (4, 4), dict(sizes=(1, 2, 4)), 1),   # blocks of 1, 4, 16 tokens
    ("euclidean", (5, 5), {}, 2),                  # blocks of 1, 5, 13, 25 tokens
])
def test_gradient_reaches_only_visible_inputs(kind, grid, kw, block):
    schedule = schedules.make_schedule(kind, grid, **kw)
    layout = schedules.train_layout(schedule)
    bounds = schedules.block_bounds(schedule)
    config = transformer.model_config("tiny", vocab_size=32, num_classes=4,
                                      block_size=grid[0] * grid[1], grid=grid)
    model = transformer.Transformer(config)
    params = random_head_params(config)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 32, grid[0] * grid[1])
    tokens_1L = codes[np.maximum(layout["flat_pos"], 0)][None]
    labels = np.array([1])
    h_1LD = jax.jit(lambda p: model.apply({"params": p}, tokens_1L, labels, layout["is_new"],
                                          layout["is_class"], method="embed"))(params)

    # The loss at the first known-area position of the block; its ground-truth target.
    start, stop = bounds[block], bounds[block + 1]
    query = start + int(np.flatnonzero(~layout["is_new"][start:stop])[0])
    target = int(codes[layout["target_pos"][query]])

    def loss(h):
        logits, _ = model.apply({"params": params}, h, layout["flat_pos"], layout["mask"],
                                method="forward_embeddings")
        return -jax.nn.log_softmax(logits[0, query])[target]

    grad_L = np.abs(np.asarray(jax.jit(jax.grad(loss))(h_1LD))[0]).max(axis=-1)
    index = np.arange(len(grad_L))
    new_ring_here = (index >= start) & (index < stop) & layout["is_new"]
    later = index >= stop
    earlier = index < start  # class token and every earlier block
    known_here = (index >= start) & (index < stop) & ~layout["is_new"]
    assert new_ring_here.sum() > 0 and later.sum() > 0
    # Exactly zero: the known area never sees its own new ring, and no step sees a later one.
    assert np.all(grad_L[new_ring_here | later] == 0.0), grad_L
    # Everything the query may attend to reaches it.
    assert np.all(grad_L[earlier] > 0), grad_L[earlier]
    assert np.all(grad_L[known_here] > 0), grad_L[known_here]


# ----------------------------------------------------------------------------------------------
# d. Loss split, RNI and RDS
# ----------------------------------------------------------------------------------------------
class _RecordingModel:
    """Stands in for the Transformer in sequence_loss and keeps the input tokens it is fed."""

    def __init__(self, vocab_size):
        self.config = ml_collections.ConfigDict(dict(vocab_size=vocab_size))
        self.tokens_BL = None

    def apply(self, variables, tokens_BL, labels_B, flat_pos, is_new, is_class, mask, *,
              train, rngs):
        del variables, labels_B, flat_pos, is_new, is_class, mask, train, rngs
        self.tokens_BL = tokens_BL
        return jnp.zeros(tokens_BL.shape + (8,)), None


def fed_tokens(vocab_size, codes_BN, meta, seed, **loss_kw):
    """(B, L) input tokens that sequence_loss (RNI included) feeds the model, under jit."""
    model = _RecordingModel(vocab_size)

    def run(codes_BN, rng):
        labels_B = jnp.zeros(codes_BN.shape[:1], jnp.int32)
        train.sequence_loss(model, {}, codes_BN, labels_B, meta, rng, **loss_kw)
        return model.tokens_BL
    return np.asarray(jax.jit(run)(codes_BN, jax.random.key(seed)))


def _full_meta(schedule):
    """A schedule's whole layout as LayoutSampler gives it without RDS (all valid)."""
    layout = schedules.layout_metadata(schedule)
    return schedules.pad_layout(layout, len(layout["step"]))


def test_rni_replaces_exactly_the_known_inputs():
    """Deterministic case: with a one-code vocabulary every replacement is code 0, so the fed
    tokens are fully predictable: 0 at known-area positions, the clean token elsewhere."""
    schedule = schedules.make_schedule("euclidean", (4, 4))
    meta = _full_meta(schedule)
    known_L = ~meta["is_new"] & ~meta["is_class"]
    codes_BN = np.full((3, 16), 5, np.int32)
    tokens_BL = fed_tokens(1, codes_BN, meta, 0, train=True, rni_range=(1.0, 1.0))
    np.testing.assert_array_equal(tokens_BL, np.where(known_L, 0, 5)[None].repeat(3, 0))
    # Off when the range is (0, 0), at evaluation, and for raster (which has no known area).
    raster_meta = _full_meta(schedules.make_schedule("raster", (4, 4)))
    for meta_, kw in ((meta, dict(train=True, rni_range=(0.0, 0.0))),
                      (meta, dict(train=False, rni_range=(1.0, 1.0))),
                      (raster_meta, dict(train=True, rni_range=(1.0, 1.0), raster=True))):
        assert np.all(fed_tokens(1, codes_BN, meta_, 0, **kw) == 5), kw


def test_rni_rate_and_per_example_fraction():
    schedule = schedules.make_schedule("euclidean", (8, 8))
    meta = _full_meta(schedule)
    known_L = ~meta["is_new"] & ~meta["is_class"]
    vocab, batch = 32, 64
    codes_BN = np.random.default_rng(0).integers(0, vocab, (batch, 64)).astype(np.int32)
    clean_BL = codes_BN[:, np.maximum(meta["flat_pos"], 0)]

    def differ_rate(rni_range, seed):
        tokens_BL = fed_tokens(vocab, codes_BN, meta, seed, train=True, rni_range=rni_range)
        differ_BL = tokens_BL != clean_BL
        assert not differ_BL[:, ~known_L].any()  # class and new-ring inputs are never touched
        return differ_BL[:, known_L].mean(axis=1)  # (B,) per example

    # Rate 1: every known input is a uniform random code, equal to the clean one w.p. 1/V.
    # About 9,000 known inputs: the binomial standard error is ~0.002.
    rate_B = differ_rate((1.0, 1.0), 0)
    assert abs(rate_B.mean() - (1 - 1 / vocab)) < 0.01, rate_B.mean()
    rate_B = differ_rate((0.5, 0.5), 1)
    assert abs(rate_B.mean() - 0.5 * (1 - 1 / vocab)) < 0.02, rate_B.mean()
    # U(0, 1) per example: the fractions spread over the whole range, mean ~ 1/2 * (1 - 1/V).
    rate_B = differ_rate((0.0, 1.0), 2)
    assert rate_B.min() < 0.2 and rate_B.max() > 0.8, rate_B
    assert abs(rate_B.mean() - 0.5 * (1 - 1 / vocab)) < 0.1, rate_B.mean()


def test_loss_split_matches_an_independent_cross_entropy():
    schedule = schedules.make_schedule("euclidean", (4, 4))
    meta = _full_meta(schedule)
    config = transformer.model_config("tiny", vocab_size=32, num_classes=4, block_size=16)
    model = transformer.Transformer(config)
    params = random_head_params(config)
    rng = np.random.default_rng(0)
    codes_BN = rng.integers(0, 32, (2, 16)).astype(np.int32)
    labels = np.array([0, 3], np.int32)
    loss, metrics = jax.jit(lambda p: train.sequence_loss(
        model, p, codes_BN, labels, meta, jax.random.key(0), train=False, known_weight=0.25))(
            params)

    # Independent: logits of the plain forward pass, then per-token CE from numpy.
    tokens_BL = codes_BN[:, np.maximum(meta["flat_pos"], 0)]
    mask = schedules.train_layout(schedule)["mask"]
    logits, _ = jax.jit(lambda p: model.apply({"params": p}, tokens_BL, labels, meta["flat_pos"],
                                              meta["is_new"], meta["is_class"], mask))(params)
    targets_BL = codes_BN[:, np.maximum(meta["target_pos"], 0)]
    ce_BL = -np.take_along_axis(log_softmax_np(logits), targets_BL[..., None], -1)[..., 0]
    is_new = meta["is_new"][None].repeat(2, 0)
    is_known = (~meta["is_new"] & ~meta["is_class"])[None].repeat(2, 0)
    np.testing.assert_allclose(metrics["loss_new"], ce_BL[is_new].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_known"], ce_BL[is_known].mean(), rtol=1e-5)
    expected = ((ce_BL[is_new].sum() + 0.25 * ce_BL[is_known].sum())
                / (is_new.sum() + 0.25 * is_known.sum()))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert float(metrics["tokens"]) == 2 * len(meta["step"])


def _kept_steps(schedule, example):
    """Recovers which steps of `schedule` a (padded) RDS layout kept, from its block sizes."""
    n = int(example["valid"].sum())
    assert example["valid"][:n].all() and not example["valid"][n:].any()
    steps = example["step"][:n][~example["is_class"][:n]]
    block_sizes = np.bincount(steps)
    keep = np.searchsorted(schedule.canvas_sizes, block_sizes)
    np.testing.assert_array_equal(schedule.canvas_sizes[keep], block_sizes)
    return keep, n


def test_layout_sampler_rds_per_example():
    schedule = schedules.make_schedule("euclidean", (8, 8))  # 7 steps
    t = cd.generator_train(rds=True, rds_mode="per_example", rds_min_steps=3)
    sampler = train.LayoutSampler(schedule, t, seed=5)
    full_length = len(schedules.layout_metadata(schedule)["step"])
    assert sampler.length == full_length
    meta = sampler(step=7, batch_size=16)
    assert set(meta) == set(train.META_KEYS)
    assert all(v.shape == (16, full_length) for v in meta.values())

    ladders = set()
    for i in range(16):
        example = {k: v[i] for k, v in meta.items()}
        keep, n = _kept_steps(schedule, example)
        assert keep[0] == 0 and keep[-1] == schedule.num_steps - 1 and len(keep) >= 3
        expected = schedules.layout_metadata(schedules.merge_rings(schedule, keep))
        for key, value in expected.items():
            np.testing.assert_array_equal(example[key][:n], value, err_msg=key)
        # Padding feeds and predicts nothing.
        assert np.all(example["flat_pos"][n:] == -1) and np.all(example["target_pos"][n:] == -1)
        assert not example["is_new"][n:].any() and not example["is_class"][n:].any()
        ladders.add(tuple(keep))
    assert len(ladders) > 1  # per example, not one ladder for the batch

    # Deterministic in (seed, step) -- a fresh sampler too, as after a resume -- and different
    # for another step or seed.
    again = train.LayoutSampler(schedule, t, seed=5)(step=7, batch_size=16)
    for key in train.META_KEYS:
        np.testing.assert_array_equal(meta[key], again[key])
    other_step = sampler(step=8, batch_size=16)
    other_seed = train.LayoutSampler(schedule, t, seed=6)(step=7, batch_size=16)
    assert not np.array_equal(meta["step"], other_step["step"])
    assert not np.array_equal(meta["step"], other_seed["step"])


def test_layout_sampler_per_batch_and_off():
    schedule = schedules.make_schedule("euclidean", (8, 8))
    per_batch = train.LayoutSampler(schedule, cd.generator_train(rds=True, rds_mode="per_batch"))
    meta = per_batch(step=3, batch_size=16)
    assert meta["step"].shape == (per_batch.length,)
    keep, n = _kept_steps(schedule, meta)
    expected = schedules.layout_metadata(schedules.merge_rings(schedule, keep))
    np.testing.assert_array_equal(meta["flat_pos"][:n], expected["flat_pos"])
    # RDS off, or raster (no rings to drop): the full layout every step, all valid.
    for sched, t in ((schedule, cd.generator_train(rds=False)),
                     (schedules.make_schedule("raster", (8, 8)), cd.generator_train(rds=True))):
        meta = train.LayoutSampler(sched, t)(step=3, batch_size=16)
        full = schedules.layout_metadata(sched)
        assert meta["valid"].all() and meta["step"].shape == full["step"].shape
        for key, value in full.items():
            np.testing.assert_array_equal(meta[key], value)
    bad = train.LayoutSampler(schedule, cd.generator_train(rds=True, rds_mode="sometimes"))
    with pytest.raises(ValueError, match="rds_mode='sometimes'"):
        bad(step=1, batch_size=2)


def test_padded_rds_layouts_give_the_unpadded_loss():
    """Per-example padded layouts inside one batch: each example's CE equals the CE of its own
    unpadded merged layout, so padding neither leaks into attention nor into the loss."""
    schedule = schedules.make_schedule("euclidean", (5, 5))
    config = transformer.model_config("tiny", vocab_size=32, num_classes=4, block_size=25)
    model = transformer.Transformer(config)
    params = random_head_params(config)
    codes_BN = np.random.default_rng(1).integers(0, 32, (4, 25)).astype(np.int32)
    labels = np.array([0, 1, 2, 3], np.int32)
    t = cd.generator_train(rds=True, rds_mode="per_example", rds_keep_prob=0.5)
    meta = train.LayoutSampler(schedule, t, seed=0)(step=1, batch_size=4)
    # Jitted: eager op-by-op execution would compile every op for each layout length.
    loss_fn = jax.jit(lambda codes, labels, meta: train.sequence_loss(
        model, params, codes, labels, meta, jax.random.key(0), train=False)[1])
    metrics = loss_fn(codes_BN, labels, meta)

    total_ce, count = 0.0, 0
    for i in range(4):
        keep, _ = _kept_steps(schedule, {k: v[i] for k, v in meta.items()})
        own = _full_meta(schedules.merge_rings(schedule, keep))
        m = loss_fn(codes_BN[i:i + 1], labels[i:i + 1], own)
        n_new = int(own["is_new"].sum())
        total_ce += float(m["loss_new"]) * n_new
        count += n_new
    np.testing.assert_allclose(metrics["loss_new"], total_ce / count, rtol=1e-5)


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
