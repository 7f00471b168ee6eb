"""Converters from LlamaGen PyTorch checkpoints to radar_jax's Flax parameter trees.

`load_state_dict(path)` reads a flat {torch name: numpy array} dict from a `.pt`, `.npz` or
`.safetensors` file; `load_llamagen_vq(path)` turns a LlamaGen VQ tokenizer checkpoint into
`(config, params)` for `radar_jax.models.vq.VQModel`.
"""

from radar_jax.convert.gpt import load_llamagen_gpt
from radar_jax.convert.state_dict import load_npz_config, load_state_dict
from radar_jax.convert.vq import load_llamagen_vq

__all__ = ["load_llamagen_gpt", "load_llamagen_vq", "load_npz_config", "load_state_dict"]
