"""PatchGAN discriminator (taming's NLayerDiscriminator, LlamaGen's default) and GAN losses, NHWC.

Layers, for ndf=64, n_layers=3 (torch `main.{i}` indices, our Flax names `main_{i}`):
  main_0  conv 4x4/2 3->64 (+bias), LeakyReLU 0.2
  main_2  conv 4x4/2 64->128 (no bias), main_3 BatchNorm, LeakyReLU
  main_5  conv 4x4/2 128->256 (no bias), main_6 BatchNorm, LeakyReLU
  main_8  conv 4x4/1 256->512 (no bias), main_9 BatchNorm, LeakyReLU
  main_11 conv 4x4/1 512->1 (+bias): patch logits
All convs pad 1, so a 256x256 image gives 30x30 logits (H/8 - 2). BatchNorm runs on batch
statistics when `train` (as LlamaGen, which never puts its discriminator in eval mode) and
keeps running averages in the 'batch_stats' collection: apply with `mutable=['batch_stats']`.

Logical axis names: conv kernels ('conv_height', 'conv_width', 'conv_in', 'conv_out'), conv
biases ('conv_out',), BatchNorm scale/bias ('norm',).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

LEAKY_SLOPE = 0.2
BN_MOMENTUM = 0.9  # torch BatchNorm2d momentum 0.1 in Flax's convention (decay of the average).
BN_EPS = 1e-5  # torch BatchNorm2d default.
INIT_STD = 0.02  # taming's weights_init: conv N(0, 0.02), BatchNorm scale N(1, 0.02).


def _normal_around(mean: float, std: float):
    def init(key, shape, dtype=jnp.float32):
        return mean + std * jax.random.normal(key, shape, dtype)
    return init


class PatchGANDiscriminator(nn.Module):
    """(B, H, W, C) images in [-1, 1] -> (B, H/2**n_layers - 2, W/2**n_layers - 2, 1) logits."""
    ndf: int = 64
    n_layers: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        """x: (B, H, W, C) float. Returns float32 patch logits (B, h', w', 1)."""
        if x.ndim != 4:
            raise ValueError(f"discriminator input must be NHWC (B, H, W, C), got {x.shape}")
        kernel_init = nn.with_logical_partitioning(
            _normal_around(0.0, INIT_STD), ("conv_height", "conv_width", "conv_in", "conv_out"))
        bias_init = nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",))

        def conv(features, stride, use_bias, index):
            return nn.Conv(features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                           use_bias=use_bias, dtype=self.dtype, param_dtype=jnp.float32,
                           kernel_init=kernel_init, bias_init=bias_init, name=f"main_{index}")

        def batch_norm(index):
            return nn.BatchNorm(
                use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPS,
                dtype=self.dtype, param_dtype=jnp.float32, name=f"main_{index}",
                scale_init=nn.with_logical_partitioning(_normal_around(1.0, INIT_STD), ("norm",)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))

        x = x.astype(self.dtype)
        x = nn.leaky_relu(conv(self.ndf, 2, True, 0)(x), LEAKY_SLOPE)
        index, mult = 2, 1  # Next torch Sequential index; channel multiplier of the last conv.
        # n_layers - 1 stride-2 conv+BN+LeakyReLU stages, then one stride-1 stage. No conv bias
        # before BatchNorm: the BN shift makes it redundant (taming's use_bias=False).
        for n in range(1, self.n_layers + 1):
            mult = min(2 ** n, 8)
            stride = 2 if n < self.n_layers else 1
            x = conv(self.ndf * mult, stride, False, index)(x)
            x = nn.leaky_relu(batch_norm(index + 1)(x), LEAKY_SLOPE)
            index += 3
        return conv(1, 1, True, index)(x).astype(jnp.float32)


# GAN losses: pure functions of logits (any shape), each returning a float32 scalar.


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))): zero once real >= 1, fake <= -1."""
    loss_real = jnp.mean(jax.nn.relu(1.0 - logits_real))
    return 0.5 * (loss_real + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """0.5 * (mean(softplus(-real)) + mean(softplus(fake))): binary cross-entropy with logits."""
    loss_real = jnp.mean(jax.nn.softplus(-logits_real))
    return 0.5 * (loss_real + jnp.mean(jax.nn.softplus(logits_fake)))


def non_saturating_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """The standard non-saturating GAN discriminator loss: BCE(real -> 1, fake -> 0), halved.

    Numerically equal to `vanilla_d_loss`. LlamaGen's own non_saturating_d_loss passes its
    arguments to binary_cross_entropy_with_logits in swapped order (targets as logits); we do
    not reproduce that.
    """
    return vanilla_d_loss(logits_real, logits_fake)


def hinge_g_loss(logits_fake: jax.Array) -> jax.Array:
    """Generator hinge loss: -mean(fake logits)."""
    return -jnp.mean(logits_fake)


def non_saturating_g_loss(logits_fake: jax.Array) -> jax.Array:
    """Non-saturating generator loss: mean(softplus(-fake)) = BCE(fake -> 1)."""
    return jnp.mean(jax.nn.softplus(-logits_fake))


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss,
            "non-saturating": non_saturating_d_loss}
G_LOSSES = {"hinge": hinge_g_loss, "non-saturating": non_saturating_g_loss}


def get_d_loss(name: str):
    """The discriminator loss called `name` ('hinge' | 'vanilla' | 'non-saturating')."""
    if name not in D_LOSSES:
        raise ValueError(f"unknown discriminator loss {name!r}: use one of {sorted(D_LOSSES)}")
    return D_LOSSES[name]


def get_g_loss(name: str):
    """The generator adversarial loss called `name` ('hinge' | 'non-saturating')."""
    if name not in G_LOSSES:
        raise ValueError(f"unknown generator adversarial loss {name!r}: use one of "
                         f"{sorted(G_LOSSES)}")
    return G_LOSSES[name]
