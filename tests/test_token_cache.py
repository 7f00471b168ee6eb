"""Tests for the sharded token cache: radar_jax/data/token_cache.py and token_reader.py."""

import contextlib
import json
import os
import pickle

import grain
import numpy as np
import pytest
from etils import epath

from radar_jax import data


def random_tokens(n, grid=(3, 4), vocab=16384, num_classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, vocab, (n,) + grid).astype(np.int64),
            rng.integers(0, num_classes, (n,)).astype(np.int64))


def stored_dtype(path, name="codes-00000.npy"):
    """The dtype in the .npy header on disk (read without the reader under test)."""
    with open(os.path.join(path, name), "rb") as f:
        version = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        return read(f)[2]  # (shape, fortran_order, dtype)


def test_codes_stored_as_uint16_when_the_codebook_fits_else_int32(tmp_path):
    codes, labels = random_tokens(6)
    small = str(tmp_path / "small")
    data.save_token_cache(small, codes, labels, {"vocab_size": 16384})
    assert stored_dtype(small) == np.uint16  # LlamaGen's 16,384 codes: half of int32
    assert stored_dtype(small, "labels-00000.npy") == np.int32
    # 65,536 codes still fit uint16 (0..65535); one more does not.
    edge = codes.copy()
    edge[0, 0, 0] = 65535
    data.save_token_cache(str(tmp_path / "edge"), edge, labels, {"vocab_size": 65536})
    assert stored_dtype(str(tmp_path / "edge")) == np.uint16
    big = str(tmp_path / "big")
    data.save_token_cache(big, codes, labels, {"vocab_size": 65537})
    assert stored_dtype(big) == np.int32
    # Without a vocab_size the largest code decides.
    data.write_token_shard(tmp_path / "bymax", 0, edge + 1, labels)  # max code 65536
    assert stored_dtype(str(tmp_path / "bymax")) == np.int32
    for path, want in ((small, codes), (str(tmp_path / "edge"), edge), (big, codes)):
        got_codes, got_labels = data.TokenCache(path)[np.arange(6)]
        assert got_codes.dtype == np.int32 and got_labels.dtype == np.int32
        np.testing.assert_array_equal(got_codes, want)
        np.testing.assert_array_equal(got_labels, labels)
    assert data.TokenCache(small).dtype == np.uint16 and data.TokenCache(big).dtype == np.int32


def test_two_processes_write_shards_read_back_in_order(tmp_path):
    codes, labels = random_tokens(11)
    path = str(tmp_path / "tokens")
    # "Process 1" finishes first; finalize must wait for shard 0 and say so.
    data.write_token_shard(path, 1, codes[7:], labels[7:], vocab_size=16384)
    assert data.token_cache_state(path) == "incomplete"
    with pytest.raises(ValueError, match=r"shard\(s\) \[0\] not written"):
        data.finalize_token_cache(path, {"augment": "none"}, num_shards=2)
    data.write_token_shard(path, 0, codes[:7], labels[:7], vocab_size=16384)
    info = data.finalize_token_cache(path, {"augment": "none"}, num_shards=2)
    assert data.token_cache_state(path) == "complete"
    with open(os.path.join(path, "meta.json")) as f:
        on_disk = json.load(f)
    assert on_disk == info
    assert on_disk["num_examples"] == 11 and on_disk["grid"] == [3, 4]
    assert on_disk["dtype"] == "uint16" and on_disk["format_version"] == 2
    assert [s["length"] for s in on_disk["shards"]] == [7, 4]
    assert on_disk["meta"] == {"augment": "none"}
    assert not [n for n in os.listdir(path) if n.startswith(".tmp")]
    cache = data.TokenCache(path)
    assert len(cache) == 11 and cache.grid == (3, 4) and cache.shard_lengths == [7, 4]
    got_codes, got_labels = cache[np.arange(11)]
    np.testing.assert_array_equal(got_codes, codes)  # shard 0 first, whatever the write order
    np.testing.assert_array_equal(got_labels, labels)
    # A finished cache is not written into: a stale process cannot corrupt it.
    with pytest.raises(ValueError, match="already a finished token cache"):
        data.write_token_shard(path, 2, codes, labels)
    # Without num_shards the shards present must be 0..K-1.
    gap = str(tmp_path / "gap")
    data.write_token_shard(gap, 0, codes, labels)
    data.write_token_shard(gap, 2, codes, labels)
    with pytest.raises(ValueError, match=r"shard\(s\) \[1\]"):
        data.finalize_token_cache(gap, {})


