"""``impl="triton"``: Pallas block-sparse kernels on the Triton backend.

Tuned for NVIDIA A100 (sm_80) and H100 (sm_90); on a CPU backend the same
kernels run in the Pallas interpreter. Kernels live in ``kernels.py``, their
tiles in ``config.py``; ``lowering.py`` lowers them for CUDA and ``ptx.py``
compiles that with the ``triton`` wheel for the resource report (no GPU needed).
"""

from __future__ import annotations

import functools

from pallas_kernels.backend import Backend
from pallas_kernels.triton.kernels import grouped_matmul, weight_grad

BACKEND = Backend(
    sdd=functools.partial(grouped_matmul, "sdd"),
    dsd=functools.partial(grouped_matmul, "dsd"),
    dstd=weight_grad,
    layout_block_size=lambda block_size: block_size,
)
