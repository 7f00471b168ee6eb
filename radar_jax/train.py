"""RadAR generator training on cached token maps, in one readable function.

`train_and_evaluate(config, workdir, tokens_path)` trains (or resumes) the transformer of
`config.model` on the token cache at `tokens_path` with the ring schedule `config.schedule`:

  setup -> data -> model -> shard -> update step -> checkpoint -> loop

The layouts, the loss (RNI included) and the jitted update step are in train_step.py; this
file strings them together with the data, the checkpoints and the logs.
"""

from __future__ import annotations

import contextlib
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from radar_jax import checkpoint as ckpt_lib
from radar_jax import config_defaults as cd
from radar_jax import config_io
from radar_jax import data as data_lib
from radar_jax import fileio
from radar_jax import perf
from radar_jax import preemption
from radar_jax import reporting
from radar_jax import sharding
from radar_jax import train_step as ts
from radar_jax import trainer
from radar_jax.models import transformer


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       tokens_path: str) -> dict[str, float]:
    """Trains (or resumes) the generator in `workdir` on the token cache at `tokens_path`."""
    t = config.train
    # ---------------------------------------------------------------- setup
    workdir = fileio.path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if not t.num_steps and t.get("init_from"):
        return export_init_from(config, workdir)
    writer = reporting.create_writer(workdir)
    mesh = sharding.make_mesh(config.get("mesh"))
    sharding.check_batch_divisible(t.batch_size, mesh)
    if t.batch_size % t.grad_accum:
        raise ValueError(f"config.train.batch_size={t.batch_size} is not divisible by "
                         f"grad_accum={t.grad_accum}.")
    # Separate streams: the same root key must not both initialise the weights and seed the
    # dropout / RNI draws of every step.
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    schedule = cd.schedule_from_config(config.schedule, config.model.grid)

    # ---------------------------------------------------------------- data
    # The cache is memory-mapped, never loaded whole; its shape, codes and labels are checked
    # against the model before anything is compiled.
    try:
        cache = data_lib.TokenCache(tokens_path)
        if tuple(cache.grid) != tuple(config.model.grid):
            raise ValueError(f"Token cache {tokens_path} holds {tuple(cache.grid)} token maps but "
                             f"config.model.grid={tuple(config.model.grid)}; re-encode with the "
                             "matching tokenizer or fix the grid.")
        data_lib.check_token_cache(cache, num_classes=config.model.num_classes,
                                   vocab_size=config.model.vocab_size)
    except (ValueError, FileNotFoundError) as e:
        raise config_io.ConfigError(str(e)) from None
    # Each step's global batch is a pure function of the step (data/global_batches.py): the
    # train state's step is the data position, on any number of processes.
    batches = data_lib.GlobalTokenBatches(cache, t.batch_size, seed=config.seed,
                                          process_index=jax.process_index(),
                                          process_count=jax.process_count())
    layouts = ts.LayoutSampler(schedule, t, config.model.cls_token_num, seed=config.seed,
                               correction_band=cd.correction_band(
                                   config.schedule.get("correction_band", 0)))
    # The loss of predicting every token from its marginal frequency: what the model must beat.
    counts = cache.code_counts(config.model.vocab_size)
    freq = counts / counts.sum()
    marginal_entropy = float(-np.sum(freq[freq > 0] * np.log(freq[freq > 0])))
    logging.info("Marginal-frequency baseline loss (token entropy): %.4f nats.", marginal_entropy)
    logging.info("Generator: %d token maps %s, schedule %s with %d steps, sequence length %d%s.",
                 len(cache), tuple(cache.grid), schedule.kind, schedule.num_steps, layouts.length,
                 f", RDS {t.rds_mode}" if layouts.rds else "")

    # ---------------------------------------------------------------- model
    model = transformer.Transformer(config.model)
    tx = ts.make_optimizer(t)
    counts = transformer.count_params(config.model)
    logging.info("Transformer: %.2fM parameters (%.2fM non-embedding).",
                 counts["total"] / 1e6, counts["non_embedding"] / 1e6)

    # ---------------------------------------------------------------- shard
    rules = sharding.rules_from_config(config)
    state, state_shardings = trainer.create_sharded_state(ts.init_fn(config, tx), init_rng,
                                                          mesh, rules)

    # ---------------------------------------------------------------- update step
    p_train_step = ts.make_train_step(config, model, tx, mesh, state_shardings, layouts,
                                      step_rng)
    meta_sh = ts.meta_shardings(mesh, layouts)

    # ---------------------------------------------------------------- checkpoint
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=t.keep_checkpoints)
    try:
        state, resumed = ckpt.restore(state)
    except ckpt_lib.CheckpointMismatchError as e:
        raise config_io.ConfigError(str(e)) from None
    if resumed is None and t.get("init_from"):
        # A fresh run from LlamaGen's GPT: its weights, RadAR's new prompt embedding as drawn.
        params = init_from_llamagen(config, state.params)
        state = state.replace(params=jax.device_put(params, state_shardings.params))
        if t.ema_decay:
            state = state.replace(ema_params=state.params)
    start = int(state.step)

    # ---------------------------------------------------------------- loop
    # Throughput and MFU count useful (non-padding) tokens only: each step's FLOPs are those of
    # its examples' real lengths, summed on the host from the layouts (no device sync).
    flops_per_step = t.batch_size * perf.train_flops_per_sequence(config.model, layouts.length)
    useful_tokens = useful_flops = 0.0
    flops_fn = ts.train_flops_fn(config.model)
    peak = perf.measure_matmul_peak(jnp.bfloat16 if config.model.dtype == "bfloat16"
                                    else jnp.float32) * jax.device_count()
    logging.info("Measured matmul peak %.1f GFLOP/s over %d device(s); %.2f GFLOP per step.",
                 peak / 1e9, jax.device_count(), flops_per_step / 1e9)
    progress = reporting.Progress("generator", t.num_steps, start, every=t.log_every)
    last = {}
    # closing(ckpt): an interrupt (Ctrl-C) or error soon after a save must not abandon the
    # asynchronous write in flight; close() waits for it, so that checkpoint is kept.
    local = t.batch_size // jax.process_count()
    local_rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
    with sharding.mesh_context(mesh), nn.logical_axis_rules(rules), contextlib.closing(ckpt), \
            preemption.StopSignal() as stop:
        for step in range(start + 1, t.num_steps + 1):
            batch = batches(step)
            # The ladders of the whole global batch, then this host's rows: example j of step s
            # trains on the same ladder whatever the number of processes.
            meta = layouts(step, t.batch_size)
            lengths = ts.sequence_lengths(meta, t.batch_size)
            useful_tokens += float(lengths.sum())
            useful_flops += float(flops_fn(lengths).sum())
            meta = {k: (v[local_rows] if v.ndim == 2 else v) for k, v in meta.items()}
            codes_BN = batch["codes"].reshape(len(batch["codes"]), -1)
            device_batch = sharding.shard_batch((codes_BN, batch["label"]), mesh)
            meta = {k: (sharding.shard_batch(v, mesh) if v.ndim == 2
                        else jax.device_put(v, meta_sh[k])) for k, v in meta.items()}
            state, metrics = p_train_step(state, *device_batch, meta)
            if step % t.log_every == 0 or step == t.num_steps:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                steps_per_s = progress.rate(step)
                metrics.pop("tokens")
                metrics["tokens_per_s"] = useful_tokens / (step - start) * steps_per_s
                metrics["mfu"] = useful_flops / (step - start) * steps_per_s / peak
                metrics["marginal_entropy"] = marginal_entropy
                writer.write_scalars(step, {f"train/{k}": v for k, v in metrics.items()})
                progress.update(step, loss=metrics["loss"], new=metrics["loss_new"],
                                known=metrics["loss_known"], mfu=metrics["mfu"])
                last = metrics
            else:
                progress.update(step)
            stopping = stop.requested(step) and step < t.num_steps
            if stopping or step % t.ckpt_every == 0 or step == t.num_steps:
                ckpt.save(step, state)
            if stopping:
                ckpt.wait()  # the checkpoint is on disk before the process goes
                raise preemption.Preempted(step, ckpt.directory)
    progress.close()
    ckpt_lib.export_params(workdir / "params",
                           state.ema_params if t.ema_decay else state.params)
    writer.close()
    return last