def test_random_access_equals_the_original_arrays(tmp_path):
    codes, labels = random_tokens(50, seed=1)
    path = str(tmp_path / "tokens")
    for k, (a, b) in enumerate(((0, 13), (13, 13), (13, 40), (40, 50))):  # one empty shard
        data.write_token_shard(path, k, codes[a:b], labels[a:b], vocab_size=16384)
    data.finalize_token_cache(path, {}, num_shards=4)
    cache = data.TokenCache(path)
    assert cache.shard_lengths == [13, 0, 27, 10]
    rng = np.random.default_rng(2)
    for idx in (rng.permutation(50)[:17], np.array([49, 0, 12, 13, 39, 40, 13]), np.array([])):
        got_codes, got_labels = cache[idx.astype(int)]
        assert got_codes.shape == (len(idx), 3, 4) and got_codes.dtype == np.int32
        np.testing.assert_array_equal(got_codes, codes[idx.astype(int)])
        np.testing.assert_array_equal(got_labels, labels[idx.astype(int)])
    one_code, one_label = cache[40]
    assert one_code.shape == (3, 4) and int(one_label) == labels[40]
    np.testing.assert_array_equal(one_code, codes[40])
    with pytest.raises(IndexError, match="50"):
        cache[np.array([3, 50])]
    # A grain MapDataset source, also after pickling (as grain's worker processes do).
    ds = grain.MapDataset.source(pickle.loads(pickle.dumps(cache)))
    assert len(ds) == 50
    np.testing.assert_array_equal(ds[17][0], codes[17])
    np.testing.assert_array_equal(cache.code_counts(16384), np.bincount(codes.ravel(), None,
                                                                        16384))


def test_batches_are_the_same_however_the_cache_is_stored(tmp_path):
    codes, labels = random_tokens(23, seed=3)
    path = str(tmp_path / "tokens")
    data.write_token_shard(path, 0, codes[:9], labels[:9])
    data.write_token_shard(path, 1, codes[9:], labels[9:])
    data.finalize_token_cache(path, {}, num_shards=2)
    for kw in (dict(seed=0), dict(seed=7, process_index=1, process_count=2)):
        sharded = data.GlobalTokenBatches(data.TokenCache(path), 4, **kw)
        in_memory = data.GlobalTokenBatches(data.TokenCache.from_arrays(codes, labels), 4, **kw)
        for step in range(1, 9):  # > one epoch
            a, b = sharded(step), in_memory(step)
            np.testing.assert_array_equal(a["codes"], b["codes"])
            np.testing.assert_array_equal(a["label"], b["label"])
            assert a["codes"].dtype == np.int32


def test_reading_maps_the_shards_instead_of_loading_them(tmp_path, monkeypatch):
    codes, labels = random_tokens(2000)
    path = str(tmp_path / "tokens")
    data.save_token_cache(path, codes, labels, {"vocab_size": 16384})
    calls = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: calls.append((a, k)) or real_load(*a, **k))
    cache = data.TokenCache(path)
    assert sorted(os.path.basename(str(a[0])) for a, _ in calls) == [
        "codes-00000.npy", "labels-00000.npy"]
    assert all(k.get("mmap_mode") == "r" for _, k in calls)
    monkeypatch.undo()
    # What a grain worker process receives is the description, not the maps.
    assert len(pickle.dumps(cache)) < 0.05 * codes.size * 2  # vs 48 kB of uint16 codes
    got, _ = cache[np.array([5, 6])]
    assert not isinstance(got, np.memmap)  # the caller gets its own int32 copy


