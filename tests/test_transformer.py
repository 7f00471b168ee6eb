"""Tests for radar_jax.models.transformer: KV cache, nested-mask gradients, sizes, axes, dtypes.

The packed nested layout is built here by hand from a ring map (docs/method.md, "Nested attention"),
independently of radar_jax.schedules, so these tests check the model against the paper's rule.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from radar_jax.models import transformer as T

# 4x4 grid, 4 steps: the center token, then the 2x2, 3x3 and 4x4 center crops.
RING_4x4 = np.array([[2, 2, 2, 3],
                     [2, 0, 1, 3],
                     [2, 1, 1, 3],
                     [3, 3, 3, 3]])


def nested_layout(ring):
    """[class] + B_0 + ... + B_{K-1}; B_k = known area C_{k-1} then the new ring, raster order.

    Returns per-index numpy arrays flat_pos, step, is_new, is_class, block (the step, -1 for the
    class token) and the nested mask (L, L) bool.
    """
    h, w = ring.shape
    flat_pos, step, is_new = [-1], [-1], [False]
    for k in range(ring.max() + 1):
        known = [p for p in range(h * w) if ring.flat[p] < k]
        new = [p for p in range(h * w) if ring.flat[p] == k]
        flat_pos += known + new
        step += [k] * (len(known) + len(new))
        is_new += [False] * len(known) + [True] * len(new)
    flat_pos, step, is_new = np.array(flat_pos), np.array(step), np.array(is_new)
    is_class = flat_pos < 0
    si, sj = step[:, None], step[None, :]
    same_ok = is_new[:, None] | ~is_new[None, :]  # query new, or key known
    mask = is_class[None, :] | (sj < si) | ((sj == si) & same_ok)
    return dict(flat_pos=flat_pos, step=step, is_new=is_new, is_class=is_class, mask=mask)


def with_random_head(params, seed=0, std=0.5):
    """LlamaGen zero-initialises the output head; give it weights so logits carry signal."""
    params = jax.tree.map(lambda x: x, params)
    kernel = params["output"]["kernel"]
    params["output"]["kernel"] = std * jax.random.normal(jax.random.key(seed), kernel.shape)
    return params


@pytest.fixture(scope="module")
def setup():
    # Grouped-query attention (2 kv heads for 4 query heads) so the grouped path is exercised.
    config = T.model_config("tiny", block_size=16, n_kv_head=2)
    params = with_random_head(T.init_params(config, jax.random.key(0)))
    layout = nested_layout(RING_4x4)
    model = T.Transformer(config)
    apply = jax.jit(lambda p, *a, **kw: model.apply({"params": p}, *a, **kw),
                    static_argnames=("train",))
    return config, params, layout, model, apply


def test_layout_matches_the_paper_rule(setup):
    _, _, layout, _, _ = setup
    assert len(layout["flat_pos"]) == 1 + 1 + 4 + 9 + 16
    mask = layout["mask"]
    # Block 2 = known area {5, 6, 9, 10} then new ring {0, 1, 2, 4, 8}: indices 6..14.
    np.testing.assert_array_equal(layout["flat_pos"][6:15], [5, 6, 9, 10, 0, 1, 2, 4, 8])
    assert mask[6, 7] and not mask[6, 10]    # known sees known, not the new ring
    assert mask[10, 6] and mask[10, 11]      # new sees known and new
    assert mask[6, 0] and not mask[5, 6]     # class visible; later steps hidden


def _tokens(batch, length, seed=1):
    return np.asarray(jax.random.randint(jax.random.key(seed), (batch, length), 0, 64), np.int32)


def test_kv_cache_blocks_equal_full_forward(setup):
    config, params, layout, _, apply = setup
    length = len(layout["flat_pos"])
    tokens, labels = _tokens(2, length), np.array([3, 10], np.int32)  # 10 = null class
    # Example 0 uses the nested mask, example 1 a causal one: per-example (B, L, L) masks.
    mask_BLL = np.stack([layout["mask"], np.tril(np.ones((length, length), bool))])
    meta = (layout["flat_pos"], layout["is_new"], layout["is_class"])
    full, cache = apply(params, tokens, labels, *meta, mask_BLL)
    assert cache is None and full.shape == (2, length, 64) and full.dtype == jnp.float32

    # Tokens at class and new positions are ignored (the prompt / label is fed there).
    ignored = np.where(layout["is_new"] | layout["is_class"], -1, tokens)
    np.testing.assert_array_equal(apply(params, ignored, labels, *meta, mask_BLL)[0], full)

    n_slots = length + 9  # trailing empty slots must stay hidden by the mask
    for sizes in ([1, 1, 4, 9, 16], [2, 4, 25]):  # step blocks, and merged steps
        cache = T.init_cache(config, 2, n_slots)
        assert cache["layers_1"]["k"].shape == (2, n_slots, 2, 16)
        outs, start = [], 0
        for size in sizes:
            idx = slice(start, start + size)
            mask_BLS = np.zeros((2, size, n_slots), bool)
            mask_BLS[:, :, :length] = mask_BLL[:, idx]
            out, cache = apply(params, tokens[:, idx], labels, layout["flat_pos"][idx],
                               layout["is_new"][idx], layout["is_class"][idx], mask_BLS,
                               cache=cache, cache_index=jnp.int32(start))
            outs.append(out)
            start += size
        np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=1e-4)


def test_known_area_cannot_see_new_ring_or_later_blocks(setup):
    _, params, layout, model, _ = setup
    step, is_new = layout["step"], layout["is_new"]
    length = len(step)
    k = 2
    query = int(np.flatnonzero((step == k) & ~is_new)[0])
    tokens, labels = _tokens(1, length), np.array([4], np.int32)
    h_BLD = model.apply({"params": params}, tokens, labels, layout["is_new"],
                        layout["is_class"], method="embed")
    probe_V = jax.random.normal(jax.random.key(5), (64,))

    @jax.jit
    def grad_fn(h):
        def loss(h):
            logits, _ = model.apply({"params": params}, h, layout["flat_pos"], layout["mask"],
                                    method="forward_embeddings")
            return jnp.dot(logits[0, query], probe_V)
        return jax.grad(loss)(h)

    gnorm_L = np.linalg.norm(np.asarray(grad_fn(h_BLD))[0], axis=-1)
    hidden = ((step == k) & is_new) | (step > k)
    seen = ~hidden
    assert hidden.sum() == 5 + 16 and seen.sum() == 1 + 1 + 4 + 4
    assert np.all(gnorm_L[hidden] == 0.0), gnorm_L[hidden]
    assert np.all(gnorm_L[seen] > 0.0), gnorm_L[seen]


def test_embed_uses_prompt_class_and_token_tables(setup):
    _, params, layout, model, _ = setup
    tokens, labels = _tokens(2, len(layout["flat_pos"])), np.array([3, 10], np.int32)
    h = np.asarray(model.apply({"params": params}, tokens, labels, layout["is_new"],
                               layout["is_class"], method="embed"))
    table = np.asarray(params["cls_embedding"]["embedding_table"]["embedding"])
    np.testing.assert_array_equal(h[:, 0], table[labels])
    new = np.flatnonzero(layout["is_new"])
    np.testing.assert_array_equal(h[:, new], np.broadcast_to(params["prompt_embedding"],
                                                              (2, len(new), 64)))
    known = np.flatnonzero(~layout["is_new"] & ~layout["is_class"])
    np.testing.assert_array_equal(
        h[:, known], np.asarray(params["tok_embeddings"]["embedding"])[tokens[:, known]])


def test_grouped_query_attention_equals_repeated_kv_heads(setup):
    """n_kv_head=2 equals full multi-head attention with kv heads repeat_interleave'd (torch)."""
    config, params, layout, _, apply = setup
    mha_config = T.model_config("tiny", block_size=16)
    mha_params = jax.tree.map(lambda x: x, params)
    head_dim, group = 16, 2
    for i in range(config.n_layer):
        w = np.asarray(params[f"layers_{i}"]["attention"]["wqkv"]["kernel"])  # (64, 4*16+2*2*16)
        q, k, v = w[:, :64], w[:, 64:96], w[:, 96:]
        rep = lambda x: np.repeat(x.reshape(64, 2, head_dim), group, axis=1).reshape(64, -1)
        mha_params[f"layers_{i}"]["attention"]["wqkv"]["kernel"] = np.concatenate(
            [q, rep(k), rep(v)], axis=1)
    args = (_tokens(1, 31), np.array([2], np.int32), layout["flat_pos"], layout["is_new"],
            layout["is_class"], layout["mask"])
    mha = T.Transformer(mha_config).apply({"params": mha_params}, *args)[0]
    np.testing.assert_allclose(apply(params, *args)[0], mha, atol=1e-5)


