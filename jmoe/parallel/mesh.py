"""Device meshes for expert parallelism, and how to shard a model's state on them.

A mesh has named axes. ``"expert"`` is the expert-parallel axis: the expert
weights ``[E, ...]`` are split over it along ``E``. Every axis splits the
tokens, so each device holds ``tokens / devices`` of them (MegaBlocks: the
expert-parallel group is a subset of the data-parallel one); the axes other
than ``"expert"`` are the token (batch) axes of the expert-parallel layer.
The names the experiments use are ``"data"`` (pure data parallelism),
``"fsdp"`` (data parallelism with the state split over it) and ``"expert"``;
`jmoe.parallel` accepts any others as token axes too.

Other parameters (and the optimizer moments beside them) are replicated, or
FSDP-split over ``"fsdp"`` and, with ``fsdp=True``, over ``"data"`` as well.
A scanned model's stacked leaves ``[groups, ...]`` keep their layer axis whole
(`param_spec`).

Under ``with jax.set_mesh(mesh):`` `DroplessMoE` runs expert-parallel when the
mesh has an ``"expert"`` axis; without one, plain data parallelism.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jmoe.scanned_blocks import is_stacked

DATA = "data"
FSDP = "fsdp"
EXPERT = "expert"
TOKEN_SPEC = P((DATA, EXPERT), None)  # [tokens, ...] split over every device of a make_mesh mesh


def make_mesh(
    data: int, expert: int, *, axis_type: AxisType = AxisType.Auto, devices=None
) -> jax.sharding.Mesh:
    """A ``[data, expert]`` mesh over the first ``data * expert`` devices.

    ``axis_type``: `AxisType.Auto` (the default; XLA propagates shardings
    through the model) or `AxisType.Explicit` (shardings are part of the
    array types). The expert-parallel layer works with either.
    """
    return make_named_mesh({DATA: data, EXPERT: expert}, axis_type=axis_type, devices=devices)


def make_named_mesh(
    axes: Mapping[str, int], *, axis_type: AxisType = AxisType.Auto, devices=None
) -> jax.sharding.Mesh:
    """A mesh with the named axes of ``axes`` (in order), e.g.
    ``{"data": 2, "fsdp": 2, "expert": 2}``, over the first ``prod(sizes)`` devices."""
    for name, size in axes.items():
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be a positive int, got {size!r}")
    devices = jax.devices() if devices is None else list(devices)
    count = math.prod(axes.values())
    if count > len(devices):
        shape = " x ".join(str(size) for size in axes.values())
        raise ValueError(f"a {shape} mesh needs {count} devices, {len(devices)} are available")
    return jax.make_mesh(
        tuple(axes.values()),
        tuple(axes),
        axis_types=(axis_type,) * len(axes),
        devices=devices[:count],
    )


def context_mesh() -> AbstractMesh | None:
    """The `jax.set_mesh` mesh if it has an ``"expert"`` axis, else None.

    Raises ValueError for an ``"expert"`` mesh that the expert-parallel layer
    cannot use: axes already manual (inside a ``shard_map``), or axes of
    different axis types.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or EXPERT not in mesh.axis_names:
        return None
    check_mesh(mesh)
    return mesh


def check_mesh(mesh: Mesh | AbstractMesh) -> None:
    """Raises ValueError unless ``mesh`` (concrete or abstract) suits expert parallelism."""
    names = tuple(mesh.axis_names)
    if EXPERT not in names:
        raise ValueError(
            f"mesh must have an axis named {EXPERT!r} (use jmoe.parallel.make_mesh), "
            f"got axes {names}"
        )
    manual = set(getattr(mesh, "manual_axes", ())) & set(names)
    if manual:
        raise ValueError(
            f"mesh axes {sorted(manual)} are already manual (inside a "
            "shard_map): call the MoE layer outside shard_map"
        )
    if len(set(mesh.axis_types)) != 1:
        raise ValueError(f"mesh axes {names} must have the same AxisType, got {mesh.axis_types}")


def token_axes(mesh: Mesh | AbstractMesh) -> tuple[str, ...]:
    """Every axis of ``mesh``, in order: the ones ``[tokens, ...]`` is split over."""
    return tuple(mesh.axis_names)


def batch_axes(mesh: Mesh | AbstractMesh) -> tuple[str, ...]:
    """The token axes other than ``"expert"`` (replicas of the expert-parallel group)."""
    return tuple(name for name in mesh.axis_names if name != EXPERT)


def token_spec(mesh: Mesh | AbstractMesh) -> P:
    """``[tokens, ...]`` split over every device of ``mesh``."""
    return P(token_axes(mesh), None)


