"""Tokenizer for the embedded digits: 32x32 RGB digits -> 8x8 codes from a 256-entry codebook.

Trains on a 2-core CPU in a few minutes:

  python -m radar_jax.main --config=configs/demo_vq.py --workdir=workdirs/demo_vq --mode=train_vq

It writes workdir/tokenizer/: checkpoints/, metrics.jsonl, images/recon_*.png (originals on
the top row, reconstructions below), reconstructions.png, params/ and eval.json with PSNR,
codebook usage, and the accuracy a digit classifier fitted on the real 8x8 training digits
keeps on reconstructed held-out digits (about 98% of the real digits' accuracy).
`configs/demo.py` uses this same tokenizer as its first stage, with the same config shape.
"""

import ml_collections

from radar_jax import config_defaults as cd


def get_config(arg=None):
    del arg
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.tokenizer = tokenizer()
    return config


def tokenizer():
    """The digits tokenizer section (configs/demo.py reuses it)."""
    model = cd.vq_model(
        codebook_size=256, codebook_embed_dim=8, ch=32, encoder_ch_mult=(1, 2, 2),
        decoder_ch_mult=(1, 2, 2), z_channels=32, num_res_blocks=1)
    config = cd.tokenizer(
        model, cd.data("digits", image_size=32),
        batch_size=32, num_steps=300, log_every=50, eval_every=1000, ckpt_every=100,
        eval_batch_size=300)
    # Digits are tiny and simple: a faster learning rate, and a short late GAN phase so the
    # demo finishes in minutes. There is no LPIPS file in the embedded default.
    config.optim.lr = 3e-4
    config.loss.disc_start = 200
    config.loss.disc_weight = 0.1
    config.loss.disc_ndf = 32
    config.loss.disc_layers = 2
    return config
