r"""Does a config fit a TPU slice? Compile its real train step (or sampler) for the slice, here.

XLA's TPU compiler runs on a CPU host (the libtpu wheel: `pip install -e ".[tpu]"`, or
`pip install "jax[tpu]==<the installed jax version>"`): `jax.experimental.topologies` describes
a slice's devices without the hardware, a mesh is built over them with radar_jax.sharding, and
the step is lowered with abstract, sharded inputs and compiled (maxtext's train_compile idea).

  python launch/aot_check.py --config=configs/xl.py --topology=v5p-64 --batch_size=256
  python launch/aot_check.py --config=configs/xl.py --topology=v5e-256 --mode=sample \
      --batch_size=256 --config.mesh.fsdp=4

Prints ONE JSON line: topology (as given, and libtpu's name), device_kind, device_count, mesh,
batch_size, mode, per-device argument / output / temp / alias / peak bytes (peak from the
compiled memory analysis), the device's HBM bytes, `fits` (peak < 90% of HBM), FLOPs per device
and per step (per device x devices) from the compiled cost analysis, compile_seconds, and the
model settings that matter for memory (dtype, remat_policy, scan_layers, attention_impl,
attention_chunk), and the command.
Exit status 1 when it does not fit, with one stderr line naming the knobs to turn; 2, with
one line, for a bad topology, batch or config field.

--mode=train compiles `radar_jax.train_step.make_train_step` (what train.py runs) at the
longest RDS bucket (the full packed length); --mode=sample compiles the sampler of
`radar_jax.sampling.sample` with config.sample's options (CFG doubles the batch).

Topology names: the usual slice names count TensorCores for v4 / v5p (2 per chip, v5p-64 = 32
chips) and chips for v5e / v6e (v5e-256 = 256 chips); libtpu's own names pass through
('v5e:16x16', 'v5p:2x4x4').
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host compiles; it never runs on a TPU
# Compile-only use of libtpu: several checks may run at once (libtpu otherwise takes a lock).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file, e.g. configs/xl.py.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice: v5p-64, v4-64, v5e-256, v6e-16, "
                                "or a libtpu name such as v5e:4x4.")
_BATCH = flags.DEFINE_integer("batch_size", None, "global batch (train) or images per sampler "
                              "call (sample); default config.train / config.sample batch_size")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample"], "what to compile")
flags.mark_flags_as_required(["config", "topology"])

GIB = 2 ** 30
# HBM per device (one device per chip on v4 / v5e / v5p / v6e), by jax's device_kind.
HBM_BYTES = {"TPU v4": 32 * GIB, "TPU v5 lite": 16 * GIB, "TPU v5e": 16 * GIB,
             "TPU v5": 95 * GIB, "TPU v5p": 95 * GIB, "TPU v6 lite": 32 * GIB,
             "TPU v6e": 32 * GIB}
FIT_FRACTION = 0.9
# Slice-name prefix -> (libtpu prefix, TensorCores per chip counted in the name, torus rank).
_FAMILIES = {"v4": ("v4", 2, 3), "v5p": ("v5p", 2, 3), "v5e": ("v5e", 1, 2),
             "v5litepod": ("v5e", 1, 2), "v6e": ("v6e", 1, 2)}


def libtpu_topology(name: str) -> str:
    """'v5p-64' -> 'v5p:2x4x4' (32 chips), 'v5e-256' -> 'v5e:16x16'; 'v5e:4x4' is kept.

    Chip grids follow Cloud TPU's slice shapes: 3D tori grow 2x2x1, 2x2x2, 2x2x4, 2x4x4,
    4x4x4, ...; 2D ones 1x1, 1x2, 2x2, 2x4, 4x4, ... (double the smallest side, the last of
    equal ones).
    """
    if ":" in name:
        return name
    family, _, count = name.partition("-")
    if family not in _FAMILIES or not count.isdigit():
        raise ValueError(f"--topology={name!r}: use a slice name like v5p-64, v4-32, v5e-256, "
                         f"v6e-16 (families {sorted(_FAMILIES)}) or a libtpu name like v5e:4x4")
    prefix, cores_per_chip, rank = _FAMILIES[family]
    chips = int(count) // cores_per_chip
    if (int(count) % cores_per_chip or chips < 1 or chips & (chips - 1)
            or (rank == 3 and chips < 4)):
        raise ValueError(f"--topology={name!r}: {family}-N needs N = {cores_per_chip} x a power "
                         f"of two chips ({'TensorCores' if cores_per_chip == 2 else 'chips'} "
                         "are counted); pass a libtpu name like v5p:2x2x4 for other shapes")
    dims = [2, 2, 1] if rank == 3 else [1, 1]
    chips //= math.prod(dims)
    while chips > 1:
        smallest = min(dims)
        axis = max(i for i, d in enumerate(dims) if d == smallest)
        dims[axis] *= 2
        chips //= 2
    return f"{prefix}:{'x'.join(str(d) for d in dims)}"


def topology_devices(name: str):
    """The abstract devices of a TPU slice (needs libtpu; raises a clear error without it).

    v4 and v5p run one device per chip (megacore), as jax on those TPU VMs does; slices of
    fewer than 4 chips of v5e / v6e get matching host bounds.
    """
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    libtpu_name = libtpu_topology(name)
    prefix, _, shape = libtpu_name.partition(":")
    dims = [int(d) for d in shape.split("x")]
    kw = {}
    if prefix in ("v4", "v5p"):
        kw["chip_config_name"] = "megacore"
    elif math.prod(dims) < 4:
        kw["chips_per_host_bounds"] = tuple(dims) + (1,) * (3 - len(dims))
    try:
        return topologies.get_topology_desc(topology_name=libtpu_name, platform="tpu",
                                            **kw).devices
    except Exception as e:  # pylint: disable=broad-except
        if importlib.util.find_spec("libtpu") is None:
            raise RuntimeError("The TPU compiler (libtpu) is not installed: pip install -e "
                               "'.[tpu]' (or jax[tpu] at the installed jax version).") from e
        raise ValueError(f"--topology={name!r} (libtpu {libtpu_name!r}): {e}") from e


def _sds(tree, shardings):
    """ShapeDtypeStructs of an abstract tree with the given shardings."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                        shardings)


