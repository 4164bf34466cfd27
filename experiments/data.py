"""Byte-level text <-> tokens (vocab 256), as `experiments.generate` uses them.

Corpora are prepared by `experiments.prepare_data` and read by `experiments.pipeline`.
"""

from __future__ import annotations

import numpy as np

VOCAB_SIZE = 256  # one token per byte


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of ``text`` as ``[len] uint8`` token ids."""
    return np.frombuffer(text.encode("utf-8"), np.uint8)


def decode(tokens) -> str:
    """Inverse of `encode` (invalid UTF-8 sequences become U+FFFD)."""
    return np.asarray(tokens, np.uint8).tobytes().decode("utf-8", errors="replace")
