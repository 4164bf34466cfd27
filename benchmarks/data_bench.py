"""Is the data pipeline ever the bottleneck? Tokens/s of the Grain pipeline vs the training step.

    python -m benchmarks.data_bench                       # xs and s, 1 and 2 threads, 20 MB BPE
    python -m benchmarks.data_bench --prepare-mb 100 --batches 400

1. Pipeline: `experiments.pipeline.train_batches` on the KJV (byte-level, one
   document per chapter) at each preset's sequence length and batch size,
   with 1 and 2 reader threads: tokens/s over ``--batches`` batches after a
   warm-up batch (which fills the shuffle window). Packing, the window
   shuffle and the background prefetch thread are included.
2. Training step: the preset's compiled `experiments.train.train_step`
   (forward, backward, AdamW) on one batch, median of ``--steps`` calls:
   the tokens/s a training run consumes. Reported: pipeline / step.
3. Preparation: a byte-level BPE of vocab 4096 trained on the KJV, then
   `experiments.prepare_data` with it of one ``--prepare-mb`` MB .txt file
   (copies of the KJV; a .txt is encoded in 64 KiB pieces, batches of them in
   parallel by ``tokenizers``): input MB/s and tokens/s.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path

import jax
from flax import nnx

from benchmarks.timing import median_seconds
from experiments import pipeline, prepare_data
from experiments.presets import PRESET_TRAINING, PRESETS, preset
from experiments.tokenizer import train_bpe
from experiments.train import TrainConfig, optimizer, train_step
from jmoe.transformer import MoETransformer


def pipeline_tokens_per_s(records, seq_len: int, batch: int, threads: int, batches: int) -> float:
    """Tokens/s of ``batches`` training batches (after one warm-up batch)."""
    it = pipeline.train_batches(
        records, seq_len=seq_len, batch_size=batch, seed=0, num_threads=threads
    )
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - start
    it.close()
    return batches * batch * (seq_len + 1) / seconds


def step_tokens_per_s(name: str, records, steps: int) -> float:
    """Tokens/s the preset's compiled training step consumes (median step)."""
    model_config = preset(name)
    batch = PRESET_TRAINING[name]["batch_size"]
    config = TrainConfig(model=model_config, out="", cache_dir="", batch_size=batch)
    model = MoETransformer(model_config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split((model, nnx.Optimizer(model, optimizer(config), wrt=nnx.Param)))
    step = jax.jit(functools.partial(train_step, graphdef))
    it = pipeline.train_batches(records, seq_len=model_config.max_seq_len, batch_size=batch, seed=0)
    data = next(it)
    it.close()
    seconds = median_seconds(lambda: step(state, data)[1]["loss"], repeats=steps)
    return batch * model_config.max_seq_len / seconds


def prepare_throughput(megabytes: int, work: Path) -> dict:
    """Trains a BPE of vocab 4096 on the KJV, then prepares ``megabytes`` MB with it."""
    kjv = "".join(c["text"] for c in pipeline.kjv_chapters())
    start = time.perf_counter()
    tokenizer = train_bpe([kjv], 4096, work / "kjv-bpe.json")
    train_s = time.perf_counter() - start
    copies = max(1, round(megabytes * 1e6 / len(kjv.encode())))
    corpus = work / "corpus.txt"
    corpus.write_text(kjv * copies, encoding="utf-8")
    size = corpus.stat().st_size
    start = time.perf_counter()
    metadata = prepare_data.prepare([str(corpus)], work / "prepared", tokenizer=str(tokenizer))
    seconds = time.perf_counter() - start
    return {
        "bpe_train_s": train_s,
        "mb": size / 1e6,
        "mb_per_s": size / 1e6 / seconds,
        "tokens_per_s": metadata["tokens"] / seconds,
        "bytes_per_token": size / metadata["tokens"],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.data_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--presets",
        nargs="+",
        choices=PRESETS,
        default=["xs", "s"],
        help="presets whose train step is timed (default: the CPU ones, %(default)s)",
    )
    parser.add_argument("--batches", type=int, default=200, help="timed pipeline batches")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (median)")
    parser.add_argument("--prepare-mb", type=int, default=20, help="0: skip the preparation")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        records = pipeline.Corpus(pipeline.prepared(None, tmp)).records
        print(
            "| preset | batch x seq | step tok/s | pipeline tok/s, 1 thread | 2 threads | ratio |"
        )
        print("|---|---|---:|---:|---:|---:|")
        for name in args.presets:
            seq, batch = preset(name).max_seq_len, PRESET_TRAINING[name]["batch_size"]
            step = step_tokens_per_s(name, records, args.steps)
            rates = [pipeline_tokens_per_s(records, seq, batch, t, args.batches) for t in (1, 2)]
            print(
                f"| {name} | {batch} x {seq} | {step:,.0f} | {rates[0]:,.0f} | {rates[1]:,.0f} "
                f"| {rates[1] / step:.0f}x |",
                flush=True,
            )
        if args.prepare_mb:
            r = prepare_throughput(args.prepare_mb, Path(tmp))
            print(
                f"BPE 4096 trained on the KJV in {r['bpe_train_s']:.1f} s; "
                f"prepared {r['mb']:.0f} MB at {r['mb_per_s']:.2f} MB/s = "
                f"{r['tokens_per_s']:,.0f} tokens/s "
                f"({r['bytes_per_token']:.2f} bytes/token)"
            )


if __name__ == "__main__":
    main()
