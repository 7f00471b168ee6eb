r"""RadAR on ImageNet 256x256 with LlamaGen's VQ-16 tokenizer: one config, the size is its argument.

  python -m radar_jax.main --config=configs/imagenet.py:XL --workdir=gs://BUCKET/radar_xl \
      --config.tokenizer.init_from=/path/to/vq_ds16_c2i.pt \
      --config.tokenizer.data.tfds_data_dir=/path/to/tensorflow_datasets

Sizes (the paper's table; docs/method.md, "Model sizes"):

  | arg | layers x width, heads | parameters (non-embedding) | note                       |
  |-----|-----------------------|----------------------------|----------------------------|
  | B   | 12 x 768, 12          | 110.9M (85.0M)             | LlamaGen-B's shape          |
  | L   | 24 x 1024, 16         | 342.9M (308.3M)            | the paper's 310M            |
  | XL  | 30 x 1280, 20         | 652.8M (609.6M)            | the paper's 610M: LlamaGen- |
  |     |                       |                            | XL's width, depth to match  |

configs/b.py, l.py and xl.py are aliases: `--config=configs/xl.py` is this file with arg XL.

Stages: convert LlamaGen's VQ-16 (with tokenizer.num_steps=0 it is only converted and exported;
raise num_steps to fine-tune it first, as RadAR does), encode ImageNet once with LlamaGen's ten
crops, train RadAR with LlamaGen's recipe (300 epochs at batch 256, AdamW 0.9/0.95, lr 1e-4, wd
0.05 on matrices, clip 1.0, bf16, dropout 0.1, class dropout 0.1) plus RNI and RDS on the
euclidean schedule (13 rings on 16x16: the paper's 13 steps), then sample. Needs ImageNet
prepared for TFDS (imagenet2012): without it the run stops at once and says how to prepare it.
Scale out with --config.mesh.fsdp=N (FSDP) or --config.mesh.tensor=N (tensor parallelism).
Evaluate (FID / sFID / IS / Precision / Recall of 50k samples) with --mode=eval and
--config.eval.inception_path=... --config.eval.reference=...; LlamaGen's own weights as a ready
model: --config.train.init_from=c2i_L_256.pt --config.train.num_steps=0
--config.schedule.kind=raster (docs/evaluate.md).
`python configs/imagenet.py XL` prints the parameter count.
"""

import sys

import ml_collections

from radar_jax import config_defaults as cd
from radar_jax.models import transformer

SIZES = ("B", "L", "XL")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size = (arg or "XL").upper()
    if size not in SIZES:
        raise ValueError(f"configs/imagenet.py:{arg}: the size must be one of {', '.join(SIZES)} "
                         "(e.g. --config=configs/imagenet.py:XL).")
    c = ml_collections.ConfigDict()
    c.seed = 0
    data_config = cd.data("tfds", image_size=256, tfds_name="imagenet2012", random_crop=True,
                          flip=True, num_workers=16)
    c.tokenizer = cd.tokenizer(cd.vq_model(), data_config, batch_size=128, num_steps=0,
                               eval_batch_size=64, eval_batches=8, ckpt_every=5000,
                               eval_every=5000)
    # LlamaGen encodes ImageNet once with ten crops (5 crops x flips of a 1.1x resize).
    c.tokens = cd.tokens(augment="tencrop", batch_size=128)
    # bf16 matmuls on a float32 residual stream; 'minimal' remat (keep the weight matmuls'
    # outputs, recompute attention) is what lets XL at batch 256 fit a v5p-64 (launch/
    # aot_check.py: 87.8 GiB per device without remat, over the 85.5 GiB line). Attention in
    # one pass (attention_chunk=0): the query chunks measured faster on CPU only; on TPU
    # their speed is unmeasured (the README's aot table gives their memory).
    c.model = transformer.model_config(size, vocab_size=16384, num_classes=1000,
                                       block_size=256, grid=(16, 16), dtype="bfloat16",
                                       remat_policy="minimal", attention_chunk=0)
    c.schedule = cd.schedule("euclidean")
    c.train = cd.generator_train(rni_range=(0.0, 0.1), rds=True)
    c.sample = cd.sampling(num_per_class=8, batch_size=32, cfg_scale=2.0)
    # --mode=eval: 50,000 samples (50 per class) against ADM's reference batch (docs/evaluate.md).
    c.eval = cd.eval_(num_samples=50_000, labels="per_class", batch_size=64, shard_size=1000)
    # Tokenizer post-training (--mode=post_train_vq; off in --mode=all until enabled): set
    # --config.tpt.dinov2_path to DINOv2-B's weights for the semantic term (docs/tpt.md).
    c.tpt = cd.tpt()
    c.mesh = cd.mesh()
    return c


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "XL"
    print(cd.param_summary(f"RadAR-{name.upper()}", get_config(name)))
