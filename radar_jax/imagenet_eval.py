r"""The eval stage on ImageNet (any non-digit data): ADM's metrics of N samples, or of the
tokenizer's reconstructions.

  python -m radar_jax.main --config=configs/imagenet.py:XL --workdir=DIR --mode=eval \
      --config.eval.inception_path=weights-inception-2015-12-05-6726825d.pth \
      --config.eval.reference=VIRTUAL_imagenet256_labeled.npz

`config.eval.what='samples'` (default): for every setting of the sweep config.eval.cfg_scales x
config.eval.num_steps, sample `num_samples` images (labels 50 per class, the VAR / MAR protocol,
or uniformly random, LlamaGen's), decode them, and write

  samples/eval/<setting>/shard-00012.p0-of-1.npz   (process 0's part of shard 12, as it goes)
  samples/eval/<setting>/samples.npz               (ADM format: arr_0 uint8 (N, H, W, 3),
                                                     arr_1 int32 (N,) labels; process 0)
  samples/eval/metrics.json                        (one row per setting: fid, sfid,
                                                     inception_score, precision, recall, ...)

Resuming: shard s of a setting is drawn from fold_in(key(seed), s) (then one key per process
and per batch), so a killed run starts again at the first shard a process has not written and
ends with the same samples.npz as an uninterrupted run (same seed, shard_size, batch_size,
process and local device counts). Every process samples its contiguous part of each shard on
its local devices (see `sample_images`); shard files must be on storage all processes see
(gs://, NFS).

`config.eval.what='reconstruction'`: the tokenizer's quality on the held-out split, as
LlamaGen's `reconstruction_vq_ddp` reports it: rFID (FID of the reconstructions against the
originals, with this Inception), PSNR and SSIM (Gaussian 11x11 window, sigma 1.5, on uint8
values), into samples/eval/reconstruction.json.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np

from radar_jax import config_io
from radar_jax import fileio
from radar_jax import reporting
from radar_jax import samples as samples_lib
from radar_jax import sampling
from radar_jax import workdir as workdir_lib
from radar_jax.metrics import adm

LABEL_PROTOCOLS = ("per_class", "uniform")
WHAT = ("samples", "reconstruction")


# ------------------------------------------------------------------------------ labels, settings
def eval_labels(num_samples: int, num_classes: int, protocol: str, seed: int) -> np.ndarray:
    """(N,) int32 class labels of an evaluation run.

    'per_class': labels i % num_classes, i.e. N / C of each class (50 per class for 50,000 on
    ImageNet, VAR's and MAR's protocol), interleaved so every shard sees every class.
    'uniform': uniformly random classes from `seed` (LlamaGen's sample_ddp draws
    torch.randint per batch; the same distribution, drawn once here).
    """
    if protocol == "per_class":
        return (np.arange(num_samples) % num_classes).astype(np.int32)
    if protocol == "uniform":
        rng = np.random.default_rng([int(seed), 0x1AB])
        return rng.integers(0, num_classes, num_samples).astype(np.int32)
    raise config_io.ConfigError(f"config.eval.labels={protocol!r}: use one of "
                                f"{', '.join(LABEL_PROTOCOLS)}.")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One row of the sweep: the sampler options and schedule it samples with."""
    options: samples_lib.SampleOptions
    schedule: object
    band: int | None

    @property
    def name(self) -> str:
        name = f"cfg{self.options.cfg_scale:g}_steps{self.schedule.num_steps}"
        return name + (f"_band{self.band}" if self.band else "")