def test_rope_2d_hand_values():
    # head_dim 8: 2 frequencies 1 and 1/100 (base 1e4, half 4); rows then columns.
    cos, sin = T.rope_2d(jnp.array([[-1, 6]]), head_dim=8, grid_w=4, base=1e4)
    np.testing.assert_array_equal(cos[0, 0], 0.0)  # class token: zero rotation, q = k = 0
    np.testing.assert_array_equal(sin[0, 0], 0.0)
    angles = np.array([1 * 1.0, 1 * 0.01, 2 * 1.0, 2 * 0.01])  # (h, w) = divmod(6, 4) = (1, 2)
    np.testing.assert_allclose(cos[0, 1], np.cos(angles), rtol=1e-6)
    np.testing.assert_allclose(sin[0, 1], np.sin(angles), rtol=1e-6)
    x = jnp.arange(8.0).reshape(1, 1, 1, 8)  # adjacent pairs (0,1), (2,3), ...
    out = np.asarray(T.apply_rope(jnp.tile(x, (1, 2, 1, 1)), cos, sin))[0, :, 0]
    np.testing.assert_array_equal(out[0], 0.0)
    a = angles[1]
    np.testing.assert_allclose(out[1, 2:4], [2 * np.cos(a) - 3 * np.sin(a),
                                             3 * np.cos(a) + 2 * np.sin(a)], rtol=1e-6)


