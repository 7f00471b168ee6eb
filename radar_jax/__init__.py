"""radar_jax: RadAR, radial-parallel autoregressive image generation in JAX/Flax.

Modules: schedules (ring schedules, packed layouts, nested masks), models (VQ tokenizer,
transformer), data (grain pipelines), train_vq / train (training loops), sampling (jitted
samplers), convert (LlamaGen checkpoints), evaluation (quality metrics), main (CLI).
"""

__version__ = "0.1.0"
