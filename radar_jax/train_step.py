"""The generator's training step: per-batch layouts, the teacher-forced loss, the jitted update.

Each training sequence is the packed teacher-forcing layout of docs/method.md (class token, then
block B_k for every step: the known area first, then the new ring carrying the prompt
embedding), attended with the nested mask. The raster schedule gives plain next-token training
on the same code path. Tricks, all config switches:
  RNI  a per-example fraction (uniform in `train.rni_range`) of known-area inputs is replaced by
       random codes, so the model learns to correct wrong context.
  RDS  each example (or each batch) trains on a random sub-ladder of the ring ladder: dropped
       rings are merged into the next kept step; layouts are padded to the full length and the
       nested mask is derived from the per-example metadata inside jit.

`make_train_step` is the one update step: the training loop (train.py), the training benchmark
(launch/bench_train.py) and the compile check (launch/aot_check.py) all run this function, so
what they time and size is what users train with.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from radar_jax import schedules
from radar_jax import sharding
from radar_jax import trainer
from radar_jax.models import transformer

META_KEYS = ("flat_pos", "target_pos", "step", "is_new", "is_class", "valid")


@flax.struct.dataclass
class TrainState:
    """What a generator run checkpoints. `ema_params` is {} when EMA is off."""
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any


class LayoutSampler:
    """Host-side per-batch layout metadata, deterministic in (seed, step) so resume is exact.

    Without RDS (or for raster) every batch uses the full layout: arrays of shape (L,). With
    per-example RDS each example gets its own sub-ladder: arrays (B, L), padded to the full
    layout's length L with `valid` False. Per-batch RDS gives one sub-ladder per batch, (L,).
    """

    def __init__(self, schedule, train_config, num_class_tokens: int = 1, seed: int = 0):
        self.schedule, self.t, self.seed = schedule, train_config, seed
        self.num_class_tokens = num_class_tokens
        self.full = self._padded(schedule, None)
        self.length = len(self.full["step"])
        self.rds = bool(train_config.rds) and not schedule.is_next_token \
            and schedule.num_steps > 2
        self._cache: dict[tuple[int, ...], dict[str, np.ndarray]] = {}

    def _padded(self, schedule, length):
        layout = schedules.layout_metadata(schedule, self.num_class_tokens)
        return schedules.pad_layout(layout, length or len(layout["step"]))

    def _ladder(self, rng) -> dict[str, np.ndarray]:
        keep = schedules.sample_sub_ladder(self.schedule.num_steps, rng,
                                           min_steps=self.t.rds_min_steps,
                                           keep_prob=self.t.rds_keep_prob)
        key = tuple(int(k) for k in keep)
        if key not in self._cache:
            merged = schedules.merge_rings(self.schedule, keep)
            self._cache[key] = self._padded(merged, self.length)
        return self._cache[key]

    def __call__(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
        if not self.rds:
            return self.full
        rng = np.random.default_rng([self.seed, step])
        if self.t.rds_mode == "per_batch":
            return self._ladder(rng)
        if self.t.rds_mode != "per_example":
            raise ValueError(f"config.train.rds_mode={self.t.rds_mode!r}: use 'per_example' or "
                             "'per_batch'.")
        layouts = [self._ladder(rng) for _ in range(batch_size)]
        return {k: np.stack([l[k] for l in layouts]) for k in META_KEYS}


def _bcast(x, batch):
    """(L,) or (B, L) metadata -> (B, L)."""
    return jnp.broadcast_to(x, (batch,) + x.shape[-1:])


def sequence_loss(model, params, codes_BN, labels_B, meta, rng, *, train: bool,
                  rni_range=(0.0, 0.0), known_weight: float = 1.0, raster: bool = False):
    """Teacher-forced cross-entropy over a packed layout; returns (loss, metrics).

    Args:
      codes_BN: (B, H*W) int32 flattened token maps.
      labels_B: (B,) int32 class ids.
      meta: layout metadata (see LayoutSampler), arrays (L,) or (B, L).
      rng: key for dropout, class dropout and RNI.
      rni_range: (lo, hi): each example replaces a fraction ~ U(lo, hi) of its known-area input
        tokens by uniformly random codes (RNI); (0, 0) turns it off.
      known_weight: weight of known-area targets relative to new-ring targets.
      raster: every target is a generation target (no known area is re-fed).
    """
    b = codes_BN.shape[0]
    flat_pos_BL = _bcast(meta["flat_pos"], b)
    target_pos_BL = _bcast(meta["target_pos"], b)
    is_new_BL, is_class_BL = _bcast(meta["is_new"], b), _bcast(meta["is_class"], b)
    valid_BL = _bcast(meta["valid"], b)
    rng_drop, rng_rni_rate, rng_rni_where, rng_rni_code = jax.random.split(rng, 4)

    tokens_BL = jnp.take_along_axis(codes_BN, jnp.maximum(flat_pos_BL, 0), axis=1)
    known_input_BL = valid_BL & ~is_new_BL & ~is_class_BL
    lo, hi = rni_range
    if train and hi > 0 and not raster:
        rate_B = jax.random.uniform(rng_rni_rate, (b,), minval=lo, maxval=hi)
        noisy_BL = known_input_BL & (jax.random.uniform(rng_rni_where, tokens_BL.shape)
                                     < rate_B[:, None])
        random_BL = jax.random.randint(rng_rni_code, tokens_BL.shape, 0,
                                       model.config.vocab_size)
        tokens_BL = jnp.where(noisy_BL, random_BL, tokens_BL)

    mask = schedules.nested_mask(meta["step"], meta["is_new"], meta["is_class"], meta["valid"],
                                 xp=jnp)  # (L, L) or (B, L, L)
    logits_BLV, _ = model.apply({"params": params}, tokens_BL, labels_B, meta["flat_pos"],
                                meta["is_new"], meta["is_class"], mask, train=train,
                                rngs={"dropout": rng_drop})
    targets_BL = jnp.take_along_axis(codes_BN, jnp.maximum(target_pos_BL, 0), axis=1)
    ce_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, targets_BL)
    has_target_BL = valid_BL & (target_pos_BL >= 0)
    gen_BL = has_target_BL & (True if raster else is_new_BL)
    known_BL = has_target_BL & ~gen_BL
    weights_BL = gen_BL + known_weight * known_BL
    loss = jnp.sum(ce_BL * weights_BL) / jnp.maximum(jnp.sum(weights_BL), 1.0)
    correct_BL = jnp.argmax(logits_BLV, -1) == targets_BL
    mean = lambda x, w: jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1)
    metrics = dict(loss=loss, loss_new=mean(ce_BL, gen_BL), loss_known=mean(ce_BL, known_BL),
                   acc_new=mean(correct_BL, gen_BL), acc_known=mean(correct_BL, known_BL),
                   tokens=jnp.sum(valid_BL))
    return loss, metrics


def make_optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The generator's AdamW (LlamaGen's recipe: weight decay on matrices and embeddings)."""
    return trainer.make_optimizer(t, t.num_steps, decay_mask=trainer.matrices_only)