def test_param_counts_match_paper_and_llamagen():
    # docs/method.md: L = 308M and XL = 610M non-embedding; LlamaGen: GPT-B 111M, GPT-L 343M total.
    counts = {s: T.count_params(T.model_config(s)) for s in ("B", "L", "XL")}
    assert abs(counts["L"]["non_embedding"] / 308e6 - 1) < 0.005, counts["L"]
    assert abs(counts["XL"]["non_embedding"] / 610e6 - 1) < 0.005, counts["XL"]
    assert abs(counts["L"]["total"] / 343e6 - 1) < 0.005, counts["L"]
    assert abs(counts["B"]["total"] / 111e6 - 1) < 0.005, counts["B"]
    # SwiGLU widths by LlamaGen's rule (the fixture's tiny model has 192).
    assert [T.ffn_hidden_dim(T.model_config(s)) for s in ("tiny", "L", "XL")] == [192, 2816, 3584]


def test_every_parameter_has_logical_axes(setup):
    config = setup[0]
    boxed = T.init_params(config, jax.random.key(0), unbox=False)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    specs = T.param_logical_axes(config)
    flat = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]}
    shapes = {jax.tree_util.keystr(p): x.shape for p, x in
              jax.tree_util.tree_flatten_with_path(nn.unbox(boxed))[0]}
    assert flat.keys() == shapes.keys()
    for name, spec in flat.items():
        assert len(spec) == len(shapes[name]) and all(isinstance(a, str) for a in spec), name
    l0 = specs["layers_0"]
    assert tuple(l0["attention"]["wqkv"]["kernel"]) == ("embed", "qkv")
    assert tuple(l0["attention"]["wo"]["kernel"]) == ("heads", "embed")
    assert tuple(l0["feed_forward"]["w2"]["kernel"]) == ("mlp", "embed")
    assert tuple(specs["output"]["kernel"]) == ("embed", "vocab")
    assert tuple(specs["prompt_embedding"]) == ("embed",)


def test_runs_under_a_mesh_with_logical_rules(setup):
    """The activation constraints resolve under real rules and a ('data', ...) mesh."""
    _, params, layout, model, _ = setup
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "tensor"))
    rules = (("batch", "data"), ("embed", None), ("vocab", "tensor"), ("length", None))
    args = (_tokens(1, 31), np.array([2], np.int32), layout["flat_pos"], layout["is_new"],
            layout["is_class"], layout["mask"])
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        out = jax.jit(lambda p: model.apply({"params": p}, *args)[0])(params)
    np.testing.assert_allclose(out, setup[4](params, *args)[0], atol=1e-6)


