"""The expert-MLP products of a dropless MoE, differentiable, with pluggable kernels.

All three products act on the padded expert-sorted layout of a `Topology`
(``P = topo.padded_rows`` rows; see ``topology.py``):

* ``sdd(x, w)``: dense ``[P, k]`` x per-expert ``[E, k, n]`` -> block-sparse
  ``[P, n]`` (compact storage). MegaBlocks' SDD, e.g. ``h = x @ W1``.
* ``dsd(h, w)``: block-sparse ``[P, k]`` x per-expert ``[E, k, n]`` -> dense
  ``[P, n]``. MegaBlocks' DSD, e.g. ``y = act(h) @ W2`` or ``dx = dh @ W1ᵀ``.
* ``dstd(a, b)``: ``[P, k]``ᵀ x ``[P, n]`` summed per expert -> ``[E, k, n]``.
  MegaBlocks' DSᵀD and DᵀS (the weight gradients ``dW2 = act(h)ᵀ dy`` and
  ``dW1 = xᵀ dh``): in the compact layout both operands share the row layout,
  so the two transposed products are one.

Row ``i`` of an input or output belongs to expert ``topo.row_expert()[i]``.
Contract shared by every implementation: input rows that hold no assignment
(``~topo.row_is_valid()``) are ignored, and such output rows are zero.

``sdd`` and ``dsd`` compute the same function in this layout; they differ in
which operand is block-sparse and so in how a GPU kernel tiles them (SDD: one
program per nonzero output block; DSD: one per dense output tile, looping over
the expert's blocks). The backward passes are the MegaBlocks ones:

* ``sdd``:  ``dx = dsd(dh, Wᵀ)``, ``dW = dstd(x, dh)``
* ``dsd``:  ``dh = sdd(dy, Wᵀ)``, ``dW = dstd(h, dy)``
* ``dstd``: ``da = sdd(b, gᵀ)``,  ``db = dsd(a, g)``

``impl`` picks the kernels: ``"xla"`` (loops over experts and row tiles, fast on
CPU), ``"ragged_dot"`` (``jax.lax.ragged_dot``), ``"triton"`` (Pallas block-sparse
kernels), ``"mosaic"`` (Pallas Mosaic GPU grouped GEMM for Hopper), or
``"auto"`` (the best one for the default device, `impl_for_device`; on an
NVIDIA GPU only for bfloat16 / float16 operands, see `resolve_impl`).
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from pallas_kernels.backend import Backend
from pallas_kernels.topology import Topology

__all__ = [
    "IMPLS",
    "backend",
    "dsd",
    "dstd",
    "impl_for_device",
    "layout_block_size",
    "resolve_impl",
    "sdd",
    "size_rule",
]

# impl name -> module exposing BACKEND; imported lazily so that, e.g., a CPU
# machine never imports the Mosaic GPU kernels unless asked to. The xla
# backend is `xla_impl`'s products plus the fused expert MLP of `fused_mlp`.
_BACKEND_MODULES = {
    "xla": "pallas_kernels.fused_mlp",
    "ragged_dot": "pallas_kernels.ragged_dot_impl",
    "triton": "pallas_kernels.triton",
    "mosaic": "pallas_kernels.mosaic",
}
IMPLS = ("auto", *_BACKEND_MODULES)


# The Mosaic GPU kernels use wgmma, which exists only on sm_90a (H100 / H200):
# not on sm_100 / sm_120 (Blackwell), whose tensor-core instructions differ.
MOSAIC_CAPABILITY = (9, 0)
# Pallas Triton's bfloat16 tensor-core dots need Ampere (sm_80) or newer.
TRITON_MIN_CAPABILITY = (8, 0)
# impl="auto" on an NVIDIA GPU computes in these dtypes only (see `resolve_impl`).
GPU_AUTO_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _default_device():
    """The device ``impl="auto"`` chooses for (tests replace it with a stub)."""
    return jax.devices()[0]


def _nvidia_capability(device) -> tuple[int, int] | None:
    """``(major, minor)`` of an NVIDIA GPU (``compute_capability`` ``"9.0"``;
    ROCm reports ``"gfx..."``), ``(0, 0)`` for one that does not say; None off NVIDIA."""
    if device.platform != "gpu":
        return None
    version = getattr(device, "compute_capability", "").split(".")
    if len(version) >= 2 and all(part.isdigit() for part in version[:2]):
        return int(version[0]), int(version[1])
    return (0, 0) if "NVIDIA" in device.device_kind.upper() else None


def impl_for_device(device: jax.Device) -> str:
    """The fastest implementation that runs on ``device`` (see the table in docs/gpu.md).

    CPU and non-NVIDIA devices: ``"xla"``. NVIDIA: ``"mosaic"`` on sm_90
    exactly, ``"triton"`` on other sm_80+ GPUs (Ampere, Ada, Blackwell),
    ``"ragged_dot"`` on older or unidentified ones.
    """
    capability = _nvidia_capability(device)
    if capability is None:
        return "xla"
    if capability == MOSAIC_CAPABILITY:
        return "mosaic"
    return "triton" if capability >= TRITON_MIN_CAPABILITY else "ragged_dot"


def resolve_impl(impl: str, dtype: DTypeLike | None = None) -> str:
    """Maps ``"auto"`` to a concrete implementation for the default device
    (`impl_for_device`); other names pass through.

    ``dtype`` (the compute dtype, optional): ``"auto"`` on an NVIDIA GPU
    refuses any dtype but bfloat16 / float16 with a ValueError saying what to
    set, rather than run float32 products on a path several times slower than
    the 16-bit kernels (which accumulate in float32 either way).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    device = _default_device()
    chosen = impl_for_device(device)
    if (
        dtype is not None
        and _nvidia_capability(device) is not None
        and jnp.dtype(dtype) not in GPU_AUTO_DTYPES
    ):
        raise ValueError(
            f"impl='auto' on {device.device_kind} picks {chosen!r}, whose kernels take "
            f"bfloat16 or float16 inputs (float32 accumulation), got compute dtype "
            f"{jnp.dtype(dtype).name}: set MoEConfig(dtype=jnp.bfloat16), or name the impl "
            f"(e.g. impl='xla') to compute in {jnp.dtype(dtype).name} on a slower path"
        )
    return chosen


