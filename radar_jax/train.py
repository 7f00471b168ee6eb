"""RadAR generator training on cached token maps, in one readable function.

`train_and_evaluate(config, workdir)` trains (or resumes) the transformer of `config.model` on
the token cache `tokens_path` with the ring schedule `config.schedule`:

  setup -> data -> model -> shard -> update step -> checkpoint -> loop

Each training sequence is the packed teacher-forcing layout of RADAR.md (class token, then block
B_k = the whole canvas C_k for every step, known area first, then the new ring with the prompt
embedding), attended with the nested mask. The raster schedule gives plain next-token training
on the same code path. Tricks, all config switches:
  RNI  a per-example fraction (uniform in `train.rni_range`) of known-area inputs is replaced by
       random codes, so the model learns to correct wrong context.
  RDS  each example (or each batch) trains on a random sub-ladder of the ring ladder: dropped
       rings are merged into the next kept step; layouts are padded to the full length and the
       nested mask is derived from the per-example metadata inside jit.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from radar_jax import checkpoint as ckpt_lib
from radar_jax import data as data_lib
from radar_jax import perf
from radar_jax import reporting
from radar_jax import schedules
from radar_jax import sharding
from radar_jax.models import transformer

META_KEYS = ("flat_pos", "target_pos", "step", "is_new", "is_class", "valid")


@flax.struct.dataclass
class TrainState:
    """What a generator run checkpoints. `ema_params` is {} when EMA is off."""
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any


def schedule_from_config(config: ml_collections.ConfigDict) -> schedules.RingSchedule:
    """The ring schedule of `config.schedule` on the model's token grid."""
    s = config.schedule
    kw = {}
    if s.kind == "crops":
        if s.get("preset"):
            kw["preset"] = s.preset
        if s.get("sizes"):
            kw["sizes"] = tuple(s.sizes)
    schedule = schedules.make_schedule(s.kind, tuple(config.model.grid), **kw)
    if s.get("num_steps") and s.kind != "raster" and s.num_steps != schedule.num_steps:
        schedule = schedules.sub_ladder(schedule, s.num_steps)
    return schedule


