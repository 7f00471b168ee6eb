"""RadAR-XL on ImageNet 256x256: an alias of configs/imagenet.py:XL (see that file).

  python -m radar_jax.main --config=configs/xl.py --workdir=gs://BUCKET/radar_xl \
      --config.tokenizer.init_from=/path/to/vq_ds16_c2i.pt \
      --config.tokenizer.data.tfds_data_dir=/path/to/tensorflow_datasets

behaves exactly as --config=configs/imagenet.py:XL. `python configs/xl.py` prints the size.
"""

import os

from radar_jax import config_defaults as cd
from radar_jax import config_io


def get_config(arg=None):
    del arg
    return config_io.load_config(os.path.join(os.path.dirname(__file__), "imagenet.py:XL"))


if __name__ == "__main__":
    print(cd.param_summary("RadAR-XL", get_config()))
