"""The generator's training step: per-batch layouts, the teacher-forced loss, the jitted update.

Each training sequence is the packed teacher-forcing layout of docs/method.md (class token, then
block B_k for every step: the known band first, then the new ring carrying the prompt
embedding), attended with the nested mask; `config.schedule.correction_band` picks the band.
The raster schedule gives plain next-token training on the same code path. Tricks, all config
switches:
  RNI  a per-example fraction (uniform in `train.rni_range`) of known-area inputs is replaced by
       random codes, so the model learns to correct wrong context. 'per_position' (default)
       noises grid positions: a noised position carries the same wrong code in every block
       that re-feeds it, as a wrong sample does at sampling time, so no block holds a clean copy
       to undo the noise by copying. 'per_index' noises packed indices independently.
  RDS  each example (or each batch) trains on a random sub-ladder of the ring ladder: dropped
       rings are merged into the next kept step; the full ladder (the sampler's default) is
       drawn with probability `train.rds_full_prob`. Merged layouts are shorter than the full
       one, so instead of padding every example to the full length, LayoutSampler pads each
       batch to one of a few static bucket lengths (one compile each) and draws the batch's
       examples from one bucket; the nested mask is derived from the metadata inside jit.

`make_train_step` is the one update step: the training loop (train.py), the training benchmark
(launch/bench_train.py) and the compile check (launch/aot_check.py) all run this function, so
what they time and size is what users train with.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from radar_jax import perf
from radar_jax import schedules
from radar_jax import sharding
from radar_jax import trainer
from radar_jax.models import transformer

META_KEYS = ("flat_pos", "target_pos", "step", "is_new", "is_class", "valid")
RNI_MODES = ("per_position", "per_index")
# Draws of the RDS ladder distribution from which the bucket lengths are chosen.
_BUCKET_DRAWS = 4096


@flax.struct.dataclass
class TrainState:
    """What a generator run checkpoints. `ema_params` is {} when EMA is off."""
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any


# ----------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------
def choose_buckets(lengths: np.ndarray, num_buckets: int) -> np.ndarray:
    """Bucket lengths minimising the mean padded length of `lengths` (exact, by dynamic
    programming over the distinct lengths); each length is padded to the smallest bucket that
    holds it. The last bucket is max(lengths).

    Args:
      lengths: (n,) int, a sample of sequence lengths.
      num_buckets: the most buckets (>= 1); fewer when there are fewer distinct lengths.
    Returns:
      (m,) int64 strictly increasing bucket lengths, m <= num_buckets.
    """
    values, counts = np.unique(np.asarray(lengths, np.int64), return_counts=True)
    m, nb = len(values), min(int(num_buckets), len(values))
    cum = np.concatenate([[0], np.cumsum(counts)])
    # cost[j, e]: least total padded length of values[:e] in j buckets; start[j, e]: where the
    # last of them starts.
    cost = np.full((nb + 1, m + 1), np.inf)
    cost[0, 0] = 0.0
    start = np.zeros((nb + 1, m + 1), np.int64)
    for j in range(1, nb + 1):
        for e in range(j, m + 1):
            total = cost[j - 1, :e] + (cum[e] - cum[:e]) * values[e - 1]
            start[j, e] = int(np.argmin(total))
            cost[j, e] = total[start[j, e]]
    bounds, e = [], m
    for j in range(nb, 0, -1):
        bounds.append(values[e - 1])
        e = start[j, e]
    return np.asarray(bounds[::-1], np.int64)


class LayoutSampler:
    """Host-side per-batch layout metadata, deterministic in (seed, step) so resume is exact.

    Without RDS (or for raster) every batch uses the full layout: arrays of shape (L,), all
    valid. With RDS, layouts are padded (`valid` False) to one of `bucket_lengths` (the longest
    is the full length `length`):
      per_example  arrays (B, L_b). The first example's ladder is drawn from the RDS
                   distribution; its length picks the bucket b; the other examples are drawn
                   from the RDS distribution conditioned on falling in bucket b (rejection).
                   So every example's ladder has exactly the RDS distribution (examples of one
                   batch are correlated in length only), and padding is bounded by the bucket's
                   width instead of the full length.
      per_batch    one sub-ladder per batch, arrays (L_b,).
    The RDS distribution: the full ladder with probability `rds_full_prob`, else
    `schedules.sample_sub_ladder(K, rng, rds_min_steps, rds_keep_prob)`. The correction band
    (None = all, or an int >= 1) counts rings of the (merged) ladder being laid out.
    """

    def __init__(self, schedule, train_config, num_class_tokens: int = 1, seed: int = 0,
                 correction_band=None):
        self.schedule, self.t, self.seed = schedule, train_config, seed
        self.num_class_tokens = num_class_tokens
        self.correction_band = schedules.check_correction_band(correction_band)
        full = schedules.layout_metadata(schedule, num_class_tokens, self.correction_band)
        self.length = len(full["step"])
        self.full = schedules.pad_layout(full, self.length)
        self.rds = bool(train_config.rds) and not schedule.is_next_token \
            and schedule.num_steps > 2
        self.full_prob = float(train_config.get("rds_full_prob", 0.0))
        if not 0.0 <= self.full_prob <= 1.0:
            raise ValueError(f"config.train.rds_full_prob={self.full_prob} must be in [0, 1] (the "
                             "probability of training on the full ladder).")
        if self.rds and train_config.rds_mode not in ("per_example", "per_batch"):
            raise ValueError(f"config.train.rds_mode={train_config.rds_mode!r}: use "
                             "'per_example' or 'per_batch'.")
        self._ring_cum = np.concatenate([[0], np.cumsum(schedule.ring_sizes)])
        self._cache: dict[tuple[int, ...], dict[str, np.ndarray]] = {}
        self.bucket_lengths = np.asarray([self.length], np.int64)
        if self.rds:
            num_buckets = int(train_config.get("rds_buckets", 1))
            if num_buckets < 1:
                raise ValueError(f"config.train.rds_buckets={num_buckets} must be >= 1 (1 pads "
                                 "every RDS layout to the full length).")
            # A fixed stream, not the run's seed: buckets (and so compiled shapes) depend only
            # on the schedule and the RDS settings.
            rng = np.random.default_rng(0)
            lengths = [self.ladder_length(self._draw(rng)) for _ in range(_BUCKET_DRAWS)]
            buckets = choose_buckets(lengths + [self.length], num_buckets)
            self.bucket_lengths = buckets

    def ladder_length(self, keep) -> int:
        """Packed length of the layout of sub-ladder `keep` (same as its layout_metadata), from
        ring sizes alone: n_cls + sum_j |K_j| + |N_j| over merged rings j."""
        keep = np.asarray(keep, np.int64)
        prev = np.concatenate([[-1], keep[:-1]])
        merged = self._ring_cum[keep + 1] - self._ring_cum[prev + 1]  # merged ring sizes
        merged_cum = np.concatenate([[0], np.cumsum(merged)])
        j = np.arange(len(keep))
        first = j * 0 if self.correction_band is None else np.maximum(0, j - self.correction_band)
        return int(self.num_class_tokens + np.sum(merged_cum[j] - merged_cum[first] + merged))

    def _draw(self, rng) -> np.ndarray:
        k = self.schedule.num_steps
        if self.full_prob > 0 and rng.random() < self.full_prob:
            return np.arange(k, dtype=np.int32)
        return schedules.sample_sub_ladder(k, rng, min_steps=self.t.rds_min_steps,
                                           keep_prob=self.t.rds_keep_prob)

    def _bucket(self, length: int) -> int:
        return int(np.searchsorted(self.bucket_lengths, length))

    def _layout(self, keep, length: int) -> dict[str, np.ndarray]:
        key = tuple(int(k) for k in keep) + (length,)
        if key not in self._cache:
            merged = schedules.merge_rings(self.schedule, keep)
            layout = schedules.layout_metadata(merged, self.num_class_tokens,
                                               self.correction_band)
            self._cache[key] = schedules.pad_layout(layout, length)
        return self._cache[key]

    def __call__(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
        """Metadata for training step `step`: arrays (L,) or (batch_size, L_b); see the class."""
        if not self.rds:
            return self.full
        rng = np.random.default_rng([self.seed, step])
        first = self._draw(rng)
        bucket = self._bucket(self.ladder_length(first))
        length = int(self.bucket_lengths[bucket])
        if self.t.rds_mode == "per_batch":
            return self._layout(first, length)
        ladders = [first]
        while len(ladders) < batch_size:
            keep = self._draw(rng)
            if self._bucket(self.ladder_length(keep)) == bucket:
                ladders.append(keep)
        layouts = [self._layout(keep, length) for keep in ladders]
        return {k: np.stack([l[k] for l in layouts]) for k in META_KEYS}

    def padding_waste(self, num_batches: int = 256, batch_size: int = 8) -> float:
        """Fraction of token-forwards spent on padding over the batches of steps
        1..num_batches: 1 - valid positions / (batch * padded length), summed over them."""
        valid = total = 0
        for step in range(1, num_batches + 1):
            meta = self(step, batch_size)
            lengths = sequence_lengths(meta, batch_size)
            valid += int(lengths.sum())
            total += batch_size * meta["valid"].shape[-1]
        return 1.0 - valid / total


def sequence_lengths(meta, batch_size: int) -> np.ndarray:
    """(B,) int64 valid (non-padding) positions of each example of a LayoutSampler batch."""
    valid = np.asarray(meta["valid"])
    return np.broadcast_to(valid.sum(-1), (batch_size,)).astype(np.int64)


def train_flops_fn(model_config):
    """A fast `lengths (B,) int -> (B,) float64 training FLOPs per example` for MFU on useful
    tokens: perf.train_flops_per_sequence at each example's real length.

    perf's count is linear (matmuls) plus quadratic (dense attention) in the length; it builds
    the model's shapes on every call (~0.4 s), so the two coefficients are read off once and
    checked at a third length.
    """
    f1, f2, f3 = (perf.train_flops_per_sequence(model_config, n) for n in (1, 2, 3))
    quad = (f2 - 2.0 * f1) / 2.0
    lin = f1 - quad
    if not np.isclose(lin * 3 + quad * 9, f3, rtol=1e-9):
        raise AssertionError("perf.train_flops_per_sequence is no longer linear + quadratic in "
                             "the sequence length; update train_step.train_flops_fn")
    return lambda lengths: lin * np.asarray(lengths, np.float64) + quad * np.square(
        np.asarray(lengths, np.float64))


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------
def _bcast(x, batch):
    """(L,) or (B, L) metadata -> (B, L)."""
    return jnp.broadcast_to(x, (batch,) + x.shape[-1:])


def target_weights(meta, batch: int, known_weight: float = 1.0, raster: bool = False):
    """Which positions the loss counts, from metadata alone (so the whole batch's normaliser is
    known before its micro-batches run).

    Returns:
      gen_BL (B, L) bool: generation targets (the new ring; every target for raster);
      known_BL (B, L) bool: known-area (correction) targets;
      weights_BL (B, L) float32: gen + known_weight * known.
    """
    target_pos_BL = _bcast(meta["target_pos"], batch)
    has_target_BL = _bcast(meta["valid"], batch) & (target_pos_BL >= 0)
    gen_BL = has_target_BL & (True if raster else _bcast(meta["is_new"], batch))
    known_BL = has_target_BL & ~gen_BL
    return gen_BL, known_BL, gen_BL + known_weight * known_BL.astype(jnp.float32)


def rni_tokens(tokens_BL, flat_pos_BL, known_input_BL, rng, rni_range, vocab_size: int,
               num_positions: int, mode: str = "per_position"):
    """Random-noise injection: (B, L) int32 input tokens with known-area inputs replaced.

    Each example draws a rate ~ U(rni_range). 'per_position': each of its `num_positions` grid
    positions is noised with that probability and gets one random code, used at every index
    whose input is that position (so all its blocks agree); 'per_index': each known-area index
    is noised independently. Class and new-ring inputs (known_input_BL False) are untouched.
    """
    if mode not in RNI_MODES:
        raise ValueError(f"config.train.rni_mode={mode!r}: use one of {RNI_MODES}.")
    b = tokens_BL.shape[0]
    rng_rate, rng_where, rng_code = jax.random.split(rng, 3)
    lo, hi = rni_range
    rate_B = jax.random.uniform(rng_rate, (b,), minval=lo, maxval=hi)
    if mode == "per_position":
        pos_BL = jnp.maximum(flat_pos_BL, 0)
        noisy_BN = jax.random.uniform(rng_where, (b, num_positions)) < rate_B[:, None]
        random_BN = jax.random.randint(rng_code, (b, num_positions), 0, vocab_size)
        noisy_BL = known_input_BL & jnp.take_along_axis(noisy_BN, pos_BL, axis=1)
        random_BL = jnp.take_along_axis(random_BN, pos_BL, axis=1)
    else:
        noisy_BL = known_input_BL & (jax.random.uniform(rng_where, tokens_BL.shape)
                                     < rate_B[:, None])
        random_BL = jax.random.randint(rng_code, tokens_BL.shape, 0, vocab_size)
    return jnp.where(noisy_BL, random_BL, tokens_BL)


def loss_sums(model, params, codes_BN, labels_B, meta, rng, *, train: bool,
              rni_range=(0.0, 0.0), rni_mode: str = "per_position", known_weight: float = 1.0,
              raster: bool = False) -> dict[str, jax.Array]:
    """Sums over the batch that the loss and its metrics are ratios of (float32 scalars):
    ce_weighted = sum(CE * weight), weight, ce_new / n_new / correct_new (generation targets),
    ce_known / n_known / correct_known (correction targets), tokens (valid positions).
    Summing these over micro-batches and dividing once gives the full-batch token mean.
    Arguments as in `sequence_loss`."""
    b = codes_BN.shape[0]
    flat_pos_BL = _bcast(meta["flat_pos"], b)
    is_new_BL, is_class_BL = _bcast(meta["is_new"], b), _bcast(meta["is_class"], b)
    valid_BL = _bcast(meta["valid"], b)
    rng_drop, rng_rni = jax.random.split(rng)

    tokens_BL = jnp.take_along_axis(codes_BN, jnp.maximum(flat_pos_BL, 0), axis=1)
    lo, hi = rni_range
    if train and hi > 0 and not raster:
        tokens_BL = rni_tokens(tokens_BL, flat_pos_BL, valid_BL & ~is_new_BL & ~is_class_BL,
                               rng_rni, (lo, hi), model.config.vocab_size, codes_BN.shape[1],
                               rni_mode)

    mask = schedules.nested_mask(meta["step"], meta["is_new"], meta["is_class"], meta["valid"],
                                 xp=jnp)  # (L, L) or (B, L, L)
    hidden_BLD, _ = model.apply({"params": params}, tokens_BL, labels_B, meta["flat_pos"],
                                meta["is_new"], meta["is_class"], mask, train=train,
                                rngs={"dropout": rng_drop}, return_hidden=True)
    target_pos_BL = _bcast(meta["target_pos"], b)
    targets_BL = jnp.take_along_axis(codes_BN, jnp.maximum(target_pos_BL, 0), axis=1)
    gen_BL, known_BL, weights_BL = target_weights(meta, b, known_weight, raster)
    # Head and CE in sequence chunks, the gradient fused into the forward pass: (B, L, V)
    # float32 logits are never live at once. Only ce_weighted carries a gradient.
    ce_weighted, ce_BL, correct_BL = transformer.weighted_cross_entropy(
        model, params, hidden_BLD, targets_BL, weights_BL)
    total = lambda x, w: jnp.sum(jnp.where(w, x, 0.0).astype(jnp.float32))
    return dict(ce_weighted=ce_weighted, weight=jnp.sum(weights_BL),
                ce_new=total(ce_BL, gen_BL), n_new=total(1.0, gen_BL),
                correct_new=total(correct_BL, gen_BL), ce_known=total(ce_BL, known_BL),
                n_known=total(1.0, known_BL), correct_known=total(correct_BL, known_BL),
                tokens=total(1.0, valid_BL))


def finish_metrics(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """`loss_sums` (possibly summed over micro-batches) -> loss, loss_new, loss_known, acc_new,
    acc_known (token means) and tokens (valid positions)."""
    ratio = lambda a, n: sums[a] / jnp.maximum(sums[n], 1.0)
    return dict(loss=ratio("ce_weighted", "weight"), loss_new=ratio("ce_new", "n_new"),
                loss_known=ratio("ce_known", "n_known"), acc_new=ratio("correct_new", "n_new"),
                acc_known=ratio("correct_known", "n_known"), tokens=sums["tokens"])


def sequence_loss(model, params, codes_BN, labels_B, meta, rng, *, train: bool,
                  rni_range=(0.0, 0.0), rni_mode: str = "per_position",
                  known_weight: float = 1.0, raster: bool = False):
    """Teacher-forced cross-entropy over a packed layout; returns (loss, metrics).

    Args:
      codes_BN: (B, H*W) int32 flattened token maps.
      labels_B: (B,) int32 class ids.
      meta: layout metadata (see LayoutSampler), arrays (L,) or (B, L).
      rng: key for dropout, class dropout and RNI.
      rni_range: (lo, hi): each example replaces a fraction ~ U(lo, hi) of its known-area input
        tokens by uniformly random codes (RNI); (0, 0) turns it off.
      rni_mode: 'per_position' or 'per_index' (see `rni_tokens`).
      known_weight: weight of known-area targets relative to new-ring targets.
      raster: every target is a generation target (no known area is re-fed).
    Returns:
      loss: float32 scalar, the weighted token mean; metrics: `finish_metrics`.
    """
    metrics = finish_metrics(loss_sums(model, params, codes_BN, labels_B, meta, rng,
                                       train=train, rni_range=rni_range, rni_mode=rni_mode,
                                       known_weight=known_weight, raster=raster))
    return metrics["loss"], metrics


# ----------------------------------------------------------------------------------------------
# Optimiser, state and the update step
# ----------------------------------------------------------------------------------------------
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
    with the step so a resumed run draws the same numbers. With `grad_accum` > 1 the gradient
    is the full batch's token mean: every micro-batch's weighted CE is divided by the whole
    batch's target weight (known from the metadata up front), and the results are summed.
    jit compiles once per metadata shape (one per RDS bucket)."""
    t = config.train
    raster = layouts.schedule.is_next_token
    loss_kw = dict(rni_range=tuple(t.rni_range), rni_mode=t.get("rni_mode", "per_position"),
                   known_weight=t.known_weight, raster=raster)
    if loss_kw["rni_mode"] not in RNI_MODES:
        raise ValueError(f"config.train.rni_mode={loss_kw['rni_mode']!r}: use one of "
                         f"{RNI_MODES}.")

    def scaled_loss(params, codes_BN, labels_B, meta, rng, norm):
        sums = loss_sums(model, params, codes_BN, labels_B, meta, rng, train=True, **loss_kw)
        return sums["ce_weighted"] / norm, sums

    grad_fn = jax.grad(scaled_loss, has_aux=True)

    def grads_fn(params, codes_BN, labels_B, meta, rng):
        """(grads of the full-batch weighted token mean, summed loss_sums); micro-batches run
        under a lax.scan, which keeps memory flat."""
        _, _, weights_BL = target_weights(meta, codes_BN.shape[0], t.known_weight, raster)
        norm = jnp.maximum(jnp.sum(weights_BL), 1.0)
        if t.grad_accum == 1:
            return grad_fn(params, codes_BN, labels_B, meta, rng, norm)
        # Split the batch (and per-example metadata) into micro-batches; shared (L,) metadata
        # is broadcast to every micro-batch.
        micro = lambda x: x.reshape((t.grad_accum, -1) + x.shape[1:])
        meta_mb = {k: (micro(v) if v.ndim == 2 else
                       jnp.broadcast_to(v, (t.grad_accum,) + v.shape)) for k, v in meta.items()}
        xs = (micro(codes_BN), micro(labels_B), meta_mb, jax.random.split(rng, t.grad_accum))
        run = lambda x: grad_fn(params, *x, norm)
        first = jax.tree.map(lambda v: v[0], xs)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(run, first))
        body = lambda acc, x: (jax.tree.map(jnp.add, acc, run(x)), None)
        return jax.lax.scan(body, zeros, xs)[0]

    def train_step(state, codes_BN, labels_B, meta):
        step_rng = jax.random.fold_in(rng, state.step)
        grads, sums = grads_fn(state.params, codes_BN, labels_B, meta, step_rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = finish_metrics(sums)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             ema_params=trainer.ema_update(state.ema_params, params,
                                                           t.ema_decay)), metrics

    batch_sh = lambda nd: sharding.batch_sharding(mesh, nd)
    return jax.jit(train_step, donate_argnums=0,
                   in_shardings=(state_shardings, batch_sh(2), batch_sh(1),
                                 meta_shardings(mesh, layouts)),
                   out_shardings=(state_shardings, None))
