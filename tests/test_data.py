"""Tests for radar_jax.data: digits, image folders, TFDS (mocked), resume, token caches."""

import io
import logging
import os

import grain
import ml_collections
import numpy as np
import pytest
from PIL import Image

from radar_jax import data

S = 16  # output side for the folder/TFDS tests: small keeps decoding cheap


def data_config(**overrides):
    cfg = ml_collections.ConfigDict(dict(
        source="digits", path="", tfds_name="", tfds_data_dir="", train_split="train",
        eval_split="validation", image_size=32, random_crop=False, flip=False, num_workers=0))
    cfg.update(overrides)
    return cfg


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


# ---------------------------------------------------------------------------------------------
# Digits
# ---------------------------------------------------------------------------------------------

def test_digits_split_is_fixed_disjoint_and_complete():
    from sklearn.datasets import load_digits

    x_tr, y_tr = data.load_digits_split("train")
    x_ev, y_ev = data.load_digits_split("eval")
    assert x_tr.dtype == np.float32 and y_tr.dtype == np.int32
    assert x_tr.shape[1:] == (8, 8) and len(x_tr) + len(x_ev) == 1797
    assert len(x_ev) == 300 and len(x_tr) == 1497
    np.testing.assert_array_equal(np.bincount(y_ev), [30] * 10)  # 30 held out per class
    assert x_tr.min() == 0.0 and x_tr.max() == 16.0  # sklearn's 0..16 range
    # Together the splits are exactly the 1,797 sklearn digits (as a multiset), so they are
    # disjoint; compare rows of (label, pixels) sorted lexicographically.
    full = load_digits()
    rows = lambda x, y: np.sort(np.concatenate([y[:, None], x.reshape(len(x), -1)], 1)  # noqa
                                .view([("", np.float64)] * 65), axis=0)
    both = rows(np.concatenate([x_tr, x_ev]).astype(np.float64),
                np.concatenate([y_tr, y_ev]).astype(np.float64))
    np.testing.assert_array_equal(both, rows(full.images, full.target.astype(np.float64)))
    # Fixed: a second call gives the same split.
    x_ev2, y_ev2 = data.load_digits_split("eval")
    np.testing.assert_array_equal(x_ev, x_ev2)
    np.testing.assert_array_equal(y_ev, y_ev2)
    with pytest.raises(ValueError, match="split"):
        data.load_digits_split("test")


def test_digits_to_images_hand_computed():
    x = np.zeros((1, 8, 8), np.float32)
    x[0, 0, 0] = 16.0
    img = data.digits_to_images(x, 16)
    assert img.shape == (1, 16, 16, 3) and img.dtype == np.float32
    # Output pixel 0 samples input 0 (clamped edge); output 1 samples 0.25: weight 0.75 on the
    # lit pixel per axis. 16 * w -> [-1, 1] is 16 * w / 8 - 1.
    np.testing.assert_allclose(img[0, 0, 0], [1.0] * 3, atol=1e-6)
    np.testing.assert_allclose(img[0, 1, 0, 0], 16 * 0.75 / 8 - 1, atol=1e-6)
    np.testing.assert_allclose(img[0, 1, 1, 0], 16 * 0.75 * 0.75 / 8 - 1, atol=1e-6)
    np.testing.assert_allclose(img[0, 2, 0, 0], 16 * 0.25 / 8 - 1, atol=1e-6)
    np.testing.assert_allclose(img[0, 3:, 3:], -1.0, atol=1e-6)  # black background
    # At S = 8 it is just the affine map 0..16 -> [-1, 1].
    x_tr, _ = data.load_digits_split("train")
    np.testing.assert_allclose(data.digits_to_images(x_tr[:5], 8)[..., 1], x_tr[:5] / 8 - 1,
                               atol=1e-6)
    with pytest.raises(ValueError, match="image_size"):
        data.digits_to_images(x, 4)


@pytest.mark.parametrize("size", [32, 28])
def test_digits_round_trip(size):
    x, _ = data.load_digits_split("eval")
    img = data.digits_to_images(x[:64], size)
    assert img.min() >= -1.0 and img.max() <= 1.0
    back = data.images_to_digits(img)
    assert back.shape == (64, 8, 8) and back.dtype == np.float32
    np.testing.assert_allclose(back, x[:64], atol=1e-3)