def size_rule(impl: str, block_size: int) -> tuple[int, str]:
    """``(multiple, what it is)`` that ``d_model`` and ``d_ff`` must be multiples
    of for the kernels of a concrete ``impl``; multiple 1 means any size."""
    if impl == "triton":
        return block_size, f"block_size={block_size}"
    if impl == "mosaic":  # imported only when asked: it loads Mosaic GPU
        from pallas_kernels.mosaic.common import FEATURE_MULTIPLE

        return FEATURE_MULTIPLE, f"{FEATURE_MULTIPLE} (the Mosaic GPU kernels' TMA tiles)"
    return 1, "1"


@functools.cache
def _backend_of(impl: str) -> Backend:
    return importlib.import_module(_BACKEND_MODULES[impl]).BACKEND


def backend(impl: str) -> Backend:
    """The `Backend` of ``impl`` (``"auto"`` resolved for the default device)."""
    return _backend_of(resolve_impl(impl))


def layout_block_size(impl: str, block_size: int) -> int:
    """Row alignment of the padded layout the implementation computes on.

    Block-sparse kernels need ``block_size``-row bins; grouped GEMMs take
    unpadded (ragged) groups and return a smaller alignment.
    """
    return backend(impl).layout_block_size(block_size)


def _check_operands(name: str, lhs, rhs, topo: Topology, transpose_rhs: bool):
    if lhs.ndim != 2 or lhs.shape[0] != topo.padded_rows:
        raise ValueError(
            f"{name}: lhs must be [padded_rows={topo.padded_rows}, k], got shape {lhs.shape}"
        )
    if rhs.ndim != 3 or rhs.shape[0] != topo.num_experts:
        raise ValueError(
            f"{name}: rhs must be [num_experts={topo.num_experts}, k, n], got shape {rhs.shape}"
        )
    k = rhs.shape[2] if transpose_rhs else rhs.shape[1]
    if lhs.shape[1] != k:
        layout = "[E, n, k] (transpose_rhs=True)" if transpose_rhs else "[E, k, n]"
        raise ValueError(
            f"{name}: contraction mismatch, lhs is {lhs.shape} and rhs {layout} is {rhs.shape}"
        )
    if lhs.dtype != rhs.dtype:
        raise ValueError(f"{name}: lhs and rhs dtypes differ ({lhs.dtype} vs {rhs.dtype})")


def sdd(
    lhs: ArrayLike,
    rhs: ArrayLike,
    topo: Topology,
    *,
    transpose_rhs: bool = False,
    impl: str = "auto",
) -> jax.Array:
    """Dense ``[P, k]`` x ``rhs[e]`` -> block-sparse ``[P, n]``, row-wise by expert.

    ``rhs`` is ``[E, k, n]``, or ``[E, n, k]`` with ``transpose_rhs``.
    """
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    _check_operands("sdd", lhs, rhs, topo, transpose_rhs)
    return _sdd(resolve_impl(impl, lhs.dtype), transpose_rhs, lhs, rhs, topo)