def init_fn(config: ml_collections.ConfigDict, tx: optax.GradientTransformation):
    """rng -> a fresh TrainState (boxed with logical axis names, for create_sharded_state)."""
    def init(rng):
        params = transformer.init_params(config.model, rng, unbox=False)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params),
                          ema_params=params if config.train.ema_decay else {})
    return init


def meta_shardings(mesh, layouts: LayoutSampler) -> dict[str, Any]:
    """Per-example (B, L) metadata is split with the batch; shared (L,) metadata replicated."""
    per_example = layouts.rds and layouts.t.rds_mode == "per_example"
    return {k: (sharding.batch_sharding(mesh, 2) if per_example else sharding.replicated(mesh))
            for k in META_KEYS}


def make_train_step(config: ml_collections.ConfigDict, model, tx, mesh, state_shardings,
                    layouts: LayoutSampler, rng: jax.Array):
    """The jitted update: (state, codes_BN int32 (B, H*W), labels_B int32 (B,), meta) ->
    (state, metrics). The state is donated; `rng` seeds dropout, class dropout and RNI, folded
    with the step so a resumed run draws the same numbers."""
    t = config.train
    loss_kw = dict(rni_range=tuple(t.rni_range), known_weight=t.known_weight,
                   raster=layouts.schedule.is_next_token)
    grad_fn = jax.value_and_grad(functools.partial(sequence_loss, model, train=True, **loss_kw),
                                 has_aux=True)

    def grads_fn(params, codes_BN, labels_B, meta, rng):
        """Gradients averaged over `grad_accum` micro-batches (a lax.scan keeps memory flat)."""
        def run(x):
            codes_mb, labels_mb, meta_mb, rng_mb = x
            (_, metrics), grads = grad_fn(params, codes_mb, labels_mb, meta_mb, rng_mb)
            return grads, metrics

        if t.grad_accum == 1:
            return run((codes_BN, labels_B, meta, rng))
        # Split the batch (and per-example metadata) into micro-batches; shared (L,) metadata
        # is broadcast to every micro-batch.
        micro = lambda x: x.reshape((t.grad_accum, -1) + x.shape[1:])
        meta_mb = {k: (micro(v) if v.ndim == 2 else
                       jnp.broadcast_to(v, (t.grad_accum,) + v.shape)) for k, v in meta.items()}
        xs = (micro(codes_BN), micro(labels_B), meta_mb, jax.random.split(rng, t.grad_accum))
        first = jax.tree.map(lambda v: v[0], xs)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                             jax.eval_shape(run, first))
        body = lambda acc, x: (jax.tree.map(jnp.add, acc, run(x)), None)
        (grads, metrics), _ = jax.lax.scan(body, zeros, xs)
        metrics = {k: (v if k == "tokens" else v / t.grad_accum) for k, v in metrics.items()}
        return jax.tree.map(lambda g: g / t.grad_accum, grads), metrics

    def train_step(state, codes_BN, labels_B, meta):
        step_rng = jax.random.fold_in(rng, state.step)
        grads, metrics = grads_fn(state.params, codes_BN, labels_B, meta, step_rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             ema_params=trainer.ema_update(state.ema_params, params,
                                                           t.ema_decay)), metrics

    batch_sh = lambda nd: sharding.batch_sharding(mesh, nd)
    return jax.jit(train_step, donate_argnums=0,
                   in_shardings=(state_shardings, batch_sh(2), batch_sh(1),
                                 meta_shardings(mesh, layouts)),
                   out_shardings=(state_shardings, None))
