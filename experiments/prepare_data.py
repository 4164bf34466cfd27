"""Tokenize text corpora once into ArrayRecord shards that `experiments.pipeline` reads.

    python -m experiments.prepare_data --input 'corpus/*.jsonl' --out data/corpus
    python -m experiments.prepare_data --input book.txt --train-tokenizer 4096 --out data/book
    python -m experiments.prepare_data --input 'web/*.parquet' --tokenizer t.json --out web \\
        --process-index 0 --process-count 4   # and 1, 2, 3 on other machines, same --out

Inputs: ``.txt`` (a whole file is one document), ``.jsonl`` (one document per
line, its ``--text-field``), ``.parquet`` (one document per row of that column).
Input file ``i`` (sorted) becomes shard ``i``: ``shard-{i:05d}.array_record``,
one record per document piece: the document's tokens followed by the EOS id,
cut into records of at most ``--record-tokens`` tokens (a longer document
spans several consecutive records). A finished shard has a ``shard-{i:05d}.json``
of its counts next to it; re-running skips those. Process ``p`` of ``n``
prepares the shards ``i`` with ``i % n == p``; whichever process finishes the
last shard writes ``metadata.json`` (tokenizer, vocab size, EOS id, token
dtype, token/document/record counts, shard list), which is what marks ``DIR``
ready. The tokenizer file is copied to ``DIR/tokenizer.json``.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from experiments.tokenizer import BYTES, Tokenizer, train_bpe

METADATA = "metadata.json"
FORMAT = "array_record"
SUFFIXES = (".txt", ".jsonl", ".parquet")
_TXT_PIECE_CHARS = 1 << 16  # .txt files are encoded in pieces of about this many characters
_ENCODE_BATCH = 256  # pieces per tokenizer call (encoded in parallel by `tokenizers`)


def input_files(patterns: list[str]) -> list[Path]:
    """Sorted, de-duplicated files matching ``patterns`` (globs)."""
    files = sorted({Path(f) for p in patterns for f in glob.glob(p, recursive=True)})
    if not files:
        raise ValueError(f"input: no file matches {patterns}")
    bad = [str(f) for f in files if f.suffix not in SUFFIXES]
    if bad:
        raise ValueError(f"input: {bad} are not one of {SUFFIXES}")
    return files


def text_pieces(path: Path, text_field: str = "text") -> Iterator[tuple[str, bool, int]]:
    """``(text, ends_document, input bytes consumed)`` pieces of a file's documents."""
    if path.suffix == ".txt":
        with open(path, encoding="utf-8", errors="replace") as f:
            piece = f.read(_TXT_PIECE_CHARS)
            while piece:
                piece += f.readline()  # cut at line ends
                following = f.read(_TXT_PIECE_CHARS)
                yield piece, not following, len(piece.encode("utf-8"))
                piece = following
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    record = json.loads(line)
                    if text_field not in record:
                        raise ValueError(f"text_field: {path}:{number} has no {text_field!r} field")
                    yield record[text_field], True, len(line.encode("utf-8"))
    else:
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        if text_field not in parquet.schema_arrow.names:
            raise ValueError(f"text_field: {path} has no {text_field!r} column")
        rows = max(parquet.metadata.num_rows, 1)
        for batch in parquet.iter_batches(columns=[text_field]):
            for text in batch.column(0).to_pylist():
                yield text or "", True, path.stat().st_size // rows


def _records(tokenizer: Tokenizer, pieces, record_tokens: int) -> Iterator[tuple[np.ndarray, int]]:
    """Documents + EOS cut every ``record_tokens``: yields ``(record, documents
    it ends)`` per record and ``(None, input bytes)`` per encoded piece."""
    eos = np.array([tokenizer.eos_id], tokenizer.dtype)
    pending: list[np.ndarray] = []
    batch: list[tuple[str, bool, int]] = []

    def flush():
        encoded = tokenizer.encode_batch([text for text, _, _ in batch])
        for ids, (_, ends, size) in zip(encoded, batch):
            pending.append(ids)
            if ends:
                pending.append(eos)
            doc = np.concatenate(pending)
            cut = len(doc) if ends else len(doc) // record_tokens * record_tokens
            for start in range(0, cut, record_tokens):
                end = min(start + record_tokens, cut)
                yield doc[start:end], int(ends and end == cut)  # documents ended
            pending[:] = [doc[cut:]] if cut < len(doc) else []
            yield None, size
        batch.clear()

    for piece in pieces:
        batch.append(piece)
        if len(batch) == _ENCODE_BATCH:
            yield from flush()
    yield from flush()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def write_shard(
    source: Path,
    out: Path,
    index: int,
    tokenizer: Tokenizer,
    tokenizer_id: str,
    *,
    text_field: str,
    record_tokens: int,
    position: int = 0,
) -> dict:
    """Writes shard ``index`` of ``source`` (unless done); returns its counts."""
    from array_record.python.array_record_module import ArrayRecordWriter

    name = f"shard-{index:05d}"
    done = out / f"{name}.json"
    if done.exists():
        stats = json.loads(done.read_text())
        if stats["tokenizer"] == tokenizer_id and stats["input"] == str(source):
            return stats
    tmp = out / f"{name}.array_record.tmp{os.getpid()}"
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    tokens = documents = records = 0
    with tqdm(
        total=source.stat().st_size,
        unit="B",
        unit_scale=True,
        desc=source.name,
        position=position,
        leave=False,
    ) as bar:
        for record, info in _records(tokenizer, text_pieces(source, text_field), record_tokens):
            if record is None:
                bar.update(info)
                continue
            writer.write(record.tobytes())
            tokens, records, documents = tokens + len(record), records + 1, documents + info
    writer.close()
    tmp.rename(out / f"{name}.array_record")
    stats = {
        "path": f"{name}.array_record",
        "input": str(source),
        "tokenizer": tokenizer_id,
        "tokens": tokens,
        "documents": documents,
        "records": records,
    }
    done.write_text(json.dumps(stats) + "\n")
    return stats


