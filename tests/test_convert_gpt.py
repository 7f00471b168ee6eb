"""Parity of radar_jax.convert.gpt + Transformer with the reference LlamaGen GPT fixture.

The fixture (../shared/fixtures/llamagen_gpt_tiny.npz, see its README) holds a tiny random
LlamaGen c2i GPT, the logits of its teacher-forced forward and its greedy generations.
"""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import shared_fixture
from radar_jax.convert.gpt import load_llamagen_gpt
from radar_jax.models import transformer as T

FIXTURE = "llamagen_gpt_tiny.npz"


@pytest.fixture(scope="module")
def fixture_path():
    return shared_fixture(FIXTURE)


@pytest.fixture(scope="module")
def loaded(fixture_path):
    data = dict(np.load(fixture_path))
    config, params = load_llamagen_gpt(fixture_path)
    return data, config, params


def _raster_layout(length):
    """LlamaGen's next-token sequence [cls, t_0 .. t_{L-2}]: flat_pos = i - 1, causal mask."""
    flat_pos = np.arange(length) - 1
    return flat_pos, np.zeros(length, bool), flat_pos < 0, np.tril(np.ones((length, length), bool))


def test_config_from_the_fixture_json(loaded):
    _, config, params = loaded
    assert (config.dim, config.n_layer, config.n_head, config.vocab_size) == (64, 2, 4, 64)
    assert (config.num_classes, config.block_size, tuple(config.grid)) == (10, 64, (8, 8))
    assert T.ffn_hidden_dim(config) == 192  # README: SwiGLU hidden 192
    # Plain nested dict of float32 numpy arrays, no Partitioned boxes, no kv_cache buffers.
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    assert all(isinstance(x, np.ndarray) and x.dtype == np.float32 for _, x in leaves)
    assert not any("kv_cache" in jax.tree_util.keystr(p) for p, _ in leaves)
    assert params["layers_1"]["attention"]["wqkv"]["kernel"].shape == (64, 192)


def test_teacher_forced_logits_match_llamagen(loaded):
    data, config, params = loaded
    tokens, labels = data["tokens"], data["labels"]  # labels include the null class 10
    length = tokens.shape[1]
    inputs = np.concatenate([np.zeros((len(tokens), 1), np.int32), tokens[:, :-1]], axis=1)
    logits, _ = T.Transformer(config).apply({"params": params}, inputs, labels,
                                            *_raster_layout(length))
    assert logits.shape == data["logits"].shape
    np.testing.assert_allclose(logits, data["logits"], atol=1e-3)


def _greedy(config, params, labels, cfg_scale):
    """LlamaGen-style greedy generation through the KV cache, one token per call."""
    model = T.Transformer(config)
    n_tokens, n_slots = config.block_size, config.block_size + 8
    guided = cfg_scale > 1.0
    if guided:  # LlamaGen's CFG: conditional rows, then the same rows with the null class.
        labels = np.concatenate([labels, np.full_like(labels, config.num_classes)])
    batch = len(labels)

    @jax.jit
    def step(cache, token_B, index):
        # Slot `index` holds the class token (index 0) or token index-1 at grid position index-1.
        flat_pos = jnp.reshape(index - 1, (1,))
        mask_1S = (jnp.arange(n_slots) <= index)[None, :]
        logits, cache = model.apply({"params": params}, token_B[:, None], labels, flat_pos,
                                    jnp.zeros((1,), bool), flat_pos < 0, mask_1S, cache=cache,
                                    cache_index=index)
        logits_BV = logits[:, 0]
        if guided:
            cond, uncond = jnp.split(logits_BV, 2)
            logits_BV = jnp.tile(uncond + (cond - uncond) * cfg_scale, (2, 1))
        return cache, jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

    cache = T.init_cache(config, batch, n_slots)
    token_B, out = jnp.zeros((batch,), jnp.int32), []
    for index in range(n_tokens):
        cache, token_B = step(cache, token_B, jnp.int32(index))
        out.append(token_B)
    return np.stack(out, axis=1)[: batch // 2 if guided else batch]


@pytest.mark.parametrize("scale,key", [(1.0, "greedy_cfg1"), (3.0, "greedy_cfg3")])
def test_kv_cached_greedy_matches_llamagen_generate(loaded, scale, key):
    data, config, params = loaded
    tokens = _greedy(config, params, data["greedy_labels"], scale)
    np.testing.assert_array_equal(tokens, data[key])


def _write_npz(path, data, sd, config_json=True):
    arrays = {f"sd/{k}": v for k, v in sd.items()}
    if config_json:
        arrays["config"] = data["config"]
    np.savez(path, **arrays)


def _state_dict(data):
    return {k[3:]: v for k, v in data.items() if k.startswith("sd/")}


def test_wrong_shape_names_the_key(loaded, tmp_path):
    data = loaded[0]
    sd = _state_dict(data)
    sd["layers.1.feed_forward.w2.weight"] = np.zeros((64, 128), np.float32)
    _write_npz(tmp_path / "bad.npz", data, sd)
    with pytest.raises(ValueError, match=r"layers\.1\.feed_forward\.w2\.weight.*\(64, 128\)"
                                         r".*\(192, 64\)"):
        load_llamagen_gpt(tmp_path / "bad.npz")


def test_missing_and_unexpected_keys_are_listed(loaded, tmp_path):
    data = loaded[0]
    sd = _state_dict(data)
    del sd["norm.weight"]
    sd["extra_head.weight"] = np.zeros((3, 3), np.float32)
    _write_npz(tmp_path / "keys.npz", data, sd)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra_head\.weight'\].*"
                                         r"missing parameters \['norm/weight'\]"):
        load_llamagen_gpt(tmp_path / "keys.npz")


def test_safetensors_with_explicit_or_inferred_config(loaded, tmp_path, caplog):
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    data, config, params = loaded
    sd = {k: v for k, v in _state_dict(data).items() if "kv_cache" not in k}
    save_file(sd, str(tmp_path / "gpt.safetensors"))
    with caplog.at_level(logging.INFO):
        config2, params2 = load_llamagen_gpt(tmp_path / "gpt.safetensors", config=config)
    assert "prompt_embedding" in caplog.text
    jax.tree.map(np.testing.assert_array_equal, params2, params)  # prompt init is seeded too
    assert 0.005 < params2["prompt_embedding"].std() < 0.05  # N(0, 0.02)
    # Without a config, shapes give dim, depth, vocab and classes; grid sets block_size.
    config3, params3 = load_llamagen_gpt(tmp_path / "gpt.safetensors", grid=(8, 8))
    assert (config3.dim, config3.n_layer, config3.vocab_size, config3.num_classes,
            config3.block_size) == (64, 2, 64, 10, 64)
    assert T.ffn_hidden_dim(config3) == 192
    # A config that disagrees with the file is refused, naming the key.
    with pytest.raises(ValueError, match=r"'[\w.]+\.weight' has shape \(\d+, 64\).*needs"):
        load_llamagen_gpt(tmp_path / "gpt.safetensors", config=T.model_config("tiny", dim=32,
                                                                               n_head=2))


def test_fixture_json_is_what_we_parse(fixture_path):
    raw = json.loads(str(np.load(fixture_path)["config"]))
    assert raw["multiple_of"] == 32 and raw["class_dropout_prob"] > 0  # null row present
