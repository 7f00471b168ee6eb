"""launch/aot_check.py: slice names, and a real TPU compile of the tiny config on this CPU.

The compile needs libtpu (`pip install -e ".[tpu]"`); without it that test is skipped.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "aot_check.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("aot_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_slice_names_map_to_libtpu_topologies():
    aot = _load_script()
    # Cloud TPU's slice shapes: v4/v5p names count TensorCores (2 per chip), v5e/v6e chips.
    expected = {"v5p-64": "v5p:2x4x4", "v4-64": "v4:2x4x4", "v4-32": "v4:2x2x4",
                "v4-8": "v4:2x2x1", "v5p-256": "v5p:4x4x8", "v5e-256": "v5e:16x16",
                "v5litepod-16": "v5e:4x4", "v5e-8": "v5e:2x4", "v6e-1": "v6e:1x1",
                "v6e-2": "v6e:1x2",
                "v5e:2x2": "v5e:2x2"}
    assert {name: aot.libtpu_topology(name) for name in expected} == expected
    for bad in ("v5p-63", "v9-8", "v5e-12", "v4-4"):
        with pytest.raises(ValueError, match="--topology"):
            aot.libtpu_topology(bad)


def test_tiny_config_compiles_for_a_v5e_slice():
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler here")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(SCRIPT), f"--config={ROOT / 'configs' / 'demo.py'}",
           "--topology=v5e:2x2", "--batch_size=8", "--config.model.n_layer=1",
           "--config.model.dim=32", "--config.model.remat_policy=full"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    assert len(lines) == 1, proc.stdout
    row = json.loads(lines[0])
    assert row["device_count"] == 4 and row["device_kind"] == "TPU v5 lite"
    assert row["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert row["mode"] == "train" and row["batch_size"] == 8 and row["fits"] is True
    assert row["model"]["remat_policy"] == "full"
    assert row["hbm_bytes"] == 16 * 2**30
    assert 0 < row["argument_bytes"] <= row["peak_bytes"] < row["hbm_bytes"]
    # 8 sequences of 223 tokens through ~26k params is at least 6 * params * tokens FLOPs.
    assert row["flops_per_step"] >= 6 * 20_000 * 8 * 223
    assert row["compile_seconds"] > 0


def test_a_batch_the_mesh_cannot_split_is_one_line_before_compiling():
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install -e '.[tpu]'): no TPU topology here")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(SCRIPT), f"--config={ROOT / 'configs' / 'demo.py'}",
           "--topology=v5e:2x2", "--batch_size=6", "--mode=sample"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("aot_check: batch_size=6 is not divisible by the 4") and (
        "multiple of 4" in last), last
    assert "Traceback" not in proc.stderr and not proc.stdout.strip()
