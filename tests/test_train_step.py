"""The generator's training step (radar_jax/train_step.py): gradients on the real packed
layout respect the nested mask, the loss split against an independent cross-entropy, RNI and
the RDS layout sampler.

Tiny transformer (dim 64, 2 layers); each test compiles one small function.
"""

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from radar_jax import config_defaults as cd
from radar_jax import perf
from radar_jax import schedules
from radar_jax import train_step
from radar_jax.models import transformer

from test_train import log_softmax_np, random_head_params

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

    def apply(self, variables, tokens_BL, *args, method=None, **kwargs):
        del variables, args, kwargs
        if method == "logits_from_hidden":  # the loss head, on (B, C, 1) "hidden" chunks
            return jnp.zeros(tokens_BL.shape[:-1] + (self.config.vocab_size,))
        self.tokens_BL = tokens_BL
        return jnp.zeros(tokens_BL.shape + (1,)), None


def fed_tokens(vocab_size, codes_BN, meta, seed, **loss_kw):
    """(B, L) input tokens that sequence_loss (RNI included) feeds the model, under jit."""
    model = _RecordingModel(vocab_size)

    def run(codes_BN, rng):
        labels_B = jnp.zeros(codes_BN.shape[:1], jnp.int32)
        train_step.sequence_loss(model, {}, codes_BN, labels_B, meta, rng, **loss_kw)
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


