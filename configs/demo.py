"""The embedded default: RadAR on scikit-learn's digits, end to end on a laptop CPU.

  python -m radar_jax.main --config=configs/demo.py --workdir=workdirs/demo

Stages (each resumes, or is skipped when finished, on a re-run):
  1. tokenizer: configs/demo_vq.py's tokenizer, 32x32 digits -> 8x8 codes (workdir/tokenizer);
  2. token cache: the training digits encoded once (workdir/tokens);
  3. generator: a small RadAR transformer on the euclidean ring schedule (7 rings on 8x8), with
     RNI and RDS (workdir/generator);
  4. tokenizer post-training (TPT): the decoder fine-tuned for 200 steps on the generator's
     token maps mixed half and half with the encoder's; no DINOv2 file in the embedded
     default, so the semantic term is off with a notice (workdir/tokenizer_tpt);
  5. samples: a PNG grid with one row per class, a GIF of the canvas growing ring by ring, and
     metrics.json with the digit-classifier accuracy and Frechet distance of the samples, for
     the full schedule, the RDS sub-ladders and with correction on and off, and the trained
     ladder's codes decoded by the post-trained tokenizer too ("TPT" row) (workdir/samples).

The raster (next-token) baseline on the same token maps:
  python -m radar_jax.main --config=configs/demo.py --workdir=workdirs/demo_raster \
      --config.schedule.kind=raster
"""

import importlib.util
import os

import ml_collections

from radar_jax import config_defaults as cd
from radar_jax.models import transformer


def _demo_vq():
    # configs/demo_vq.py, whose tokenizer this is (loaded by path: configs/ is not a package).
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_vq.py")
    spec = importlib.util.spec_from_file_location("demo_vq", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg=None):
    del arg
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.tokenizer = _demo_vq().tokenizer()
    config.tokens = cd.tokens(augment="none", batch_size=300)
    # A small LlamaGen-style transformer over the 8x8 grid of a 256-entry codebook.
    config.model = transformer.model_config(
        "tiny", dim=96, n_layer=3, n_head=4, multiple_of=32, vocab_size=256, num_classes=10,
        block_size=64, grid=(8, 8), class_dropout_prob=0.1, token_dropout_p=0.1,
        resid_dropout_p=0.1, ffn_dropout_p=0.1, attn_dropout_p=0.0)
    config.schedule = cd.schedule("euclidean")
    config.train = cd.generator_train(
        batch_size=32, num_steps=600, lr=1e-3, weight_decay=0.05, warmup_steps=50,
        decay="cosine", min_lr_ratio=0.1, rni_range=(0.0, 0.2), rds=True, log_every=50,
        ckpt_every=200)
    # Three groups of sampler steps (three compiled scan bodies, not the default plan's six):
    # the demo's small grid is compile-bound. On 2 CPU cores, a setting sampled 6 times at
    # batch 100 (first call with compile, then 5 calls) takes 15.1 s, against 17.8 s with six
    # groups and 16.2 s with two (launch/bench_sampling.py --config configs/demo.py
    # --batch_sizes 100 --runs 6 --correction_band all --max_groups 8,3,2).
    config.sample = cd.sampling(num_per_class=10, batch_size=100, cfg_scale=2.0, max_groups=3)
    config.edit = cd.edit()  # --mode=edit (docs/editing.md)
    # --mode=eval on an image folder (the digits have their own table): ADM's metrics of a few
    # hundred samples; set --config.eval.inception_path and --config.eval.reference.
    config.eval = cd.eval_(num_samples=500, batch_size=100, shard_size=100)
    # A small post-training budget (about a minute on a laptop CPU); --config.tpt.enabled=False
    # skips it.
    config.tpt = cd.tpt(enabled=True, num_steps=200, batch_size=32, mix_ratio=0.5, lr=1e-4,
                        log_every=50, ckpt_every=100)
    config.mesh = cd.mesh()
    return config
