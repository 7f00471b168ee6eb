"""The KV-cached sampler: RadAR's ring sampler and LlamaGen's raster sampler in one function.

`sample` is one jitted function: the schedule, the model config and the discrete options are
static; params, labels, rng and the float options are traced. Its loop is a few `lax.scan`s
over the sampler steps (one per group of steps that share a padded block shape, see
`radar_jax.sampling_plan`), with the canvas, the KV cache, the rng and the step counter carried
in a small `SamplerState`, like maskgit's sampler.

Step k (ring kinds; docs/method.md, "Inference"), with correction band b (`schedules.layouts`):
  1. feed block B_k: the known band K_k (rings k-b..k-1; the whole known area C_{k-1} for
     b = None) first, carrying the CURRENT canvas tokens, then the new ring N_k carrying the
     learnable prompt, each at its own 2D-RoPE position; step 0 also feeds the class token in
     front of the center prompt;
  2. its keys/values go to cache slots [offset_k, offset_k + L_k): the cache is the packed
     teacher-forcing sequence, and the block attends to it under the training nested mask
     (every earlier block is visible, so rings older than the band are seen through the
     keys/values they wrote while they were in it);
  3. sample a token at every position of B_k and write them back into the canvas at all of
     B_k (correct=True: the known band is re-predicted and replaced) or only at N_k. Positions
     outside the block, older than the band, keep their value.
For 'raster' the same loop is LlamaGen's next-token sampler: step 0 feeds the class token,
whose output predicts position 0; step t feeds token t-1 and predicts token t.

Because every step writes exactly the keys/values that the teacher-forced forward over
`schedules.train_layout(schedule, correction_band=b)` computes at those indices (with each
block's known inputs equal to the canvas before that step), greedy sampling (top_k=1)
reproduces that forward's argmax exactly, up to float rounding.

Cost (per image and CFG branch): num_class_tokens + sum_k (|K_k| + |N_k|) token-forwards in K
sequential calls (sum_k |C_k| = 1629 for euclidean-13 with b = None, 512 with b = 1), plus the
padding that `sampling_plan` reports, against H*W tokens in H*W calls for raster.
Raster at small batch is bound by reading every weight once per token; the ring kinds by
matmul FLOPs and by the attention over the cache (a step attends over every earlier block).
The categorical draw costs one random number per code per sampled position: with
jax.random.key(..., impl='rbg') it is ~2.4x cheaper on CPU than with the default threefry.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from radar_jax import schedules
from radar_jax.models import transformer
from radar_jax.sampling_plan import DEFAULT_MAX_GROUPS, SamplingPlan, sampling_plan
from radar_jax.sampling_plan import slot_cost_for_dim

__all__ = ["sample", "sampling_plan", "plan_for_config", "filter_logits", "cfg_scales",
           "SamplerState", "SamplingPlan"]

CFG_SCHEDULES = ("constant", "linear")


@flax.struct.dataclass
class SamplerState:
    """The scan carry of the sampler.

    canvas_BN: (B, H*W) int32 token map; -1 where nothing is generated (or fixed) yet.
    cache: transformer KV cache, {'layers_i': {'k', 'v': (B', S, n_kv_head, head_dim)}} in the
      compute dtype; B' = 2B with classifier-free guidance (conditional half first), S = the
      current group's cache length.
    rng: the base key; step k draws with fold_in(rng, k).
    step: int32 scalar, the sampler step about to run.
    """
    canvas_BN: jax.Array
    cache: Any
    rng: jax.Array
    step: jax.Array


def plan_for_config(schedule: schedules.RingSchedule, model_config,
                    correction_band: int | None = None,
                    max_groups: int = DEFAULT_MAX_GROUPS) -> SamplingPlan:
    """The plan that `sample` uses for this schedule, band and model (slot cost from the
    width). correction_band: None (whole known area) or an int >= 1; max_groups: at most
    this many scan bodies (see `sample`)."""
    return sampling_plan(schedule, model_config.cls_token_num, correction_band=correction_band,
                         slot_cost=slot_cost_for_dim(model_config.dim), max_groups=max_groups)


# ----------------------------------------------------------------------------------------------
# Logit processing
# ----------------------------------------------------------------------------------------------
def cfg_scales(cfg_scale, num_steps: int, schedule: str = "constant") -> jax.Array:
    """(num_steps,) float32 guidance scale of each sampler step.

    'constant': cfg_scale at every step. 'linear': ramps from 1 (no guidance) at the first step
    to cfg_scale at the last, s_k = 1 + (cfg_scale - 1) * k / (K - 1); a single step uses
    cfg_scale. Raster counts H*W steps (the class-token step that predicts position 0 first).
    """
    if schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule={schedule!r} is not supported; use one of "
                         f"{list(CFG_SCHEDULES)}")
    cfg_scale = jnp.asarray(cfg_scale, jnp.float32)
    if schedule == "constant" or num_steps == 1:
        return jnp.full((num_steps,), cfg_scale)
    ramp_K = jnp.arange(num_steps, dtype=jnp.float32) / (num_steps - 1)
    return 1.0 + (cfg_scale - 1.0) * ramp_K


def filter_logits(logits_BPV: jax.Array, temperature=1.0, top_k: int = 0,
                  top_p=None) -> jax.Array:
    """Temperature, then top-k, then nucleus (top-p) filtering, as LlamaGen orders them.

    Args:
      logits_BPV: (..., V) float32.
      temperature: > 0 (may be traced); logits are divided by it.
      top_k: static int; 0 or >= V keeps everything, else tokens whose logit is below the k-th
        largest get -inf (ties with the k-th are kept).
      top_p: None (off) or a float in (0, 1] (may be traced): keeps the smallest set of most
        likely tokens whose cumulative probability reaches top_p (a token is kept when the
        probability of the tokens strictly more likely than it is below top_p), so the most
        likely token always survives.
    Returns:
      (..., V) float32 with removed tokens at -inf.
    """
    logits = logits_BPV.astype(jnp.float32) / temperature
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth_BP1 = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth_BP1, -jnp.inf, logits)
    if top_p is not None:
        sorted_BPV = -jnp.sort(-logits, axis=-1)  # descending
        probs_BPV = jax.nn.softmax(sorted_BPV, axis=-1)
        before_BPV = jnp.cumsum(probs_BPV, axis=-1) - probs_BPV
        keep_BPV = before_BPV < top_p
        # The least likely kept logit is the threshold; ties with it are kept too.
        threshold_BP1 = jnp.min(jnp.where(keep_BPV, sorted_BPV, jnp.inf), axis=-1,
                                keepdims=True)
        logits = jnp.where(logits < threshold_BP1, -jnp.inf, logits)
    return logits


def _pick_tokens(logits_BPV, key, temperature, top_k, top_p):
    """(B, P) int32 tokens: argmax for top_k == 1 (greedy, no rng), else a filtered draw."""
    if top_k == 1:
        return jnp.argmax(logits_BPV, axis=-1).astype(jnp.int32)
    logits_BPV = filter_logits(logits_BPV, temperature, top_k, top_p)
    return jax.random.categorical(key, logits_BPV, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# The jitted sampler
# ----------------------------------------------------------------------------------------------
def _force_fixed(canvas_BN, fixed_codes_BN, fixed_mask_BN):
    if fixed_mask_BN is None:
        return canvas_BN
    return jnp.where(fixed_mask_BN, fixed_codes_BN, canvas_BN)


def _grow_cache(cache, length: int):
    """Pads every (B, S, K, D) cache array with empty slots up to `length`."""
    def pad(x):
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))
    return jax.tree.map(pad, cache)


@functools.partial(jax.jit, static_argnames=(
    "config", "schedule", "correction_band", "use_cfg", "cfg_schedule", "top_k", "use_top_p",
    "correct", "return_canvases", "max_groups"))
def _sample_jit(params, labels_B, rng, cfg_scale, temperature, top_p, fixed_codes_BN,
                fixed_mask_BN, *, config, schedule, correction_band, use_cfg, cfg_schedule, top_k,
                use_top_p, correct, return_canvases, max_groups):
    """Traced body of `sample` (arguments already validated; see `sample`)."""
    plan = plan_for_config(schedule, config, correction_band, max_groups)
    model = transformer.Transformer(config)
    compute_dtype = jnp.dtype(config.dtype)
    if compute_dtype != jnp.float32:
        # Every layer casts its float32 weights to the compute dtype before use, so casting
        # once here gives the same numbers and halves the weight bytes each step reads.
        params = jax.tree.map(
            lambda x: x.astype(compute_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
            params)
    batch = labels_B.shape[0]
    num_pos = schedule.grid[0] * schedule.grid[1]
    # CFG: conditional half first, then the null class (id num_classes), as LlamaGen does.
    labels_in = (jnp.concatenate([labels_B, jnp.full_like(labels_B, config.num_classes)])
                 if use_cfg else labels_B)
    scale_K = cfg_scales(cfg_scale, plan.num_steps, cfg_schedule)
    top_p = top_p if use_top_p else None

    def step_fn(state: SamplerState, xs):
        # Known positions carry the current canvas; the model ignores the token at class,
        # new-ring and padding positions (input_pos 0 there).
        tokens_BP = state.canvas_BN[:, xs["input_pos"]]
        if use_cfg:
            tokens_BP = jnp.concatenate([tokens_BP, tokens_BP])
        logits_BPV, cache = model.apply(
            {"params": params}, tokens_BP, labels_in, xs["flat_pos"], xs["is_new"],
            xs["is_class"], xs["mask"], cache=state.cache, cache_index=xs["cache_index"])
        if use_cfg:
            cond_BPV, uncond_BPV = jnp.split(logits_BPV, 2)
            logits_BPV = uncond_BPV + scale_K[state.step] * (cond_BPV - uncond_BPV)
        key = jax.random.fold_in(state.rng, state.step)
        sampled_BP = _pick_tokens(logits_BPV, key, temperature, top_k, top_p)
        write_N = xs["writes"] if correct else xs["writes_new"]
        canvas_BN = jnp.where(write_N, sampled_BP[:, xs["src"]], state.canvas_BN)
        canvas_BN = _force_fixed(canvas_BN, fixed_codes_BN, fixed_mask_BN)
        new_state = SamplerState(canvas_BN, cache, state.rng, state.step + 1)
        return new_state, (canvas_BN if return_canvases else None)

    canvas_BN = _force_fixed(jnp.full((batch, num_pos), -1, jnp.int32), fixed_codes_BN,
                             fixed_mask_BN)
    cache = transformer.init_cache(config, labels_in.shape[0], plan.groups[0].cache_len,
                                   jnp.dtype(config.dtype))
    state = SamplerState(canvas_BN, cache, rng, jnp.int32(0))
    canvases = []
    for group in plan.groups:
        # Each group attends over its own cache length: early steps do not pay for late slots.
        state = state.replace(cache=_grow_cache(state.cache, group.cache_len))
        xs = {k: jnp.asarray(v) for k, v in group.arrays.items() if k != "step"}
        state, canvases_kBN = jax.lax.scan(step_fn, state, xs)
        canvases.append(canvases_kBN)
    codes_BHW = state.canvas_BN.reshape(batch, *schedule.grid)
    if not return_canvases:
        return codes_BHW, None
    return codes_BHW, jnp.concatenate(canvases).reshape(plan.num_steps, batch, *schedule.grid)


# ----------------------------------------------------------------------------------------------
# Public entry point: validation, then the jitted sampler.
# ----------------------------------------------------------------------------------------------
def _frozen_config(model_config) -> ml_collections.FrozenConfigDict:
    """A hashable copy of the transformer config (jit needs static arguments to hash)."""
    if isinstance(model_config, ml_collections.FrozenConfigDict):
        return model_config
    if isinstance(model_config, (ml_collections.ConfigDict, dict)):
        return ml_collections.FrozenConfigDict(model_config)
    raise ValueError(f"model_config must be a transformer ConfigDict (from "
                     f"transformer.model_config or load_llamagen_gpt), got "
                     f"{type(model_config).__name__}")


def _check_labels(labels, num_classes: int) -> jax.Array:
    if isinstance(labels, jax.core.Tracer):
        raise ValueError("labels must be concrete: call sample() outside jit (it is jitted "
                         "inside) so that labels can be checked")
    labels_np = np.asarray(labels)
    if labels_np.ndim != 1 or labels_np.size == 0 or not np.issubdtype(labels_np.dtype,
                                                                        np.integer):
        raise ValueError(f"labels must be a non-empty (B,) integer array of class ids, got shape "
                         f"{labels_np.shape} and dtype {labels_np.dtype}")
    bad = labels_np[(labels_np < 0) | (labels_np >= num_classes)]
    if bad.size:
        raise ValueError(f"labels {bad[:8].tolist()} are out of range: class ids must be in "
                         f"[0, {num_classes}) (num_classes={num_classes}; the null class "
                         f"{num_classes} is added by the sampler when cfg_scale != 1)")
    return jnp.asarray(labels_np, jnp.int32)


def _check_options(config, schedule, cfg_scale, cfg_schedule, temperature, top_k, top_p):
    if not isinstance(schedule, schedules.RingSchedule):
        raise ValueError(f"schedule must be a RingSchedule from schedules.make_schedule, got "
                         f"{type(schedule).__name__}")
    if tuple(schedule.grid) != tuple(config.grid):
        raise ValueError(f"schedule {schedule!r} is on a {schedule.grid} grid but the model "
                         f"grid is {tuple(config.grid)}: make the schedule with "
                         f"make_schedule(kind, {tuple(config.grid)})")
    if not cfg_scale >= 0:
        raise ValueError(f"cfg_scale={cfg_scale} must be >= 0 (1 = no guidance; 0 = "
                         "unconditional)")
    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule={cfg_schedule!r} must be one of {list(CFG_SCHEDULES)}")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0; use top_k=1 for greedy "
                         "decoding")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not (
            0 <= top_k <= config.vocab_size):
        raise ValueError(f"top_k={top_k!r} must be an int in [0, {config.vocab_size}] "
                         "(vocab_size; 0 = no top-k, 1 = greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (1 = no nucleus filtering)")


def _check_fixed(fixed_codes, fixed_mask, batch: int, grid, vocab_size: int):
    if fixed_codes is None and fixed_mask is None:
        return None, None
    if fixed_codes is None or fixed_mask is None:
        raise ValueError("give both fixed_codes (B, H, W) int and fixed_mask (B, H, W) bool, or "
                         "neither")
    codes, mask = np.asarray(fixed_codes), np.asarray(fixed_mask)
    want = (batch, *grid)
    if codes.shape != want or mask.shape != want:
        raise ValueError(f"fixed_codes {codes.shape} and fixed_mask {mask.shape} must both have "
                         f"shape (B, H, W) = {want}")
    if mask.dtype != bool:
        raise ValueError(f"fixed_mask must be a bool array, got dtype {mask.dtype}")
    used = codes[mask]
    if used.size and (used.min() < 0 or used.max() >= vocab_size):
        raise ValueError(f"fixed_codes under fixed_mask must be codes in [0, {vocab_size}), got "
                         f"values in [{used.min()}, {used.max()}]")
    return (jnp.asarray(codes.reshape(batch, -1), jnp.int32),
            jnp.asarray(mask.reshape(batch, -1)))


def sample(params, model_config, schedule: schedules.RingSchedule, labels, rng, *,
           cfg_scale: float = 1.0, cfg_schedule: str = "constant", temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, correct: bool = True,
           return_canvases: bool = False, fixed_codes=None, fixed_mask=None,
           correction_band: int | None = None, max_groups: int = DEFAULT_MAX_GROUPS):
    """Generates token maps with the KV-cached ring sampler (or LlamaGen's, for 'raster').

    Args:
      params: Transformer parameters (pass jax arrays: numpy ones are copied at every call).
      model_config: the transformer ConfigDict (its grid must equal the schedule's).
      schedule: a RingSchedule; 'raster' is next-token AR with H*W steps.
      labels: (B,) int class ids in [0, num_classes).
      rng: a jax.random key; step k draws with fold_in(rng, k). Unused when top_k == 1.
      cfg_scale: classifier-free guidance scale s >= 0; when s != 1 the batch is doubled with
        the null class and logits = u + s * (c - u).
      cfg_schedule: 'constant', or 'linear' (s ramps from 1 at the first step to cfg_scale at
        the last; see `cfg_scales`).
      temperature, top_k, top_p: applied in that order (see `filter_logits`); top_k=1 is
        greedy and deterministic.
      correct: True re-predicts and replaces the known band at every step; False writes only
        the new ring (no effect on 'raster').
      return_canvases: also return the canvas after every step.
      fixed_codes, fixed_mask: (B, H, W) int / bool, both or neither (editing, out-painting):
        masked positions hold fixed_codes from the start and after every step, so known-area
        inputs always carry them and the output keeps them.
      correction_band: None (re-feed the whole known area C_{k-1} at every step, the paper) or
        an int b >= 1 (re-feed only rings k-b..k-1; older rings keep their tokens and stay
        visible through the KV cache). Use the band the model was trained with. Ignored by
        'raster'; b >= K-1 equals None (and shares its compiled sampler).
      max_groups: at most this many groups of steps, each one `lax.scan` body to trace and
        compile (`sampling_plan`). The default lets the plan keep padding low, which pays when
        many images are sampled; small grids and few images (the digits demo on CPU) are
        compile-bound, where 1-2 groups are faster end to end. The samples are the same
        greedy tokens whatever the grouping; random draws differ (the padded block shape
        changes the draw).

    Returns:
      codes (B, H, W) int32; with return_canvases also canvases (K, B, H, W) int32, the canvas
      after each of the K steps: C_k filled, fixed positions at their codes, -1 elsewhere.

    Raises:
      ValueError: out-of-range labels or options, a schedule on another grid, bad fixed_*,
        a correction_band that is not None or an int >= 1.
    """
    config = _frozen_config(model_config)
    labels_B = _check_labels(labels, config.num_classes)
    _check_options(config, schedule, cfg_scale, cfg_schedule, temperature, top_k, top_p)
    # The effective band is the jit key: b >= K-1 lays out exactly like None.
    band = schedules.effective_correction_band(schedule, correction_band)
    if cfg_scale != 1.0 and config.class_dropout_prob <= 0:
        raise ValueError(f"cfg_scale={cfg_scale} needs the null class, but this model has none "
                         "(class_dropout_prob=0): use cfg_scale=1.0")
    fixed_codes_BN, fixed_mask_BN = _check_fixed(fixed_codes, fixed_mask, labels_B.shape[0],
                                                 schedule.grid, config.vocab_size)
    codes, canvases = _sample_jit(
        params, labels_B, rng, jnp.float32(cfg_scale), jnp.float32(temperature),
        jnp.float32(top_p), fixed_codes_BN, fixed_mask_BN, config=config, schedule=schedule,
        correction_band=band, use_cfg=cfg_scale != 1.0, cfg_schedule=cfg_schedule,
        top_k=0 if int(top_k) == config.vocab_size else int(top_k), use_top_p=top_p < 1.0,
        correct=bool(correct) or schedule.is_next_token, return_canvases=bool(return_canvases),
        max_groups=int(max_groups))
    return (codes, canvases) if return_canvases else codes