def _load_llamagen(config):
    """(params, source) of config.train.init_from, converted for config.model."""
    from radar_jax import convert  # pylint: disable=g-import-not-at-top
    path = config.train.init_from
    try:
        _, params = convert.load_llamagen_gpt(path, config=config.model)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise config_io.ConfigError(f"config.train.init_from={path}: {e}") from None
    return params


def init_from_llamagen(config, params_template):
    """LlamaGen's GPT weights (config.train.init_from) in the structure of `params_template`
    (this run's freshly initialised params), whose prompt_embedding is kept: LlamaGen has none.

    Raises ConfigError naming the file and the mismatched key and shapes when the checkpoint
    does not fit config.model (e.g. another size: use the matching configs/imagenet.py:SIZE).
    """
    params = _load_llamagen(config)
    params["prompt_embedding"] = np.asarray(jax.device_get(params_template["prompt_embedding"]))
    logging.info("Initialised the generator from LlamaGen's %s (prompt embedding new).",
                 config.train.init_from)
    return params


def export_init_from(config, workdir) -> dict[str, float]:
    """train.num_steps=0 with init_from: LlamaGen's weights converted and exported as this
    stage's params (no data, no training): a ready model for sampling and evaluation."""
    params = _load_llamagen(config)
    ckpt_lib.export_params(fileio.path(workdir) / "params", params)
    logging.info("Generator: exported LlamaGen's %s without training.", config.train.init_from)
    return {}