def test_digits_pipeline_batches_and_eval_order():
    cfg = data_config()
    it = iter(data.make_image_dataset(cfg, "train", 8, seed=0, train=True))
    batch = next(it)
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (8,)
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["image"].min() == -1.0 and batch["image"].max() > 0.5  # black bg, white ink
    assert np.all((batch["label"] >= 0) & (batch["label"] <= 9))
    # Eval: one pass, source order, last partial batch kept; uint8 storage loses < 1/127.5.
    x_ev, y_ev = data.load_digits_split("eval")
    batches = list(data.make_image_dataset(cfg, "validation", 128, seed=0, train=False,
                                           drop_remainder=False))
    assert [len(b["label"]) for b in batches][:-1] == [128] * (len(batches) - 1)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), y_ev)
    images = np.concatenate([b["image"] for b in batches])
    np.testing.assert_allclose(images, data.digits_to_images(x_ev, 32), atol=1 / 127.5 + 1e-6)
    np.testing.assert_allclose(data.images_to_digits(images), x_ev, atol=0.25)


# ---------------------------------------------------------------------------------------------
# Image folders: colour modes, bad files, clear errors
# ---------------------------------------------------------------------------------------------

def _pattern(h, w):
    """uint8 (h, w, 3) with distinct, smooth channels."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([yy * 255 // (h - 1), xx * 255 // (w - 1),
                     np.full((h, w), 128)], -1).astype(np.uint8)


def _write(path, img, fmt, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, fmt, **kw)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """root/{cat,dog}: 6 decodable images in 6 colour modes, a truncated JPEG, a text '.jpg'."""
    root = str(tmp_path_factory.mktemp("folder"))
    cat, dog = os.path.join(root, "cat"), os.path.join(root, "dog")
    _write(os.path.join(cat, "rgb.jpg"), Image.fromarray(_pattern(30, 40)), "JPEG", quality=95)
    # CMYK (0, 255, 255, 0): no cyan, full magenta and yellow, no black = red ink.
    _write(os.path.join(cat, "cmyk.JPEG"), Image.new("CMYK", (20, 24), (0, 255, 255, 0)), "JPEG")
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0] = 255  # red everywhere ...
    rgba[:10, :, 3] = 255  # ... opaque on the top half, fully transparent below
    _write(os.path.join(cat, "rgba.png"), Image.fromarray(rgba, "RGBA"), "PNG")
    buf = io.BytesIO()
    Image.fromarray(_pattern(32, 32)).save(buf, "JPEG")
    with open(os.path.join(cat, "truncated.jpg"), "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    _write(os.path.join(dog, "gray.png"), Image.fromarray(np.full((18, 22), 77, np.uint8)), "PNG")
    pal = Image.new("P", (16, 16))
    pal.putpalette([10, 20, 30] + [200, 100, 50] * 255)
    _write(os.path.join(dog, "sub", "palette.png"), pal, "PNG")  # nested folders count too
    la = Image.fromarray(np.stack([np.full((16, 16), 50), np.full((16, 16), 255)], -1)
                         .astype(np.uint8), "LA")
    _write(os.path.join(dog, "la.png"), la, "PNG")
    with open(os.path.join(dog, "notes.jpg"), "w") as f:
        f.write("this is not an image\n")
    with open(os.path.join(dog, "readme.txt"), "w") as f:
        f.write("ignored: not an image extension\n")
    broken = sorted([os.path.join(cat, "truncated.jpg"), os.path.join(dog, "notes.jpg")])
    return root, broken


def test_imagefolder_source_converts_every_mode_to_rgb(image_folder):
    root, broken = image_folder
    source = data.make_source(data_config(source="imagefolder", path=root), "train")
    assert source.classes == ["cat", "dog"] and source.num_classes == 2
    assert len(source) == 8  # 6 decodable + 2 broken; readme.txt is not an image file
    records, bad = {}, []
    for i in range(len(source)):
        path = source.path(i)
        try:
            rec = source[i]
        except data.BadImageError as e:
            assert e.where == path
            bad.append(path)
            continue
        assert rec["image"].dtype == np.uint8 and rec["image"].ndim == 3
        assert rec["image"].shape[2] == 3
        assert rec["label"] == (0 if os.sep + "cat" + os.sep in path else 1)
        records[os.path.basename(path)] = rec["image"]
    assert sorted(bad) == broken
    assert records["rgb.jpg"].shape == (30, 40, 3)
    assert records["cmyk.JPEG"].shape == (24, 20, 3)
    assert np.abs(records["cmyk.JPEG"].astype(int) - [255, 0, 0]).max() <= 3  # red (JPEG loss)
    np.testing.assert_array_equal(records["rgba.png"][0, 0], [255, 0, 0])  # opaque red
    np.testing.assert_array_equal(records["rgba.png"][-1, 0], [255, 255, 255])  # on white
    np.testing.assert_array_equal(records["gray.png"], np.full((18, 22, 3), 77))
    np.testing.assert_array_equal(records["palette.png"], np.full((16, 16, 3), [10, 20, 30]))
    np.testing.assert_array_equal(records["la.png"], np.full((16, 16, 3), 50))


def test_imagefolder_pipeline_skips_and_counts_bad_files(image_folder, caplog):
    root, broken = image_folder
    cfg = data_config(source="imagefolder", path=root, image_size=S)
    with caplog.at_level(logging.WARNING):
        it = iter(data.make_image_dataset(cfg, "train", 4, seed=0, train=False,
                                          drop_remainder=False))
        batches = list(it)
    assert [b["image"].shape for b in batches] == [(4, S, S, 3), (2, S, S, 3)]
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1])  # source order, bad ones gone
    assert data.skipped_count(it) == 2 and it.skip_counter.paths == broken
    for path in broken:  # logged once, with the path
        assert sum(path in r.getMessage() for r in caplog.records) == 1

    # Training: three epochs, random crops and flips; bad files come up every epoch but are
    # logged once each, and iteration never crashes.
    caplog.clear()
    cfg_train = data_config(source="imagefolder", path=root, image_size=S, random_crop=True,
                            flip=True)
    it = iter(data.make_image_dataset(cfg_train, "train", 3, seed=1, train=True,
                                      num_epochs=3))
    with caplog.at_level(logging.WARNING):
        n = sum(len(b["label"]) for b in it)
    assert n == 18 and data.skipped_count(it) == 2 and it.skip_counter.encounters == 6
    for path in broken:
        assert sum(path in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(TypeError, match="make_image_dataset"):
        data.skipped_count(iter([1, 2]))


def test_imagefolder_skips_are_counted_with_worker_processes(image_folder):
    import multiprocessing

    from absl import flags
    from absl.testing import flagsaver

    root, broken = image_folder
    cfg = data_config(source="imagefolder", path=root, image_size=S, num_workers=1)
    # Outside absl.app grain cannot start processes (see worker_processes_available): the
    # pipeline decodes in threads, gives the same batch, and leaves absl's flags unparsed.
    assert not flags.FLAGS.is_parsed() and not data.worker_processes_available()
    in_threads = next(iter(data.make_image_dataset(cfg, "train", 6, seed=0, train=False)))
    assert not flags.FLAGS.is_parsed()
    # As under absl.app (the CLI): real worker processes. flagsaver restores the flags.
    with flagsaver.as_parsed(grain_enable_multiprocess_worker_profiling="false"):
        assert data.worker_processes_available()
        it = iter(data.make_image_dataset(cfg, "train", 6, seed=0, train=False))
        batch = next(it)
        assert multiprocessing.active_children()  # decoded in another process
        it.close()
    assert not data.worker_processes_available()
    assert batch["image"].shape == (6, S, S, 3)
    np.testing.assert_array_equal(batch["label"], [0, 0, 0, 1, 1, 1])
    assert data.skipped_count(it) == 2 and it.skip_counter.paths == broken
    np.testing.assert_array_equal(in_threads["image"], batch["image"])


def _list_with_timeout(root, seconds=20):
    """make_source in a thread, so a walk that would never end fails the test instead."""
    import threading

    result = {}
    thread = threading.Thread(target=lambda: result.update(
        source=data.make_source(data_config(source="imagefolder", path=str(root)), "train")),
        daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"listing {root} did not finish in {seconds} s"
    return result["source"]


def test_imagefolder_symlink_loops_list_each_image_once(tmp_path):
    # root/cat/a.png, root/cat/deep/b.png, root/dog/c.png, with three loops: cat/deep/up ->
    # cat (an ancestor), dog/self -> dog (itself), dog/root -> root (two levels up, through
    # which cat is reachable again). Before the visited set, os.walk(followlinks=True) listed
    # a.png dozens of times and the nested loops never finished.
    root = tmp_path / "root"
    for sub in ("cat/deep", "dog"):
        (root / sub).mkdir(parents=True)
    for name in ("cat/a.png", "cat/deep/b.png", "dog/c.png"):
        Image.new("RGB", (8, 8)).save(root / name)
    os.symlink(root / "cat", root / "cat" / "deep" / "up")
    os.symlink(root / "dog", root / "dog" / "self")
    os.symlink(root, root / "dog" / "root")
    source = _list_with_timeout(root)
    paths = [source.path(i) for i in range(len(source))]
    assert paths == [str(root / "cat" / "a.png"), str(root / "cat" / "deep" / "b.png"),
                     str(root / "dog" / "c.png")]
    assert [source[i]["label"] for i in range(3)] == [0, 0, 1]
    # A symlinked class folder is still followed (once): a real folder elsewhere.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.new("RGB", (8, 8)).save(elsewhere / "d.png")
    os.symlink(elsewhere, root / "bird")
    source = _list_with_timeout(root)
    assert source.classes == ["bird", "cat", "dog"] and len(source) == 4
    assert source.path(0) == str(root / "bird" / "d.png")


def test_missing_empty_and_imageless_folders_raise_one_clear_error(tmp_path):
    missing = str(tmp_path / "no_such_folder")
    with pytest.raises(data.DataUnavailableError, match="no_such_folder.*does not exist"):
        data.check_data_available(data_config(source="imagefolder", path=missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.DataUnavailableError, match=str(empty)):
        data.make_image_dataset(data_config(source="imagefolder", path=str(empty)), "train",
                                2, seed=0, train=True)
    textonly = tmp_path / "textonly"
    (textonly / "a").mkdir(parents=True)
    (textonly / "a" / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="textonly.*no image files"):
        data.check_data_available(data_config(source="imagefolder", path=str(textonly)))
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("RGB", (8, 8)).save(loose / "a.png")
    with pytest.raises(ValueError, match="subfolder per class"):
        data.check_data_available(data_config(source="imagefolder", path=str(loose)))


def test_all_files_bad_raises_instead_of_spinning(tmp_path):
    (tmp_path / "a").mkdir()
    for i in range(3):
        (tmp_path / "a" / f"{i}.jpg").write_text("not an image")
    cfg = data_config(source="imagefolder", path=str(tmp_path), image_size=S)
    it = iter(data.make_image_dataset(cfg, "train", 2, seed=0, train=True))
    with pytest.raises(data.DataUnavailableError, match="none of the last 6 images"):
        next(it)


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="source='webdataset'"):
        data.make_source(data_config(source="webdataset"), "train")
    with pytest.raises(ValueError, match="batch_size=0"):
        data.make_image_dataset(data_config(), "train", 0, seed=0, train=True)
    with pytest.raises(ValueError, match="shard_index=2"):
        data.make_image_dataset(data_config(), "train", 4, seed=0, train=True,
                                shard_index=2, shard_count=2)


# ---------------------------------------------------------------------------------------------
# TFDS (mocked: no TensorFlow, no download)
# ---------------------------------------------------------------------------------------------

def test_tfds_mock_batches_without_tensorflow():
    import sys

    import tensorflow_datasets as tfds

    had_tf = "tensorflow" in sys.modules  # e.g. imported by another test's TensorBoard writer
    cfg = data_config(source="tfds", tfds_name="imagenet2012", image_size=S, random_crop=True,
                      flip=True)
    with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
        assert "10 records" in data.check_data_available(cfg)
        it = iter(data.make_image_dataset(cfg, "train", 4, seed=0, train=True))
        batches = take(it, 3)  # 12 > 10: crosses into the second epoch
        ev = list(data.make_image_dataset(cfg, "validation", 4, seed=0, train=False,
                                          drop_remainder=False))
    for b in batches:
        assert b["image"].shape == (4, S, S, 3) and b["image"].dtype == np.float32
        assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
        assert b["label"].dtype == np.int32 and np.all((b["label"] >= 0) & (b["label"] < 1000))
    assert sum(len(b["label"]) for b in ev) == 10
    assert had_tf or "tensorflow" not in sys.modules  # the mock and source never import TF


def test_tfds_not_prepared_gives_instructions(tmp_path):
    cfg = data_config(source="tfds", tfds_name="imagenet2012", tfds_data_dir=str(tmp_path))
    with pytest.raises(data.DataUnavailableError) as err:
        data.check_data_available(cfg)
    msg = str(err.value)
    for needed in ("imagenet2012", str(tmp_path), "ILSVRC2012_img_train.tar", "tfds build",
                   "--config.tokenizer.data.tfds_data_dir", "array_record"):
        assert needed in msg
    cfg.tfds_name = "no_such_dataset_xyz"
    with pytest.raises(data.DataUnavailableError, match="no_such_dataset_xyz"):
        data.make_source(cfg, "train")


# ---------------------------------------------------------------------------------------------
# Determinism and resume
# ---------------------------------------------------------------------------------------------

def test_same_seed_same_batches_and_exact_resume():
    # Random crops and flips on, so per-example randomness is part of what must resume.
    cfg = data_config(random_crop=True, flip=True)
    ds = data.make_image_dataset(cfg, "train", 8, seed=3, train=True)
    first, second = iter(ds), iter(ds)
    a = take(first, 3)
    assert_batches_equal(a, take(second, 3))
    state = first.get_state()
    after = take(first, 2)
    # A fresh iterator of a freshly built dataset, restored from the saved state.
    resumed = iter(data.make_image_dataset(cfg, "train", 8, seed=3, train=True))
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 2), after)
    # Another seed gives another stream.
    other = take(iter(data.make_image_dataset(cfg, "train", 8, seed=4, train=True)), 1)
    assert not np.array_equal(other[0]["label"], a[0]["label"])


def test_resume_with_skipped_files_and_orbax_checkpoint(image_folder, tmp_path):
    import orbax.checkpoint as ocp

    root, broken = image_folder
    cfg = data_config(source="imagefolder", path=root, image_size=S, random_crop=True,
                      flip=True)
    make = lambda: data.make_image_dataset(cfg, "train", 2, seed=5, train=True)  # noqa: E731
    it = iter(make())
    take(it, 4)  # 8 good images > the 6 of epoch 1, so all 8 files of epoch 1 were read
    assert data.skipped_count(it) == 2
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
        mngr.save(7, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    after = take(it, 4)  # crosses the next epoch boundary (6 good images, 2 per batch)
    restored = iter(make())
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
        mngr.restore(7, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointRestore(restored)))
    # The skip counts come back with the position: the restart still reports both files.
    assert data.skipped_count(restored) == 2 and restored.skip_counter.paths == broken
    assert_batches_equal(take(restored, 4), after)
    assert restored.skip_counter.encounters == it.skip_counter.encounters


# ---------------------------------------------------------------------------------------------
# Token caches
# ---------------------------------------------------------------------------------------------

def test_token_cache_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16384, size=(5, 4, 4)).astype(np.int64)
    labels = np.arange(5)
    path = str(tmp_path / "sub" / "tokens")
    meta = {"tokenizer": "vq16", "image_size": 64, "augment": ["none"]}
    data.save_token_cache(path, codes, labels, meta)
    got_codes, got_labels, got_meta = data.load_token_cache(path)
    assert got_codes.dtype == np.int32 and got_labels.dtype == np.int32
    np.testing.assert_array_equal(got_codes, codes)
    np.testing.assert_array_equal(got_labels, labels)
    assert got_meta == meta
    assert os.listdir(tmp_path / "sub") == ["tokens"]  # no temp file left behind ...
    assert sorted(os.listdir(path)) == [  # ... inside the cache either
        "codes-00000.npy", "labels-00000.npy", "meta.json", "shard-00000.json"]
    data.save_token_cache(path, codes[:2], labels[:2], {})  # overwrite in place
    assert data.load_token_cache(path)[0].shape == (2, 4, 4)

    with pytest.raises(FileNotFoundError, match="missing.npz"):
        data.load_token_cache(str(tmp_path / "missing.npz"))
    # Format-1 caches (one .npz) still read; a garbage or truncated one is reported as corrupt.
    legacy = tmp_path / "legacy.npz"
    np.savez(legacy, codes=codes.astype(np.int32), labels=labels.astype(np.int32),
             meta_json=np.array('{"tokenizer": "old"}'), format_version=np.int32(1))
    old_codes, old_labels, old_meta = data.load_token_cache(str(legacy))
    np.testing.assert_array_equal(old_codes, codes)
    assert old_meta == {"tokenizer": "old"}
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="garbage.npz.*corrupt"):
        data.load_token_cache(str(garbage))
    whole = legacy.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="truncated.npz"):
        data.load_token_cache(str(truncated))
    # A truncated shard of the directory format is reported too, naming the cache.
    shard = os.path.join(path, "codes-00000.npy")
    with open(shard, "rb") as f:
        whole = f.read()
    with open(shard, "wb") as f:
        f.write(whole[: len(whole) - 7])
    with pytest.raises(ValueError, match="tokens: shard 0 cannot be read"):
        data.load_token_cache(path)
    with pytest.raises(ValueError, match="codes"):
        data.save_token_cache(str(tmp_path / "bad"), codes[0], labels, {})
    with pytest.raises(ValueError, match="JSON"):
        data.save_token_cache(str(tmp_path / "bad"), codes, labels, {"x": object()})


def test_global_token_batches_epochs_processes_and_steps():
    n, h, w = 12, 3, 2
    codes = np.broadcast_to(np.arange(n)[:, None, None], (n, h, w)).copy()  # code = index
    labels = np.arange(n) % 5
    cache = data.TokenCache.from_arrays(codes, labels)
    batches = data.GlobalTokenBatches(cache, 4, seed=0)
    first_epoch = [batches(step) for step in (1, 2, 3)]
    for b in first_epoch:
        assert b["codes"].shape == (4, h, w) and b["codes"].dtype == np.int32
        assert b["label"].shape == (4,) and b["label"].dtype == np.int32
        np.testing.assert_array_equal(b["codes"][:, 0, 0] % 5, b["label"])  # pairs kept
    order = np.concatenate([b["codes"][:, 0, 0] for b in first_epoch])
    assert sorted(order) == list(range(n))  # one epoch = every example once
    assert list(order) != list(range(n))  # ... shuffled
    second = np.concatenate([batches(step)["codes"][:, 0, 0] for step in (4, 5, 6)])
    assert sorted(second) == list(range(n)) and list(second) != list(order)  # reshuffled
    # A batch is a pure function of the step: a fresh reader (a resumed run) asked for step 5
    # gives what the first gave, in any order of asking.
    fresh = data.GlobalTokenBatches(cache, 4, seed=0)
    for step in (5, 2, 5):
        np.testing.assert_array_equal(fresh(step)["codes"], batches(step)["codes"])
    # Two processes read the two halves of each global batch: together, one process's batch.
    for step in (1, 4, 7):
        halves = [data.GlobalTokenBatches(cache, 4, seed=0, process_index=i, process_count=2)(
            step)["codes"] for i in range(2)]
        np.testing.assert_array_equal(np.concatenate(halves), batches(step)["codes"])
    assert not np.array_equal(data.GlobalTokenBatches(cache, 4, seed=1)(1)["codes"],
                              batches(1)["codes"])
    with pytest.raises(ValueError, match="batch_size=5 is not divisible by the 2 processes"):
        data.GlobalTokenBatches(cache, 5, seed=0, process_count=2)
