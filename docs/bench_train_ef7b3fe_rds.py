"""The baseline of issue 8's training-throughput comparison: ef7b3fe's train step on its own
RDS batches (per-example sub-ladders, each padded to the full 1629 tokens), GPT-B, euclidean-13,
batch 2, float32. ef7b3fe's launch/bench_train.py has no RDS switch (it times the full ladder),
so this drives that file's own `build_step` with `config.train.rds = True` and counts the valid
(non-padding) positions of the six timed batches.

  git worktree add /tmp/bench_base ef7b3fe
  JAX_PLATFORMS=cpu python docs/bench_train_ef7b3fe_rds.py /tmp/bench_base >> rows.jsonl

Prints one JSON line. The rows of the side-by-side run are in bench_train_side_by_side_cpu.jsonl.
"""
import json
import sys
import time

BASE = sys.argv[1] if len(sys.argv) > 1 else "/tmp/bench_base"
sys.path[:0] = [BASE, f"{BASE}/launch"]

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import bench_train as bt  # noqa: E402  (ef7b3fe's)
from radar_jax import sharding, train  # noqa: E402  (ef7b3fe's)

args = bt.parse_args(["--size", "B", "--batch_size", "2", "--layouts", "euclidean-13",
                      "--steps", "6"])
config = bt.pipeline_config(args, "euclidean-13")
config.train.rds = True
mesh = sharding.make_mesh(config.mesh)
layouts = train.LayoutSampler(train.schedule_from_config(config), config.train,
                              config.model.cls_token_num)
step, state, rules = bt.build_step(config, mesh, layouts)
rng = np.random.default_rng(0)
codes, labels = sharding.shard_batch((rng.integers(0, 16384, (2, 256), np.int32),
                                      rng.integers(0, 1000, (2,), np.int32)), mesh)
metas = [layouts(s, 2) for s in range(1, 7)]
device_metas = [jax.device_put(m, sharding.replicated(mesh)) for m in metas]
with sharding.mesh_context(mesh), nn.logical_axis_rules(rules):
    compiled = step.lower(state, codes, labels, device_metas[0]).compile()
    state, metrics = compiled(state, codes, labels, device_metas[0])  # warm-up
    jax.block_until_ready(state)
    times = []
    for meta in device_metas:
        t0 = time.perf_counter()
        state, metrics = compiled(state, codes, labels, meta)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
useful = int(sum(m["valid"].sum() for m in metas))
fed = 2 * metas[0]["valid"].shape[-1] * len(metas)
print(json.dumps(dict(
    code="ef7b3fe", recipe="rds per_example padded to 1629",
    timed_step_s=[round(t, 3) for t in times], useful_tokens_per_s=round(useful / sum(times), 1),
    fed_tokens_per_s=round(fed / sum(times), 1), padding_waste=round(1 - useful / fed, 4),
    loss=float(metrics["loss"]))))
