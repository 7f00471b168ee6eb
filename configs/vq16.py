"""LlamaGen's VQ-16 tokenizer on ImageNet 256x256 (72M params, 16x16 codes, 16384 x 8 codebook).

Fine-tune from LlamaGen's released checkpoint (the file you downloaded, e.g. vq_ds16_c2i.pt):

  python -m radar_jax.main --config=configs/vq16.py --workdir=gs://BUCKET/vq16 --mode=train_vq \
      --config.init_from=/path/to/vq_ds16_c2i.pt --config.loss.lpips_path=/path/to/lpips_vgg.npz \
      --config.data.tfds_data_dir=/path/to/tensorflow_datasets

Needs ImageNet prepared for TFDS (`imagenet2012`); without it the run stops at once and says how
to prepare it. LlamaGen's recipe: batch 128, Adam(0.9, 0.95), lr 1e-4, grad clip 1.0, L2 +
LPIPS + codebook losses, PatchGAN hinge loss from step 20k.
"""

from radar_jax import config_defaults as cd


def get_config(arg=None):
    del arg
    data = cd.data("tfds", image_size=256, tfds_name="imagenet2012", random_crop=True, flip=True,
                   num_workers=8)
    return cd.tokenizer(cd.vq_model(), data, batch_size=128, num_steps=400_000,
                        eval_batch_size=64, ckpt_every=5000, eval_every=5000)