def settings_of(config, wd: workdir_lib.Workdir) -> list[Setting]:
    """The sweep config.eval.cfg_scales x config.eval.num_steps (() = config.sample's)."""
    e, s = config.eval, config.sample
    trained, trained_band = wd.trained_schedule()
    out = {}
    for cfg in tuple(e.cfg_scales) or (s.cfg_scale,):
        options = samples_lib.SampleOptions.from_config(s, cfg_scale=float(cfg))
        for steps in tuple(e.num_steps) or (s.num_steps,):
            try:
                schedule, band = samples_lib.sampling_schedule(
                    trained, trained_band, kind=s.schedule, num_steps=int(steps),
                    band=s.correction_band, grid=tuple(s.get("grid", ())))
            except ValueError as err:
                raise config_io.ConfigError(str(err)) from None
            setting = Setting(options, schedule, band)
            out.setdefault(setting.name, setting)  # raster: one row whatever the steps asked
    return list(out.values())


# ------------------------------------------------------------------------------ sampling
def sample_images(device_params, model_config, setting: Setting, labels, key, decode, *,
                  batch_size: int) -> np.ndarray:
    """uint8 (n, H, W, 3) images of `labels` (n,), in batches of `batch_size`.

    `device_params` holds one copy of the generator's params per local device. Batch j is
    split into one contiguous chunk per device, chunk d drawn from fold_in(fold_in(key, j), d)
    on device d: the calls are dispatched asynchronously, so the devices sample in parallel
    (the sampler itself is single-device).
    """
    options = dataclasses.asdict(setting.options)
    codes = []
    for j, start in enumerate(range(0, len(labels), batch_size)):
        batch = np.asarray(labels[start:start + batch_size])
        chunks = np.array_split(batch, min(len(device_params), len(batch)))
        codes.append([sampling.sample(device_params[d], model_config, setting.schedule, chunk,
                                      jax.random.fold_in(jax.random.fold_in(key, j), d),
                                      correction_band=setting.band, **options)
                      for d, chunk in enumerate(chunks)])
    return np.concatenate([reporting.to_uint8(decode(np.concatenate([np.asarray(c)
                                                                     for c in batch])))
                           for batch in codes])


def _shard_path(folder, shard: int, process: int, processes: int):
    return folder / f"shard-{shard:05d}.p{process}-of-{processes}.npz"


