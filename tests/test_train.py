"""Training: one step lowers the loss, the learning-rate schedule, exact resume
from a checkpoint (model, optimizer and the packed data pipeline), and the
command line end to end (the data pipeline: tests/test_data_pipeline.py)."""

import dataclasses
import functools
import json
import math
import os
import re
import shutil
import signal
import string
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments import compare, flops, overrides, pipeline
from experiments import train as train_module
from experiments.checkpoint import Checkpoints
from experiments.presets import preset
from experiments.train import (
    TrainConfig,
    config_from_args,
    learning_rate,
    optimizer,
    parse_args,
    read_metrics,
    train,
    train_step,
)
from experiments.train import main as train_main
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


@pytest.mark.slow
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


@pytest.mark.slow
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

    resumed = train(dataclasses.replace(config, out=str(tmp_path / "killed")))
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "full")
    assert resumed["final_val_loss"] == full["final_val_loss"]
    with pytest.raises(ValueError, match="another model .*num_layers 2 -> 3.*--overwrite"):
        train(dataclasses.replace(config, model=config.model.replace(num_layers=3)))

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
    # Per-layer drops (the layers' own counts) add up to the interval's total (their sum).
    dropped = np.array([r["dropped_fraction_per_layer"] for r in train_records]) * 512
    chex.assert_shape(dropped, (2, 4))
    np.testing.assert_allclose(dropped, np.round(dropped), atol=1e-6)
    np.testing.assert_allclose(dropped.sum(-1), [r["dropped_tokens"] for r in train_records])
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


# ------------------------------------------------------------------ model from the command line


def test_set_and_config_override_the_preset(tmp_path, capsys):
    """--set and --config reach every field with its type; unknown keys, bad values and
    the configs' own errors name the key; the summary's model dict reads back the same."""
    sets = ["num_layers=12", "moe.num_experts=64", "moe.top_k=8", "moe.d_ff=256"]
    model = config_from_args(parse_args(sum((["--set", s] for s in sets), [])))[0].model
    assert (model.num_layers, model.moe.num_experts, model.moe.top_k, model.moe.d_ff) == (
        12,
        64,
        8,
        256,
    )
    assert model.d_model == preset("xs").d_model  # untouched fields keep the preset's
    file = tmp_path / "model.json"
    file.write_text(
        json.dumps(
            {"d_model": 64, "qk_norm": "head", "moe": {"expert_type": "glu"}, "moe.top_k": 2}
        )
    )
    argv = ["--config", str(file), "--set", "moe.top_k=3", "--set", "num_kv_heads=2"]
    argv += ["--set", "moe.normalize_top_k=none", "--set", "moe.dtype=bfloat16"]
    argv += ["--set", "tie_embeddings=true", "--set", "rope_base=5e5"]
    model = config_from_args(parse_args(argv))[0].model
    assert model.d_model == model.moe.d_model == 64  # d_model carries to moe.d_model
    assert (model.qk_norm, model.moe.expert_type, model.moe.top_k) == ("head", "glu", 3)
    assert model.num_kv_heads == 2 and model.tie_embeddings and model.rope_base == 5e5
    assert model.moe.normalize_top_k is None and model.moe.dtype == jnp.bfloat16
    assert (
        overrides.apply(preset("s"), overrides.flatten(overrides.model_dict(model)), "x") == model
    )

    bad = {
        "moe.num_expert=8": "unknown key 'moe.num_expert'",
        "layers=2": "unknown key 'layers'",
        "num_layers=two": "num_layers='two': expected int",
        "tie_embeddings=maybe": "tie_embeddings='maybe': expected true or false",
        "moe.dtype=int8": "moe.dtype='int8': expected a floating dtype",
        "num_heads=none": "num_heads='none': expected int, not None",
        "moe.top_k=9": "top_k must be <= num_experts=8",
        "num_layers": "--set takes KEY=VALUE",
    }
    for assignment, message in bad.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            config_from_args(parse_args(["--set", assignment]))
    file.write_text(json.dumps({"moe": {"top_k": "8"}, "num_layers": 2.5}))
    with pytest.raises(ValueError, match=re.escape("num_layers=2.5: expected int")):
        config_from_args(parse_args(["--config", str(file)]))
    with pytest.raises(SystemExit) as exit_info:  # the CLI: one line, no traceback
        train_main(["--set", "moe.top_k=0"])
    assert exit_info.value.code == 2
    assert "error: top_k must be a positive int, got 0" in capsys.readouterr().err


