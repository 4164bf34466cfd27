"""Training: one step lowers the loss, the learning-rate schedule, exact resume
from a checkpoint (model, optimizer and the packed data pipeline), and the
command line end to end (the data pipeline: tests/test_data_pipeline.py)."""

import dataclasses
import functools
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import chex
import jax
import numpy as np
import optax
import pytest
from flax import nnx

from experiments import compare, pipeline
from experiments.checkpoint import Checkpoints
from experiments.train import TrainConfig, learning_rate, optimizer, read_metrics, train, train_step
from jmoe import MoEConfig
from jmoe.transformer import MoETransformer, TransformerConfig

REPO = Path(__file__).resolve().parents[1]
SEQ = 16


def _model(ffn="dmoe") -> TransformerConfig:
    moe = MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=1, block_size=32, impl="xla")
    return TransformerConfig(
        vocab_size=256, d_model=16, num_layers=2, num_heads=2, max_seq_len=SEQ, moe=moe, ffn=ffn
    )


def _config(tmp_path, text_file, **kw) -> TrainConfig:
    base = dict(
        model=_model(),
        out=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"),
        data=str(text_file),
        steps=8,
        batch_size=4,
        lr=1e-2,
        log_every=1,
        eval_every=2,
        eval_batches=2,
        checkpoint_every=4,
    )
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("ffn", ["dmoe", "moe", "dense"])
def test_one_step_lowers_loss_on_fixed_batch(tmp_path, text_file, ffn):
    """The loss a step reports is that of the parameters before its update."""
    config = _config(tmp_path, text_file, model=_model(ffn), warmup_fraction=0.0)
    model = MoETransformer(config.model, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split((model, nnx.Optimizer(model, optimizer(config), wrt=nnx.Param)))
    tokens = np.random.default_rng(0).integers(0, 256, (4, SEQ + 1)).astype(np.int32)
    step = jax.jit(functools.partial(train_step, graphdef))
    state, first = step(state, tokens)
    state, second = step(state, tokens)
    assert float(first["ce"]) == pytest.approx(math.log(256), abs=0.1)  # untrained: ~uniform
    assert float(second["loss"]) < float(first["loss"]) - 0.05
    assert int(nnx.merge(graphdef, state)[1].step[...]) == 2


def _unigram_entropy(data: bytes) -> float:
    """Cross-entropy (nats/byte) of the best context-free model of ``data``:
    the entropy of its byte frequencies."""
    p = np.bincount(np.frombuffer(data, np.uint8), minlength=256) / len(data)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _router_and_expert_grads(model, tokens):
    """Gradients of the cross-entropy alone (no aux loss) w.r.t. each MoE
    layer's router kernel and expert weights."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def ce(params):
        logits, _ = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    grads = nnx.to_pure_dict(jax.jit(jax.grad(ce))(params))
    return [
        (layer["ffn"]["router"]["kernel"], layer["ffn"]["experts"])
        for layer in grads["blocks"].values()
        if "router" in layer.get("ffn", {})
    ]


def test_moe_learns_beyond_unigram(tmp_path, text_file):
    """The dMoE LM learns context: within 60 steps the cross-entropy it
    reports on batches it has not trained on yet (each step's loss is taken
    before its update, and one epoch visits every window once) falls well
    below the unigram entropy of the training bytes (computed here from the
    file), which byte-frequency learning alone cannot beat (measured: ~1.2
    nats against 2.68). The routing is trained by the LM loss itself: the
    cross-entropy's gradient (no aux loss) reaches every MoE router and every
    expert that received tokens.

    Catches a router cut out of the gradient path (planted by hand:
    ``stop_gradient`` on the router gates zeroes the router gradients) and a
    model that can learn only byte frequencies (planted by hand: feeding every
    position the same token fails it, first at the expert check since every
    token then routes alike; zeroing attention does not, as a bigram model
    beats the unigram entropy)."""
    config = _config(tmp_path, text_file, warmup_fraction=0.0, steps=60)
    corpus = pipeline.Corpus(pipeline.prepared(str(text_file), tmp_path))
    records = corpus.split(0.05)[0]
    train_bytes = np.concatenate([records[i] for i in range(len(records))])
    assert config.steps * 8 * (SEQ + 1) < len(train_bytes)  # no token is seen twice
    unigram = _unigram_entropy(train_bytes.astype(np.uint8).tobytes())
    batches = pipeline.train_batches(records, seq_len=SEQ, batch_size=8, seed=0)
    model = MoETransformer(config.model, rngs=nnx.Rngs(0))
    first = next(batches)
    for router, experts in _router_and_expert_grads(model, first["tokens"]):
        assert np.abs(np.asarray(router)).sum() > 0
        moved = [np.abs(np.asarray(w)).sum(axis=(1, 2)) > 0 for w in experts.values()]
        assert np.count_nonzero(moved[0]) >= 2  # tokens reached several experts
        assert all(np.array_equal(m, moved[0]) for m in moved)
    graphdef, state = nnx.split((model, nnx.Optimizer(model, optimizer(config), wrt=nnx.Param)))
    step = jax.jit(functools.partial(train_step, graphdef))
    unseen = []
    for i in range(config.steps):
        state, metrics = step(state, first if i == 0 else next(batches))
        unseen.append(float(metrics["ce"]))
    batches.close()
    assert np.mean(unseen[-10:]) < unigram - 0.5, (unseen[-10:], unigram)


def test_learning_rate_schedule(tmp_path, text_file):
    schedule = learning_rate(
        _config(tmp_path, text_file, steps=100, lr=1.0, warmup_fraction=0.1, min_lr_ratio=0.1)
    )
    expected = {0: 0.1, 5: 0.55, 10: 1.0, 55: 0.1 + 0.9 * 0.5, 100: 0.1}
    for step, lr in expected.items():
        assert float(schedule(step)) == pytest.approx(lr, abs=1e-5), step


def _losses(out: Path) -> list:
    return [
        (r["kind"], r["step"], r.get("loss"), r.get("ce"), r.get("val_loss"))
        for r in read_metrics(out / "metrics.jsonl")
    ]


def test_resume_is_exact(tmp_path, text_file):
    """An interrupted run resumed from its step-4 checkpoint reproduces the
    uninterrupted run's losses and final parameters exactly."""
    config = _config(tmp_path, text_file, out=str(tmp_path / "full"))
    full = train(config)
    assert full["steps"] == 8
    # Simulate a kill at step 6: the step-4 checkpoint and metrics up to step 6 survive.
    shutil.copytree(tmp_path / "full", tmp_path / "killed")
    shutil.rmtree(tmp_path / "killed" / "checkpoints" / "8")
    metrics = tmp_path / "killed" / "metrics.jsonl"
    kept = [r for r in read_metrics(metrics) if r["step"] <= 6]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in kept))

    resumed = train(dataclasses.replace(config, out=str(tmp_path / "killed"), resume=True))
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "full")
    assert resumed["final_val_loss"] == full["final_val_loss"]

    model = MoETransformer(config.model, rngs=nnx.Rngs(0))
    like = nnx.state((model, nnx.Optimizer(model, optimizer(config), wrt=nnx.Param)))
    states = []
    for run in ("full", "killed"):
        checkpoints = Checkpoints(tmp_path / run / "checkpoints", every=4)
        assert checkpoints.latest_step() == 8
        states.append(checkpoints.restore(8, like)[0])
        checkpoints.close()
    chex.assert_trees_all_equal(*states)


