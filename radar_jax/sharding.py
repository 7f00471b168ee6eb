"""Device mesh and logical-axis sharding rules.

Every parameter in radar_jax carries logical axis names (`nn.with_logical_partitioning`), e.g.
('embed', 'mlp'). A rules list maps each logical name to a mesh axis (or None = replicated), so
data parallel, FSDP and tensor parallel differ only in the config:

  config.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))   # -1: all remaining devices
  config.mesh_rules = ...                                     # optional override of DEFAULT_RULES

The mesh is built with `jax.sharding.Mesh` over `mesh_utils.create_device_mesh`; jax.make_mesh
is avoided on purpose because its Explicit axis types break Linen's logical constraints.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axis (maxtext-style). Names a model uses that are not listed here are
# replicated. The batch is split over both data-parallel axes; FSDP shards the 'embed' dimension
# of every matrix; tensor parallelism splits heads, the MLP hidden dimension and the vocabulary.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("qkv", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
    ("norm", None),
)


def make_mesh(mesh_config: Any = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a ('data', 'fsdp', 'tensor') mesh from a config with one size per axis.

    Args:
      mesh_config: mapping with keys data/fsdp/tensor (ints). At most one may be -1, meaning
        "all devices not used by the others". None means pure data parallel.
      devices: the devices to use (default: all of jax.devices()).

    Returns:
      A `jax.sharding.Mesh` with axis names MESH_AXES.
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = {"data": -1, "fsdp": 1, "tensor": 1}
    if mesh_config is not None:
        for name in MESH_AXES:
            if name in mesh_config:
                sizes[name] = int(mesh_config[name])
    unknown = [s for s in sizes.values() if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"config.mesh {sizes}: at most one axis may be -1 (fill); set the others "
                         "to explicit sizes.")
    known = math.prod(s for s in sizes.values() if s != -1)
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(f"config.mesh {sizes}: sizes must be positive or -1.")
    if unknown:
        if len(devices) % known:
            raise ValueError(f"config.mesh {sizes}: {len(devices)} devices are not divisible by "
                             f"the fixed axes' product {known}.")
        sizes = {k: (len(devices) // known if v == -1 else v) for k, v in sizes.items()}
    shape = tuple(sizes[name] for name in MESH_AXES)
    if math.prod(shape) != len(devices):
        raise ValueError(f"config.mesh {sizes} needs {math.prod(shape)} devices but "
                         f"{len(devices)} are available; make the product of the sizes match "
                         "(or use -1 for one axis).")
    try:
        device_array = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, AssertionError, NotImplementedError):
        # CPU / host-platform devices have no physical topology to optimise for.
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES)


def rules_from_config(config: Any = None) -> tuple[tuple[str, Any], ...]:
    """The logical axis rules: `config.mesh_rules` when set, else DEFAULT_RULES."""
    rules = None if config is None else config.get("mesh_rules", None)
    if not rules:
        return DEFAULT_RULES
    return tuple((name, tuple(axis) if isinstance(axis, list) else axis) for name, axis in rules)


def logical_to_shardings(abstract_tree: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for a tree of (possibly `nn.Partitioned`-boxed) abstract arrays.

    Leaves without logical names are replicated.
    """
    specs = nn.get_partition_spec(abstract_tree)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), mesh_specs,
                        is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Sharding for a batch-major array: the batch dimension split over ('data', 'fsdp')."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Places a host batch (a pytree of numpy arrays, batch-major) on the mesh.

    Single-process: the full global batch is on this host. Multi-process (a TPU pod): each host
    passes its local shard and the global array is assembled from the per-host pieces.
    """
    def put(x):
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.ndim)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, global_shape)
    return jax.tree.map(put, batch)


def check_batch_divisible(batch_size: int, mesh: Mesh) -> None:
    """Raises a clear error when the global batch cannot be split over the data axes."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % n:
        raise ValueError(f"batch_size={batch_size} is not divisible by the {n} data-parallel "
                         f"devices of mesh {dict(mesh.shape)}; choose a multiple of {n}.")


def mesh_context(mesh: Mesh):
    """The context that makes `mesh` current for logical constraints inside jit.

    `jax.set_mesh` where this JAX has it (the `with mesh:` form is deprecated there), else the
    Mesh itself.
    """
    set_mesh = getattr(jax, "set_mesh", None)
    return set_mesh(mesh) if set_mesh is not None else mesh