def test_training_bounds_the_expert_parallel_buffer_by_default():
    """The trainer's dMoE gets ep_buffer_factor=1.25 unless the model sets it or the
    (exclusive) ep_capacity_factor; ``none`` restores worst-case buffers."""
    moe_of = lambda *sets: (
        config_from_args(parse_args([a for s in sets for a in ("--set", s)]))[0].model.moe
    )
    assert preset("xs").moe.ep_buffer_factor is None  # the library's default stays
    assert moe_of().ep_buffer_factor == 1.25
    assert moe_of("moe.ep_buffer_factor=2").ep_buffer_factor == 2.0
    assert moe_of("moe.ep_buffer_factor=none").ep_buffer_factor is None
    capped = moe_of("moe.ep_capacity_factor=1.5")
    assert (capped.ep_buffer_factor, capped.ep_capacity_factor) == (None, 1.5)
    with pytest.raises(ValueError, match="ep_buffer_factor=2.0 .* and"):
        moe_of("moe.ep_capacity_factor=1.5", "moe.ep_buffer_factor=2")


def test_param_counts_and_flops():
    """`flops.param_counts` equals the parameters the model creates (variants of
    attention, FFN and embeddings) and the published totals of the large presets;
    the matmul parameters give XLA's forward FLOPs of a dense model."""
    base = _model()
    variants = [
        base,
        base.replace(num_kv_heads=1, head_dim=4, qk_norm="head", tie_embeddings=True),
        base.replace(qk_norm="projection", moe_every=2, ffn="moe"),
        base.replace(
            ffn="dense",
            moe=base.moe.replace(expert_type="glu", num_shared_experts=2, shared_expert_gate=True),
        ),
        base.replace(moe=base.moe.replace(num_shared_experts=1, shared_expert_gate=True)),
    ]
    for config in variants:
        model = nnx.eval_shape(lambda c=config: MoETransformer(c, rngs=nnx.Rngs(0)))
        created = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
        assert flops.param_counts(config)[0] == created, config
    published = {  # (total, active), in billions, from the models' cards
        "olmoe-1b-7b": (6.92, 1.28),
        "qwen3-30b-a3b": (30.5, 3.3),
        "mixtral-8x7b": (46.7, 12.9),
    }
    for name, (total, active) in published.items():
        counted = np.array(flops.param_counts(preset(name))) / 1e9
        np.testing.assert_allclose(counted, (total, active), rtol=0.02, err_msg=name)
    assert 95e6 < flops.param_counts(preset("m"))[0] < 110e6

    dense = base.replace(ffn="dense", d_model=64, num_heads=4, moe=base.moe.replace(d_model=64))
    model = MoETransformer(dense, rngs=nnx.Rngs(0))
    tokens = np.zeros((2, SEQ), np.int32)
    cost = jax.jit(lambda t: model(t)[0]).lower(tokens).compile().cost_analysis()
    matmuls = 2 * flops.matmul_params_active(dense) * tokens.size
    attention = 4 * dense.num_layers * dense.num_heads * dense.head_size * SEQ * tokens.size
    assert cost["flops"] == pytest.approx(matmuls + attention, rel=0.05)
    assert flops.flops_per_token(dense) == 6 * flops.matmul_params_active(dense) + 0.5 * 3 * (
        attention / tokens.size
    )
    assert flops.peak_flops("NVIDIA H100 80GB HBM3") == flops.peak_flops("NVIDIA H200") == 989e12
    assert flops.peak_flops("NVIDIA H100 PCIe") == 756e12 and flops.peak_flops("cpu") is None


# ------------------------------------------------------------------ precision and accumulation


