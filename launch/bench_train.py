"""Generator training throughput and MFU for the packed RadAR layouts and the raster baseline.

The step timed is radar_jax's own: `train_step.make_train_step`, the function train.py runs
(teacher-forced loss with the nested mask, RNI, gradient accumulation, AdamW, EMA, grad norm,
the state born sharded by the logical-axis rules and donated). No checkpointing, logging or data
pipeline: one random batch of codes is fed every step, so the numbers are the step itself.

For each layout: the layouts of training steps 1..`--steps` from train_step.LayoutSampler (the
full layout every step without `--rds`; RDS sub-ladders padded to a few bucket lengths with
it), compile time (lower + compile of every distinct shape, reported apart), `--warmup` untimed
steps, then the timed steps, each synchronised with block_until_ready.

Example (GPT-B, float32, batch 2, on this machine's CPU; about ten minutes per layout):
  python launch/bench_train.py --size B --batch_size 2 --layouts euclidean-13 --rds \
      --out /tmp/bench_train.jsonl

Each case prints one JSON line (and appends it to --out) with: layout, rds, correction_band,
seq_len (the full layout), batch, padded_lengths (bucket per timed step), step_s (median) and
every timed step; throughput in useful (non-padding) tokens: tokens_per_s = valid positions of
the timed steps / their total time, padded_tokens_per_s (every position fed), padding_waste
(share of the timed steps' positions that are padding) and expected_padding_waste
(LayoutSampler.padding_waste over 256 batches); images_per_s; useful model TFLOP per step
(perf.train_flops_per_sequence at each example's real length: 3x the forward, dense attention
over that length), achieved useful TFLOP/s, MFU on useful tokens against
perf.measure_matmul_peak in the same dtype on every device, compile_s, peak memory (device
memory_stats when the backend has them, else the process max RSS, which only grows across
cases) and the compiled program's own memory estimate (largest shape), device, backend, dtype,
remat, attention_chunk. At the end: a table.
"""

from __future__ import annotations

import argparse
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from radar_jax import config_defaults as cd
from radar_jax import perf
from radar_jax import sharding
from radar_jax import train_step
from radar_jax import trainer
from radar_jax.models import transformer

