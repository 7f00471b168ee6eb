"""The main job: every stage of a config, run, resumed, or skipped when finished, in order.

Stages and their folders in the workdir of a pipeline config (configs/demo.py, b.py, ...):
  train_vq      tokenizer/   the tokenizer run (checkpoints, metrics, reconstructions.png, params/)
  cache_tokens  tokens/      the training set encoded once: train.npz (codes, labels)
  train         generator/   the RadAR transformer (checkpoints, metrics, params/)
  sample        samples/     samples.png (a row per class), growth.gif, codes.npz
  eval          samples/     metrics.json: sample quality (digits: classifier accuracy and
                             Frechet distance) per step count and with correction on and off
A tokenizer-only config (configs/demo_vq.py, vq16.py) has just the train_vq stage, in workdir.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from radar_jax import checkpoint as ckpt_lib
from radar_jax import data as data_lib

MODES = ("all", "train_vq", "cache_tokens", "train", "sample", "eval")


def _is_tokenizer_config(config: ml_collections.ConfigDict) -> bool:
    """Tokenizer-only configs are a tokenizer run at the top level (no generator sections)."""
    return "tokenizer" not in config


def tokenizer_stage(config: ml_collections.ConfigDict, workdir: str):
    """(tokenizer run config, its workdir) for either kind of config."""
    if _is_tokenizer_config(config):
        return config, workdir
    return config.tokenizer, os.path.join(workdir, "tokenizer")


def load_config(path: str, **overrides) -> ml_collections.ConfigDict:
    """`get_config()` of a config file (as --config=path does), with field overrides given as
    dotted keys: load_config("configs/demo.py", **{"train.num_steps": 10})."""
    spec = importlib.util.spec_from_file_location("radar_jax_config", path)
    if spec is None or not os.path.exists(path):
        raise FileNotFoundError(f"No config file at {path}: pass e.g. configs/demo.py.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def _read_json(path: str):
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _tokenizer_done(vq_config, vq_workdir) -> bool:
    done = _read_json(os.path.join(vq_workdir, "eval.json"))
    return bool(done and done.get("step") == vq_config.num_steps
                and os.path.isdir(os.path.join(vq_workdir, "params")))


def load_tokenizer(vq_config, vq_workdir):
    """(VQModel, params) of a finished tokenizer stage."""
    from radar_jax.models import vq as vq_lib  # pylint: disable=g-import-not-at-top
    path = os.path.join(vq_workdir, "params")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"No tokenizer params at {path}: run the tokenizer stage first "
                                "(--mode=train_vq, or --mode=all).")
    return vq_lib.VQModel(vq_config.model), ckpt_lib.load_params(path)


def cache_tokens(config, workdir) -> str:
    """Encodes the tokenizer's training split once; returns the cache path (skips if present)."""
    vq_config, vq_workdir = tokenizer_stage(config, workdir)
    path = os.path.join(workdir, "tokens", "train.npz")
    if os.path.exists(path):
        logging.info("Token cache %s exists: skipping the encode stage.", path)
        return path
    model, params = load_tokenizer(vq_config, vq_workdir)
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))
    augment = config.tokens.augment
    if augment not in ("none", "flip", "tencrop"):
        raise ValueError(f"config.tokens.augment={augment!r}: use 'none', 'flip' or 'tencrop'.")
    data_config = vq_config.data.copy_and_resolve_references()
    size = data_config.image_size
    if augment == "tencrop":  # LlamaGen: ten crops of a 1.1x center-resized image
        data_config.image_size = int(round(size * 1.1))
    ds = data_lib.make_image_dataset(data_config, data_config.train_split,
                                     config.tokens.batch_size, seed=0, train=False,
                                     num_epochs=1, drop_remainder=False)
    codes, labels = [], []
    t0 = time.perf_counter()
    for batch in ds:
        # Each augmented view is its own training example, as in LlamaGen's extract_codes.
        for view in augmented_views(jnp.asarray(batch["image"]), augment, size):
            codes.append(np.asarray(encode(params, view)))
            labels.append(np.asarray(batch["label"]))
    codes, labels = np.concatenate(codes), np.concatenate(labels)
    data_lib.save_token_cache(path, codes, labels, dict(augment=augment,
                                                        tokenizer=vq_workdir))
    logging.info("Encoded %d token maps %s in %.1fs -> %s", len(codes), codes.shape[1:],
                 time.perf_counter() - t0, path)
    return path