@pytest.mark.parametrize("band", [None, 2])
def test_rni_per_position_is_consistent_across_blocks(band):
    """Every noised grid position carries the same random code in every block where it is a
    known input; clean positions are clean in every block. 'per_index' (the ablation) noises
    each packed index apart, so there a position's copies disagree."""
    schedule = schedules.make_schedule("euclidean", (8, 8))  # 7 steps
    layout = schedules.layout_metadata(schedule, correction_band=band)
    meta = schedules.pad_layout(layout, len(layout["step"]))
    known_L = ~meta["is_new"] & ~meta["is_class"]
    vocab, batch = 4096, 8  # a random code equals the clean one w.p. 1/4096
    codes_BN = np.random.default_rng(0).integers(0, vocab, (batch, 64)).astype(np.int32)
    clean_BL = codes_BN[:, np.maximum(meta["flat_pos"], 0)]
    pos_L = meta["flat_pos"]
    repeated = [p for p in range(64) if (known_L & (pos_L == p)).sum() > 1]
    assert len(repeated) > 20  # positions re-fed in several blocks: the case that matters

    tokens_BL = fed_tokens(vocab, codes_BN, meta, 0, train=True, rni_range=(0.5, 0.5))
    assert np.array_equal(tokens_BL[:, ~known_L], clean_BL[:, ~known_L])
    noised = 0
    for i in range(batch):
        for p in repeated:
            copies = tokens_BL[i, known_L & (pos_L == p)]
            assert np.all(copies == copies[0]), (i, p, copies)
            noised += int(copies[0] != codes_BN[i, p])
    assert 0.35 < noised / (batch * len(repeated)) < 0.65  # rate 1/2, ~300 positions

    per_index = fed_tokens(vocab, codes_BN, meta, 0, train=True, rni_range=(0.5, 0.5),
                           rni_mode="per_index")
    disagree = sum(len(set(per_index[i, known_L & (pos_L == p)])) > 1
                   for i in range(batch) for p in repeated)
    assert disagree > 0.5 * batch * len(repeated)
    with pytest.raises(ValueError, match="rni_mode='sometimes'"):
        fed_tokens(vocab, codes_BN, meta, 0, train=True, rni_range=(0.5, 0.5),
                   rni_mode="sometimes")


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
    loss, metrics = jax.jit(lambda p: train_step.sequence_loss(
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
    """Recovers which steps of `schedule` a (padded) RDS layout kept, from its new-ring sizes
    (so it works with any correction band)."""
    n = int(example["valid"].sum())
    assert example["valid"][:n].all() and not example["valid"][n:].any()
    new = example["is_new"][:n]
    canvas = np.cumsum(np.bincount(example["step"][:n][new]))
    keep = np.searchsorted(schedule.canvas_sizes, canvas)
    np.testing.assert_array_equal(schedule.canvas_sizes[keep], canvas)
    return keep, n


@pytest.mark.parametrize("band", [None, 2])
def test_layout_sampler_rds_per_example(band):
    schedule = schedules.make_schedule("euclidean", (8, 8))  # 7 steps
    t = cd.generator_train(rds=True, rds_mode="per_example", rds_min_steps=3)
    sampler = train_step.LayoutSampler(schedule, t, seed=5, correction_band=band)
    full_length = len(schedules.layout_metadata(schedule, correction_band=band)["step"])
    assert sampler.length == full_length == sampler.bucket_lengths[-1]
    buckets = [0] + list(sampler.bucket_lengths)
    assert 1 < len(buckets) - 1 <= t.rds_buckets
    meta = sampler(step=7, batch_size=16)
    assert set(meta) == set(train_step.META_KEYS)
    padded = meta["step"].shape[1]
    assert padded in sampler.bucket_lengths
    assert all(v.shape == (16, padded) for v in meta.values())

    ladders = set()
    for i in range(16):
        example = {k: v[i] for k, v in meta.items()}
        keep, n = _kept_steps(schedule, example)
        assert keep[0] == 0 and keep[-1] == schedule.num_steps - 1 and len(keep) >= 3
        # Every example of the batch lies in the batch's bucket: longer than the next smaller
        # bucket, so it would not fit there (padding is bounded by the bucket's width).
        assert buckets[buckets.index(padded) - 1] < n <= padded
        expected = schedules.layout_metadata(schedules.merge_rings(schedule, keep),
                                             correction_band=band)
        for key, value in expected.items():
            np.testing.assert_array_equal(example[key][:n], value, err_msg=key)
        # Padding feeds and predicts nothing.
        assert np.all(example["flat_pos"][n:] == -1) and np.all(example["target_pos"][n:] == -1)
        assert not example["is_new"][n:].any() and not example["is_class"][n:].any()
        ladders.add(tuple(keep))
    assert len(ladders) > 1  # per example, not one ladder for the batch

    # Deterministic in (seed, step) -- a fresh sampler too, as after a resume -- and different
    # for another step or seed.
    again = train_step.LayoutSampler(schedule, t, seed=5, correction_band=band)(7, 16)
    for key in train_step.META_KEYS:
        np.testing.assert_array_equal(meta[key], again[key])
    other_step = sampler(step=8, batch_size=16)
    other_seed = train_step.LayoutSampler(schedule, t, seed=6, correction_band=band)(7, 16)
    assert not np.array_equal(meta["step"], other_step["step"])
    assert not np.array_equal(meta["step"], other_seed["step"])


def test_rds_ladder_distribution_and_full_ladder_probability():
    """Bucketing must not bias which ladders are trained: at every batch slot, the ladder has
    the RDS distribution. Checked by the full ladder's frequency, hand-computed: drawn outright
    with probability p = rds_full_prob, else by sample_sub_ladder, which keeps each of the K-2
    inner steps with probability 1/2, so P(full) = p + (1 - p) / 2^(K-2)."""
    schedule = schedules.make_schedule("euclidean", (6, 6))  # 5 steps
    k = schedule.num_steps
    for p in (0.25, 1.0):
        t = cd.generator_train(rds=True, rds_full_prob=p)
        sampler = train_step.LayoutSampler(schedule, t, seed=0)
        full = sampler.length
        # Slot 0 picks the bucket; slot 3 is drawn conditioned on it.
        lengths_SB = np.stack([train_step.sequence_lengths(sampler(step, 4), 4)
                               for step in range(1, 1001)])
        expected = p + (1 - p) / 2 ** (k - 2)
        for slot in (0, 3):
            freq = float(np.mean(lengths_SB[:, slot] == full))
            assert abs(freq - expected) < 0.05, (p, slot, freq, expected)  # s.e. <= 0.016
    # The uniform mean length of all 2^(K-2) ladders (keep_prob 1/2, no full_prob, min 2):
    # hand-enumerated with merge_rings, against the sampler's slot 3.
    t = cd.generator_train(rds=True, rds_full_prob=0.0, rds_keep_prob=0.5)
    sampler = train_step.LayoutSampler(schedule, t, seed=1)
    enumerated = []
    for bits in range(2 ** (k - 2)):
        keep = [0] + [i + 1 for i in range(k - 2) if bits >> i & 1] + [k - 1]
        enumerated.append(len(schedules.layout_metadata(
            schedules.merge_rings(schedule, keep))["step"]))
    slot3 = [train_step.sequence_lengths(sampler(step, 4), 4)[3] for step in range(1, 1001)]
    assert abs(np.mean(slot3) - np.mean(enumerated)) < 0.05 * np.mean(enumerated)


def test_choose_buckets_is_optimal():
    """Against brute force over every set of bucket lengths (the last is the longest)."""
    import itertools  # pylint: disable=g-import-not-at-top
    lengths = np.random.default_rng(0).integers(10, 60, 40)
    values = np.unique(lengths)
    padded = lambda b: sum(min(x for x in b if x >= n) for n in lengths)
    for num in (1, 2, 3):
        best = min(padded(c + (values[-1],))
                   for c in itertools.combinations(values[:-1], num - 1))
        got = train_step.choose_buckets(lengths, num)
        assert len(got) == num and got[-1] == values[-1]
        assert padded(tuple(got)) == best


def test_rds_padding_waste_below_ten_percent_on_euclidean_13():
    """The default RDS settings on euclidean-13 (16x16): the padding share of token-forwards is
    under 10%; padding every example to the full length (one bucket) wastes far more."""
    schedule = schedules.make_schedule("euclidean", (16, 16))
    waste = {}
    for buckets in (1, cd.generator_train().rds_buckets):
        sampler = train_step.LayoutSampler(
            schedule, cd.generator_train(rds=True, rds_buckets=buckets))
        waste[buckets] = sampler.padding_waste(num_batches=48, batch_size=4)
        # Independently, from the batches themselves.
        metas = [sampler(step, 4) for step in range(1, 49)]
        valid = sum(int(m["valid"].sum()) for m in metas)
        assert np.isclose(waste[buckets], 1 - valid / sum(m["valid"].size for m in metas))
    assert waste[cd.generator_train().rds_buckets] < 0.10, waste
    assert waste[1] > 0.25, waste


def test_layout_sampler_per_batch_and_off():
    schedule = schedules.make_schedule("euclidean", (8, 8))
    per_batch = train_step.LayoutSampler(
        schedule, cd.generator_train(rds=True, rds_mode="per_batch"))
    meta = per_batch(step=3, batch_size=16)
    assert meta["step"].shape[0] in per_batch.bucket_lengths and meta["step"].ndim == 1
    keep, n = _kept_steps(schedule, meta)
    expected = schedules.layout_metadata(schedules.merge_rings(schedule, keep))
    np.testing.assert_array_equal(meta["flat_pos"][:n], expected["flat_pos"])
    # RDS off, or raster (no rings to drop): the full layout every step, all valid.
    for sched, t in ((schedule, cd.generator_train(rds=False)),
                     (schedules.make_schedule("raster", (8, 8)), cd.generator_train(rds=True))):
        meta = train_step.LayoutSampler(sched, t)(step=3, batch_size=16)
        full = schedules.layout_metadata(sched)
        assert meta["valid"].all() and meta["step"].shape == full["step"].shape
        for key, value in full.items():
            np.testing.assert_array_equal(meta[key], value)
    with pytest.raises(ValueError, match="rds_mode='sometimes'"):
        train_step.LayoutSampler(schedule, cd.generator_train(rds=True, rds_mode="sometimes"))
    with pytest.raises(ValueError, match="rds_full_prob=1.5"):
        train_step.LayoutSampler(schedule, cd.generator_train(rds=True, rds_full_prob=1.5))


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
    meta = train_step.LayoutSampler(schedule, t, seed=0)(step=1, batch_size=4)
    # Jitted: eager op-by-op execution would compile every op for each layout length.
    loss_fn = jax.jit(lambda codes, labels, meta: train_step.sequence_loss(
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




def test_grad_accum_under_rds_is_the_full_batch_token_mean():
    """RDS on, examples of very different lengths (the micro-batch of short ladders holds far
    fewer targets than the one of full ladders): grad_accum=2 and grad_accum=1 both give the
    gradient of the whole batch's token-mean CE, computed independently from the plain forward
    pass. With SGD(lr=1) the update is minus the gradient, read back from the new params."""
    import optax  # pylint: disable=g-import-not-at-top
    from radar_jax import sharding  # pylint: disable=g-import-not-at-top
    grid = (5, 5)
    schedule = schedules.make_schedule("euclidean", grid)
    k = schedule.num_steps
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = transformer.model_config("tiny", vocab_size=32, num_classes=4,
                                            block_size=25, grid=grid, class_dropout_prob=0.0,
                                            n_layer=1)
    config.train = cd.generator_train(rds=True, rds_mode="per_example", known_weight=0.5)
    layouts = train_step.LayoutSampler(schedule, config.train)
    # Examples 0, 1: the shortest ladder; 2, 3: the full one; all padded to the full length.
    ladders = [[0, k - 1]] * 2 + [list(range(k))] * 2
    metas = [schedules.pad_layout(schedules.layout_metadata(
        schedules.merge_rings(schedule, keep)), layouts.length) for keep in ladders]
    meta = {key: np.stack([m[key] for m in metas]) for key in train_step.META_KEYS}
    counts = meta["valid"].sum(1)
    assert counts[2] > 1.5 * counts[0]
    codes_BN = np.random.default_rng(0).integers(0, 32, (4, 25)).astype(np.int32)
    labels_B = np.array([0, 1, 2, 3], np.int32)
    model = transformer.Transformer(config.model)
    params = random_head_params(config.model)

    # Independent expectation: sum of weighted per-token CE over the batch / sum of weights.
    def reference_loss(p):
        tokens_BL = jnp.asarray(codes_BN)[np.arange(4)[:, None], np.maximum(meta["flat_pos"], 0)]
        mask = np.stack([schedules.nested_mask(m["step"], m["is_new"], m["is_class"],
                                               m["valid"]) for m in metas])
        logits, _ = model.apply({"params": p}, tokens_BL, labels_B, meta["flat_pos"],
                                meta["is_new"], meta["is_class"], mask)
        targets_BL = codes_BN[np.arange(4)[:, None], np.maximum(meta["target_pos"], 0)]
        ce_BL = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets_BL[..., None],
                                     -1)[..., 0]
        has = meta["valid"] & (meta["target_pos"] >= 0)
        w_BL = np.where(has & meta["is_new"], 1.0, np.where(has, 0.5, 0.0))
        return jnp.sum(ce_BL * w_BL) / w_BL.sum()
    expected_loss, expected = jax.jit(jax.value_and_grad(reference_loss))(params)

    mesh = sharding.make_mesh(cd.mesh(1, 1, 1), jax.devices()[:1])
    tx = optax.sgd(1.0)
    shardings = jax.tree.map(lambda _: sharding.replicated(mesh), train_step.TrainState(
        step=0, params=params, opt_state=tx.init(params), ema_params={}))
    for accum in (1, 2):
        config.train.grad_accum = accum
        step = train_step.make_train_step(config, model, tx, mesh, shardings, layouts,
                                          jax.random.key(0))
        state = train_step.TrainState(step=jnp.zeros((), jnp.int32),
                                      params=jax.tree.map(jnp.array, params),
                                      opt_state=tx.init(params), ema_params={})
        with sharding.mesh_context(mesh):
            new_state, metrics = step(state, codes_BN, labels_B, meta)
        np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-5)
        assert float(metrics["tokens"]) == counts.sum()
        got = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params,
                           new_state.params)
        for path, g in jax.tree_util.tree_leaves_with_path(got):
            e = np.asarray(functools.reduce(lambda t, key: t[key.key], path, expected))
            np.testing.assert_allclose(g, e, atol=2e-6 * np.abs(e).max() + 1e-9, rtol=1e-4,
                                       err_msg=f"accum={accum} {jax.tree_util.keystr(path)}")


def test_train_flops_fn_matches_perf():
    config = transformer.model_config("tiny")
    flops = train_step.train_flops_fn(config)(np.array([7, 100, 1629]))
    for n, f in zip((7, 100, 1629), flops):
        np.testing.assert_allclose(f, perf.train_flops_per_sequence(config, n), rtol=1e-12)


def test_bench_train_times_the_real_train_step(monkeypatch, tmp_path):
    """launch/bench_train.py must time radar_jax's own step (with EMA, grad accumulation and
    the grad norm), not a re-implementation: it calls train_step.make_train_step."""
    import importlib.util  # pylint: disable=g-import-not-at-top
    import pathlib  # pylint: disable=g-import-not-at-top
    path = pathlib.Path(__file__).resolve().parents[1] / "launch" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls = []
    real = train_step.make_train_step

    def recording(config, *args, **kwargs):
        calls.append(config)
        return real(config, *args, **kwargs)
    monkeypatch.setattr(train_step, "make_train_step", recording)
    out = tmp_path / "rows.jsonl"
    common = ["--size", "tiny", "--batch_size", "2", "--steps", "5", "--warmup", "0",
              "--out", str(out)]
    assert bench.main(common + ["--layouts", "raster"]) == 0
    assert len(calls) == 1 and calls[0].train.batch_size == 2
    # The band and RDS reach the step: euclidean-13 with b = 1 is 512 positions (1 + 2 * 256
    # - the 5 tokens of the last ring); RDS rows count only useful (non-padding) tokens.
    assert bench.main(common + ["--layouts", "euclidean-13", "--correction_band", "1",
                                "--rds", "--rds_buckets", "2"]) == 0
    assert calls[-1].train.rds and calls[-1].schedule.correction_band == 1
    raster, rds = [json.loads(line) for line in out.read_text().splitlines()]
    assert raster["seq_len"] == raster["padded_lengths"][0] == 256
    assert raster["padding_waste"] == 0 and raster["useful_tokens_per_step"] == 2 * 256
    assert rds["seq_len"] == 512 and rds["bucket_lengths"][-1] == 512
    assert rds["useful_tokens_per_step"] < 2 * 512 and 0 <= rds["padding_waste"] < 0.1
    assert set(rds["padded_lengths"]) <= set(rds["bucket_lengths"])
    for row in (raster, rds):  # tokens/s counts useful tokens over the timed steps
        np.testing.assert_allclose(row["tokens_per_s"] * sum(row["timed_step_s"]),
                                   5 * row["useful_tokens_per_step"], rtol=2e-3)
