"""Input pipelines (grain): embedded digits, image folders, TFDS; token-map caches.

`config.tokenizer.data` (an ml_collections.ConfigDict in every config file) has these fields:
  source: str          'digits' (scikit-learn's bundled 8x8 digits, no download; the demo),
                       'imagefolder' (a folder of class subfolders) or 'tfds' (a prepared
                       TensorFlow Datasets dataset, read without TensorFlow).
  path: str            imagefolder root: <path>/<class>/**/*.{jpg,jpeg,png,webp} (any case);
                       classes are the sorted subfolder names. If <path>/<split> exists (e.g.
                       <path>/train, <path>/validation) that folder is used for the split.
  tfds_name: str       TFDS dataset name, e.g. 'imagenet2012'.
  tfds_data_dir: str   TFDS data dir; '' = the TFDS default (~/tensorflow_datasets).
  train_split: str     training split name, e.g. 'train' (TFDS slicing like 'train[:10%]' ok).
  eval_split: str      evaluation split, e.g. 'validation' (digits: any name other than
                       'train' or train_split = the fixed held-out split of digits.py:
                       300 images, 30 per class; the other 1,497 are 'train').
  image_size: int      output side S of the square images.
  random_crop: bool    train only: resize the short side to a random length in
                       [S, S / 0.8] and crop S x S at a random offset (LlamaGen/ADM style);
                       False: resize the short side to S and crop the centre.
  flip: bool           train only: random horizontal flip (False for digits: a mirrored
                       digit is another shape).
  num_workers: int     grain worker processes for decoding (0 = threads in this process;
                       outside absl.app, where grain cannot start processes, threads too).

Public API (see each module for details):
  digits.py:      load_digits_split, digits_to_images, images_to_digits
  sources.py:     make_source, check_data_available, DataUnavailableError, BadImageError
  pipeline.py:    make_image_dataset, SkipCounter, skipped_count
  global_batches.py: GlobalTokenBatches (generator batches: a pure function of the step)
  token_cache.py: write_token_shard, finalize_token_cache, save_token_cache,
                  remove_token_cache, token_cache_state, codes_dtype, IncompleteTokenCacheError
  token_reader.py: TokenCache, check_token_cache, load_token_cache

Token caches: a directory of memory-mapped .npy shards plus meta.json (format in
token_cache.py), read with random access (`TokenCache(path)[indices]`) without loading it,
codes stored as uint16 when the codebook fits; gs:// caches are copied to local disk first.
All file IO goes through etils.epath, so paths may be gs://...

Bad data: an undecodable file is skipped, logged once with its path and counted per iterator
(`skipped_count(iterator)`, `iterator.skip_counter.paths`; the counts are checkpointed with
the iterator). Grayscale,
CMYK, palette, 16-bit images become RGB; transparent images (RGBA, LA, palette with
transparency) are composited on white. A missing/empty folder or unprepared TFDS dataset
raises one DataUnavailableError (a ValueError) that says how to fix it.
"""

from radar_jax.data.digits import digits_to_images
from radar_jax.data.digits import images_to_digits
from radar_jax.data.digits import load_digits_split
from radar_jax.data.global_batches import GlobalTokenBatches
from radar_jax.data.pipeline import make_image_dataset
from radar_jax.data.pipeline import SkipCounter
from radar_jax.data.pipeline import skipped_count
from radar_jax.data.sources import BadImageError
from radar_jax.data.sources import check_data_available
from radar_jax.data.sources import DataUnavailableError
from radar_jax.data.sources import make_source
from radar_jax.data.pipeline import worker_processes_available
from radar_jax.data.token_cache import codes_dtype
from radar_jax.data.token_cache import finalize_token_cache
from radar_jax.data.token_cache import IncompleteTokenCacheError
from radar_jax.data.token_cache import remove_token_cache
from radar_jax.data.token_cache import save_token_cache
from radar_jax.data.token_cache import token_cache_state
from radar_jax.data.token_cache import write_token_shard
from radar_jax.data.token_reader import check_token_cache
from radar_jax.data.token_reader import load_token_cache
from radar_jax.data.token_reader import TokenCache

__all__ = [
    "GlobalTokenBatches",
    "BadImageError",
    "DataUnavailableError",
    "IncompleteTokenCacheError",
    "SkipCounter",
    "TokenCache",
    "check_data_available",
    "check_token_cache",
    "codes_dtype",
    "digits_to_images",
    "finalize_token_cache",
    "images_to_digits",
    "load_digits_split",
    "load_token_cache",
    "make_image_dataset",
    "make_source",
    "remove_token_cache",
    "save_token_cache",
    "skipped_count",
    "token_cache_state",
    "worker_processes_available",
    "write_token_shard",
]
