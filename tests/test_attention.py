"""Chunked attention (models/attention.py): the reach it relies on holds on every packed layout
the project builds, and chunked forwards and gradients equal the one-pass ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from radar_jax import config_defaults as cd
from radar_jax import schedules
from radar_jax import train_step
from radar_jax.models import attention
from radar_jax.models import transformer as T


def _reach(mask):
    """Largest j - i over the visible pairs (i, j) of an (L, S) or (B, L, S) mask."""
    mask = np.asarray(mask)
    l, s = mask.shape[-2:]
    offset = np.arange(s)[None, :] - np.arange(l)[:, None]
    return int(np.max(np.where(mask, offset, -l)))


@pytest.mark.parametrize("kind,grid,kw", [
    ("euclidean", (16, 16), {}), ("crops", (16, 16), dict(preset="crops10")),
    ("raster", (16, 16), {}), ("euclidean", (6, 9), {}), ("crops", (5, 8), {})])
def test_no_query_sees_a_key_a_grid_or_more_ahead(kind, grid, kw):
    """The chunked core's premise, checked on the masks themselves: full ladders, correction
    bands and the padded per-example RDS layouts training feeds."""
    schedule = schedules.make_schedule(kind, grid, **kw)
    n = grid[0] * grid[1]
    for band in ((None,) if kind == "raster" else (None, 1, 2)):
        full = schedules.train_layout(schedule, 1, correction_band=band)
        reach = _reach(full["mask"])
        assert reach < n, (kind, band, reach)
        if band is None and kind != "raster":
            # The last block holds every position, its known area all but the last ring: the
            # bound is close to tight.
            assert reach >= n - 1 - schedule.ring_sizes[-1], (kind, reach)
        if kind == "raster":
            assert reach == 0  # causal
            continue
        t = cd.generator_train(rds=True, rds_buckets=4)
        sampler = train_step.LayoutSampler(schedule, t, 1, correction_band=band)
        for step in range(1, 6):
            meta = sampler(step, 3)
            mask = schedules.nested_mask(meta["step"], meta["is_new"], meta["is_class"],
                                         meta["valid"])
            assert _reach(mask) < n, (kind, band, step)


def _random_inputs(length, batch, d=8, heads=2, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(key, (batch, length, heads, d)) for key in k]


def _naive_attention(q, k, v, mask):
    """The textbook formula, with none of the cores' rearrangements (head-major layout, bias
    mask, deferred normalisation, the max out of the gradient)."""
    scores = jnp.einsum("blhd,bshd->bhls", q, k) / np.sqrt(q.shape[-1])
    probs = jax.nn.softmax(jnp.where(mask[:, None], scores, -jnp.inf), axis=-1)
    return jnp.einsum("bhls,bshd->blhd", probs, v)


def _within_reach_mask(length, reach, seed=0):
    rng = np.random.default_rng(seed)
    offset = np.arange(length)[None, :] - np.arange(length)[:, None]
    mask = (rng.random((2, length, length)) < 0.6) & (offset < reach)  # no key `reach` ahead
    mask[:, :, 0] = True
    return jnp.asarray(mask)


def test_chunked_cores_equal_the_textbook_formula_within_the_reach_and_differ_beyond_it():
    q, k, v = _random_inputs(29, 2)
    mask = _within_reach_mask(29, 5)
    ref = _naive_attention(q, k, v, mask)
    einsum = jax.jit(lambda *a, chunk: attention.einsum_attention(*a, None, chunk, 5),
                     static_argnames="chunk")
    generic = jax.jit(lambda *a, chunk: attention.chunked_attention(
        attention.dot_product_attention, *a, chunk, reach=5), static_argnames="chunk")
    for chunk in (0, 1, 4, 7, 29):
        np.testing.assert_allclose(einsum(q, k, v, mask, chunk=chunk), ref, atol=1e-6,
                                   err_msg=f"einsum core, chunk={chunk}")
        if chunk:
            np.testing.assert_allclose(generic(q, k, v, mask, chunk=chunk), ref, atol=1e-6,
                                       err_msg=f"dot_product core, chunk={chunk}")
    # A mask reaching further than promised is computed wrongly: the keys are really skipped.
    wide = jnp.ones((2, 29, 29), bool)
    for run in (einsum, generic):
        assert not np.allclose(run(q, k, v, wide, chunk=7), _naive_attention(q, k, v, wide),
                               atol=1e-3)


def test_einsum_core_gradients_equal_the_textbook_formula():
    """The core's backward (the row max held out of the gradient, the bias mask, chunks) gives
    autodiff's gradients of the textbook formula, grouped-query heads included."""
    q, _, _ = _random_inputs(29, 2, heads=4)
    _, k, v = _random_inputs(29, 2, heads=2, seed=1)
    mask = _within_reach_mask(29, 6, seed=2)
    k4, v4 = (jnp.repeat(x, 2, axis=2) for x in (k, v))  # torch's repeat_interleave
    cot = jax.random.normal(jax.random.key(3), q.shape)
    ref = jax.grad(lambda q, k, v: jnp.sum(cot * _naive_attention(
        q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2), mask)), argnums=(0, 1, 2))
    want = ref(q, k, v)
    np.testing.assert_allclose(attention.einsum_attention(q, k, v, mask),
                               _naive_attention(q, k4, v4, mask), atol=1e-6)
    for chunk in (0, 8):
        got = jax.jit(jax.grad(lambda q, k, v: jnp.sum(cot * attention.einsum_attention(
            q, k, v, mask, None, chunk, 6)), argnums=(0, 1, 2)))(q, k, v)
        for name, g, w in zip("qkv", got, want):
            np.testing.assert_allclose(g, w, atol=2e-5, err_msg=f"d{name}, chunk={chunk}")


