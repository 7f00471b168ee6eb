"""Flax Linen models: the VQ tokenizer, its discriminator and LPIPS, and the transformer."""
