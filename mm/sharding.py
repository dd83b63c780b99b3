"""Device meshes from config, the one logical-axis rules table, and multi-host start-up.

Every parameter and key activation in mm carries logical axis names (see `LOGICAL_AXES`); this module maps
them onto mesh axes. Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and
optimizer state sharded), `tensor` (Megatron-style model parallel over heads / MLP / vocab). A mesh shape
of -1 on one axis takes the devices left over.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of axes, or None). The single source of truth for sharding.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_head_dim", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("lora_rank", None),  # LoRA adapters (mm.models.lora): the rank axis is never split
)

LOGICAL_AXES = tuple(name for name, _ in DEFAULT_RULES)


def mesh_shape_from_config(shape: Mapping[str, int] | Sequence[int], n_devices: int) -> tuple[int, ...]:
    """Resolves a `{data, fsdp, tensor}` shape (one entry may be -1) against the device count."""
    if isinstance(shape, Mapping):
        unknown = sorted(set(shape) - set(MESH_AXES))
        if unknown:
            raise ValueError(f"mesh: unknown axes {unknown}; axes are {MESH_AXES}")
        dims = [int(shape.get(a, 1)) for a in MESH_AXES]
    else:
        dims = [int(x) for x in shape]
        if len(dims) != len(MESH_AXES):
            raise ValueError(f"mesh: shape {dims} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if dims.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, dims))}")
    if any(d == 0 or d < -1 for d in dims):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, dims))}")
    known = math.prod(d for d in dims if d != -1)
    if -1 in dims:
        if n_devices % known:
            raise ValueError(f"mesh: {n_devices} devices do not divide by {dict(zip(MESH_AXES, dims))}")
        dims[dims.index(-1)] = n_devices // known
    if math.prod(dims) != n_devices:
        raise ValueError(
            f"mesh: {dict(zip(MESH_AXES, dims))} needs {math.prod(dims)} devices, have {n_devices}")
    return tuple(dims)


def make_mesh(shape: Mapping[str, int] | Sequence[int] = (-1, 1, 1),
              devices: Sequence[jax.Device] | None = None, dcn_axis: str = "data") -> Mesh:
    """A mesh over all (or the given) devices; uses jax's topology-aware layout when possible. Devices of
    several TPU slices (multi-slice: `slice_index`) get a hybrid mesh: `dcn_axis` (data parallel by default)
    spans the slices over the data-centre network, every other axis stays inside a slice on ICI."""
    devices = list(jax.devices() if devices is None else devices)
    dims = mesh_shape_from_config(shape, len(devices))
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices > 1:
        from jax.experimental import mesh_utils

        k = MESH_AXES.index(dcn_axis)
        if dims[k] % slices:
            raise ValueError(f"mesh: {slices} slices, but the '{dcn_axis}' axis ({dims[k]}) that spans them is not "
                             f"a multiple of {slices}")
        dcn = tuple(slices if i == k else 1 for i in range(len(dims)))
        ici = tuple(d // s for d, s in zip(dims, dcn))
        return Mesh(mesh_utils.create_hybrid_device_mesh(ici, dcn, devices), MESH_AXES)
    try:
        arr = jax.make_mesh(dims, MESH_AXES, devices=devices).devices
    except Exception:  # non-standard device sets: plain reshape
        arr = np.asarray(devices).reshape(dims)
    return Mesh(arr, MESH_AXES)


def rules_from_overrides(overrides: Mapping[str, Any] | None = None) -> tuple[tuple[str, Any], ...]:
    """The default table with some logical axes remapped (e.g. `{"embed": None}` for pure data parallel)."""
    if not overrides:
        return DEFAULT_RULES
    unknown = sorted(set(overrides) - set(LOGICAL_AXES))
    if unknown:
        raise ValueError(f"sharding rules: unknown logical axes {unknown}")
    return tuple((k, overrides.get(k, v)) for k, v in DEFAULT_RULES)


def logical_to_sharding(logical_tree: Any, mesh: Mesh, rules: Iterable[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """Maps a tree of logical PartitionSpecs (from `nn.get_partition_spec`) to NamedShardings."""
    return nn.logical_to_mesh_sharding(logical_tree, mesh, list(rules))


def param_shardings(abstract_boxed_params: Any, mesh: Mesh,
                    rules: Iterable[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """NamedShardings for a tree of `nn.LogicallyPartitioned` params (e.g. from `jax.eval_shape(init)`)."""
    specs = nn.get_partition_spec(abstract_boxed_params)
    return logical_to_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: Iterable[tuple[str, Any]] = DEFAULT_RULES) -> NamedSharding:
    """Sharding of a `[batch, ...]` input array: batch over the data-parallel axes, the rest replicated."""
    spec = nn.logical_to_mesh_axes(("act_batch",) + (None,) * (ndim - 1), list(rules))
    return NamedSharding(mesh, PartitionSpec(*spec))


def global_batch(local: Mapping[str, Any], sharding: NamedSharding | Callable[[int], NamedSharding],
                 process_count: int, row_axis: int = 1) -> dict[str, jax.Array]:
    """Global arrays from this process's numpy batch: the one host -> global helper. `row_axis` is the axis the
    processes split (1 for the trainer's `[accum, local_rows, ...]` batches, 0 for plain `[rows, ...]`), so the
    global shape has `local_rows * process_count` there. `sharding` is one sharding for every leaf, or a
    function of the leaf's rank."""
    out = {}
    for k, v in local.items():
        shape = (*v.shape[:row_axis], v.shape[row_axis] * process_count, *v.shape[row_axis + 1:])
        s = sharding if isinstance(sharding, NamedSharding) else sharding(v.ndim)
        out[k] = jax.make_array_from_process_local_data(s, v, shape)
    return out


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def cluster_environment() -> str | None:
    """The multi-process cluster this process runs in that `jax.distributed.initialize()` configures itself
    from: "slurm" (a SLURM step of several tasks), "tpu-pod" (several TPU VM workers), or None."""
    env = os.environ
    tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
    if "SLURM_PROCID" in env and tasks.isdigit() and int(tasks) > 1:
        return "slurm"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
        return "tpu-pod"
    return None


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, local_device_ids: Sequence[int] | None = None) -> None:
    """`jax.distributed.initialize` for multi-host runs; a no-op for a single process with no arguments.

    On TPU pods and SLURM clusters (`cluster_environment`) nothing need be passed: jax discovers the coordinator,
    process count and id itself. Elsewhere (CPU tests, plain hosts) pass them explicitly. CPU collectives across
    processes use gloo.
    """
    if not coordinator_address and num_processes in (None, 1):
        if cluster_environment() is None:
            return
        coordinator_address = num_processes = process_id = None  # jax's cluster auto-detection fills them
    # Only affects the CPU backend; asking for the backend here would initialise it too early.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)


