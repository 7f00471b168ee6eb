"""RadAR-XL on ImageNet 256x256: 30 layers at LlamaGen-XL's width 1280, euclidean rings.

RADAR.md "Model sizes": the depth is chosen to hit the paper's 610M non-embedding parameters.

  python -m radar_jax.main --config=configs/xl.py --workdir=gs://BUCKET/radar_xl \
      --config.tokenizer.init_from=/path/to/vq_ds16_c2i.pt \
      --config.tokenizer.data.tfds_data_dir=/path/to/tensorflow_datasets

Stages: convert LlamaGen's VQ-16 (or fine-tune it with --config.tokenizer.num_steps=N), encode
ImageNet once with ten crops, train RadAR (610M non-embedding; 300 epochs at batch 256 with AdamW
0.9/0.95, lr 1e-4, wd 0.05, clip 1.0, bf16, RNI and RDS), then sample. Needs ImageNet prepared
for TFDS (imagenet2012): without it the run stops at once and says how to prepare it. Scale out
with --config.mesh.fsdp=N for FSDP or --config.mesh.tensor=N for tensor parallelism.
`python configs/xl.py` prints the parameter count.
"""

from radar_jax import config_defaults as cd


def get_config(arg=None):
    del arg
    return cd.imagenet_pipeline("XL")


if __name__ == "__main__":
    print(cd.param_summary("RadAR-XL", get_config()))