def test_cli_end_to_end(tmp_path):
    """``python -m experiments.train`` on the default corpus (KJV) with the xs preset."""
    out = tmp_path / "xs"
    command = [
        sys.executable,
        "-m",
        "experiments.train",
        "--preset",
        "xs",
        "--ffn",
        "moe",
        "--capacity-factor",
        "1.5",
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--log-every",
        "2",
        "--eval-every",
        "2",
        "--checkpoint-every",
        "2",
        "--eval-batches",
        "1",
        "--out",
        str(out),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[xs-moe-cf1.5] 4 steps | val loss" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["ffn"] == "moe"
    assert summary["final_val_loss"] < math.log(256)
    assert 0 <= summary["dropped_fraction"] < 1
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "val"] == [0, 2, 4]
    train_records = [r for r in records if r["kind"] == "train"]
    load = np.array([r["expert_load"] for r in train_records])
    chex.assert_shape(load, (2, 4, 8))  # intervals, MoE layers, experts
    # Regression guard only: the code normalises the loads, so they sum to 1 by construction.
    np.testing.assert_allclose(load.sum(-1), 1.0, rtol=1e-6)
    # Independent: an interval is 2 steps x 2 sequences x 128 tokens x top-1 = 512
    # assignments per MoE layer (4 layers), each counted once, before any drop.
    assert all(r["assignments"] == 512 * 4 for r in train_records)
    np.testing.assert_allclose(load * 512, np.round(load * 512), atol=1e-6)
    assert (out / "training.png").stat().st_size > 10_000
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "4"]
    assert list((tmp_path / "cache").glob("kjv-chapters-*/metadata.json"))


def test_compare_time_to_reach_and_table():
    val = [
        {"kind": "val", "step": s, "train_time_s": t, "val_loss": v}
        for s, t, v in [(0, 0.0, 5.5), (10, 10.0, 3.0), (20, 30.0, 2.0), (30, 50.0, 1.5)]
    ]
    assert compare.time_to_reach(val, 2.5) == pytest.approx(20.0)  # halfway from 3.0 to 2.0
    assert compare.time_to_reach(val, 6.0) == 0.0
    assert compare.time_to_reach(val, 1.0) is None
    summary = dict(
        final_val_loss=2.0,
        train_time_s=30.0,
        tokens_per_s=100.0,
        median_step_s=0.5,
        dropped_fraction=0.0,
        tokens_per_step=64,
    )
    rows = compare.results_table(
        {"dense": summary, "dmoe": {**summary, "final_val_loss": 1.5, "train_time_s": 50.0}},
        {"dense": val[:3], "dmoe": val},
    )
    assert rows[0]["speedup_vs_dense"] == pytest.approx(1.0)
    assert rows[1]["time_to_dense_loss_s"] == pytest.approx(30.0)
    table = compare.markdown(rows)
    # dense's records end at step 20 (2.0); dmoe's 2.0 there ties, so it is never ahead
    assert rows[1]["ahead_of_dense_from_tokens"] is None
    assert "| dmoe | 1.5000 | 50 | 100 | 500 | 0.0% | 30 | 1.00x | never |" in table
    assert "| dense | 2.0000 | 30 | 100 | 500 | 0.0% | 30 | 1.00x | - |" in table
