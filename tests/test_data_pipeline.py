"""Prepared corpora (`experiments.prepare_data`: .txt/.jsonl/.parquet, bytes or
BPE, shards split between processes, re-runs skip finished shards) and the
Grain pipeline (`experiments.pipeline`: packing with segment ids and
positions, shuffle by seed, per-process shards, exact restore, the default
KJV corpus), and training on a prepared BPE corpus with ``--eval-data``."""

import dataclasses
import json
import string

import chex
import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flax import nnx

from experiments import data, pipeline, prepare_data
from experiments.tokenizer import BPE_EOS, Tokenizer
from experiments.train import TrainConfig, train
from jmoe import MoEConfig
from jmoe.transformer import MoETransformer, TransformerConfig

TEXTS = {  # per input file, its documents
    "a.txt": ["a whole file is one document:\nline two, café\n"],
    "b.jsonl": ["first json document", "second, naïve"],
    "c.parquet": ["row one", "", "row three is a little longer"],
}


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.txt").write_text(TEXTS["a.txt"][0], encoding="utf-8")
    (folder / "b.jsonl").write_text(
        "".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(TEXTS["b.jsonl"]))
    )
    pq.write_table(pa.table({"body": TEXTS["c.parquet"]}), folder / "c.parquet")
    return str(folder / "*")


def _shard_texts(corpus: pipeline.Corpus) -> list[str]:
    """Each shard's records decoded and concatenated."""
    texts, start = [], 0
    for shard in corpus.metadata["shards"]:
        records = [corpus.records[i] for i in range(start, start + shard["records"])]
        texts.append(corpus.tokenizer.decode(np.concatenate(records)))
        start += shard["records"]
    return texts