def _load_npz(path) -> dict:
    with path.open("rb") as f, np.load(f, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _save_large_npz(path, **arrays) -> None:
    """np.savez streamed to a temporary name, then renamed: 10 GB of samples are not also
    held in a second in-memory buffer, and a killed run leaves no half-written npz."""
    path = fileio.path(path)
    tmp = path.parent / f".{path.name}.tmp-{jax.process_index()}"
    with tmp.open("wb") as f:
        np.savez(f, **arrays)
    tmp.replace(path)


def _check_setting_record(folder, record: dict) -> None:
    """A folder written with other options must not be resumed into a mixed sample set."""
    old = fileio.read_json(folder / "setting.json")
    if old is None:
        if jax.process_index() == 0:
            fileio.write_json(folder / "setting.json", record)
        return
    changed = [f"{k}: was {old.get(k)!r}, now {v!r}" for k, v in record.items()
               if old.get(k) != v]
    if changed:
        raise config_io.ConfigError(
            f"{folder} holds samples made with other settings ({'; '.join(changed)}); delete "
            "that folder to sample again, or restore those values.")


def generate_setting(config, wd, setting: Setting, device_params, decode
                     ) -> tuple[object, float]:
    """Samples (or resumes) one setting's shards; returns (samples.npz path, seconds of
    sampling + decoding summed over the shards, slowest process per shard)."""
    e = config.eval
    folder = wd.stage(workdir_lib.SAMPLES) / "eval" / setting.name
    final = folder / "samples.npz"
    folder.mkdir(parents=True, exist_ok=True)
    pi, pc = jax.process_index(), jax.process_count()
    generator_step = (wd.record(workdir_lib.GENERATOR) or {}).get("step")
    _check_setting_record(folder, dict(
        dataclasses.asdict(setting.options), steps=setting.schedule.num_steps,
        kind=setting.schedule.kind, band=setting.band, num_samples=e.num_samples,
        labels=e.labels, seed=e.seed, shard_size=e.shard_size, batch_size=e.batch_size,
        processes=pc, local_devices=len(device_params), generator_step=generator_step))
    labels = eval_labels(e.num_samples, config.model.num_classes, e.labels, e.seed)
    num_shards = -(-e.num_samples // e.shard_size)
    if not final.exists():
        todo = [s for s in range(num_shards) if not _shard_path(folder, s, pi, pc).exists()]
        if todo and todo[0]:
            logging.info("Eval %s: resuming at shard %d of %d.", setting.name, todo[0],
                         num_shards)
        progress = reporting.Progress(f"eval {setting.name} (shards)", num_shards,
                                      num_shards - len(todo), every=1)
        for shard in todo:
            t0 = time.perf_counter()
            mine = np.array_split(labels[shard * e.shard_size:(shard + 1) * e.shard_size],
                                  pc)[pi]
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(e.seed), shard), pi)
            images = sample_images(device_params, config.model, setting, mine, key, decode,
                                   batch_size=e.batch_size)
            reporting.save_npz(_shard_path(folder, shard, pi, pc), images=images, labels=mine,
                               seconds=np.float64(time.perf_counter() - t0))
            progress.update(num_shards - len(todo) + todo.index(shard) + 1)
        progress.close()
        if pc > 1:  # every process's shards are on disk before process 0 reads them
            multihost_utils.sync_global_devices(f"radar_jax eval {setting.name}")
    seconds = 0.0
    if pi == 0 and not final.exists():
        images, out_labels = [], []
        for shard in range(num_shards):
            parts = [_load_npz(_shard_path(folder, shard, p, pc)) for p in range(pc)]
            images += [part["images"] for part in parts]
            out_labels += [part["labels"] for part in parts]
            seconds += max(float(part["seconds"]) for part in parts)
        _save_large_npz(final, arr_0=np.concatenate(images), arr_1=np.concatenate(out_labels))
        fileio.write_json(folder / "timing.json", dict(seconds=seconds))
        logging.info("Wrote %s (%d images).", final, e.num_samples)
    elif pi == 0:
        seconds = (fileio.read_json(folder / "timing.json") or {}).get("seconds", 0.0)
    return final, seconds


# ------------------------------------------------------------------------------ the stage
def _inception(e):
    from radar_jax.convert import inception as convert_inception  # pylint: disable=C0415
    try:
        return convert_inception.inception_from_file(e.inception_path)
    except ValueError as err:
        raise config_io.ConfigError(f"config.eval.inception_path={e.inception_path!r}: "
                                    f"{err}") from None


def _reference(e, inception) -> adm.ReferenceStats:
    try:
        return adm.reference_stats(e.reference, inception, batch_size=e.inception_batch_size,
                                   use_npz_stats=e.use_npz_stats)
    except ValueError as err:
        raise config_io.ConfigError(f"config.eval.reference={e.reference!r}: {err}") from None


def check_config(e) -> None:
    """What a typo breaks, before anything samples (raises ConfigError naming the field)."""
    if e.what not in WHAT:
        raise config_io.ConfigError(f"config.eval.what={e.what!r}: use one of {', '.join(WHAT)}.")
    if e.labels not in LABEL_PROTOCOLS:
        raise config_io.ConfigError(f"config.eval.labels={e.labels!r}: use one of "
                                    f"{', '.join(LABEL_PROTOCOLS)}.")
    for name in ("num_samples", "batch_size", "shard_size", "inception_batch_size"):
        if e[name] < 1:
            raise config_io.ConfigError(f"config.eval.{name}={e[name]}: use a value >= 1.")
    if e.what == "samples" and e.num_samples < 4:
        raise config_io.ConfigError(f"config.eval.num_samples={e.num_samples}: Precision / "
                                    "Recall (k=3 neighbours) need at least 4 (ADM uses 50000).")
    if e.what == "samples" and not e.reference:
        raise config_io.ConfigError("config.eval.reference is empty: pass ADM's reference batch "
                                    "(VIRTUAL_imagenet256_labeled.npz) or an image folder.")