# name -> config.schedule fields of the benchmarked layouts on a 16x16 grid.
LAYOUTS = {
    "euclidean-13": dict(kind="euclidean"),
    "crops-10": dict(kind="crops", preset="crops10"),
    "crops-13": dict(kind="crops", preset="crops13"),
    "raster": dict(kind="raster"),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="B", choices=["tiny", "B", "L", "XL"],
                        help="transformer.model_config size; always on a 16x16 token grid")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="global batch; default 8 on CPU, 32 elsewhere")
    parser.add_argument("--layouts", default="euclidean-13,crops-10,raster",
                        help=f"comma-separated subset of {sorted(LAYOUTS)}")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per layout (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype (params and optimizer state stay float32)")
    parser.add_argument("--remat", action="store_true",
                        help="rematerialise every layer in the backward pass (less memory)")
    parser.add_argument("--rds", action="store_true",
                        help="train on RDS sub-ladders (config.train's default RDS settings)")
    parser.add_argument("--rds_buckets", type=int, default=None,
                        help="with --rds: bucket lengths (default config.train's; 1 = pad to "
                             "the full length, as before bucketing)")
    parser.add_argument("--correction_band", type=int, default=0,
                        help="rings of the known area re-fed per step (0 = all, the paper)")
    parser.add_argument("--attention_chunk", type=int, default=None,
                        help="query rows per attention chunk (0 = one pass over the whole "
                             "mask); default: the model config's")
    parser.add_argument("--mesh", default="-1,1,1",
                        help="data,fsdp,tensor mesh sizes (-1 on one axis = the rest)")
    parser.add_argument("--out", default=None, help="JSON-lines file to append the cases to")
    args = parser.parse_args(argv)
    if args.steps < 5:
        parser.error(f"--steps={args.steps}: time at least 5 steps so the median means something")
    if args.warmup < 0:
        parser.error(f"--warmup={args.warmup} must be >= 0")
    unknown = set(args.layouts.split(",")) - set(LAYOUTS)
    if unknown:
        parser.error(f"unknown --layouts {sorted(unknown)}; choose from {sorted(LAYOUTS)}")
    try:
        data, fsdp, tensor = (int(x) for x in args.mesh.split(","))
    except ValueError:
        parser.error(f"--mesh={args.mesh!r}: give three comma-separated ints, e.g. -1,1,1")
    args.mesh = cd.mesh(data, fsdp, tensor)
    if args.batch_size is None:
        args.batch_size = 8 if jax.default_backend() == "cpu" else 32
    if args.correction_band < 0:
        parser.error(f"--correction_band={args.correction_band}: use 0 (all) or b >= 1")
    if args.batch_size < 1:
        parser.error(f"--batch_size={args.batch_size} must be >= 1")
    return args


def pipeline_config(args, layout: str) -> ml_collections.ConfigDict:
    """The config `train_and_evaluate` would get: model, schedule, train, mesh, seed."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    # Every size on the 16x16 grid of a 256px image; 'tiny' keeps its small vocabulary.
    overrides = dict(block_size=256, grid=(16, 16)) if args.size == "tiny" else {}
    if args.attention_chunk is not None:
        overrides["attention_chunk"] = args.attention_chunk
    config.model = transformer.model_config(args.size, dtype=args.dtype, remat=args.remat,
                                            **overrides)
    config.schedule = cd.schedule(**LAYOUTS[layout], correction_band=args.correction_band)
    config.train = cd.generator_train(batch_size=args.batch_size, rds=args.rds)
    if args.rds_buckets is not None:
        config.train.rds_buckets = args.rds_buckets
    config.mesh = args.mesh
    return config


def build_step(config, mesh, layouts):
    """(jitted step, initial state, rules): radar_jax's own update step (train_step.py's
    make_train_step, the one train.py runs), on a state born sharded as in training."""
    rules = sharding.rules_from_config(config)
    model = transformer.Transformer(config.model)
    tx = train_step.make_optimizer(config.train)
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    state, state_shardings = trainer.create_sharded_state(
        train_step.init_fn(config, tx), init_rng, mesh, rules)
    step = train_step.make_train_step(config, model, tx, mesh, state_shardings, layouts,
                                      step_rng)
    return step, state, rules


def compiled_memory_mb(compiled) -> float | None:
    """XLA's own estimate for one step: arguments + outputs + temporaries - aliased (donated)."""
    try:
        m = compiled.memory_analysis()
        total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                 - m.alias_size_in_bytes)
    except (AttributeError, NotImplementedError, TypeError):
        return None
    return round(total / 2**20, 1)


