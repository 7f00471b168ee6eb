"""FLOP counts and a measured matmul peak, for model FLOPs utilisation (MFU).

MFU here = achieved model FLOP/s / the matmul FLOP/s this device reaches on a large square
matmul in the same dtype, measured once at start-up. A measured peak (not a datasheet number)
makes the figure honest on CPUs, where there is no meaningful datasheet peak, and comparable
across machines.
"""

from __future__ import annotations

import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from radar_jax.models import transformer


def time_fn(fn, *args, warmup: int = 1, runs: int = 5) -> tuple[float, list[float]]:
    """Median wall time (s) of `fn(*args)` over `runs` runs after `warmup`, synchronised."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), times


def measure_matmul_peak(dtype=jnp.float32, size: int | None = None, runs: int = 5) -> float:
    """FLOP/s of an (n, n) @ (n, n) matmul on the default device (n = 1024 on CPU, 8192 else)."""
    if size is None:
        size = 1024 if jax.default_backend() == "cpu" else 8192
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (size, size), dtype)
    b = jax.random.normal(k2, (size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    seconds, _ = time_fn(matmul, a, b, warmup=2, runs=runs)
    return 2.0 * size ** 3 / seconds


def forward_flops_per_sequence(config, seq_len: int, attended_len: float | None = None) -> float:
    """Model FLOPs of one forward pass over a packed sequence of `seq_len` tokens.

    Matmul FLOPs: 2 * (non-embedding params + output head) per token; the input embedding is a
    gather (no FLOPs). Attention: QK^T and AV, 2 * 2 * seq_len * attended_len * dim per layer,
    where attended_len defaults to seq_len (the dense masked attention we compute).
    """
    counts = transformer.count_params(config)
    head = config.dim * config.vocab_size
    matmul = 2.0 * (counts["non_embedding"] + head) * seq_len
    attended = seq_len if attended_len is None else attended_len
    attention = 4.0 * config.n_layer * seq_len * attended * config.dim
    return matmul + attention


def train_flops_per_sequence(config, seq_len: int) -> float:
    """Forward + backward (3x the forward, the usual estimate) for one training sequence."""
    return 3.0 * forward_flops_per_sequence(config, seq_len)


def peak_memory() -> dict:
    """Peak device memory when the backend reports it, else this process's max RSS (both only
    grow over a process's life, so in a benchmark they cover every case run so far)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return dict(peak_memory_mb=round(stats["peak_bytes_in_use"] / 2**20, 1),
                    peak_memory_kind="device peak_bytes_in_use (cumulative over cases)")
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return dict(peak_memory_mb=round(rss_kb / 1024, 1),
                peak_memory_kind="process max RSS (cumulative over cases)")


def emit_row(row: dict, out: str | None = None) -> None:
    """Prints a benchmark case as one JSON line and appends it to `out` when given."""
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a", encoding="utf-8") as f:
            f.write(line + "\n")