def dsd(
    lhs: ArrayLike,
    rhs: ArrayLike,
    topo: Topology,
    *,
    transpose_rhs: bool = False,
    impl: str = "auto",
) -> jax.Array:
    """Block-sparse ``[P, k]`` x ``rhs[e]`` -> dense ``[P, n]``, row-wise by expert.

    ``rhs`` is ``[E, k, n]``, or ``[E, n, k]`` with ``transpose_rhs``.
    """
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    _check_operands("dsd", lhs, rhs, topo, transpose_rhs)
    return _dsd(resolve_impl(impl, lhs.dtype), transpose_rhs, lhs, rhs, topo)


def dstd(
    lhs: ArrayLike,
    rhs: ArrayLike,
    topo: Topology,
    *,
    out_dtype: DTypeLike | None = None,
    impl: str = "auto",
) -> jax.Array:
    """Per-expert ``lhs[rows_e]ᵀ @ rhs[rows_e]``: ``[P, k]``, ``[P, n]`` -> ``[E, k, n]``.

    Experts with no rows get exact zeros. ``out_dtype`` defaults to lhs's.
    """
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    for arg, x in (("lhs", lhs), ("rhs", rhs)):
        if x.ndim != 2 or x.shape[0] != topo.padded_rows:
            raise ValueError(
                f"dstd: {arg} must be [padded_rows={topo.padded_rows}, _], got shape {x.shape}"
            )
    if lhs.dtype != rhs.dtype:
        raise ValueError(f"dstd: lhs and rhs dtypes differ ({lhs.dtype} vs {rhs.dtype})")
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    return _dstd(resolve_impl(impl, lhs.dtype), out_dtype, lhs, rhs, topo)


def _weight_grad(impl, transpose_rhs, dense, grad, topo, rhs_dtype):
    """Gradient of ``rhs`` in ``dense @ rhs[e]`` (or ``rhs[e]ᵀ``) given ``grad``."""
    if transpose_rhs:
        return _dstd(impl, rhs_dtype, grad, dense, topo)
    return _dstd(impl, rhs_dtype, dense, grad, topo)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _sdd(impl, transpose_rhs, lhs, rhs, topo):
    return _backend_of(impl).sdd(lhs, rhs, topo, transpose_rhs)


def _sdd_fwd(impl, transpose_rhs, lhs, rhs, topo):
    return _sdd(impl, transpose_rhs, lhs, rhs, topo), (lhs, rhs, topo)


def _sdd_bwd(impl, transpose_rhs, residuals, grad):
    lhs, rhs, topo = residuals
    dlhs = _dsd(impl, not transpose_rhs, grad, rhs, topo)
    drhs = _weight_grad(impl, transpose_rhs, lhs, grad, topo, rhs.dtype)
    return dlhs, drhs, None


_sdd.defvjp(_sdd_fwd, _sdd_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _dsd(impl, transpose_rhs, lhs, rhs, topo):
    return _backend_of(impl).dsd(lhs, rhs, topo, transpose_rhs)


def _dsd_fwd(impl, transpose_rhs, lhs, rhs, topo):
    return _dsd(impl, transpose_rhs, lhs, rhs, topo), (lhs, rhs, topo)


def _dsd_bwd(impl, transpose_rhs, residuals, grad):
    lhs, rhs, topo = residuals
    dlhs = _sdd(impl, not transpose_rhs, grad, rhs, topo)
    drhs = _weight_grad(impl, transpose_rhs, lhs, grad, topo, rhs.dtype)
    return dlhs, drhs, None


_dsd.defvjp(_dsd_fwd, _dsd_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _dstd(impl, out_dtype, lhs, rhs, topo):
    return _backend_of(impl).dstd(lhs, rhs, topo, out_dtype)


def _dstd_fwd(impl, out_dtype, lhs, rhs, topo):
    return _dstd(impl, out_dtype, lhs, rhs, topo), (lhs, rhs, topo)


def _dstd_bwd(impl, out_dtype, residuals, grad):
    lhs, rhs, topo = residuals
    grad = grad.astype(lhs.dtype)
    dlhs = _sdd(impl, True, rhs, grad, topo)  # rhs[rows_e] @ grad[e]ᵀ
    drhs = _dsd(impl, False, lhs, grad, topo)  # lhs[rows_e] @ grad[e]
    return dlhs, drhs, None


_dstd.defvjp(_dstd_fwd, _dstd_bwd)