def test_class_dropout_only_in_train():
    config = T.model_config("tiny", class_dropout_prob=0.5)
    params = T.init_params(config, jax.random.key(0))
    model = T.Transformer(config)
    labels = np.arange(64, dtype=np.int32) % 10
    tokens = np.zeros((64, 1), np.int32)
    embed = jax.jit(lambda rng, train: model.apply(
        {"params": params}, tokens, labels, np.array([False]), np.array([True]), train=train,
        method="embed", rngs={"dropout": rng}), static_argnums=1)
    table = np.asarray(params["cls_embedding"]["embedding_table"]["embedding"])
    is_null = lambda h: np.all(np.asarray(h)[:, 0] == table[10], axis=-1)
    np.testing.assert_array_equal(np.asarray(embed(jax.random.key(1), False))[:, 0],
                                  table[labels])
    dropped = is_null(embed(jax.random.key(1), True))
    kept = ~dropped
    np.testing.assert_array_equal(np.asarray(embed(jax.random.key(1), True))[kept, 0],
                                  table[labels[kept]])
    assert 10 <= dropped.sum() <= 54, dropped.sum()  # Binomial(64, 0.5)
    assert not np.array_equal(dropped, is_null(embed(jax.random.key(2), True)))


def test_bfloat16_compute_close_to_float32(setup):
    config, params, layout, _, apply = setup
    bf16 = T.Transformer(T.model_config("tiny", block_size=16, n_kv_head=2, dtype="bfloat16"))
    args = (_tokens(2, 31), np.array([1, 7], np.int32), layout["flat_pos"], layout["is_new"],
            layout["is_class"], layout["mask"])
    ref = np.asarray(apply(params, *args)[0])
    out = jax.jit(lambda p: bf16.apply({"params": p}, *args)[0])(params)
    assert out.dtype == jnp.float32
    out = np.asarray(out)
    assert not np.array_equal(out, ref)  # the compute really ran in bfloat16
    np.testing.assert_allclose(out, ref, atol=0.05 * np.abs(ref).max())


def test_bad_inputs_raise_clear_errors(setup):
    config, params, layout, model, _ = setup
    with pytest.raises(ValueError, match="mask has shape"):
        model.apply({"params": params}, _tokens(1, 31), np.array([1]), layout["flat_pos"],
                    layout["is_new"], layout["is_class"], layout["mask"][:, :30])
    with pytest.raises(ValueError, match="n_head=5"):
        T.model_config("tiny", n_head=5)
    with pytest.raises(ValueError, match="block_size"):
        T.model_config("tiny", grid=(4, 8))
    with pytest.raises(ValueError, match="unknown model size"):
        T.model_config("XXL")


# ----------------------------------------------------------------------------------------------
# Switches: attention core, scan over layers, remat policies, float32 residual, chunked loss.
# Each is checked against the default path with the same parameters.
# ----------------------------------------------------------------------------------------------
def _nested_args(layout, batch=2, seed=1):
    return (_tokens(batch, len(layout["flat_pos"]), seed), np.array([3, 10][:batch], np.int32),
            layout["flat_pos"], layout["is_new"], layout["is_class"], layout["mask"])


def test_dot_product_attention_equals_einsum_core(setup):
    """jax.nn.dot_product_attention gives the einsum core's logits, with and without a cache."""
    config, params, layout, _, apply = setup
    dp = T.Transformer(T.model_config("tiny", block_size=16, n_kv_head=2,
                                      attention_impl="dot_product"))
    dp_apply = jax.jit(lambda p, *a, **kw: dp.apply({"params": p}, *a, **kw))
    args = _nested_args(layout)
    ref = apply(params, *args)[0]
    np.testing.assert_allclose(dp_apply(params, *args)[0], ref, atol=1e-5)
    # One cached block (the last step's 16 tokens) over 40 slots, 9 of them empty and hidden.
    length, n_slots = len(layout["flat_pos"]), len(layout["flat_pos"]) + 9
    idx = slice(length - 16, length)
    mask_LS = np.zeros((16, n_slots), bool)
    mask_LS[:, :length] = layout["mask"][idx]
    cache = T.init_cache(config, 2, n_slots)
    cache = apply(params, args[0][:, :length - 16], args[1], *(a[:length - 16] for a in args[2:5]),
                  np.pad(layout["mask"][:length - 16], ((0, 0), (0, 9))), cache=cache,
                  cache_index=jnp.int32(0))[1]
    block = (args[0][:, idx], args[1], *(a[idx] for a in args[2:5]), mask_LS)
    out_ref, cache_ref = apply(params, *block, cache=cache, cache_index=jnp.int32(length - 16))
    out_dp, cache_dp = dp_apply(params, *block, cache=cache, cache_index=jnp.int32(length - 16))
    np.testing.assert_allclose(out_dp, ref[:, idx], atol=1e-4)
    np.testing.assert_allclose(out_dp, out_ref, atol=1e-5)
    np.testing.assert_allclose(cache_dp["layers_1"]["k"], cache_ref["layers_1"]["k"], atol=1e-6)


