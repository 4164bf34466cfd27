"""Device meshes for expert parallelism, and how to shard a model's state on them.

A mesh has two named axes: ``"data"`` (pure data parallelism) and
``"expert"`` (expert parallelism). Tokens are split over both axes, so every
device holds ``tokens / (data * expert)`` of them; the expert weights
``[E, ...]`` are split over ``"expert"`` along ``E`` (MegaBlocks: the
expert-parallel group is a subset of the data-parallel one). Other parameters
are replicated, or FSDP-style split over ``"data"``.

Under ``with jax.set_mesh(mesh):`` `DroplessMoE` runs expert-parallel when the
mesh has an ``"expert"`` axis; without one, plain data parallelism.
"""

from __future__ import annotations

import jax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"
EXPERT = "expert"
TOKEN_SPEC = P((DATA, EXPERT), None)  # [tokens, ...] split over every device


def make_mesh(
    data: int, expert: int, *, axis_type: AxisType = AxisType.Auto, devices=None
) -> jax.sharding.Mesh:
    """A ``[data, expert]`` mesh over the first ``data * expert`` devices.

    ``axis_type``: `AxisType.Auto` (the default; XLA propagates shardings
    through the model) or `AxisType.Explicit` (shardings are part of the
    array types). The expert-parallel layer works with either.
    """
    for name, size in (("data", data), ("expert", expert)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be a positive int, got {size!r}")
    devices = jax.devices() if devices is None else list(devices)
    if data * expert > len(devices):
        raise ValueError(
            f"a {data} x {expert} mesh needs {data * expert} devices, {len(devices)} are available"
        )
    return jax.make_mesh(
        (data, expert),
        (DATA, EXPERT),
        axis_types=(axis_type, axis_type),
        devices=devices[: data * expert],
    )


def context_mesh() -> AbstractMesh | None:
    """The `jax.set_mesh` mesh if it has an ``"expert"`` axis, else None.

    Raises ValueError for an ``"expert"`` mesh that the expert-parallel layer
    cannot use: no ``"data"`` axis, axes already manual (inside a
    ``shard_map``), or ``"data"`` and ``"expert"`` of different axis types.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or EXPERT not in mesh.axis_names:
        return None
    check_mesh(mesh)
    return mesh


def check_mesh(mesh: Mesh | AbstractMesh) -> None:
    """Raises ValueError unless ``mesh`` (concrete or abstract) suits expert parallelism."""
    names = tuple(mesh.axis_names)
    if DATA not in names or EXPERT not in names:
        raise ValueError(
            f"mesh must have axes named {DATA!r} and {EXPERT!r} "
            f"(use jmoe.parallel.make_mesh), got axes {names}"
        )
    manual = set(getattr(mesh, "manual_axes", ())) & {DATA, EXPERT}
    if manual:
        raise ValueError(
            f"mesh axes {sorted(manual)} are already manual (inside a "
            "shard_map): call the MoE layer outside shard_map"
        )
    if _axis_type(mesh, DATA) != _axis_type(mesh, EXPERT):
        raise ValueError(
            f"mesh axes {DATA!r} and {EXPERT!r} must have the same AxisType, got {mesh.axis_types}"
        )


def _axis_type(mesh, name: str) -> AxisType:
    return dict(zip(mesh.axis_names, mesh.axis_types))[name]


def is_explicit(mesh: Mesh | AbstractMesh) -> bool:
    """Whether the ``"data"``/``"expert"`` axes carry shardings in the array types."""
    return _axis_type(mesh, EXPERT) == AxisType.Explicit


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
    rank and the layer slices each rank's part of ``d_ff``. With ``fsdp``, the
    largest other dimension divisible by the ``"data"`` size is split over
    ``"data"`` (FSDP: XLA all-gathers it before use and reduce-scatters its
    gradient); leaves it does not fit are replicated.
    """
    spec: list = [None] * len(shape)
    expert_dim = None
    if "experts" in _names(path) and len(shape) == 3:
        expert_dim = 0
        if shape[0] % mesh.shape[EXPERT] == 0:
            spec[0] = EXPERT
    if fsdp:
        dim = _largest_divisible_dim(shape, expert_dim, mesh.shape[DATA])
        if dim is not None:
            spec[dim] = DATA
    return P(*spec)


def state_shardings(state, mesh: Mesh, *, fsdp: bool = False):
    """NamedSharding of every leaf of ``state`` (e.g. ``nnx.state(model)``).

    Use as ``nnx.update(model, jax.device_put(state, state_shardings(state,
    mesh)))``; see `param_spec` for the rules. ``fsdp`` needs `AxisType.Auto`
    axes: on Explicit axes the layers would have to gather the weights
    themselves.
    """
    check_mesh(mesh)
    if fsdp and is_explicit(mesh):
        raise ValueError(
            "fsdp=True needs a mesh with AxisType.Auto axes "
            "(jmoe.parallel.make_mesh's default), got Explicit axes"
        )
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(
            mesh, param_spec(path, jax.numpy.shape(leaf), mesh, fsdp=fsdp)
        ),
        state,
    )
