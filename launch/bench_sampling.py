"""Sampling throughput of the KV-cached sampler, one harness for every schedule.

For each (dtype, batch size, schedule, correction band) case: one warm-up call (compile + run),
then `--runs` timed calls synchronised with block_until_ready; reports the median. Compile
time is reported apart: the tracing, lowering and XLA compile durations that JAX reports
(jax.monitoring) during the warm-up. The model has random weights (with a non-zero output
head, so sampling is not degenerate) and samples with CFG (the batch is doubled internally).
Every size runs on the 16x16 grid of the paper's schedules ('tiny' included, for a quick smoke
run).

The correction band (`--correction_band`, alias `--bands`; see radar_jax.layouts) re-feeds
only the last b known rings at each step; 'all' is the paper's full known area. Raster ignores
the band and gets one row per (dtype, batch). `--dtype` lists compute dtypes: 'bfloat16' runs
the sampler in bfloat16 (the model config's dtype field; the weights are cast once).

Example (GPT-B, CFG 2.0, batch 1 and 8, bands 1 and all, float32 and bfloat16, on this
machine's CPU; many minutes):
  python launch/bench_sampling.py --size B --batch_sizes 1,8 --correction_band 1,all \
      --dtype float32,bfloat16 --out /tmp/bench_sampling.jsonl
Smoke run (about a minute; compiles dominate): python launch/bench_sampling.py --size tiny \
      --runs 1 --batch_sizes 1 --schedules crops-10,raster
A config's own model and schedule (on its grid) instead of a size preset, with the plan capped
at 8 (the default), 3 and 2 groups of steps (compiled scan bodies):
  python launch/bench_sampling.py --config configs/demo.py --batch_sizes 100 --runs 6 \
      --correction_band all --max_groups 8,3,2

Each case prints one JSON line (and appends it to --out) with: the command, schedule,
correction_band, batch, images_per_s,
ms_per_image, median_s, run_s, compile_s, forward_passes, token_forwards_useful /
token_forwards_padded (per image and CFG branch, from the static plan), the padding waste,
peak memory (device memory_stats when the backend has them, else the process max RSS, which
only grows across cases), device, dtype. At the end: a table and the images/s ratio of every
case against raster at the same batch size and dtype (when raster is among the schedules).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import time

import jax
import ml_collections
import numpy as np

from radar_jax import config_defaults as cd
from radar_jax import config_io, perf, sampling, sampling_plan, schedules
from radar_jax.models import transformer

# name -> (kind, kwargs) of the benchmarked schedules on a 16x16 grid.
SCHEDULES = {
    "euclidean-13": ("euclidean", {}),
    "crops-10": ("crops", {"preset": "crops10"}),
    "crops-13": ("crops", {"preset": "crops13"}),
    "raster": ("raster", {}),
}
DTYPES = ("float32", "bfloat16")


@contextlib.contextmanager
def compile_events():
    """Yields a list that collects the durations (s) of JAX's tracing, lowering and XLA
    compile events while the block runs (a jax.monitoring listener, removed on exit)."""
    seconds: list[float] = []

    def listener(name: str, duration: float, **_) -> None:
        if name.startswith("/jax/core/compile/"):
            seconds.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seconds
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _parse_bands(text: str) -> list[int | None]:
    """'1,2,all' -> [1, 2, None]; raises ValueError naming a bad entry."""
    bands = []
    for item in text.split(","):
        item = item.strip()
        if item == "all":
            bands.append(None)
            continue
        try:
            bands.append(schedules.check_correction_band(int(item)))
        except ValueError:
            raise ValueError(f"--correction_band entry {item!r} must be an int >= 1 or 'all'"
                             ) from None
    return bands


def _band_name(band: int | None) -> str:
    return "all" if band is None else str(band)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="B", choices=["tiny", "B", "L", "XL"],
                        help="transformer.model_config size, on a 16x16 grid")
    parser.add_argument("--config", default=None,
                        help="a config file: its model and its schedule (on the model's grid) "
                        "replace --size and --schedules")
    parser.add_argument("--max_groups", default=str(sampling_plan.DEFAULT_MAX_GROUPS),
                        help="comma-separated caps on the plan's groups of steps (each one "
                        "compiled scan body)")
    parser.add_argument("--batch_sizes", default=None,
                        help="comma-separated batch sizes; default 1,8 on CPU, 1,8,64 elsewhere")
    parser.add_argument("--schedules", default="euclidean-13,crops-10,raster",
                        help=f"comma-separated subset of {sorted(SCHEDULES)}")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per case (median)")
    parser.add_argument("--correction_band", "--bands", dest="bands", default="1,all",
                        help="comma-separated correction bands of the ring schedules: ints >= 1 "
                        "and/or 'all' (the paper); raster ignores the band")
    parser.add_argument("--dtype", default="float32",
                        help=f"comma-separated compute dtypes from {list(DTYPES)} (the sampler "
                        "then keeps its weights in it too)")
    parser.add_argument("--cfg_scale", type=float, default=2.0)
    parser.add_argument("--top_k", type=int, default=0, help="0 = full-vocabulary sampling")
    parser.add_argument("--prng", default="threefry2x32", choices=["threefry2x32", "rbg"],
                        help="PRNG of the keys passed to sample (jax.random.key impl); on CPU "
                        "the categorical draw over 16384 codes is ~2.4x faster with 'rbg'")
    parser.add_argument("--out", default=None, help="JSON-lines file to append the cases to")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs={args.runs} must be >= 1")
    unknown = set(args.schedules.split(",")) - set(SCHEDULES)
    if unknown:
        parser.error(f"unknown --schedules {sorted(unknown)}; choose from {sorted(SCHEDULES)}")
    try:
        args.band_list = _parse_bands(args.bands)
    except ValueError as err:
        parser.error(str(err))
    try:
        args.max_groups_list = [int(g) for g in args.max_groups.split(",")]
    except ValueError:
        parser.error(f"--max_groups={args.max_groups!r}: use comma-separated ints >= 1")
    if min(args.max_groups_list) < 1:
        parser.error(f"--max_groups={args.max_groups!r}: use comma-separated ints >= 1")
    args.dtype_list = args.dtype.split(",")
    bad = set(args.dtype_list) - set(DTYPES)
    if bad:
        parser.error(f"unknown --dtype {sorted(bad)}; choose from {list(DTYPES)}")
    return args


def random_params(config, seed: int = 0):
    """Random parameters; the output head is re-drawn with std 0.02 (LlamaGen zero-inits it)."""
    params = transformer.init_params(config, jax.random.key(seed))
    kernel = params["output"]["kernel"]
    params["output"]["kernel"] = 0.02 * jax.random.normal(jax.random.key(seed + 1),
                                                          kernel.shape, kernel.dtype)
    return jax.device_put(params)


def run_case(params, config, name: str, schedule, band: int | None, batch: int,
             max_groups: int, args, command: str) -> dict:
    """Times one (schedule, band, batch, max_groups) case with `config`'s dtype; returns its
    row."""
    plan = sampling.plan_for_config(schedule, config, band, max_groups)
    labels = np.arange(batch) % config.num_classes

    def call(seed):
        return sampling.sample(params, config, schedule, labels,
                               jax.random.key(seed, impl=args.prng),
                               cfg_scale=args.cfg_scale, top_k=args.top_k,
                               correction_band=band, max_groups=max_groups)

    load_before = os.getloadavg()[0]
    with compile_events() as compile_s:
        t0 = time.perf_counter()
        jax.block_until_ready(call(0))
        first_s = time.perf_counter() - t0
    run_s = []
    for i in range(args.runs):
        t0 = time.perf_counter()
        jax.block_until_ready(call(i + 1))
        run_s.append(time.perf_counter() - t0)
    median_s = float(np.median(run_s))
    return dict(
        # Raster has no band (null): next-token AR feeds every token once.
        command=command, schedule=name,
        correction_band=None if schedule.is_next_token else _band_name(plan.correction_band),
        batch=batch, size=args.config or args.size, dtype=str(config.dtype), cfg_scale=args.cfg_scale,
        top_k=args.top_k, prng=args.prng,
        images_per_s=round(batch / median_s, 4), ms_per_image=round(1e3 * median_s / batch, 1),
        median_s=round(median_s, 3), run_s=[round(t, 3) for t in run_s],
        compile_s=round(sum(compile_s), 2), first_call_s=round(first_s, 2),
        forward_passes=plan.num_forward_passes,
        token_forwards_useful=plan.useful_token_forwards,
        token_forwards_padded=plan.padded_token_forwards,
        padding_waste=round(plan.padding_waste, 4), max_groups=max_groups,
        groups=plan.group_sizes,
        cfg_batch_factor=2 if args.cfg_scale != 1.0 else 1,
        device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
        # Other processes on a shared machine slow every case; the 1-minute load average
        # before and after the case says how much to trust it.
        load_avg_1m=[round(load_before, 2), round(os.getloadavg()[0], 2)],
        **perf.peak_memory())


def print_table(rows) -> None:
    header = (f"{'schedule':<14}{'band':>5}{'dtype':>10}{'batch':>6}{'img/s':>10}{'ms/img':>10}"
              f"{'compile s':>11}{'groups':>7}{'fwd':>6}{'tok useful':>12}{'tok pad':>9}"
              f"{'vs raster':>11}")
    print(header)
    print("-" * len(header))
    raster = {(r["dtype"], r["batch"]): r["images_per_s"] for r in rows
              if r["schedule"] == "raster"}
    for r in rows:
        base = raster.get((r["dtype"], r["batch"]))
        ratio = f"{r['images_per_s'] / base:.2f}x" if base else "-"
        band = "-" if r["schedule"] == "raster" else r["correction_band"]
        print(f"{r['schedule']:<14}{band:>5}{r['dtype']:>10}{r['batch']:>6}"
              f"{r['images_per_s']:>10.3f}{r['ms_per_image']:>10.0f}{r['compile_s']:>11.1f}"
              f"{len(r['groups']):>7}{r['forward_passes']:>6}{r['token_forwards_useful']:>12}"
              f"{r['token_forwards_padded']:>9}{ratio:>11}")


def _model_and_schedules(args):
    """(label, dtype -> model config, {case name: schedule}) of --config, else of --size and
    --schedules on the 16x16 grid."""
    if args.config:
        loaded = config_io.load_config(args.config)
        schedule = cd.schedule_from_config(loaded.schedule, tuple(loaded.model.grid))

        def config_model(dtype):
            return ml_collections.ConfigDict({**loaded.model.to_dict(), "dtype": dtype})
        grid = "x".join(map(str, schedule.grid))
        return args.config, config_model, {f"{schedule.kind}-{grid}": schedule}
    overrides = (dict(block_size=256) if args.size == "tiny"
                 else dict(vocab_size=16384, num_classes=1000))

    def size_model(dtype):
        return transformer.model_config(args.size, dtype=dtype, **overrides)
    return f"GPT-{args.size}", size_model, {
        name: schedules.make_schedule(SCHEDULES[name][0], (16, 16), **SCHEDULES[name][1])
        for name in args.schedules.split(",")}


def run(args, command: str) -> list[dict]:
    """Runs every case of `args` (from parse_args), printing each row as it finishes.

    Order: dtype, batch size, schedule, band (raster once: it ignores the band), max_groups.
    Returns the rows (dicts, as printed).
    """
    on_cpu = jax.default_backend() == "cpu"
    batches = ([int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes
               else ([1, 8] if on_cpu else [1, 8, 64]))
    label, model_of, cases = _model_and_schedules(args)
    # Parameters are float32 whatever the compute dtype (the sampler casts them once), so one
    # draw serves every dtype and the dtypes compare the same weights.
    params = random_params(model_of("float32"))
    rows = []
    for dtype in args.dtype_list:
        config = model_of(dtype)
        print(f"# {label}: {transformer.count_params(config)['total'] / 1e6:.1f}M "
              f"params, {dtype}, CFG {args.cfg_scale}, top_k {args.top_k}, prng {args.prng}, "
              f"device {jax.devices()[0].device_kind} ({jax.default_backend()})", flush=True)
        for batch in batches:
            for name, schedule in cases.items():
                bands = [None] if schedule.is_next_token else args.band_list
                for band in bands:
                    for max_groups in args.max_groups_list:
                        row = run_case(params, config, name, schedule, band, batch, max_groups,
                                       args, command)
                        rows.append(row)
                        perf.emit_row(row, args.out)
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    command = shlex.join(["python", "launch/bench_sampling.py", *argv])
    print_table(run(args, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