def _ce_loss(model, tokens, args):
    def loss(p):
        logits, _ = model.apply({"params": p}, *args)
        return jnp.mean(optax_ce(logits, tokens))
    return loss


def optax_ce(logits_BLV, targets_BL):
    """Reference cross-entropy: -log softmax at the target, in float64 numpy-free jnp."""
    logp_BLV = jax.nn.log_softmax(logits_BLV, axis=-1)
    return -jnp.take_along_axis(logp_BLV, targets_BL[..., None], axis=-1)[..., 0]


def test_scan_layers_equals_the_layer_loop(setup):
    """scan_layers with the loop's params restacked: same logits and (restacked) gradients;
    with a remat policy on top, and the 'layers' logical axis on every stacked parameter."""
    config, params, layout, model, apply = setup
    scan_config = T.model_config("tiny", block_size=16, n_kv_head=2, scan_layers=True,
                                 remat_policy="minimal")
    scan_model = T.Transformer(scan_config)
    stacked = T.stack_layer_params(params, config.n_layer)
    assert stacked["layers"]["attention"]["wqkv"]["kernel"].shape == (2, 64, 128)
    specs = T.param_logical_axes(scan_config)
    assert tuple(specs["layers"]["attention"]["wqkv"]["kernel"]) == ("layers", "embed", "qkv")
    fresh = T.init_params(scan_config, jax.random.key(0))
    assert jax.tree.map(np.shape, fresh) == jax.tree.map(np.shape, stacked)

    args = _nested_args(layout)
    np.testing.assert_allclose(scan_model.apply({"params": stacked}, *args)[0],
                               apply(params, *args)[0], atol=1e-5)
    g_loop = jax.jit(jax.grad(_ce_loss(model, args[0], args)))(params)
    g_scan = jax.jit(jax.grad(_ce_loss(scan_model, args[0], args)))(stacked)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                 T.unstack_layer_params(g_scan), g_loop)
    with pytest.raises(ValueError, match="scan_layers=True has no KV-cache"):
        scan_model.apply({"params": stacked}, *args[:5], np.ones((31, 40), bool),
                         cache=T.init_cache(config, 2, 40), cache_index=0)


def test_remat_policies_keep_gradients():
    """Every remat policy (and the old remat=True) gives the no-remat gradients in train mode
    (dropouts and drop path need the 'dropout' rng; remat changes memory, not values)."""
    layout = nested_layout(RING_4x4)
    tokens = _tokens(2, 31)
    kw = dict(block_size=16, token_dropout_p=0.1, resid_dropout_p=0.1, ffn_dropout_p=0.1,
              attn_dropout_p=0.1, drop_path_rate=0.2)
    params = with_random_head(T.init_params(T.model_config("tiny", **kw), jax.random.key(0)))
    grads = {}
    for name, extra in (("none", {}), ("remat=True", dict(remat=True)),
                        ("minimal", dict(remat_policy="minimal")),
                        ("dots_saveable", dict(remat_policy="dots_saveable"))):
        model = T.Transformer(T.model_config("tiny", **kw, **extra))

        def loss(p, model=model):
            logits, _ = model.apply({"params": p}, tokens, np.array([1, 2]), layout["flat_pos"],
                                    layout["is_new"], layout["is_class"], layout["mask"],
                                    train=True, rngs={"dropout": jax.random.key(3)})
            return jnp.mean(optax_ce(logits, tokens))
        grads[name] = jax.jit(jax.grad(loss))(params)
    assert T.remat_policy(T.model_config("tiny", remat=True)) == "full"
    for name in ("remat=True", "minimal", "dots_saveable"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                     grads[name], grads["none"])
    assert float(jnp.abs(grads["none"]["layers_0"]["feed_forward"]["w2"]["kernel"]).sum()) > 0