def lower_train(config: ml_collections.ConfigDict, mesh, batch: int):
    """The lowered `make_train_step` at the full packed length, with abstract inputs."""
    from radar_jax import config_defaults as cd  # pylint: disable=g-import-not-at-top
    from radar_jax import sharding, train_step as ts
    from radar_jax.models import transformer
    t = config.train
    sharding.check_batch_divisible(batch, mesh)
    if batch % t.grad_accum:
        raise ValueError(f"--batch_size={batch} is not divisible by config.train.grad_accum="
                         f"{t.grad_accum}")
    schedule = cd.schedule_from_config(config.schedule, config.model.grid)
    layouts = ts.LayoutSampler(schedule, t, config.model.cls_token_num, correction_band=(
        cd.correction_band(config.schedule.get("correction_band", 0))))
    model = transformer.Transformer(config.model)
    tx = ts.make_optimizer(t)
    rules = sharding.rules_from_config(config)
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    boxed = jax.eval_shape(ts.init_fn(config, tx), init_rng)
    state_shardings = sharding.logical_to_shardings(boxed, mesh, rules)
    state = _sds(nn.meta.unbox(boxed), state_shardings)
    step = ts.make_train_step(config, model, tx, mesh, state_shardings, layouts, step_rng)
    num_pos = config.model.grid[0] * config.model.grid[1]
    codes = jax.ShapeDtypeStruct((batch, num_pos), jnp.int32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    per_example = layouts.rds and t.rds_mode == "per_example"
    # The longest bucket is the full layout: the largest program the run compiles.
    meta = {k: jax.ShapeDtypeStruct(((batch,) if per_example else ()) + v.shape, v.dtype)
            for k, v in layouts.full.items() if k in ts.META_KEYS}
    with sharding.mesh_context(mesh), nn.logical_axis_rules(rules):
        return step.lower(state, codes, labels, meta), layouts.length


def lower_sample(config: ml_collections.ConfigDict, mesh, batch: int):
    """The lowered sampler of `sampling.sample` with config.sample's options."""
    from radar_jax import config_defaults as cd  # pylint: disable=g-import-not-at-top
    from radar_jax import sampling, samples, schedules, sharding
    from radar_jax.models import transformer
    s = config.sample
    sharding.check_batch_divisible(batch, mesh)
    trained = cd.schedule_from_config(config.schedule, config.model.grid)
    schedule, band = samples.sampling_schedule(
        trained, cd.correction_band(config.schedule.get("correction_band", 0)),
        kind=s.get("schedule", ""), num_steps=s.get("num_steps", 0),
        band=s.get("correction_band", -1))
    rules = sharding.rules_from_config(config)
    boxed = jax.eval_shape(lambda r: transformer.init_params(config.model, r, unbox=False),
                           jax.random.key(0))
    params = _sds(nn.meta.unbox(boxed), sharding.logical_to_shardings(boxed, mesh, rules))
    rep = sharding.replicated(mesh)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding.batch_sharding(mesh))
    key = jax.eval_shape(lambda: jax.random.key(s.seed))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
    model_config = ml_collections.FrozenConfigDict(config.model)
    top_k = int(s.top_k)
    with sharding.mesh_context(mesh), nn.logical_axis_rules(rules):
        lowered = sampling._sample_jit.lower(  # pylint: disable=protected-access
            params, labels, key, scalar, scalar, scalar, None, None, config=model_config,
            schedule=schedule, correction_band=schedules.effective_correction_band(schedule,
                                                                                   band),
            use_cfg=s.cfg_scale != 1.0, cfg_schedule=s.cfg_schedule,
            top_k=0 if top_k == config.model.vocab_size else top_k, use_top_p=s.top_p < 1.0,
            correct=bool(s.correct) or schedule.is_next_token, return_canvases=False)
    return lowered, schedule.num_steps