def test_prepare_bytes_formats_and_rerun(tmp_path, inputs, capsys):
    """Bytes: every document's UTF-8 bytes then EOS 0, in records of at most 8
    tokens; counts in metadata.json; a second run rewrites nothing."""
    out = tmp_path / "out"
    argv = ["--input", inputs, "--out", str(out), "--text-field", "body", "--record-tokens", "8"]
    metadata = prepare_data.main(argv)
    assert "6 documents, 3 shards, vocab 256" in capsys.readouterr().out
    docs = [t.encode() + b"\0" for texts in TEXTS.values() for t in texts]
    assert metadata["documents"] == len(docs) == 6
    assert metadata["tokens"] == sum(len(d) for d in docs)
    assert metadata["records"] == sum(-(-len(d) // 8) for d in docs)
    assert (metadata["vocab_size"], metadata["eos_id"], metadata["dtype"]) == (256, 0, "uint8")
    corpus = pipeline.Corpus(out)
    assert max(len(corpus.records[i]) for i in range(len(corpus.records))) == 8
    assert _shard_texts(corpus) == ["".join(t + "\0" for t in texts) for texts in TEXTS.values()]
    shards = sorted(out.glob("shard-*.array_record"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    assert prepare_data.main(argv) == metadata
    assert [p.stat().st_mtime_ns for p in shards] == stamps


def test_prepare_split_between_processes(tmp_path, inputs):
    """Process 0 of 2 writes shards 0 and 2; metadata.json appears once
    process 1 has written shard 1, equal to a one-process preparation's."""
    kw = dict(text_field="body")
    whole = prepare_data.prepare([inputs], tmp_path / "one", **kw)
    split = tmp_path / "two"
    assert prepare_data.prepare([inputs], split, process_index=0, process_count=2, **kw) is None
    assert sorted(p.name for p in split.glob("*.array_record")) == [
        "shard-00000.array_record",
        "shard-00002.array_record",
    ]
    assert not (split / "metadata.json").exists()
    assert prepare_data.prepare([inputs], split, process_index=1, process_count=2, **kw) == whole


def test_prepare_with_trained_bpe(tmp_path, inputs):
    """--train-tokenizer: a byte-level BPE saved in the output, EOS
    <|endoftext|> after every document, fewer tokens than bytes."""
    text = " ".join(["the king said unto them, the land of the lord"] * 40)
    (tmp_path / "in" / "d.txt").write_text(text)
    out = tmp_path / "bpe"
    metadata = prepare_data.prepare(
        [str(tmp_path / "in" / "*")], out, train_tokenizer=300, text_field="body"
    )
    tokenizer = Tokenizer(out / "tokenizer.json")
    assert metadata["tokenizer"] == "tokenizer.json" and metadata["eos_id"] == 0
    assert 257 < metadata["vocab_size"] == tokenizer.vocab_size <= 300
    texts = _shard_texts(pipeline.Corpus(out))
    assert texts[3] == text + BPE_EOS
    assert metadata["shards"][3]["tokens"] < len(text) / 4


def _letters_corpus(tmp_path, count=24) -> pipeline.Corpus:
    """Documents of 1..6 repeats of one letter each (distinct letters), bytes."""
    docs = [string.ascii_letters[i] * (1 + i % 6) for i in range(count)]
    path = tmp_path / "letters.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return pipeline.Corpus(pipeline.prepared(str(path), tmp_path / "cache"))


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_packing_segments_and_positions(tmp_path):
    """Every segment of a packed row is a piece of one document + EOS (one
    letter repeated, then at most one EOS at its end) with positions 0, 1, ...;
    rows are full; over the tokens of 1.5 epochs every document appears."""
    corpus = _letters_corpus(tmp_path)
    lengths = {int(r[0]): len(r) for r in (corpus.records[i] for i in range(len(corpus.records)))}
    it = pipeline.train_batches(corpus.records, seq_len=6, batch_size=2, seed=0, window=4)
    seen = set()
    for batch in _take(it, 12):
        chex.assert_shape(list(batch.values()), (2, 7))
        for tokens, segments, positions in zip(
            batch["tokens"], batch["segment_ids"], batch["positions"]
        ):
            chex.assert_trees_all_equal(np.unique(segments), np.arange(1, segments.max() + 1))
            assert np.all(np.diff(segments) >= 0)
            for s in np.unique(segments):
                piece, where = tokens[segments == s], positions[segments == s]
                chex.assert_trees_all_equal(where, np.arange(len(piece)))
                letters = piece[piece != 0]
                assert np.all(piece[: len(letters)] == letters) and len(piece) - len(letters) <= 1
                if len(letters):
                    assert np.all(letters == letters[0]) and len(piece) <= lengths[letters[0]]
                    seen.add(int(letters[0]))
    it.close()
    assert seen == set(lengths)


def test_shuffle_seed_processes_and_restore(tmp_path):
    """Same seed, same batches; another seed, another order; two processes
    read disjoint documents; an iterator restored from its JSON state
    continues exactly."""
    corpus = _letters_corpus(tmp_path)
    make = lambda seed=0, **kw: pipeline.train_batches(
        corpus.records, seq_len=6, batch_size=2, seed=seed, window=4, **kw
    )
    first = lambda it: (np.stack([b["tokens"] for b in _take(it, 6)]), it.close())[0]
    chex.assert_trees_all_equal(first(make()), first(make()))
    assert not np.array_equal(first(make()), first(make(seed=1)))
    letters = [
        set(first(make(process_index=p, process_count=2)).ravel().tolist()) - {0} for p in (0, 1)
    ]
    assert not letters[0] & letters[1]
    full = make()
    want = _take(full, 9)[5:]
    partial = make()
    _take(partial, 5)
    state = json.loads(json.dumps(partial.get_state()))
    restored = make()
    restored.set_state(state)
    chex.assert_trees_all_equal(_take(restored, 4), want)
    for it in (full, partial, restored):
        it.close()


def test_kjv_default_corpus(tmp_path):
    """The default corpus: the KJV, one document per chapter, prepared byte-level."""
    chapters = pipeline.kjv_chapters()
    assert len(chapters) == 1189
    assert chapters[0]["text"].startswith("In the beginning God created the heaven")
    corpus = pipeline.Corpus(pipeline.prepared(None, tmp_path))
    assert corpus.metadata["documents"] == 1189 and corpus.vocab_size == 256
    assert 4_000_000 < corpus.metadata["tokens"] < 5_000_000
    assert data.decode(data.encode("Amen. ✝")) == "Amen. ✝"


@pytest.mark.slow
def test_train_on_prepared_bpe_with_eval_data(tmp_path):
    """--data DIR --eval-data DIR2: the model's vocab is the data's (not the
    config's 256), validation reads DIR2."""
    words = ["the", "of", "and", "unto", "lord", "said", "king", "land", "his", "them"]
    rng = np.random.default_rng(0)
    for name, lines in (("train", 600), ("val", 60)):
        text = "\n".join(" ".join(rng.choice(words, size=8)) for _ in range(lines))
        (tmp_path / f"{name}.txt").write_text(text)
    train_dir = tmp_path / "train-bpe"
    prepare_data.prepare([str(tmp_path / "train.txt")], train_dir, train_tokenizer=320)
    val_dir = tmp_path / "val-bpe"
    prepare_data.prepare(
        [str(tmp_path / "val.txt")], val_dir, tokenizer=str(train_dir / "tokenizer.json")
    )
    vocab = json.loads((train_dir / "metadata.json").read_text())["vocab_size"]
    moe = MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=1, block_size=32, impl="xla")
    model = TransformerConfig(
        vocab_size=256, d_model=16, num_layers=1, num_heads=2, max_seq_len=16, moe=moe
    )
    config = TrainConfig(
        model=model,
        out=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"),
        data=str(train_dir),
        eval_data=str(val_dir),
        steps=2,
        batch_size=2,
        log_every=1,
        eval_every=1,
        eval_batches=1,
        checkpoint_every=2,
    )
    summary = train(config)
    assert summary["steps"] == 2 and np.isfinite(summary["final_val_loss"])
    shapes = nnx.eval_shape(
        lambda: MoETransformer(model.replace(vocab_size=vocab), rngs=nnx.Rngs(0))
    )
    assert summary["params"] == sum(p.size for p in jax.tree.leaves(nnx.state(shapes, nnx.Param)))
    kjv = str(pipeline.prepared(None, tmp_path))
    with pytest.raises(ValueError, match="eval_data .* must share data's tokenizer"):
        train(dataclasses.replace(config, eval_data=kjv))