def test_mismatched_meta_names_the_field_and_the_fix(tmp_path):
    codes, labels = random_tokens(4)
    path = str(tmp_path / "tokens")
    meta = {"tokenizer": "/w/tokenizer", "augment": "none", "image_size": 256,
            "grid": (3, 4)}
    data.save_token_cache(path, codes, labels, meta)
    cache = data.check_token_cache(path, {"augment": "none", "grid": [3, 4],
                                          "image_size": 256})
    assert isinstance(cache, data.TokenCache) and cache.meta["grid"] == [3, 4]
    with pytest.raises(ValueError) as err:
        data.check_token_cache(path, {"tokenizer": "/w/tokenizer", "augment": "flip",
                                      "image_size": 384})
    msg = str(err.value)
    assert "augment='none' in the cache but 'flip' in the config" in msg  # the first one
    assert f"delete {path} or pass --config.tokens.rebuild=True" in msg
    with pytest.raises(ValueError, match=r"grid=\[3, 4\] in the cache but \(4, 4\)"):
        data.check_token_cache(path, {"grid": (4, 4)})
    with pytest.raises(ValueError, match="fingerprint is not recorded in the cache"):
        data.check_token_cache(path, {"fingerprint": "abc"})


def test_incomplete_cache_is_reported_never_read(tmp_path):
    codes, labels = random_tokens(4)
    path = str(tmp_path / "tokens")
    assert data.token_cache_state(path) == "missing"
    with pytest.raises(FileNotFoundError, match="tokens"):
        data.TokenCache(path)
    data.write_token_shard(path, 0, codes, labels)  # the encode "crashed" before finalize
    with pytest.raises(data.IncompleteTokenCacheError,
                       match=f"{path} is incomplete.*--config.tokens.rebuild=True"):
        data.TokenCache(path)
    with pytest.raises(data.IncompleteTokenCacheError):
        data.check_token_cache(path, {})
    # save_token_cache over a finished cache drops meta.json first, so a crash mid-rewrite
    # leaves an incomplete cache, not old metadata over new shards.
    data.finalize_token_cache(path, {"v": 1})
    from radar_jax.data import token_cache

    def crash(*a, **k):
        raise KeyboardInterrupt
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(token_cache, "write_token_shard", crash)
        with pytest.raises(KeyboardInterrupt):
            data.save_token_cache(path, codes, labels, {"v": 2})
    assert data.token_cache_state(path) == "incomplete"
    data.remove_token_cache(path)
    assert data.token_cache_state(path) == "missing"


def test_bad_labels_and_codes_name_the_value_and_the_record(tmp_path):
    codes, labels = random_tokens(8, vocab=32, num_classes=5)
    bad = labels.copy()
    bad[3] = -1
    with pytest.raises(ValueError, match="record 3 has label -1"):
        data.write_token_shard(tmp_path / "w", 0, codes, bad)
    high = codes.copy()
    high[6, 1, 2] = 32
    with pytest.raises(ValueError, match="record 6 has code 32 >= vocab_size=32"):
        data.write_token_shard(tmp_path / "w", 0, high, labels, vocab_size=32)

    path = str(tmp_path / "tokens")
    data.write_token_shard(path, 0, codes[:4], labels[:4])
    data.write_token_shard(path, 1, high[4:], labels[4:])  # valid without a vocab_size
    data.finalize_token_cache(path, {})
    data.check_token_cache(path, num_classes=5, vocab_size=33)  # fits
    with pytest.raises(ValueError, match=r"record 6 has code 32 >= config.model.vocab_size=32"):
        data.check_token_cache(path, num_classes=5, vocab_size=32)
    with pytest.raises(ValueError, match=r"record \d has label 4; labels must be in \[0, 4\)"):
        data.check_token_cache(path, num_classes=4)
    # A label file changed behind the writer's back (another tool, a bug) is caught too.
    tampered = labels[4:].astype(np.int32)
    tampered[1] = -1
    np.save(os.path.join(path, "labels-00001.npy"), tampered)
    with pytest.raises(ValueError, match="record 5 has label -1"):
        data.check_token_cache(path)