def evaluate(config, wd: workdir_lib.Workdir) -> list[dict]:
    """The eval stage (see the module docstring); returns the rows written to metrics.json
    (process 0; the other processes return [] after sampling their parts)."""
    e = config.eval
    check_config(e)
    if e.what == "reconstruction":
        return [reconstruction(config, wd)]
    inception = _inception(e)
    ref = _reference(e, inception) if jax.process_index() == 0 else None
    params = wd.params(workdir_lib.GENERATOR)
    device_params = [jax.device_put(params, device) for device in jax.local_devices()]
    decode = samples_lib.make_decoder(config.tokenizer.model, wd.decoder_params())
    rows = []
    for setting in settings_of(config, wd):
        path, seconds = generate_setting(config, wd, setting, device_params, decode)
        if jax.process_index() != 0:
            continue
        t0 = time.perf_counter()
        images = adm.load_images(path)
        if images.dtype != np.uint8 or images.shape[0] != e.num_samples:
            raise RuntimeError(f"{path}: {images.shape} {images.dtype}, expected "
                               f"({e.num_samples}, H, W, 3) uint8")
        metrics = adm.compute_metrics(inception, images, ref, batch_size=e.inception_batch_size)
        o = setting.options
        rows.append(dict(
            setting=setting.name, cfg_scale=o.cfg_scale, num_steps=setting.schedule.num_steps,
            schedule=setting.schedule.kind, correction_band=setting.band or 0,
            temperature=o.temperature, top_k=o.top_k, top_p=o.top_p, labels=e.labels,
            **metrics, images_per_s=e.num_samples / seconds if seconds else None,
            seconds=round(seconds, 2), metric_seconds=round(time.perf_counter() - t0, 2),
            samples_npz=str(path), reference=str(e.reference), reference_stats=ref.source))
        logging.info("Eval %s", rows[-1])
        fileio.write_json(wd.stage(workdir_lib.SAMPLES) / "eval" / "metrics.json", rows)
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table of evaluate()'s rows."""
    if rows and "rfid" in rows[0]:
        return "\n".join(["| rFID | PSNR | SSIM | images |", "|---|---|---|---|"] + [
            f"| {r['rfid']:.3f} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['num_images']} |"
            for r in rows])
    lines = ["| cfg | steps | FID | sFID | IS | precision | recall | images/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ips = f"{r['images_per_s']:.1f}" if r["images_per_s"] else "-"
        lines.append(f"| {r['cfg_scale']:g} | {r['num_steps']} | {r['fid']:.3f} | "
                     f"{r['sfid']:.3f} | {r['inception_score']:.2f} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {ips} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ reconstruction
def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-x ** 2 / (2.0 * sigma ** 2))
    return (g / g.sum()).astype(np.float32)


@jax.jit
def _ssim_jit(x_NHWC, y_NHWC):
    g = jnp.asarray(_gaussian_window())
    c = x_NHWC.shape[-1]

    def blur(z):  # separable 'valid' Gaussian filter, per channel
        z = jnp.moveaxis(z, -1, 1).reshape(-1, 1, *z.shape[1:3])        # (N*C, 1, H, W)
        for kernel in (g.reshape(1, 1, -1, 1), g.reshape(1, 1, 1, -1)):
            z = jax.lax.conv_general_dilated(z, kernel, (1, 1), "VALID",
                                             precision=jax.lax.Precision.HIGHEST)
        return z.reshape(-1, c, *z.shape[2:])                              # (N, C, H', W')

    c1, c2 = (0.01 * 255.0) ** 2, (0.03 * 255.0) ** 2
    # Local (co)variances as E[ab] - E[a]E[b] lose float32 digits to cancellation at pixel
    # values ~200; around each image's own channel means the moments are small and exact.
    x0 = jnp.mean(x_NHWC, axis=(1, 2), keepdims=True)
    y0 = jnp.mean(y_NHWC, axis=(1, 2), keepdims=True)
    xc, yc = x_NHWC - x0, y_NHWC - y0
    dx, dy = blur(xc), blur(yc)
    vx, vy, cov = blur(xc * xc) - dx * dx, blur(yc * yc) - dy * dy, blur(xc * yc) - dx * dy
    mx = dx + jnp.moveaxis(x0, -1, 1)
    my = dy + jnp.moveaxis(y0, -1, 1)
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return jnp.mean(s, axis=(1, 2, 3))


def ssim(x, y) -> np.ndarray:
    """Per-image SSIM (Wang et al. 2004) of uint8 (N, H, W, 3) images, H, W >= 11.

    The standard form: an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03 on the 0..255
    range, population (not sample) local variances, the mean of the SSIM map over the positions
    where the window fits and over the channels (skimage's structural_similarity with
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255).
    Returns float64 (N,).
    """
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    if x.shape != y.shape or x.ndim != 4 or min(x.shape[1:3]) < 11:
        raise ValueError(f"ssim needs two (N, H, W, C) arrays of one shape with H, W >= 11, got "
                         f"{x.shape} and {y.shape}")
    return np.asarray(_ssim_jit(jnp.asarray(x), jnp.asarray(y)), np.float64)


def psnr_uint8(x, y) -> np.ndarray:
    """Per-image PSNR in dB of uint8 (N, ...) images, range 255 (+inf where equal). (N,)"""
    diff = np.asarray(x, np.float64) - np.asarray(y, np.float64)
    mse = np.mean(diff.reshape(diff.shape[0], -1) ** 2, axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(255.0 ** 2 / mse)


def reconstruction(config, wd: workdir_lib.Workdir) -> dict:
    """rFID, PSNR and SSIM of the tokenizer on config.tokenizer.data's held-out split (at most
    config.eval.num_samples images), encoded with the tokenizer and decoded with the decoder
    every later stage uses (the post-trained one when that stage finished). Process 0 runs it.
    """
    from radar_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    from radar_jax.models import vq as vq_lib  # pylint: disable=g-import-not-at-top
    e, d = config.eval, config.tokenizer.data
    if jax.process_index() != 0:
        return {}
    inception = _inception(e)
    model = vq_lib.VQModel(config.tokenizer.model)
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))
    decode = samples_lib.make_decoder(config.tokenizer.model, wd.decoder_params())
    encoder_params = wd.params(workdir_lib.TOKENIZER)
    ds = data_lib.make_image_dataset(d, d.eval_split, e.batch_size, seed=0, train=False,
                                     num_epochs=1, drop_remainder=False)
    t0 = time.perf_counter()
    originals, recons = [], []
    count = 0
    for batch in ds:
        images = batch["image"][:e.num_samples - count]
        codes = np.asarray(encode(encoder_params, jnp.asarray(images)))
        originals.append(reporting.to_uint8(images))
        recons.append(reporting.to_uint8(decode(codes)))
        count += len(images)
        if count >= e.num_samples:
            break
    originals, recons = np.concatenate(originals), np.concatenate(recons)
    feats = {name: inception.features(x, batch_size=e.inception_batch_size, keys=("pool",))
             ["pool"] for name, x in (("original", originals), ("recon", recons))}
    result = dict(
        rfid=adm.frechet_distance(*adm.statistics(feats["recon"]),
                                  *adm.statistics(feats["original"])),
        psnr=float(np.mean(psnr_uint8(recons, originals))),
        ssim=float(np.mean(np.concatenate([ssim(recons[i:i + 256], originals[i:i + 256])
                                           for i in range(0, len(recons), 256)]))),
        num_images=int(len(recons)), split=d.eval_split,
        decoder="TPT" if wd.is_finished(workdir_lib.TOKENIZER_TPT) else "original",
        seconds=round(time.perf_counter() - t0, 2))
    fileio.write_json(wd.stage(workdir_lib.SAMPLES) / "eval" / "reconstruction.json", result)
    logging.info("Tokenizer reconstruction quality: %s", result)
    return result