def augmented_views(images_BHWC, augment: str, size: int) -> list:
    """The views the token cache stores per image: itself; + its flip; or LlamaGen's ten crops
    (4 corners and the center of a `size` crop from the 1.1x image, each also flipped)."""
    if augment == "none":
        return [images_BHWC]
    if augment == "flip":
        return [images_BHWC, images_BHWC[:, :, ::-1]]
    big = images_BHWC.shape[1]
    m, c = big - size, (big - size) // 2
    crops = [images_BHWC[:, y:y + size, x:x + size]
             for y, x in ((0, 0), (0, m), (m, 0), (m, m), (c, c))]
    return crops + [crop[:, :, ::-1] for crop in crops]


def _generator_done(config, workdir) -> bool:
    gen = os.path.join(workdir, "generator")
    ckpt_dir = os.path.join(gen, "checkpoints")
    if not os.path.isdir(os.path.join(gen, "params")) or not os.path.isdir(ckpt_dir):
        return False
    steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()]
    return bool(steps) and max(steps) >= config.train.num_steps


def run(config: ml_collections.ConfigDict, workdir: str, mode: str = "all"):
    """Runs `mode` ('all' or one stage) of `config` in `workdir`."""
    if mode not in MODES:
        raise ValueError(f"--mode={mode!r}: choose one of {', '.join(MODES)}.")
    vq_config, vq_workdir = tokenizer_stage(config, workdir)
    # Fail at once, before any compile, when the dataset is not there: one message, no trace.
    try:
        data_lib.check_data_available(vq_config.data)
    except data_lib.DataUnavailableError as e:
        prefix = "--config.data." if _is_tokenizer_config(config) else "--config.tokenizer.data."
        raise SystemExit(f"radar_jax: {str(e).replace('--config.data.', prefix)}") from None
    if not vq_config.num_steps and not vq_config.init_from:
        raise SystemExit("radar_jax: the tokenizer has num_steps=0 and no init_from: pass the "
                         "LlamaGen VQ-16 checkpoint you downloaded, e.g. "
                         "--config.tokenizer.init_from=/path/to/vq_ds16_c2i.pt (or train one "
                         "with --config.tokenizer.num_steps=N).")
    if _is_tokenizer_config(config) and mode not in ("all", "train_vq"):
        raise ValueError(f"--mode={mode} needs a pipeline config (e.g. configs/demo.py); "
                         "this config only defines a tokenizer (use --mode=train_vq).")
    t0 = time.perf_counter()
    if mode == "train_vq" or (mode == "all" and not _tokenizer_done(vq_config, vq_workdir)):
        from radar_jax import train_vq  # pylint: disable=g-import-not-at-top
        metrics = train_vq.train_and_evaluate(vq_config, vq_workdir)
        logging.info("Tokenizer: %s", {k: round(v, 4) for k, v in metrics.items()})
    elif mode == "all":
        logging.info("Tokenizer stage finished earlier (%s): skipping.", vq_workdir)
    if _is_tokenizer_config(config):
        return
    if mode in ("all", "cache_tokens"):
        cache_tokens(config, workdir)
    if mode == "train" or (mode == "all" and not _generator_done(config, workdir)):
        from radar_jax import train  # pylint: disable=g-import-not-at-top
        tokens_path = os.path.join(workdir, "tokens", "train.npz")
        train.train_and_evaluate(config, os.path.join(workdir, "generator"), tokens_path)
    elif mode == "all":
        logging.info("Generator stage finished earlier: skipping.")
    if mode in ("all", "sample", "eval"):
        from radar_jax import sample_eval  # pylint: disable=g-import-not-at-top
        out = os.path.join(workdir, "samples")
        if mode in ("all", "sample"):
            sample_eval.write_samples(config, workdir, out)
        if mode in ("all", "eval"):
            table = sample_eval.evaluate(config, workdir, out)
            if table:
                print(sample_eval.format_table(table), flush=True)
    logging.info("Done in %.1f min. Outputs in %s", (time.perf_counter() - t0) / 60, workdir)
