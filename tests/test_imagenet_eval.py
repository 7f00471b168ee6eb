"""The ImageNet eval stage: labels, SSIM / PSNR, LlamaGen's weights as a ready model, and
--mode=eval end to end on an image folder with a kill and a resume."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import ndimage

from conftest import TINY_TOKENIZER
from conftest import shared_fixture
from radar_jax import config_io
from radar_jax import imagenet_eval
from radar_jax import pipeline

REPO = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ labels
def test_labels_per_class_and_uniform():
    per_class = imagenet_eval.eval_labels(50_000, 1000, "per_class", seed=0)
    assert per_class.dtype == np.int32 and np.all(np.bincount(per_class) == 50)
    assert set(per_class[:1000]) == set(range(1000))     # every shard of 1000 has every class
    uniform = imagenet_eval.eval_labels(2000, 10, "uniform", seed=3)
    assert uniform.min() >= 0 and uniform.max() < 10 and len(set(uniform)) == 10
    np.testing.assert_array_equal(uniform, imagenet_eval.eval_labels(2000, 10, "uniform", 3))
    assert not np.array_equal(uniform, imagenet_eval.eval_labels(2000, 10, "uniform", 4))
    with pytest.raises(config_io.ConfigError, match="config.eval.labels='random'"):
        imagenet_eval.eval_labels(10, 10, "random", 0)


# ------------------------------------------------------------------------------ SSIM, PSNR
def _ssim_reference(x, y):
    """SSIM as skimage computes it (gaussian_weights=True, sigma=1.5, truncate=3.5,
    use_sample_covariance=False, data_range=255): scipy's Gaussian filter over the whole
    image, then the SSIM map cropped by the window radius 5 and averaged, per channel."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    out = []
    for a, b in zip(np.asarray(x, np.float64), np.asarray(y, np.float64)):
        per_channel = []
        for ch in range(a.shape[-1]):
            p, q = a[..., ch], b[..., ch]
            f = lambda z: ndimage.gaussian_filter(z, sigma=1.5, truncate=3.5)  # noqa: E731
            mp, mq = f(p), f(q)
            vp, vq, cov = f(p * p) - mp ** 2, f(q * q) - mq ** 2, f(p * q) - mp * mq
            s = ((2 * mp * mq + c1) * (2 * cov + c2)) / ((mp ** 2 + mq ** 2 + c1) * (vp + vq + c2))
            per_channel.append(s[5:-5, 5:-5].mean())
        out.append(np.mean(per_channel))
    return np.array(out)


def test_ssim_against_an_independent_reference_and_hand_cases():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 20, 23, 3), np.uint8)
    noise = rng.normal(0, 25, x.shape)
    y = np.clip(x + noise, 0, 255).astype(np.uint8)
    np.testing.assert_allclose(imagenet_eval.ssim(x, y), _ssim_reference(x, y), atol=1e-5)
    np.testing.assert_allclose(imagenet_eval.ssim(x, x), 1.0, atol=1e-6)
    # Constant images a and b: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b, c1 = 100.0, 140.0, (0.01 * 255) ** 2
    flat_a = np.full((1, 16, 16, 3), a, np.uint8)
    flat_b = np.full((1, 16, 16, 3), b, np.uint8)
    want = (2 * a * b + c1) / (a * a + b * b + c1)
    np.testing.assert_allclose(imagenet_eval.ssim(flat_a, flat_b), want, rtol=1e-6)
    with pytest.raises(ValueError, match="H, W >= 11"):
        imagenet_eval.ssim(x[:, :8], y[:, :8])


def test_psnr_uint8_hand_case():
    x = np.zeros((2, 4, 4, 3), np.uint8)
    y = x.copy()
    y[0] += 10                                    # mse 100 -> 10 log10(255^2 / 100)
    psnr = imagenet_eval.psnr_uint8(y, x)
    assert psnr[0] == pytest.approx(10 * np.log10(255 ** 2 / 100)) and psnr[1] == np.inf


# ------------------------------------------------------------------------------ LlamaGen ready
def test_llamagen_weights_sample_through_the_pipeline_without_training(tmp_path):
    """The parity fixtures as a 'ready model': tokenizer num_steps=0 + init_from, generator
    train.init_from; --mode=sample converts and exports both, and greedy raster sampling of
    the exported params gives LlamaGen's own greedy tokens."""
    from radar_jax import convert  # pylint: disable=import-outside-toplevel
    gpt_path = shared_fixture("llamagen_gpt_tiny.npz")
    vq_path = shared_fixture("llamagen_vq_tiny.npz")
    data = np.load(gpt_path)
    vq_config, _ = convert.load_llamagen_vq(vq_path)
    gpt_config, _ = convert.load_llamagen_gpt(gpt_path)
    labels = tuple(int(c) for c in data["greedy_labels"])
    config = config_io.load_config(str(REPO / "configs/demo.py"), **{
        "tokenizer.init_from": str(vq_path), "tokenizer.num_steps": 0,
        "tokenizer.eval_batches": 1, "tokenizer.eval_batch_size": 16,
        "train.init_from": str(gpt_path), "schedule.kind": "raster", "tpt.enabled": False,
        "sample.labels": labels, "sample.num_per_class": 1, "sample.top_k": 1,
        "sample.cfg_scale": 1.0, "sample.batch_size": 2})
    config.tokenizer.model = vq_config
    config.model = gpt_config
    pipeline.run(config, str(tmp_path / "w"), mode="sample")
    record = json.loads((tmp_path / "w" / "generator" / "finished.json").read_text())
    assert record["init_from"] == str(gpt_path) and record["step"] == 0
    with np.load(tmp_path / "w" / "samples" / "codes.npz") as out:
        codes, got_labels = out["codes"], out["labels"]
    np.testing.assert_array_equal(got_labels, labels)
    np.testing.assert_array_equal(codes.reshape(len(labels), -1), data["greedy_cfg1"])