def run_case(args, layout: str, peak_flops: float) -> dict:
    config = pipeline_config(args, layout)
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_divisible(args.batch_size, mesh)
    schedule = cd.schedule_from_config(config.schedule, config.model.grid)
    band = cd.correction_band(config.schedule.correction_band)
    layouts = train_step.LayoutSampler(schedule, config.train, config.model.cls_token_num,
                                       correction_band=band)
    step, state, rules = build_step(config, mesh, layouts)

    rng = np.random.default_rng(0)
    n_tokens = config.model.grid[0] * config.model.grid[1]
    codes_BN, labels_B = sharding.shard_batch(
        (rng.integers(0, config.model.vocab_size, (args.batch_size, n_tokens), np.int32),
         rng.integers(0, config.model.num_classes, (args.batch_size,), np.int32)), mesh)
    meta_sh = train_step.meta_shardings(mesh, layouts)
    # The layouts training steps 1..steps would use (warm-up steps reuse the first).
    host_metas = [layouts(s, args.batch_size) for s in range(1, args.steps + 1)]
    metas = [jax.device_put(m, meta_sh) for m in host_metas]
    lengths = [train_step.sequence_lengths(m, args.batch_size) for m in host_metas]
    padded = [int(m["valid"].shape[-1]) for m in host_metas]
    flops_fn = train_step.train_flops_fn(config.model)

    with sharding.mesh_context(mesh), nn.logical_axis_rules(rules):
        compiled, compile_s = {}, 0.0
        for meta, length in zip(metas, padded):
            if length not in compiled:  # one program per bucket, as jit does in training
                t0 = time.perf_counter()
                compiled[length] = step.lower(state, codes_BN, labels_B, meta).compile()
                compile_s += time.perf_counter() - t0
        for _ in range(args.warmup):
            state, metrics = compiled[padded[0]](state, codes_BN, labels_B, metas[0])
            jax.block_until_ready((state, metrics))
        step_s = []
        for meta, length in zip(metas, padded):
            t0 = time.perf_counter()
            state, metrics = compiled[length](state, codes_BN, labels_B, meta)
            jax.block_until_ready((state, metrics))
            step_s.append(time.perf_counter() - t0)
    loss = float(metrics["loss"])
    total_s = float(np.sum(step_s))
    useful = int(sum(l.sum() for l in lengths))
    fed = args.batch_size * sum(padded)
    useful_flops = float(sum(flops_fn(l).sum() for l in lengths))
    achieved = useful_flops / total_s
    return dict(
        layout=layout, rds=args.rds, correction_band=args.correction_band, size=args.size,
        dtype=args.dtype, remat=args.remat, attention_chunk=config.model.attention_chunk,
        steps_per_image=schedule.num_steps,
        seq_len=layouts.length, batch=args.batch_size,
        rds_buckets=len(layouts.bucket_lengths),
        bucket_lengths=[int(b) for b in layouts.bucket_lengths], padded_lengths=padded,
        useful_tokens_per_step=round(useful / args.steps, 1),
        step_s=round(float(np.median(step_s)), 4), timed_step_s=[round(s, 4) for s in step_s],
        tokens_per_s=round(useful / total_s, 1), padded_tokens_per_s=round(fed / total_s, 1),
        padding_waste=round(1 - useful / fed, 4),
        expected_padding_waste=round(layouts.padding_waste(256, args.batch_size), 4),
        images_per_s=round(args.batch_size * args.steps / total_s, 3),
        tflop_per_step=round(useful_flops / args.steps / 1e12, 4),
        achieved_tflop_s=round(achieved / 1e12, 4),
        peak_tflop_s=round(peak_flops / 1e12, 4), mfu=round(achieved / peak_flops, 4),
        compile_s=round(compile_s, 2), loss=round(loss, 4),
        compiled_memory_mb=compiled_memory_mb(compiled[max(compiled)]), **perf.peak_memory(),
        mesh=dict(mesh.shape), device=str(jax.devices()[0].device_kind),
        num_devices=jax.device_count(), backend=jax.default_backend(),
        command="python launch/bench_train.py " + " ".join(sys.argv[1:]))


def print_table(rows) -> None:
    header = (f"{'layout':<14}{'rds':>4}{'band':>5}{'L':>6}{'batch':>6}{'tok/step':>10}"
              f"{'waste':>7}{'step s':>9}{'tok/s':>10}{'img/s':>8}{'TFLOP/s':>9}{'MFU':>7}"
              f"{'compile s':>11}{'mem MB':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        mem = r["compiled_memory_mb"] if r["compiled_memory_mb"] is not None else r[
            "peak_memory_mb"]
        print(f"{r['layout']:<14}{'y' if r['rds'] else 'n':>4}{r['correction_band'] or 'all':>5}"
              f"{r['seq_len']:>6}{r['batch']:>6}{r['useful_tokens_per_step']:>10.0f}"
              f"{r['padding_waste']:>7.1%}{r['step_s']:>9.3f}{r['tokens_per_s']:>10.1f}"
              f"{r['images_per_s']:>8.3f}"
              f"{r['achieved_tflop_s']:>9.4f}{r['mfu']:>7.1%}{r['compile_s']:>11.1f}"
              f"{mem:>9.0f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    # MFU's denominator: the measured matmul rate of one device, times the device count.
    peak_flops = perf.measure_matmul_peak(dtype) * jax.device_count()
    counts = transformer.count_params(pipeline_config(args, "raster").model)
    print(f"# GPT-{args.size}: {counts['total'] / 1e6:.1f}M params "
          f"({counts['non_embedding'] / 1e6:.1f}M non-embedding), {args.dtype}, "
          f"remat={args.remat}, batch {args.batch_size}, device "
          f"{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}), "
          f"measured matmul peak {peak_flops / 1e12:.3f} TFLOP/s", flush=True)
    rows = []
    for layout in args.layouts.split(","):
        row = run_case(args, layout, peak_flops)
        rows.append(row)
        perf.emit_row(row, args.out)
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