def _finish(out: Path, count: int, tokenizer: Tokenizer, record_tokens: int) -> dict | None:
    """Writes ``metadata.json`` once every shard is done; returns it (None if not yet)."""
    paths = [out / f"shard-{i:05d}.json" for i in range(count)]
    if not all(p.exists() for p in paths):
        return None
    shards = [json.loads(p.read_text()) for p in paths]
    total = lambda key: sum(s[key] for s in shards)
    metadata = {
        "format": FORMAT,
        "tokenizer": BYTES if tokenizer.spec == BYTES else "tokenizer.json",
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "dtype": tokenizer.dtype.name,
        "record_tokens": record_tokens,
        "tokens": total("tokens"),
        "documents": total("documents"),
        "records": total("records"),
        "shards": [
            {k: s[k] for k in ("path", "input", "tokens", "documents", "records")} for s in shards
        ],
    }
    tmp = out / f"{METADATA}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(metadata, indent=2) + "\n")
    tmp.rename(out / METADATA)
    return metadata


def prepare(
    inputs: list[str],
    out: str | Path,
    *,
    tokenizer: str = BYTES,
    train_tokenizer: int | None = None,
    text_field: str = "text",
    eos_token: str | None = None,
    record_tokens: int = 2048,
    process_index: int = 0,
    process_count: int = 1,
) -> dict | None:
    """Prepares ``inputs`` (globs) into ``out``; returns the metadata (None while
    other processes still have shards to write). See the module docstring."""
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index must be in [0, process_count={process_count}), got {process_index}"
        )
    if record_tokens < 2:
        raise ValueError(f"record_tokens must be >= 2, got {record_tokens}")
    files = input_files(inputs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    local_tokenizer = out / "tokenizer.json"
    if train_tokenizer is not None:
        if tokenizer != BYTES:
            raise ValueError("train_tokenizer and tokenizer are exclusive: give one of them")
        if not local_tokenizer.exists():
            if process_count > 1:
                raise ValueError(
                    "train_tokenizer needs every input: train it with --process-count 1 first"
                )
            texts = (t for f in files for t, _, _ in text_pieces(f, text_field))
            train_bpe(texts, train_tokenizer, local_tokenizer)
        tokenizer = str(local_tokenizer)
    elif tokenizer != BYTES and Path(tokenizer).absolute() != local_tokenizer.absolute():
        shutil.copyfile(tokenizer, local_tokenizer)
    tok = Tokenizer(tokenizer, eos_token)
    tokenizer_id = BYTES if tok.spec == BYTES else _digest(Path(tok.spec))
    mine = [i for i in range(len(files)) if i % process_count == process_index]
    for i in tqdm(mine, desc="shards", unit="shard", disable=len(mine) < 2):
        write_shard(
            files[i],
            out,
            i,
            tok,
            tokenizer_id,
            text_field=text_field,
            record_tokens=record_tokens,
            position=1,
        )
    return _finish(out, len(files), tok, record_tokens)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.prepare_data", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--input", nargs="+", required=True, help="input files (globs)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--tokenizer", default=BYTES, help="'bytes' or a tokenizer.json (default: %(default)s)"
    )
    parser.add_argument(
        "--train-tokenizer",
        type=int,
        metavar="N",
        help="first train a byte-level BPE of vocab N on the inputs (saved as OUT/tokenizer.json)",
    )
    parser.add_argument(
        "--text-field", default="text", help="jsonl field / parquet column (default: %(default)s)"
    )
    parser.add_argument("--eos-token", help="end-of-text token of --tokenizer (default: guessed)")
    parser.add_argument(
        "--record-tokens",
        type=int,
        default=2048,
        help="longest record; longer documents span several (default: %(default)s)",
    )
    parser.add_argument("--process-index", type=int, default=0, help="this process (default: 0)")
    parser.add_argument(
        "--process-count", type=int, default=1, help="processes splitting the inputs (default: 1)"
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    metadata = prepare(
        args.input,
        args.out,
        tokenizer=args.tokenizer,
        train_tokenizer=args.train_tokenizer,
        text_field=args.text_field,
        eos_token=args.eos_token,
        record_tokens=args.record_tokens,
        process_index=args.process_index,
        process_count=args.process_count,
    )
    if metadata is None:
        print(f"{args.out}: this process's shards are done; other processes' are pending")
    else:
        print(
            f"{args.out}: {metadata['tokens']:,} tokens, {metadata['documents']:,} documents, "
            f"{len(metadata['shards'])} shards, vocab {metadata['vocab_size']}"
        )
    return metadata


if __name__ == "__main__":
    main()