# ------------------------------------------------------------------------------ end to end
def _shapes_folder(root: pathlib.Path, per_class: int = 50, size: int = 32) -> pathlib.Path:
    """4 classes of coloured shapes on noise, as PNGs in root/<class>/ (an image folder)."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    colours = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 210, 40)]
    for c, colour in enumerate(colours):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 60, (size, size, 3)).astype(np.float64)
            cy, cx, r = rng.integers(10, 22), rng.integers(10, 22), rng.integers(5, 10)
            mask = [(abs(yy - cy) <= r) & (abs(xx - cx) <= r),            # square
                    (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r,             # disc
                    (yy >= cy - r) & (abs(xx - cx) <= (yy - cy + r) / 2),  # triangle
                    ((xx // 4) % 2 == 0) & (abs(yy - cy) <= r)][c]        # stripes
            img[mask] = colour
            Image.fromarray(img.astype(np.uint8)).save(root / f"class{c}" / f"{i:03d}.png")
    return root


def _eval_flags(inception, folder):
    return {"eval.inception_path": str(inception), "eval.reference": str(folder),
            "eval.num_samples": 32, "eval.shard_size": 8, "eval.batch_size": 8,
            "eval.inception_batch_size": 32, "tokenizer.data.path": str(folder)}


def _cli_eval(workdir, flags):
    args = [sys.executable, "-m", "radar_jax.main", "--config=configs/demo.py",
            f"--workdir={workdir}", "--mode=eval", "--config.tpt.enabled=False",
            "--config.tokenizer.data.source=imagefolder", "--config.model.num_classes=4"]
    return args + [f"--config.{k}={v}" for k, v in flags.items()]


@pytest.mark.slow
def test_eval_end_to_end_with_kill_and_resume(tmp_path):
    from radar_jax.convert import inception as convert  # pylint: disable=C0415
    from radar_jax.metrics import inception as inception_lib  # pylint: disable=C0415
    # 32 reference images, one Inception batch (the random-weight Inception runs at ~5 images/s
    # on 2 cores: the reference once, then the 32 samples in the straight run and in the rerun;
    # the reference statistics are cached beside the folder).
    folder = _shapes_folder(tmp_path / "shapes", per_class=8)
    inception = tmp_path / "inception.npz"
    np.savez(inception, **convert.to_state_dict(inception_lib.random_variables(0)))
    # The tiny tokenizer (16px, the folder's images resized) and generator, two steps each,
    # trained in this process stage by stage (no sample stage: the eval is what is tested; no
    # RDS, whose length buckets would each compile a train step; one sampler scan body).
    flags = {**TINY_TOKENIZER, "tokenizer.data.source": "imagefolder", "tokenizer.num_steps": 2,
             "tokenizer.ckpt_every": 2, "tokenizer.log_every": 1,
             "tokenizer.eval_batch_size": 32, "tokenizer.loss.disc_start": 1000,
             "model.num_classes": 4, "train.num_steps": 2, "train.ckpt_every": 2,
             "train.log_every": 1, "train.rds": False, "tpt.enabled": False,
             "sample.max_groups": 1, **_eval_flags(inception, folder)}
    config = config_io.load_config(str(REPO / "configs/demo.py"), **flags)
    trained = tmp_path / "trained"
    for mode in ("train_vq", "cache_tokens", "train"):
        pipeline.run(config, str(trained), mode=mode)
    resumed = tmp_path / "resumed"
    shutil.copytree(trained, resumed)

    # Uninterrupted, in this process (its compiles land in the session's persistent cache,
    # which the command-line runs below then read).
    straight = tmp_path / "straight"
    shutil.copytree(trained, straight)
    pipeline.run(config, str(straight), mode="eval")
    rows = json.loads((straight / "samples" / "eval" / "metrics.json").read_text())
    assert len(rows) == 1
    row = rows[0]
    assert (row["cfg_scale"], row["num_steps"], row["num_samples"]) == (2.0, 7, 32)
    for key in ("fid", "sfid", "inception_score", "precision", "recall", "images_per_s",
                "seconds"):
        assert np.isfinite(row[key]), key
    assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1

    # Interrupted: SIGKILL once the first shard file is on disk, then the same command again.
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # with conftest's shared compilation cache
    cli_flags = {k: v for k, v in flags.items()
                 if k.startswith(("eval.", "sample.", "tokenizer.data.", "tokenizer.model."))}
    setting_dir = resumed / "samples" / "eval" / "cfg2_steps7"
    proc = subprocess.Popen(_cli_eval(resumed, cli_flags), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 900
        while proc.poll() is None and time.time() < deadline:
            if list(setting_dir.glob("shard-*.npz")):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the eval finished (or hung) before the kill"
    shards_at_kill = len(list(setting_dir.glob("shard-*.npz")))
    assert 1 <= shards_at_kill < 4 and not (setting_dir / "samples.npz").exists()
    rerun = subprocess.run(_cli_eval(resumed, cli_flags), cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=900, check=False)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming at shard {shards_at_kill} of 4" in rerun.stderr

    with np.load(straight / "samples" / "eval" / "cfg2_steps7" / "samples.npz") as a, \
            np.load(setting_dir / "samples.npz") as b:
        assert a["arr_0"].shape == (32, 16, 16, 3) and a["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], np.arange(32) % 4)
    again = json.loads((resumed / "samples" / "eval" / "metrics.json").read_text())[0]
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert again[key] == pytest.approx(row[key], rel=1e-5), key
