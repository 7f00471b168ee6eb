"""RadAR-L on ImageNet 256x256: an alias of configs/imagenet.py:L (see that file).

  python -m radar_jax.main --config=configs/l.py --workdir=gs://BUCKET/radar_l \
      --config.tokenizer.init_from=/path/to/vq_ds16_c2i.pt \
      --config.tokenizer.data.tfds_data_dir=/path/to/tensorflow_datasets

behaves exactly as --config=configs/imagenet.py:L. `python configs/l.py` prints the size.
"""

import importlib.util
import os

# configs/ is not a package: load the one ImageNet config by its path.
_spec = importlib.util.spec_from_file_location(
    "radar_jax_imagenet_config", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                              "imagenet.py"))
_imagenet = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_imagenet)


def get_config(arg=None):
    del arg
    return _imagenet.get_config("L")


if __name__ == "__main__":
    from radar_jax import config_defaults as cd
    print(cd.param_summary("RadAR-L", get_config()))
