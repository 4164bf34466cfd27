"""Bits per byte of a trained run on a held-out text: compares runs across tokenizers.

    python -m experiments.bits_per_byte --run runs/xs-dmoe-bpe4096 \\
        --tokenizer data/kjv-bpe4096/tokenizer.json --text heldout.jsonl
    python -m experiments.bits_per_byte --run runs/xs-dmoe-bytes --text heldout.jsonl

The run's latest checkpoint (and its ``model_config.json``) scores every
document of ``--text`` (``.txt``, ``.jsonl`` or ``.parquet``, read as
`experiments.prepare_data` reads them) tokenized by ``--tokenizer``
(``bytes``, the default, or the run's ``tokenizer.json``). A document of ``n``
tokens is cut into windows of ``max_seq_len + 1`` tokens that overlap by one,
so each of its tokens but the first is predicted once, with the context of
its window (the trainer too starts every document at position 0 and never
scores a document's first token). Bits per byte = the predicted tokens'
summed negative log-likelihood / ln 2 / their UTF-8 bytes; nats per token is
the same sum over their count.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.prepare_data import text_pieces
from experiments.run_config import latest_model, read_model_config
from experiments.tokenizer import BYTES, Tokenizer
from jmoe.transformer import MoETransformer


def windows(tokens: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """``[n]`` token ids -> windows of at most ``seq_len + 1`` tokens, each
    starting at the previous one's last token (``n >= 2``)."""
    return [tokens[start : start + seq_len + 1] for start in range(0, len(tokens) - 1, seq_len)]


@nnx.jit
def _window_nll(model: MoETransformer, tokens: jax.Array, real: jax.Array) -> jax.Array:
    """Summed NLL (nats) of ``tokens [batch, seq + 1]``'s predicted tokens;
    ``real [batch, seq + 1]`` bool marks the tokens that are not padding."""
    logits, _ = model(tokens[:, :-1], mask=real[:, :-1])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return jnp.sum(jnp.where(real[:, 1:], nll, 0.0))


def score(
    model: MoETransformer, tokenizer: Tokenizer, texts: list[str], batch_size: int = 16
) -> dict[str, float]:
    """``{"nats_per_token", "bits_per_byte", "tokens", "bytes"}`` of ``model``
    (in eval mode) over ``texts`` (documents), as the module docstring says."""
    seq_len = model.config.max_seq_len
    rows, predicted, scored_bytes = [], 0, 0
    for text, tokens in zip(texts, tokenizer.encode_batch(texts)):
        if len(tokens) < 2:
            continue
        rows += windows(tokens.astype(np.int32), seq_len)
        predicted += len(tokens) - 1
        scored_bytes += len(text.encode("utf-8")) - len(tokenizer.decode(tokens[:1]).encode())
    if not rows:
        raise ValueError("text: no document has two tokens to score")
    model.eval()
    total = 0.0
    for first in range(0, len(rows), batch_size):
        chunk = rows[first : first + batch_size]
        chunk += [chunk[0][:0]] * (batch_size - len(chunk))  # static batch: empty rows
        tokens = np.zeros((batch_size, seq_len + 1), np.int32)
        real = np.zeros_like(tokens, dtype=bool)
        for i, row in enumerate(chunk):
            tokens[i, : len(row)], real[i, : len(row)] = row, True
        total += float(_window_nll(model, jnp.asarray(tokens), jnp.asarray(real)))
    return {
        "nats_per_token": total / predicted,
        "bits_per_byte": total / math.log(2) / scored_bytes,
        "tokens": predicted,
        "bytes": scored_bytes,
    }


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="an experiments.train run directory")
    parser.add_argument("--text", required=True, help="held-out documents (.txt/.jsonl/.parquet)")
    parser.add_argument("--text-field", default="text", help="the .jsonl/.parquet text field")
    parser.add_argument("--tokenizer", default=BYTES, help="'bytes' or the run's tokenizer.json")
    args = parser.parse_args(argv)
    config = read_model_config(Path(args.run))
    if config is None:
        parser.error(f"--run {args.run}: no model_config.json (not an experiments.train run)")
    tokenizer = Tokenizer(args.tokenizer)
    if tokenizer.vocab_size != config.vocab_size:
        parser.error(
            f"--tokenizer {args.tokenizer}: vocab size {tokenizer.vocab_size}, but the run's "
            f"model has vocab_size={config.vocab_size}"
        )
    model, step = latest_model(Path(args.run), config)
    texts, pending = [], []
    for piece, ends_document, _ in text_pieces(Path(args.text), args.text_field):
        pending.append(piece)
        if ends_document:
            texts.append("".join(pending))
            pending = []
    result = score(model, tokenizer, texts)
    print(
        f"{args.run} (step {step}) on {args.text}: {result['bits_per_byte']:.4f} bits/byte, "
        f"{result['nats_per_token']:.4f} nats/token over {result['tokens']:,} tokens = "
        f"{result['bytes']:,} bytes"
    )
    return result


if __name__ == "__main__":
    main()