def logical_sharding(mesh: Mesh, axes: Sequence[str | None],
                     rules: Iterable[tuple[str, Any]] = DEFAULT_RULES) -> NamedSharding:
    """NamedSharding for one array from its logical axis names."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(axes), list(rules)))


class ShardedFunction:
    """`jax.jit` with explicit in/out shardings whose tracing always sees the mesh and the logical rules.

    Flax's logical constraints are silently dropped when traced without a mesh in context; wrapping every
    call and lowering here makes that impossible to forget.
    """

    def __init__(self, fn: Any, mesh: Mesh, rules: Iterable[tuple[str, Any]] = DEFAULT_RULES, *,
                 in_shardings: Any = None, out_shardings: Any = None, donate_argnums: Sequence[int] = (),
                 static_argnums: Sequence[int] = ()) -> None:
        self.mesh = mesh
        self.rules = list(rules)

        def traced(*args: Any) -> Any:
            with nn.logical_axis_rules(self.rules):
                return fn(*args)

        self._jitted = jax.jit(traced, in_shardings=in_shardings, out_shardings=out_shardings,
                               donate_argnums=tuple(donate_argnums), static_argnums=tuple(static_argnums))

    def __call__(self, *args: Any) -> Any:
        with jax.set_mesh(self.mesh):
            return self._jitted(*args)

    def lower(self, *args: Any) -> Any:
        with jax.set_mesh(self.mesh):
            return self._jitted.lower(*args)


def sharded_jit(fn: Any, mesh: Mesh, rules: Iterable[tuple[str, Any]] = DEFAULT_RULES, **kw: Any) -> ShardedFunction:
    """See `ShardedFunction`."""
    return ShardedFunction(fn, mesh, rules, **kw)
