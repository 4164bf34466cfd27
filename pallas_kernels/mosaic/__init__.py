"""``impl="mosaic"``: Hopper (sm_90) grouped GEMMs in Pallas Mosaic GPU.

* `gmm` (``sdd`` and ``dsd``): ``[m, k]`` x ``[E, k, n]`` (or ``[E, n, k]``)
  -> ``[m, n]``, rows of group ``e`` times ``rhs[e]``;
* `tgmm` (``dstd``, weight gradients): ``[m, k]``, ``[m, n]`` -> ``[E, k, n]``.

Both are persistent, warp-specialized kernels (one CTA per SM looping over
work items; a TMA producer warpgroup and two wgmma consumer warpgroups,
``plgpu.emit_pipeline_warp_specialized``) with float32 accumulation and a
tiled, double-buffered epilogue, on the unpadded ragged layout
(``layout_block_size`` 1). Kernels: ``gmm.py``, ``tgmm.py``; the launch, the
pipeline, the epilogue and the group metadata staged in SMEM: ``common.py``;
tiles: ``config.py``; the jmoe adapter and the float32 fallback:
``backend.py``; lowering for CUDA without a GPU: ``lowering.py``. Design and
SMEM budget: ``docs/kernels_mosaic.md``.

Off GPU (e.g. a CPU backend) the same kernels run in Mosaic GPU interpret mode
(``plgpu.InterpretGPUParams``; ``plgpu.force_gpu_interpret_mode`` sets the
same switch for a whole scope and takes precedence). In jax 0.11.2 it
simulates GMEM / SMEM buffers (uninitialised memory reads as NaN), TMA copies
(reads past an array zero-filled, stores clipped, as on the GPU), mbarriers,
warpgroup threads, wgmma (a synchronous float32 NumPy matmul; ``wgmma_wait``
is a no-op, so wgmma / SMEM overlap is not checked), and an optional
happens-before race detector. CTAs of the grid run one after another. It does
not support predicated or reducing TMA stores, copies without a barrier, or
fill modes other than zeros, it ignores the collective (multicast)
parameters of a copy, and it treats every TMA store as its own bulk-async
group (``commit_group`` is ignored). The kernels therefore store partial
tiles as several unpredicated stores of power-of-two heights, count pending
stores per store (not per group), and use no clusters; everything they use
is simulated.
"""

from pallas_kernels.mosaic.backend import BACKEND
from pallas_kernels.mosaic.config import TileConfig
from pallas_kernels.mosaic.gmm import gmm
from pallas_kernels.mosaic.tgmm import tgmm

__all__ = ["BACKEND", "TileConfig", "gmm", "tgmm"]
