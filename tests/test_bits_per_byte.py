"""experiments.bits_per_byte: every token but a document's first is predicted
once across the windows; a model with uniform logits scores exactly log2(vocab)
bits per token (8 bits per byte at the byte level); the windowed, padded,
batched score of a short document equals its direct forward; the CLI refuses a
tokenizer of another vocab size."""

import json
import math

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from experiments import bits_per_byte, overrides
from experiments.tokenizer import BYTES, Tokenizer, train_bpe
from jmoe import MoEConfig
from jmoe.transformer import MoETransformer, TransformerConfig

SEQ = 8
BATCH = 4  # one compiled forward per vocab
TEXTS = ["In the beginning God created the heaven and the earth.", "Amen.", "x", "And"]


def _model(vocab: int, uniform: bool = False) -> MoETransformer:
    moe = MoEConfig(d_model=8, d_ff=8, num_experts=2, top_k=1, impl="xla")
    config = TransformerConfig(
        vocab_size=vocab, d_model=8, num_layers=1, num_heads=2, max_seq_len=SEQ, moe=moe
    )
    model = MoETransformer(config, rngs=nnx.Rngs(0))
    if uniform:  # zero final-norm scale: every logit 0
        model.final_norm.scale.set_value(model.final_norm.scale.value * 0)
    return model


@pytest.mark.parametrize("n", [2, 3, SEQ, SEQ + 1, SEQ + 2, 3 * SEQ + 1, 3 * SEQ + 2])
def test_windows_predict_every_token_but_the_first_once(n):
    tokens = np.arange(n)
    rows = bits_per_byte.windows(tokens, SEQ)
    assert all(2 <= len(row) <= SEQ + 1 for row in rows)
    np.testing.assert_array_equal(np.concatenate([row[1:] for row in rows]), tokens[1:])


def test_uniform_logits_score_log2_vocab_bits_per_token(tmp_path):
    result = bits_per_byte.score(_model(256, uniform=True), Tokenizer(BYTES), TEXTS, BATCH)
    assert result["tokens"] == sum(len(t) - 1 for t in TEXTS)  # "x" has nothing to predict
    assert result["bytes"] == result["tokens"]
    np.testing.assert_allclose(result["bits_per_byte"], 8.0, rtol=1e-6)
    bpe = Tokenizer(train_bpe(TEXTS * 20, 300, tmp_path / "tokenizer.json"))
    result = bits_per_byte.score(_model(bpe.vocab_size, uniform=True), bpe, TEXTS, BATCH)
    assert result["tokens"] < result["bytes"] - 2  # merges: fewer tokens than bytes
    np.testing.assert_allclose(result["nats_per_token"], math.log(bpe.vocab_size), rtol=1e-6)


def test_padded_windows_equal_the_direct_forward():
    model = _model(256)
    text = "Amen, so."  # one window
    tokens = np.frombuffer(text.encode(), np.uint8).astype(np.int32)[None]
    logits, _ = jax.jit(lambda m, t: m(t))(model, tokens[:, :-1])
    want = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    got = bits_per_byte.score(model, Tokenizer(BYTES), [text, "x"], BATCH)
    np.testing.assert_allclose(got["nats_per_token"], want, rtol=1e-5)


def test_cli_refuses_a_tokenizer_of_another_vocab(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model_config.json").write_text(json.dumps(overrides.model_dict(_model(300).config)))
    (tmp_path / "t.txt").write_text("text")
    with pytest.raises(SystemExit):
        bits_per_byte.main(["--run", str(run), "--text", str(tmp_path / "t.txt")])
    assert "vocab size 256, but the run's model has vocab_size=300" in capsys.readouterr().err
