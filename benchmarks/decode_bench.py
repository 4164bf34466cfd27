"""CPU decode benchmark: `jmoe.generate` vs transformers' ``generate`` (torch
CPU) on the same Mixtral-style model, side by side in one run.

    pip install -e ".[bench]"            # torch + transformers (optional extra)
    nice python -m benchmarks.decode_bench
    nice python -m benchmarks.decode_bench --torch-python /path/to/venv-with-torch/bin/python

The model (default: 8 experts top-2, d_model 512, d_ff 1024, 4 layers, 8
heads with 2 key/value heads, vocab 32000) is created by transformers with
random weights and saved with ``save_pretrained`` (`benchmarks/hf_decode_worker.py`,
a separate process running ``--torch-python``, so torch may live in another
environment than jax); `jmoe.hf.load` reads it: both run the same weights in
float32. Both decode greedily ``--new-tokens`` tokens after a random prompt
of ``--prompt-len`` tokens for ``--batch`` sequences (transformers: no early
stop, its default dynamic KV cache; jmoe: prefill, then a jitted decode step
in a loop over a static KV cache). Each round runs both once, one after the
other (median over ``--repeats`` rounds, after a warm-up that compiles jmoe);
decode tokens/s = batch x new tokens / seconds of the whole ``generate`` call
(prefill included). It also prints the share of greedy tokens the two agree
on and jmoe's per-token decode step (from 1-token and N-token runs). Without
torch it times jmoe alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import jmoe
import jmoe.hf
from jmoe.hf.config import from_hf
from jmoe.transformer import MoETransformer

WORKER = Path(__file__).with_name("hf_decode_worker.py")


class TorchPeer:
    """The transformers model in a worker process (None-like when torch is missing)."""

    def __init__(self, python: str, folder: Path, config: dict):
        self.process = subprocess.Popen(
            [python, str(WORKER), str(folder), json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.folder = folder
        self.banner = self.process.stdout.readline().strip()
        if not self.banner.startswith("ready"):
            self.process.wait()
            raise RuntimeError(
                f"{python} could not run the transformers worker "
                "(needs torch and transformers: pip install -e '.[bench]')"
            )
        self.banner = self.banner.removeprefix("ready ")

    def generate(self, new_tokens: int) -> float:
        self.process.stdin.write(f"run {new_tokens}\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def tokens(self) -> np.ndarray:
        return np.load(self.folder / "torch_out.npy")

    def close(self):
        self.process.stdin.write("quit\n")
        self.process.stdin.flush()
        self.process.wait()


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--torch-python",
        default=sys.executable,
        help="Python with torch + transformers for the peer ('' to skip it)",
    )
    args = parser.parse_args(argv)

    config = dict(
        vocab_size=args.vocab,
        hidden_size=args.d_model,
        intermediate_size=args.d_ff,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    prompt = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.prompt_len))
    prompt = prompt.astype(np.int32)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        np.save(folder / "prompt.npy", prompt)
        peer = None
        if args.torch_python:
            try:
                peer = TorchPeer(args.torch_python, folder, config)
            except RuntimeError as error:
                print(f"  (no peer: {error})")
        model = (
            jmoe.hf.load(folder)
            if peer is not None
            else MoETransformer(from_hf({"model_type": "mixtral", **config}), rngs=nnx.Rngs(0))
        )

        def run_jmoe(new_tokens=args.new_tokens):
            return np.asarray(jax.block_until_ready(jmoe.generate(model, prompt, new_tokens)))

        jmoe_tokens = run_jmoe()  # warm-up: compiles
        run_jmoe(1)
        samples = {"jmoe.generate": [], "transformers.generate": [], "jmoe 1 token": []}
        if peer is not None:
            peer.generate(args.new_tokens)  # warm-up
        for _ in range(args.repeats):
            samples["jmoe.generate"].append(_seconds(run_jmoe))
            samples["jmoe 1 token"].append(_seconds(lambda: run_jmoe(1)))
            if peer is not None:
                samples["transformers.generate"].append(peer.generate(args.new_tokens))
        seconds = {name: statistics.median(s) for name, s in samples.items() if s}
        torch_tokens = peer.tokens() if peer is not None else None
        banner = peer.banner if peer is not None else "no torch"
        if peer is not None:
            peer.close()

    tokens = args.batch * args.new_tokens
    print(
        f"decode: batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens; "
        f"Mixtral-style d_model {args.d_model}, d_ff {args.d_ff}, 8 experts top-2, "
        f"{args.layers} layers, vocab {args.vocab}, float32; {platform.machine()}, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}; {banner}"
    )
    for name in ("jmoe.generate", "transformers.generate"):
        if name in seconds:
            print(f"  {name:24s} {seconds[name]:8.3f} s   {tokens / seconds[name]:10.1f} tokens/s")
    step = (seconds["jmoe.generate"] - seconds["jmoe 1 token"]) / (args.new_tokens - 1)
    print(f"  jmoe decode step: {step * 1e3:.2f} ms per token of the batch")
    if torch_tokens is not None:
        ratio = seconds["transformers.generate"] / seconds["jmoe.generate"]
        agree = np.mean(jmoe_tokens == torch_tokens)
        print(
            f"  jmoe / transformers decode tokens/s: {ratio:.2f}x; greedy tokens agreeing: "
            f"{agree:.1%}"
        )


if __name__ == "__main__":
    main()