@pytest.mark.slow
def test_grad_accum_equals_the_large_batch_step():
    """With the aux losses off, 4 accumulated micro-batches of 2 give the loss and the
    gradients of one batch of 8 (measured: 1e-8 apart), and the summed expert counts."""
    config = _model().replace(moe=_model().moe.replace(load_balancing_loss_weight=0.0))
    model = MoETransformer(config, rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(1).integers(0, 256, (8, SEQ + 1)).astype(np.int32)
    large = nnx.jit(nnx.value_and_grad(train_module.lm_loss, has_aux=True))(model, tokens)
    accumulated = nnx.jit(train_module.accumulated_loss_and_grads, static_argnums=2)(
        model, tokens, 4
    )
    (loss, (ce, aux)), grads = accumulated
    assert float(loss) == pytest.approx(float(large[0][0]), abs=1e-6)
    assert float(ce) == pytest.approx(float(large[0][1][0]), abs=1e-6)
    np.testing.assert_array_equal(aux["tokens_per_expert"], large[0][1][1]["tokens_per_expert"])
    chex.assert_trees_all_close(grads, large[1], atol=1e-6)
    with pytest.raises(ValueError, match="grad_accum=3 must divide batch_size=16"):
        TrainConfig(model=config, out="", cache_dir="", grad_accum=3)


def _run_steps(model_config, batches):
    config = TrainConfig(model=model_config, out="", cache_dir="", lr=1e-2, warmup_fraction=0.0)
    model = MoETransformer(model_config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split((model, nnx.Optimizer(model, optimizer(config), wrt=nnx.Param)))
    step = jax.jit(functools.partial(train_step, graphdef))
    ces = []
    for tokens in batches:
        state, metrics = step(state, tokens)
        ces.append(float(metrics["ce"]))
    return state, ces


@pytest.mark.slow
def test_bfloat16_compute_tracks_float32():
    """bfloat16 compute with float32 parameters and optimizer state (impl xla, CPU)
    follows the float32 run's cross-entropy within 0.05 nats over 30 steps (measured
    0.009 with top-2 routing); the parameters and Adam moments stay float32."""
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 64, (8, SEQ + 1)).astype(np.int32) for _ in range(30)]
    model = _model()
    _, f32 = _run_steps(model, batches)
    state, bf16 = _run_steps(model.replace(moe=model.moe.replace(dtype=jnp.bfloat16)), batches)
    assert f32[-1] < f32[0] - 0.5  # it learns, so the comparison covers training
    np.testing.assert_allclose(bf16, f32, atol=0.05)
    kept = {jnp.dtype(t) for t in (jnp.float32, jnp.int32, jnp.uint32)}  # params, steps, rngs
    assert {leaf.dtype for leaf in jax.tree.leaves(state)} <= kept


# ------------------------------------------------------------------ runs that survive a scheduler


def _poisoned_token(config: TrainConfig, step: int) -> tuple[int, set[int]]:
    """A token id first seen in ``step``'s batch (from 1) and the steps (from 1) whose
    batches hold it: of those ids, the one in the fewest of the run's batches (read
    from the run's own data pipeline)."""
    corpus = pipeline.Corpus(pipeline.prepared(config.data, config.cache_dir))
    records, _ = corpus.split(0.05)
    shape = dict(seq_len=SEQ, batch_size=config.batch_size, seed=config.seed)
    iterator = pipeline.train_batches(records, **shape)
    batches = [next(iterator)["tokens"] for _ in range(config.steps)]
    iterator.close()
    holds = lambda v: {i + 1 for i, b in enumerate(batches) if np.any(b == v)}
    first_seen = [v for v in np.unique(batches[step - 1]) if min(holds(v)) == step]
    assert first_seen, f"no token id is first seen at step {step}"
    token = min(first_seen, key=lambda v: len(holds(v)))
    return int(token), holds(token)