def fsdp_axes(mesh: Mesh | AbstractMesh, fsdp: bool = False) -> tuple[str, ...]:
    """The axes non-expert state is split over: ``"fsdp"`` if the mesh has it,
    and ``"data"`` too when ``fsdp``."""
    wanted = (DATA, FSDP) if fsdp else (FSDP,)
    return tuple(name for name in wanted if name in mesh.axis_names)


def is_explicit(mesh: Mesh | AbstractMesh) -> bool:
    """Whether the mesh's axes carry shardings in the array types."""
    return _axis_type(mesh, EXPERT) == AxisType.Explicit


def _axis_type(mesh, name: str) -> AxisType:
    return dict(zip(mesh.axis_names, mesh.axis_types))[name]


def _names(path) -> list:
    return [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]


def _largest_divisible_dim(shape, skip: int | None, size: int) -> int | None:
    dims = [i for i, n in enumerate(shape) if i != skip and n % size == 0 and n >= size]
    return max(dims, key=lambda i: shape[i]) if dims and size > 1 else None


def param_spec(path, shape: tuple[int, ...], mesh, *, fsdp: bool = False) -> P:
    """PartitionSpec of one state leaf (``path`` as from `jax.tree_util`).

    Expert weights (3-D leaves under an ``experts`` module, ``[E, a, b]``)
    are split over ``"expert"`` along ``E`` when ``E`` divides evenly;
    otherwise (hidden sharding, ``E < expert``) they stay whole on every expert
    rank and the layer slices each rank's part of ``d_ff``. FSDP: the largest
    other dimension divisible by the product of the `fsdp_axes` sizes is split
    over them (XLA all-gathers it before use and reduce-scatters its
    gradient); leaves it does not fit are replicated.

    Stacked leaves of a scanned model (``blocks/layers/...``, also under an
    optimizer's state; `jmoe.scanned_blocks.is_stacked`) are ``[groups, ...]``:
    the leading layer axis is never split (`nnx.scan` slices one group per
    step, so splitting it would gather every layer at once) and the rules
    above apply to the trailing dimensions, e.g. expert weights ``[groups, E,
    a, b]`` -> ``P(None, "expert", ...)``.
    """
    names = _names(path)
    lead = 1 if is_stacked(names) else 0
    return P(*(None,) * lead, *_layer_spec(names, shape[lead:], mesh, fsdp))


def _layer_spec(names: list, shape: tuple[int, ...], mesh, fsdp: bool) -> list:
    """`param_spec` of one layer's leaf ``shape`` (no stacked layer axis)."""
    spec: list = [None] * len(shape)
    expert_dim = None
    if EXPERT in mesh.axis_names and "experts" in names and len(shape) == 3:
        expert_dim = 0
        if shape[0] % mesh.shape[EXPERT] == 0:
            spec[0] = EXPERT
    axes = fsdp_axes(mesh, fsdp)
    dim = _largest_divisible_dim(shape, expert_dim, math.prod(mesh.shape[a] for a in axes))
    if dim is not None:
        spec[dim] = axes[0] if len(axes) == 1 else axes
    return spec


def state_shardings(state, mesh: Mesh | AbstractMesh, *, fsdp: bool = False):
    """NamedSharding of every leaf of ``state`` (e.g. ``nnx.state(model)``).

    Use as ``nnx.update(model, jax.device_put(state, state_shardings(state,
    mesh)))``; see `param_spec` for the rules. FSDP (``fsdp`` or an
    ``"fsdp"`` axis) needs `AxisType.Auto` axes: on Explicit axes the layers
    would have to gather the weights themselves.
    """
    if EXPERT in mesh.axis_names:
        check_mesh(mesh)
    if fsdp_axes(mesh, fsdp) and any(t == AxisType.Explicit for t in mesh.axis_types):
        raise ValueError(
            f"fsdp=True needs a mesh with AxisType.Auto axes (so does an {FSDP!r} axis; "
            "jmoe.parallel.make_mesh's default), got Explicit axes"
        )
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(
            mesh, param_spec(path, jax.numpy.shape(leaf), mesh, fsdp=fsdp)
        ),
        state,
    )


def bytes_per_device(state, shardings) -> int:
    """The most bytes any one device holds of ``state`` (arrays or
    `jax.ShapeDtypeStruct`s) placed by ``shardings`` (a matching tree of
    shardings, e.g. `state_shardings`; concrete or abstract meshes)."""

    def shard_bytes(leaf, sharding) -> int:
        shape = sharding.shard_shape(tuple(leaf.shape))
        return math.prod(shape) * jax.numpy.dtype(leaf.dtype).itemsize

    return sum(jax.tree.leaves(jax.tree.map(shard_bytes, state, shardings)))
