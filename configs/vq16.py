"""LlamaGen's VQ-16 tokenizer on ImageNet 256x256 (72M params, 16x16 codes, 16384 x 8 codebook).

Fine-tune from LlamaGen's released checkpoint (the file you downloaded, e.g. vq_ds16_c2i.pt):

  python -m radar_jax.main --config=configs/vq16.py --workdir=gs://BUCKET/vq16 --mode=train_vq \
      --config.tokenizer.init_from=/path/to/vq_ds16_c2i.pt \
      --config.tokenizer.loss.lpips_path=/path/to/lpips_vgg.npz \
      --config.tokenizer.data.tfds_data_dir=/path/to/tensorflow_datasets

Needs ImageNet prepared for TFDS (`imagenet2012`); without it the run stops at once and says how
to prepare it. LlamaGen's recipe: batch 128, Adam(0.9, 0.95), lr 1e-4, grad clip 1.0, L2 +
LPIPS + codebook losses, PatchGAN hinge loss from step 20k. `python configs/vq16.py` builds it,
prints its parameter count and times a 256x256 encode/decode round trip on this machine.
"""

import ml_collections

from radar_jax import config_defaults as cd


def get_config(arg=None):
    del arg
    data = cd.data("tfds", image_size=256, tfds_name="imagenet2012", random_crop=True, flip=True,
                   num_workers=8)
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.tokenizer = cd.tokenizer(cd.vq_model(), data, batch_size=128, num_steps=400_000,
                                    eval_batch_size=64, ckpt_every=5000, eval_every=5000)
    return config


if __name__ == "__main__":
    # `python configs/vq16.py`: builds VQ-16, prints its size, and round-trips a 256x256 batch
    # (random init) through encode and decode, timing each on this machine.
    import time

    import jax
    import jax.numpy as jnp

    from radar_jax.models import vq

    model = vq.VQModel(get_config().tokenizer.model)
    images = jax.random.uniform(jax.random.key(0), (2, 256, 256, 3), minval=-1.0, maxval=1.0)
    t0 = time.perf_counter()
    params = jax.jit(model.init)(jax.random.key(1), images)["params"]
    print(f"VQ-16: {vq.count_params(params) / 1e6:.2f}M parameters "
          f"(init {time.perf_counter() - t0:.1f}s)")
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))
    decode = jax.jit(lambda p, c: model.apply({"params": p}, c, method="decode_codes"))

    def timed(name, fn, arg):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params, arg))
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(params, arg))
        print(f"{name}: {tuple(arg.shape)} -> {tuple(out.shape)} {out.dtype}; first call "
              f"{first:.1f}s (with compile), then {time.perf_counter() - t0:.2f}s on "
              f"{jax.devices()[0].platform}")
        return out

    codes = timed("encode", encode, images)
    decoded = timed("decode", decode, codes)
    assert codes.shape == (2, 16, 16) and decoded.shape == (2, 256, 256, 3)
    assert bool(jnp.all(jnp.isfinite(decoded)))