def test_float32_residual_stream(setup):
    """float32 mode: the switch changes nothing. bfloat16 mode: the residual stream and the
    logits stay float32, and the result is closer to the float32 model than all-bfloat16."""
    _, params, layout, _, apply = setup
    args = _nested_args(layout)
    ref = np.asarray(apply(params, *args)[0])
    old_f32 = T.Transformer(T.model_config("tiny", block_size=16, n_kv_head=2,
                                           residual_float32=False))
    old_apply = jax.jit(lambda p, *a, **kw: old_f32.apply({"params": p}, *a, **kw))
    np.testing.assert_array_equal(old_apply(params, *args)[0], ref)

    errors = {}
    for res32 in (True, False):
        model = T.Transformer(T.model_config("tiny", block_size=16, n_kv_head=2,
                                             dtype="bfloat16", residual_float32=res32))
        hidden, _ = model.apply({"params": params}, *args, return_hidden=True)
        assert hidden.dtype == (jnp.float32 if res32 else jnp.bfloat16)
        out = np.asarray(model.apply({"params": params}, *args)[0])
        errors[res32] = np.abs(out - ref).mean()
    assert errors[True] < errors[False], errors


def test_fused_weighted_cross_entropy_equals_full_logits(setup):
    """The fused head + CE (gradients computed in the forward pass, chunks that do not divide
    L) gives the full logits' weighted CE sum and its gradients with respect to the params,
    the hidden states (so everything below the head) and the weights."""
    _, params, layout, model, _ = setup
    args = _nested_args(layout)
    targets = _tokens(2, 31, seed=7)
    weights = np.ones((2, 31), np.float32)
    weights[:, ::5] = 0.0
    weights[1, 2] = 2.5
    targets_masked = np.where(weights > 0, targets, -1)  # ignored targets may be out of range

    def full(p, w):
        logits, _ = model.apply({"params": p}, *args)
        ce = optax_ce(logits, targets)
        return jnp.sum(ce * w), (jnp.where(w > 0, ce, 0.0), jnp.argmax(logits, -1) == targets)

    def fused(p, w):
        hidden, _ = model.apply({"params": p}, *args, return_hidden=True)
        total, ce, ok = T.weighted_cross_entropy(model, p, hidden, targets_masked, w, chunk=8)
        return total, (ce, ok)

    (tot_ref, (ce_ref, ok_ref)), g_ref = jax.jit(jax.value_and_grad(
        full, argnums=(0, 1), has_aux=True))(params, weights)
    (tot, (ce, ok)), g = jax.jit(jax.value_and_grad(fused, argnums=(0, 1), has_aux=True))(
        params, weights)
    np.testing.assert_allclose(tot, tot_ref, rtol=1e-6)
    np.testing.assert_allclose(ce, ce_ref, atol=1e-5)
    np.testing.assert_array_equal(ok, np.asarray(ok_ref) & (weights > 0))
    # d/dweights is the CE itself (compared where the targets are real: the masked ones were
    # replaced by -1 above).
    on = weights > 0
    np.testing.assert_allclose(np.asarray(g[1])[on], optax_ce(
        model.apply({"params": params}, *args)[0], targets)[on], atol=1e-5)
    # Gradient leaves reach ~150 and sum many terms in another order: float32 agreement is
    # relative to each leaf's scale (an Intel VM differed by 2e-5 at 141 where AMD did not).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-5, atol=max(1e-5, 1e-6 * float(np.abs(b).max()))), g[0], g_ref[0])


def test_unavailable_switches_raise_clear_errors():
    with pytest.raises(ValueError, match="splash"):
        T.model_config("tiny", attention_impl="splash")
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        T.model_config("tiny", attention_impl="flash")
    with pytest.raises(ValueError, match="remat_policy='some'"):
        T.model_config("tiny", remat_policy="some")