def _events(directory: Path) -> dict[str, list[float]]:
    """The scalars of the TensorBoard event files under ``directory`` (TFRecord framing:
    length, its CRC, the Event proto, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars = {}
    for file in directory.glob("events.out.tfevents.*"):
        raw = file.read_bytes()
        while raw:
            length = int.from_bytes(raw[:8], "little")
            event = Event.FromString(raw[12 : 12 + length])
            raw = raw[16 + length :]
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append(value.simple_value)
    return scalars


@pytest.mark.slow
def test_nonfinite_loss_stops_or_is_skipped(tmp_path, text_file, monkeypatch):
    """A NaN loss (planted: any batch holding one token id) stops the run naming its step,
    with the earlier checkpoints kept; with skip_nonfinite the run finishes, the
    skipped updates are counted and leave the optimizer's step count behind. The
    skipping run also writes TensorBoard scalars equal to metrics.jsonl's."""
    real_loss = train_module.lm_loss
    # One of 36 rare characters on each line: ids that first show up in a later batch.
    rare = string.ascii_uppercase + string.digits
    lines = text_file.read_text().splitlines()
    corpus = tmp_path / "rare.txt"
    corpus.write_text("".join(f"{line} {rare[i % 36]}\n" for i, line in enumerate(lines)))
    config = _config(tmp_path, corpus, checkpoint_every=2)
    token, bad = _poisoned_token(config, step=3)
    first = min(bad)

    def poisoned(model, batch):
        loss, rest = real_loss(model, batch)
        return loss * jnp.where(jnp.any(batch["tokens"] == token), jnp.nan, 1.0), rest

    monkeypatch.setattr(train_module, "lm_loss", poisoned)
    with pytest.raises(FloatingPointError, match=f"step {first}: the loss or gradient"):
        train(config)
    checkpoints = Checkpoints(tmp_path / "run" / "checkpoints", every=2)
    assert checkpoints.latest_step() == (first - 1) // 2 * 2
    checkpoints.close()

    summary = train(
        dataclasses.replace(config, overwrite=True, skip_nonfinite=True, tensorboard=True)
    )
    assert summary["skipped_steps"] == len(bad) and math.isfinite(summary["final_val_loss"])
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in records if r["skipped_steps"]] == sorted(bad)
    model = MoETransformer(config.model, rngs=nnx.Rngs(0))
    graphdef, like = nnx.split((model, nnx.Optimizer(model, optimizer(config), wrt=nnx.Param)))
    checkpoints = Checkpoints(tmp_path / "run" / "checkpoints", every=2)
    state, _ = checkpoints.restore(8, like)
    checkpoints.close()
    assert int(nnx.merge(graphdef, state)[1].step[...]) == 8 - len(bad)
    scalars = _events(tmp_path / "run" / "tensorboard")
    np.testing.assert_allclose(scalars["train/ce"], [r["ce"] for r in records], rtol=1e-6)
    assert len(scalars["val/val_loss"]) == 5  # steps 0, 2, 4, 6, 8


def _tiny_cli(out: Path, corpus: Path, *flags: str) -> list[str]:
    sets = ["d_model=16", "num_heads=2", "num_layers=2", "max_seq_len=16", "moe.d_ff=32"]
    sets += ["moe.num_experts=4", "moe.block_size=32", "moe.impl=xla"]
    return [
        sys.executable,
        "-m",
        "experiments.train",
        *sum((["--set", s] for s in sets), []),
        *("--data", str(corpus), "--out", str(out), "--steps", "300", "--batch-size", "2"),
        *("--log-every", "4", "--eval-every", "300", "--checkpoint-every", "100"),
        *("--eval-batches", "1", "--grad-accum", "2", *flags),
    ]


@pytest.mark.slow
def test_sigterm_saves_and_the_relaunch_reproduces_the_run(tmp_path, text_file):
    """SIGTERM mid-run (mid logging interval, most likely) saves a checkpoint and exits
    with 143; rerunning the same command continues from it and logs exactly the losses
    of an uninterrupted run."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    full = _tiny_cli(tmp_path / "full", text_file)
    assert subprocess.run(full, cwd=REPO, env=env, capture_output=True).returncode == 0

    command = _tiny_cli(tmp_path / "run", text_file)
    process = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.exists() and '"train"' in metrics.read_text()):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr[-2000:]
    saved = Checkpoints(tmp_path / "run" / "checkpoints", every=100)
    stopped = saved.latest_step()
    saved.close()
    assert 4 <= stopped < 300 and f"saved step {stopped}" in stderr

    relaunch = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert relaunch.returncode == 0, relaunch.stderr[-2000:]
    assert _losses(tmp_path / "run") == _losses(tmp_path / "full")