def check(config: ml_collections.ConfigDict, topology: str, mode: str = "train",
          batch_size: int | None = None) -> dict:
    """Compiles the step for `topology`; returns the JSON row (see the module docstring)."""
    from radar_jax import sharding  # pylint: disable=g-import-not-at-top
    from radar_jax.models import transformer
    devices = topology_devices(topology)
    mesh = sharding.make_mesh(config.get("mesh"), devices)
    batch = int(batch_size or (config.train.batch_size if mode == "train"
                               else config.sample.batch_size))
    t0 = time.perf_counter()
    if mode == "train":
        lowered, length = lower_train(config, mesh, batch)
    else:
        lowered, length = lower_sample(config, mesh, batch)
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    peak = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
    if not peak:  # older jaxlibs: live arguments + outputs + temporaries, minus donated aliases
        peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                - mem.alias_size_in_bytes)
    kind = devices[0].device_kind
    hbm = HBM_BYTES.get(kind)
    if hbm is None:
        raise ValueError(f"unknown TPU device kind {kind!r}: add its HBM to HBM_BYTES")
    flops = float(cost.get("flops", 0.0))
    m = config.model
    return dict(
        topology=topology, libtpu_topology=libtpu_topology(topology), device_kind=kind,
        device_count=len(devices), mesh=dict(mesh.shape), mode=mode, batch_size=batch,
        seq_len=int(length) if mode == "train" else None,
        sampler_steps=int(length) if mode == "sample" else None,
        model=dict(size_params=transformer.count_params(m)["total"], dtype=m.dtype,
                   remat_policy=transformer.remat_policy(m),
                   scan_layers=bool(m.get("scan_layers", False)),
                   attention_impl=m.get("attention_impl", "xla"),
                   attention_chunk=int(m.get("attention_chunk", 0)),
                   residual_float32=bool(m.get("residual_float32", True))),
        grad_accum=int(config.train.grad_accum) if mode == "train" else None,
        argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes),
        peak_bytes=peak, peak_gib=round(peak / GIB, 2), hbm_bytes=hbm,
        hbm_gib=round(hbm / GIB, 1), fits=bool(peak < FIT_FRACTION * hbm),
        flops_per_device=flops, flops_per_step=flops * len(devices),
        compile_seconds=round(seconds, 1))


def main(argv):
    del argv
    config = _CONFIG.value
    try:
        row = check(config, _TOPOLOGY.value, _MODE.value, _BATCH.value)
    except ValueError as e:  # a bad topology, batch or config field: one line, before compiling
        print(f"aot_check: {e}", file=sys.stderr)
        sys.exit(2)
    row["command"] = " ".join(["python launch/aot_check.py"] + sys.argv[1:])
    print(json.dumps(row), flush=True)
    if not row["fits"]:
        knobs = ("--config.model.remat_policy=full (or minimal), --config.mesh.fsdp=N (shard "
                 "params and optimizer state over N devices), --config.train.grad_accum=N or a "
                 "smaller --batch_size" if row["mode"] == "train" else
                 "a smaller --batch_size (config.sample.batch_size) or --config.mesh.fsdp=N")
        print(f"does not fit: peak {row['peak_gib']} GiB per device > {FIT_FRACTION:.0%} of "
              f"{row['hbm_gib']} GiB HBM on {row['topology']}; try {knobs}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