@contextlib.contextmanager
def fake_gcs(bucket_dir):
    """Routes every epath call for gs://... to `bucket_dir` (etils' own mock backend), so the
    code under test must use epath for gs:// paths: os or np.load on one would miss."""
    prefix = "gs://"

    def local(path):
        path = os.fspath(path)
        return os.path.join(bucket_dir, path[len(prefix):]) if path.startswith(prefix) else path

    def one(fn, path, *a, **k):
        return fn(local(path), *a, **k)

    def two(fn, src, dst, *a, **k):
        return fn(local(src), local(dst), *a, **k)

    def glob(fn, pattern):
        return [p.replace(bucket_dir + "/", prefix) if pattern.startswith(prefix) else p
                for p in fn(local(pattern))]

    with epath.testing.mock_epath(
            open=one, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one, remove=one,
            rmtree=one, stat=one, glob=glob, rename=two, replace=two, copy=two):
        yield


def test_gs_paths_go_through_epath_and_are_copied_locally(tmp_path):
    bucket = tmp_path / "fake_gcs"
    bucket.mkdir()
    codes, labels = random_tokens(9, seed=4)
    remote = "gs://bucket/run/tokens"
    local = tmp_path / "local_copy"
    with fake_gcs(str(bucket)):
        data.write_token_shard(remote, 0, codes[:5], labels[:5], vocab_size=16384)
        data.write_token_shard(remote, 1, codes[5:], labels[5:], vocab_size=16384)
        data.finalize_token_cache(remote, {"augment": "none"}, num_shards=2)
        assert data.token_cache_state(remote) == "complete"
        cache = data.check_token_cache(remote, {"augment": "none"}, local_dir=local)
        got_codes, got_labels = cache[np.arange(9)]
        np.testing.assert_array_equal(got_codes, codes)
        np.testing.assert_array_equal(got_labels, labels)
        assert cache.path == remote
        # A second open reuses the local copy (same meta.json): nothing is copied again.
        stamp = os.stat(local / "codes-00000.npy").st_mtime_ns
        assert len(data.TokenCache(remote, local_dir=local)) == 9
        assert os.stat(local / "codes-00000.npy").st_mtime_ns == stamp
        # Image folders on gs:// list and read through epath too.
        from PIL import Image
        for name in ("a/x.png", "b/y.png"):
            os.makedirs(bucket / "bucket" / "imgs" / os.path.dirname(name), exist_ok=True)
            Image.new("RGB", (5, 7), (9, 9, 9)).save(bucket / "bucket" / "imgs" / name)
        source = data.make_source(_cfg("gs://bucket/imgs"), "train")
        assert source.classes == ["a", "b"] and source.path(1) == "gs://bucket/imgs/b/y.png"
        assert source[1]["image"].shape == (7, 5, 3)
        data.remove_token_cache(remote)
        assert data.token_cache_state(remote) == "missing"
    # The shards really went to the fake bucket, and nothing to a local "gs:" folder.
    assert (bucket / "bucket" / "run").is_dir() and not (bucket / "bucket/run/tokens").exists()
    assert not os.path.exists("gs:") and stored_dtype(str(local)) == np.uint16


def _cfg(path):
    import ml_collections
    return ml_collections.ConfigDict(dict(
        source="imagefolder", path=path, tfds_name="", tfds_data_dir="", train_split="train",
        eval_split="validation", image_size=8, random_crop=False, flip=False, num_workers=0))
