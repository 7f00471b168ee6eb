"""Checkpointing (radar_jax/checkpoint.py): keep-N, restore into a template, cross-topology."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from radar_jax import checkpoint as ckpt_lib


def test_keep_n_and_restore_latest(tmp_path):
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), keep=2, async_save=False)
    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(0)}
    for step in (1, 2, 3):
        ckpt.save(step, {"w": state["w"] * step, "step": jnp.int32(step)})
    ckpt.wait()
    assert sorted(int(d) for d in os.listdir(tmp_path / "ckpt") if d.isdigit()) == [2, 3]
    restored, step = ckpt.restore(state)
    ckpt.close()
    assert step == 3
    np.testing.assert_array_equal(restored["w"], np.arange(6.0).reshape(2, 3) * 3)


def test_restore_with_another_shape_names_the_fix(tmp_path):
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
    ckpt.save(1, {"w": jnp.zeros((2, 3))})
    ckpt.wait()
    with pytest.raises(ValueError, match="does not match|--workdir"):
        ckpt.restore({"w": jnp.zeros((4, 3))})
    ckpt.close()


def test_no_checkpoint_returns_the_template(tmp_path):
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "empty"))
    template = {"w": jnp.ones(3)}
    state, step = ckpt.restore(template)
    ckpt.close()
    assert step is None and state is template


def test_params_exported_on_8_devices_load_on_one(tmp_path):
    """Params sharded over an 8-device mesh (as on a pod) restore onto this single device."""
    path = str(tmp_path / "params")
    script = textwrap.dedent(f"""
        import jax, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from radar_jax import checkpoint, sharding
        mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
        w = jax.device_put(np.arange(64.0).reshape(8, 8), NamedSharding(mesh, P('fsdp', 'tensor')))
        checkpoint.export_params({path!r}, {{'layer': {{'kernel': w}}}})
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, capture_output=True)
    params = ckpt_lib.load_params(path)
    kernel = params["layer"]["kernel"]
    assert kernel.sharding.device_set == {jax.local_devices()[0]}
    np.testing.assert_array_equal(kernel, np.arange(64.0).reshape(8, 8))
    with pytest.raises(FileNotFoundError, match="export_params"):
        ckpt_lib.load_params(str(tmp_path / "missing"))