def make_optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW(b1, b2) with weight decay on matrices only, clipping, warmup and decay.

    `t.decay`: 'constant' | 'cosine' | 'linear' to `t.min_lr_ratio * lr` at `t.decay_steps`
    (0 = num_steps). The schedule depends only on config values, never on where a run resumed.
    """
    decay_steps = t.decay_steps or t.num_steps
    warmup = min(t.warmup_steps, decay_steps)
    end = t.lr * t.min_lr_ratio
    if t.decay == "constant":
        after = optax.constant_schedule(t.lr)
    elif t.decay == "cosine":
        after = optax.cosine_decay_schedule(t.lr, max(decay_steps - warmup, 1),
                                            alpha=t.min_lr_ratio)
    elif t.decay == "linear":
        after = optax.linear_schedule(t.lr, end, max(decay_steps - warmup, 1))
    else:
        raise ValueError(f"config.train.decay={t.decay!r}: use 'constant', 'cosine' or 'linear'.")
    lr = optax.join_schedules([optax.linear_schedule(0.0, t.lr, warmup), after], [warmup]) \
        if warmup else after
    # LlamaGen decays every parameter with >= 2 dims (matrices and embeddings), not norms.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    chain = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip else []
    chain.append(optax.adamw(lr, b1=t.beta1, b2=t.beta2, weight_decay=t.weight_decay,
                             mask=decay_mask))
    return optax.chain(*chain)


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       tokens_path: str) -> dict[str, float]:
    """Trains (or resumes) the generator in `workdir` on the token cache at `tokens_path`."""
    t = config.train
    # ---------------------------------------------------------------- setup
    os.makedirs(workdir, exist_ok=True)
    writer = reporting.create_writer(workdir)
    mesh = sharding.make_mesh(config.get("mesh"))
    sharding.check_batch_divisible(t.batch_size, mesh)
    if t.batch_size % t.grad_accum:
        raise ValueError(f"config.train.batch_size={t.batch_size} is not divisible by "
                         f"grad_accum={t.grad_accum}.")
    rng = jax.random.key(config.seed)
    schedule = schedule_from_config(config)
    raster = schedule.is_next_token

    # ---------------------------------------------------------------- data
    codes, labels, meta_info = data_lib.load_token_cache(tokens_path)
    if tuple(codes.shape[1:]) != tuple(config.model.grid):
        raise ValueError(f"Token cache {tokens_path} holds {codes.shape[1:]} token maps but "
                         f"config.model.grid={tuple(config.model.grid)}; re-encode with the "
                         "matching tokenizer or fix the grid.")
    if codes.max() >= config.model.vocab_size or labels.max() >= config.model.num_classes:
        raise ValueError(f"Token cache {tokens_path} has codes up to {codes.max()} and labels up "
                         f"to {labels.max()}, but config.model has vocab_size="
                         f"{config.model.vocab_size}, num_classes={config.model.num_classes}.")
    train_iter = iter(data_lib.make_token_dataset(
        codes, labels, t.batch_size // jax.process_count(), seed=config.seed,
        shard_index=jax.process_index(), shard_count=jax.process_count()))
    layouts = LayoutSampler(schedule, t, config.model.cls_token_num, seed=config.seed)
    # The loss of predicting every token from its marginal frequency: what the model must beat.
    freq = np.bincount(codes.ravel(), minlength=config.model.vocab_size) / codes.size
    marginal_entropy = float(-np.sum(freq[freq > 0] * np.log(freq[freq > 0])))
    logging.info("Marginal-frequency baseline loss (token entropy): %.4f nats.", marginal_entropy)
    logging.info("Generator: %d token maps %s, schedule %s with %d steps, sequence length %d%s.",
                 len(codes), codes.shape[1:], schedule.kind, schedule.num_steps, layouts.length,
                 f", RDS {t.rds_mode}" if layouts.rds else "")

    # ---------------------------------------------------------------- model
    model = transformer.Transformer(config.model)
    tx = make_optimizer(t)

    def init_state(rng):
        params = transformer.init_params(config.model, rng, unbox=False)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), ema_params=params if t.ema_decay else {})

    # ---------------------------------------------------------------- shard
    abstract = jax.eval_shape(init_state, rng)
    rules = sharding.rules_from_config(config)
    state_shardings = sharding.logical_to_shardings(abstract, mesh, rules)
    with sharding.mesh_context(mesh), nn.logical_axis_rules(rules):
        state = jax.jit(lambda r: nn.meta.unbox(init_state(r)),
                        out_shardings=state_shardings)(rng)
    counts = transformer.count_params(config.model)
    logging.info("Transformer: %.2fM parameters (%.2fM non-embedding).",
                 counts["total"] / 1e6, counts["non_embedding"] / 1e6)

    # ---------------------------------------------------------------- update step
    loss_kw = dict(rni_range=tuple(t.rni_range), known_weight=t.known_weight, raster=raster)

    def grads_fn(params, codes_BN, labels_B, meta, rng):
        """Gradients averaged over `grad_accum` micro-batches (a lax.scan keeps memory flat)."""
        grad_fn = jax.value_and_grad(
            functools.partial(sequence_loss, model, train=True, **loss_kw), has_aux=True)

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
        ema = state.ema_params
        if t.ema_decay:
            ema = jax.tree.map(lambda e, p: t.ema_decay * e + (1.0 - t.ema_decay) * p, ema,
                               params)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             ema_params=ema), metrics

    batch_sh = lambda nd: sharding.batch_sharding(mesh, nd)
    meta_sh = {k: (batch_sh(2) if layouts.rds and t.rds_mode == "per_example"
                   else sharding.replicated(mesh)) for k in META_KEYS}
    p_train_step = jax.jit(train_step, donate_argnums=0,
                           in_shardings=(state_shardings, batch_sh(2), batch_sh(1), meta_sh),
                           out_shardings=(state_shardings, None))

    # ---------------------------------------------------------------- checkpoint
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints)
    state, _ = ckpt.restore(state, train_iter)
    start = int(state.step)

    # ---------------------------------------------------------------- loop
    flops_per_step = t.batch_size * perf.train_flops_per_sequence(config.model, layouts.length)
    peak = perf.measure_matmul_peak(jnp.bfloat16 if config.model.dtype == "bfloat16"
                                    else jnp.float32) * jax.device_count()
    logging.info("Measured matmul peak %.1f GFLOP/s over %d device(s); %.2f GFLOP per step.",
                 peak / 1e9, jax.device_count(), flops_per_step / 1e9)
    progress = reporting.Progress("generator", t.num_steps, start, every=t.log_every)
    last = {}
    # closing(ckpt): an interrupt (Ctrl-C) or error soon after a save must not abandon the
    # asynchronous write in flight; close() waits for it, so that checkpoint is kept.
    with sharding.mesh_context(mesh), nn.logical_axis_rules(rules), contextlib.closing(ckpt):
        for step in range(start + 1, t.num_steps + 1):
            batch = next(train_iter)
            meta = layouts(step, t.batch_size // jax.process_count())
            codes_BN = batch["codes"].reshape(len(batch["codes"]), -1)
            device_batch = sharding.shard_batch((codes_BN, batch["label"]), mesh)
            meta = {k: (sharding.shard_batch(v, mesh) if v.ndim == 2
                        else jax.device_put(v, meta_sh[k])) for k, v in meta.items()}
            state, metrics = p_train_step(state, *device_batch, meta)
            if step % t.log_every == 0 or step == t.num_steps:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                steps_per_s = progress.rate(step)
                metrics["tokens_per_s"] = metrics.pop("tokens") * steps_per_s
                metrics["mfu"] = flops_per_step * steps_per_s / peak
                metrics["marginal_entropy"] = marginal_entropy
                writer.write_scalars(step, {f"train/{k}": v for k, v in metrics.items()})
                progress.update(step, loss=metrics["loss"], new=metrics["loss_new"],
                                known=metrics["loss_known"], mfu=metrics["mfu"])
                last = metrics
            else:
                progress.update(step)
            if step % t.ckpt_every == 0 or step == t.num_steps:
                ckpt.save(step, state, train_iter)
    progress.close()
    ckpt_lib.export_params(os.path.join(workdir, "params"),
                           state.ema_params if t.ema_decay else state.params)
    writer.close()
    return last
