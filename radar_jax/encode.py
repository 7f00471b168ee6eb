"""The encode stage: the tokenizer's training split, encoded once into the token cache.

Generator training reads codes, never pixels, so the tokenizer runs over the dataset once. Each
augmented view of an image (`config.tokens.augment`) is its own cached example, as in
LlamaGen's extract_codes: 'none' (the image), 'flip' (it and its mirror image) or 'tencrop'
(LlamaGen's five crops of a 1.1x resize, each also flipped).
"""

from __future__ import annotations

import logging
import time

import jax
from jax.experimental import multihost_utils
import numpy as np

from radar_jax import config_io
from radar_jax import data as data_lib
from radar_jax import workdir as workdir_lib
from radar_jax.models import vq as vq_lib

AUGMENTS = ("none", "flip", "tencrop")


def augmented_views(images_BHWC, augment: str, size: int) -> list:
    """The views the token cache stores per image: itself; + its flip; or LlamaGen's ten crops
    (4 corners and the center of a `size` crop from the 1.1x image, each also flipped).

    images_BHWC: (B, S', S', C) with S' = size, or the 1.1x size for 'tencrop'.
    Returns a list of (B, size, size, C) arrays, one per view.
    """
    if augment == "none":
        return [images_BHWC]
    if augment == "flip":
        return [images_BHWC, images_BHWC[:, :, ::-1]]
    big = images_BHWC.shape[1]
    m, c = big - size, (big - size) // 2
    crops = [images_BHWC[:, y:y + size, x:x + size]
             for y, x in ((0, 0), (0, m), (m, 0), (m, m), (c, c))]
    return crops + [crop[:, :, ::-1] for crop in crops]


def cache_facts(config) -> dict:
    """What a token cache must agree with to be reused: the tokenizer's data and codebook, the
    augmentation. A cache written under other facts is stale (see `encode_dataset`)."""
    vq = config.tokenizer
    return dict(augment=config.tokens.augment, image_size=int(vq.data.image_size),
                source=vq.data.source, split=vq.data.train_split,
                codebook_size=int(vq.model.codebook_size))


def encode_dataset(config, wd: workdir_lib.Workdir):
    """Encodes the tokenizer's training split into `wd.token_cache`; returns its path.

    Skipped when the cache exists and was written with the same facts (`cache_facts`).
    """
    path = wd.token_cache
    augment = config.tokens.augment
    if augment not in AUGMENTS:
        raise config_io.ConfigError(f"config.tokens.augment={augment!r}: use one of "
                                    f"{', '.join(AUGMENTS)}.")
    facts = cache_facts(config)
    if wd.is_finished(workdir_lib.TOKENS):
        record = wd.record(workdir_lib.TOKENS)
        stale = {k: (record.get(k), v) for k, v in facts.items() if record.get(k) != v}
        if not stale:
            logging.info("Token cache %s exists: skipping the encode stage.", path)
            return path
        if not config.tokens.get("rebuild", False):
            field, (old, new) = next(iter(stale.items()))
            raise config_io.ConfigError(
                f"config.tokens: the token cache {path} was written with {field}={old!r} but "
                f"the config has {field}={new!r}; pass --config.tokens.rebuild=True to encode "
                "again, or use the config that wrote it.")
        logging.info("Token cache %s is stale (%s): encoding again.", path, stale)
    vq_config = config.tokenizer
    model, params = vq_lib.VQModel(vq_config.model), wd.params(workdir_lib.TOKENIZER)
    # Every host encodes its own slice of the dataset, each batch split over its local devices;
    # each host writes its own shard of the cache, and process 0 seals it once all exist.
    local = jax.sharding.Mesh(np.array(jax.local_devices()), ("data",))
    batch_sharding = jax.sharding.NamedSharding(local, jax.sharding.PartitionSpec("data"))
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"),
                     in_shardings=(None, batch_sharding))
    data_config = vq_config.data.copy_and_resolve_references()
    size = data_config.image_size
    if augment == "tencrop":  # LlamaGen: ten crops of a 1.1x center-resized image
        data_config.image_size = int(round(size * 1.1))
    ds = data_lib.make_image_dataset(data_config, data_config.train_split,
                                     config.tokens.batch_size, seed=0, train=False,
                                     num_epochs=1, drop_remainder=False,
                                     shard_index=jax.process_index(),
                                     shard_count=jax.process_count())
    wd.clear_finished(workdir_lib.TOKENS)
    if wd.is_primary:
        data_lib.remove_token_cache(str(path))  # a stale or half-written cache from before
    multihost_utils.sync_global_devices("radar_jax_encode_start")
    codes, labels = [], []
    t0 = time.perf_counter()
    n_dev = jax.local_device_count()
    for batch in ds:
        images, n = np.asarray(batch["image"]), len(batch["label"])
        pad = -n % n_dev  # the last batch: pad to a multiple of the local devices
        if pad:
            images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
        for view in augmented_views(images, augment, size):
            codes.append(np.asarray(encode(params, view))[:n])
            labels.append(np.asarray(batch["label"]))
    codes, labels = np.concatenate(codes), np.concatenate(labels)
    vocab = int(vq_config.model.codebook_size)
    data_lib.write_token_shard(str(path), jax.process_index(), codes, labels, vocab_size=vocab)
    multihost_utils.sync_global_devices("radar_jax_encode_shards_written")
    info = {}
    if wd.is_primary:
        info = data_lib.finalize_token_cache(str(path), dict(facts, vocab_size=vocab),
                                             num_shards=jax.process_count())
    # Every process calls this (it ends in a barrier); process 0 writes the record.
    wd.mark_finished(workdir_lib.TOKENS, step=0, num_examples=info.get("num_examples"), **facts)
    logging.info("Encoded %d token maps %s on this host in %.1fs -> %s", len(codes),
                 codes.shape[1:], time.perf_counter() - t0, path)
    return path
