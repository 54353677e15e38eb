"""Device mesh and shardings: one logical-axis rules table maps model axes onto the mesh.

Parameters carry logical axis names (model.py). `RULES` says which mesh axes each one is split
over: the batch over data and fsdp, the hidden ("embed") dim of weights over fsdp (ZeRO-3 style:
each fsdp shard holds 1/fsdp of every weight and of its optimizer state), FFN, head and vocab dims
over tensor (Megatron style). A dim that does not divide its mesh axes stays replicated, so tiny
test models run on any mesh.

    mesh = make_mesh((2, 4, 1))            # data=2, fsdp=4, tensor=1 over 8 devices
    shardings = param_shardings(abstract_params(cfg), mesh)
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")
RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("embed_out", None),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh over AXES; one entry of `shape` may be -1 (all remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = [int(s) for s in shape]
    if len(shape) != len(AXES) or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh.shape={tuple(shape)}: give 3 positive sizes for {AXES} "
                         "(one may be -1 = the remaining devices), e.g. (8, 1, 1)")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh.shape={tuple(shape)} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) < len(devices) and jax.process_count() == 1:
        devices = devices[:int(np.prod(shape))]  # a smaller mesh on one host: use the first ones
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh.shape={tuple(shape)} needs {int(np.prod(shape))} devices but "
                         f"{len(devices)} are visible; use shapes whose product is {len(devices)}")
    axis_types = (jax.sharding.AxisType.Auto,) * len(AXES)
    return jax.make_mesh(tuple(shape), AXES, axis_types=axis_types, devices=devices)


def _fit(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drops the mesh axes of any dim they do not divide."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        fitted.append(axes if names and dim % size == 0 else None)
    return PartitionSpec(*fitted)


def param_shardings(boxed_params, mesh: Mesh):
    """NamedShardings for a logically partitioned (boxed, abstract or concrete) param tree."""
    specs = nn.logical_to_mesh(nn.get_partition_spec(boxed_params), RULES)
    shapes = nn.unbox(boxed_params)
    return jax.tree.map(lambda spec, x: NamedSharding(mesh, _fit(spec, x.shape, mesh)),
                        specs, shapes, is_leaf=lambda s: isinstance(s, PartitionSpec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim split over data and fsdp; the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def put_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array that every process holds in full -> a global sharded jax.Array."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def put_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of the global batch -> global arrays split over (data, fsdp)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}


def abstract_bytes_per_device(tree, mesh: Mesh) -> dict[str, int]:
    """Bytes of `tree` each mesh device would hold, from shapes and shardings alone: works on
    ShapeDtypeStructs (jax.eval_shape) as well as arrays, so nothing need be allocated."""
    out = {str(d): 0 for d in mesh.devices.flat}
    for leaf in jax.tree.leaves(tree):
        itemsize = np.dtype(leaf.dtype).itemsize
        for device, index in leaf.sharding.devices_indices_map(tuple(leaf.shape)).items():
            count = int(np.prod([len(range(*s.indices(n)))
                                 for s, n in zip(index, leaf.shape, strict=True)]))
            out[str(device)] = out.get(str(device), 0) + count * itemsize
    return out


def total_bytes(tree) -> int:
    """Unsharded size of `tree` (arrays or ShapeDtypeStructs)."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def fetch_to_host(tree):
    """Global arrays -> numpy on every process (gathers shards across hosts when needed)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, jax.device_get(tree))


def initialize_distributed(dist_cfg) -> None:
    """jax.distributed.initialize from the config, or from the environment with `auto` (Cloud
    TPU, SLURM, Open MPI, ...). Must run before anything touches a JAX backend (stage.start is
    the first thing every stage does); a second call in the same process is a no-op."""
    if not (dist_cfg.auto or dist_cfg.coordinator_address) or jax.distributed.is_initialized():
        return
    if not dist_cfg.auto and not 0 <= dist_cfg.process_id < dist_cfg.num_processes:
        raise ValueError(f"distributed.process_id={dist_cfg.process_id} with num_processes="
                         f"{dist_cfg.num_processes}: use an id in [0, num_processes)")
    kwargs = {} if dist_cfg.auto else dict(coordinator_address=dist_cfg.coordinator_address,
                                           num_processes=dist_cfg.num_processes,
                                           process_id=dist_cfg.process_id)
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        how = ("distributed.auto=True found no cluster in the environment (TPU VM, SLURM, MPI); "
               "set distributed.coordinator_address/num_processes/process_id instead"
               if dist_cfg.auto else "check that every process got the same coordinator "
               "host:port and num_processes, and a distinct process_id")
        raise ValueError(f"jax.distributed.initialize failed ({e}); {how}. It must run before "
                         "any JAX computation in the process") from None


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (no-op with one process): e.g.
    process 0 writes a file the others then read."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