def test_chunked_transformer_equals_one_pass_on_a_padded_rds_batch():
    """Logits on valid positions and gradients of a masked CE are equal with 16-row chunks and
    with one pass, on per-example RDS layouts of the tiny model's 8x8 euclidean schedule."""
    schedule = schedules.make_schedule("euclidean", (8, 8))
    t = cd.generator_train(rds=True, rds_full_prob=0.0, rds_buckets=2)
    meta = train_step.LayoutSampler(schedule, t, 1)(3, 2)
    assert meta["valid"].ndim == 2 and not meta["valid"].all()  # padded, per example
    mask = schedules.nested_mask(meta["step"], meta["is_new"], meta["is_class"], meta["valid"])
    length = meta["step"].shape[-1]
    assert length > 16  # several chunks
    one_pass = T.model_config("tiny", attention_chunk=0)
    chunked = T.model_config("tiny", attention_chunk=16)
    params = T.init_params(one_pass, jax.random.key(0))
    params["output"]["kernel"] = 0.5 * jax.random.normal(jax.random.key(1),
                                                         params["output"]["kernel"].shape)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 64, (2, length)).astype(np.int32)
    labels = np.array([1, 4], np.int32)
    valid = jnp.asarray(meta["valid"])

    def loss_and_logits(config):
        model = T.Transformer(config)

        def loss(p):
            logits, _ = model.apply({"params": p}, tokens, labels, meta["flat_pos"],
                                    meta["is_new"], meta["is_class"], mask)
            logp = jax.nn.log_softmax(logits, -1)
            ce = -jnp.take_along_axis(logp, jnp.asarray(tokens)[..., None], -1)[..., 0]
            return jnp.sum(jnp.where(valid, ce, 0.0)), logits
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (loss_ref, logits_ref), grads_ref = loss_and_logits(one_pass)
    (loss_c, logits_c), grads_c = loss_and_logits(chunked)
    np.testing.assert_allclose(loss_c, loss_ref, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(logits_c)[meta["valid"]],
                               np.asarray(logits_ref)[meta["valid"]], atol=1e-5)
    # Gradients are sums over ~400 tokens (up to ~5e3 here): float32 rounding, relative.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(b)))), grads_c, grads_ref)


def test_attention_chunk_must_be_a_non_negative_int():
    for bad in (-1, True):
        with pytest.raises(ValueError, match="attention_chunk="):
            T.model_config("tiny", attention_chunk=bad)
    with pytest.raises(TypeError, match="attention_chunk"):  # ml_collections' type check
        T.model_config("tiny", attention_chunk=2.5)
