"""What both training loops share: the optimizer, the EMA update and sharded state creation.

The tokenizer loop (train_vq.py) and the generator loop (train.py) differ in their losses and
data, not in how they build an optimizer, keep an EMA of the weights or place the train state
on the mesh; those three live here once, so a fix to one (a schedule, a sharding rule) reaches
both trainers and the benchmarks that time them.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
import optax

from radar_jax import sharding

DECAYS = ("constant", "cosine", "linear")


def learning_rate(o: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule | float:
    """Linear warmup to `o.lr`, then `o.decay` ('constant' | 'cosine' | 'linear') down to
    `o.min_lr_ratio * lr` at `o.decay_steps` (0 = num_steps).

    The schedule depends only on config values, never on where a run resumed; with 'constant'
    (the tokenizer's default) a run resumed with a larger num_steps continues exactly as if it
    had been started with it.
    """
    decay = o.get("decay", "constant")
    if decay not in DECAYS:
        raise ValueError(f"decay={decay!r}: use one of {', '.join(DECAYS)}.")
    decay_steps = o.get("decay_steps", 0) or num_steps
    warmup = min(o.warmup_steps, decay_steps)
    ratio = o.get("min_lr_ratio", 0.0)
    if decay == "constant":
        after = optax.constant_schedule(o.lr)
    elif decay == "cosine":
        after = optax.cosine_decay_schedule(o.lr, max(decay_steps - warmup, 1), alpha=ratio)
    else:
        after = optax.linear_schedule(o.lr, o.lr * ratio, max(decay_steps - warmup, 1))
    if not warmup:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup), after], [warmup])


def matrices_only(params: Any) -> Any:
    """Weight-decay mask of LlamaGen's GPT: every parameter with >= 2 dims (matrices and
    embeddings), not norms or the prompt vector."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(o: ml_collections.ConfigDict, num_steps: int, *,
                   decay_mask: Callable[[Any], Any] | None = None
                   ) -> optax.GradientTransformation:
    """AdamW(lr schedule, beta1, beta2, weight_decay on `decay_mask`) after global-norm clipping.

    `o` holds lr, beta1, beta2, weight_decay, grad_clip (0 = off), warmup_steps and optionally
    decay, decay_steps, min_lr_ratio (see `learning_rate`): the generator's `config.train` and
    the tokenizer's `config.optim` both have these fields.
    """
    chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip else []
    chain.append(optax.adamw(learning_rate(o, num_steps), b1=o.beta1, b2=o.beta2,
                             weight_decay=o.weight_decay, mask=decay_mask))
    return optax.chain(*chain)


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    """One step of the exponential moving average of the weights; `ema` unchanged (an empty
    tree) when decay is 0 (EMA off), so callers need no branch."""
    if not decay:
        return ema
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def create_sharded_state(init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh, rules
                         ) -> tuple[Any, Any]:
    """(state, shardings): `init_fn(rng)` run under jit so the state is born sharded.

    Shapes come from `jax.eval_shape`, shardings from the parameters' logical axis names and
    `rules` (big_vision's recipe); nothing is materialised on one device first, so a model
    larger than one device's memory initialises directly across the mesh.
    """
    abstract = jax.eval_shape(init_fn, rng)
    shardings = sharding.logical_to_shardings(abstract, mesh, rules)
    with sharding.mesh_context(mesh), nn.logical_axis_rules(rules):
        state = jax.jit(lambda r: nn.meta.unbox(init_fn(r)), out_shardings=shardings)(rng)
    return state, shardings
