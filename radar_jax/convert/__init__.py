"""Converters from LlamaGen PyTorch checkpoints to radar_jax's Flax parameter trees.

`load_state_dict(path)` reads a flat {torch name: numpy array} dict from a `.pt`, `.npz` or
`.safetensors` file; `load_llamagen_vq(path)` turns a LlamaGen VQ tokenizer checkpoint into
`(config, params)` for `radar_jax.models.vq.VQModel`; `load_llamagen_gpt(path)` a LlamaGen
GPT into the transformer's; `load_dinov2(path)` DINOv2 (Hugging Face safetensors or torch-hub
.pth) into `radar_jax.models.dinov2.DINOv2`'s.
"""

from radar_jax.convert.dinov2 import load_dinov2
from radar_jax.convert.gpt import load_llamagen_gpt
from radar_jax.convert.inception import load_inception
from radar_jax.convert.state_dict import load_npz_config, load_state_dict
from radar_jax.convert.vq import load_llamagen_vq

__all__ = ["load_dinov2", "load_inception", "load_llamagen_gpt", "load_llamagen_vq",
           "load_npz_config", "load_state_dict"]
