"""Train an MoE transformer language model (byte-level presets on the KJV Bible).

    python -m experiments.train                       # xs dropless MoE on the KJV Bible
    python -m experiments.train --preset xs --ffn moe --capacity-factor 1.5 --steps 300
    python -m experiments.train --ffn dense --data my.txt --out runs/mine
    python -m experiments.train --set num_layers=12 --set moe.num_experts=64 --set moe.top_k=8
    python -m experiments.train --preset m --grad-accum 4 --tensorboard   # one GPU, bf16
    python -m experiments.train --out runs/xs-dmoe --overwrite   # start over (rerun: continue)
    python -m experiments.train --mesh 2x4 --host-devices 8   # data x expert parallel on CPU
    python -m experiments.train --mesh data=2,fsdp=2,expert=2 --host-devices 8  # + FSDP
    python -m experiments.launch_local --processes 2 -- \\
        experiments.train --mesh 2x4 --host-devices 4
    python -m experiments.train --init-from-hf path/to/hf --out runs/ft  # fine-tune (docs/hf.md)
    python -m experiments.train --score-function sigmoid --expert-bias \
        --load-balancing-loss-weight 0 --num-expert-groups 4 --top-k-groups 2  # DeepSeek-V3

Loss = cross-entropy + the MoE aux losses; AdamW with linear warmup and cosine
decay, global-norm clipping. A run directory holds ``checkpoints/`` (Orbax:
model, optimizer state and step), ``metrics.jsonl`` (one ``"train"`` record
per logging interval, one ``"val"`` record per evaluation), ``training.png``,
``summary.json`` and, with ``--tensorboard``, ``tensorboard/``. Rerunning a
command continues its run; SIGTERM saves a checkpoint first. Wall times count
training steps only: compilation, evaluation and checkpointing are excluded.
Model fields: `experiments.config` and `experiments.overrides`; FLOPs:
`experiments.flops`. Meshes and multi-process runs: `experiments.distributed`
(only process 0 writes metrics, plots and summary).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from experiments import distributed, flops, overrides, pipeline, plotting
from experiments.checkpoint import Checkpoints
from experiments.config import TrainConfig, config_from_args, parse_args
from experiments.logbook import Logbook, read_metrics
from experiments.preemption import EXIT_CODE, Preempted, Preemption
from experiments.run_config import MODEL_CONFIG, with_hf_weights
from jmoe.parallel.mesh import bytes_per_device
from jmoe.router import expert_biases, update_expert_bias
from jmoe.transformer import MoETransformer


def learning_rate(config: TrainConfig) -> optax.Schedule:
    """Linear warmup over ``W = max(1, warmup_fraction * steps)`` steps from
    ``lr / W`` (step 0 already learns) to ``lr``, then cosine decay to
    ``min_lr_ratio * lr`` at the last step."""
    warmup = max(1, int(config.warmup_fraction * config.steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=config.lr / warmup,
        peak_value=config.lr,
        warmup_steps=warmup,
        decay_steps=config.steps,
        end_value=config.lr * config.min_lr_ratio,
    )


def optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW (b2 0.95; no decay on vectors such as norm scales)."""
    decay_matrices = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(
            learning_rate(config),
            b1=0.9,
            b2=0.95,
            weight_decay=config.weight_decay,
            mask=decay_matrices,
        ),
    )


def lm_loss(model: MoETransformer, batch):
    """``batch``: ``tokens [batch, seq + 1]`` (one document per row) or a dict of
    `pipeline.FIELDS` arrays of that shape (packed documents) -> ``(ce + aux_loss,
    (ce, aux))``; ce in nats/token, for packed documents averaged over the
    predictions inside a document (`pipeline.prediction_mask`)."""
    if not isinstance(batch, dict):
        logits, aux = model(batch[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
        return ce + aux["aux_loss"], (ce, aux)
    inputs = {name: batch[name][:, :-1] for name in ("segment_ids", "positions")}
    logits, aux = model(batch["tokens"][:, :-1], **inputs)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"][:, 1:])
    scored = pipeline.prediction_mask(batch["segment_ids"])
    ce = jnp.sum(jnp.where(scored, ce, 0.0)) / jnp.maximum(jnp.sum(scored), 1)
    return ce + aux["aux_loss"], (ce, aux)


def accumulated_loss_and_grads(model: MoETransformer, batch, micro_batches: int):
    """``((loss, (ce, aux)), grads)`` of `lm_loss` over ``batch`` (see `lm_loss`) in
    ``micro_batches`` forward and backward passes under one ``lax.scan``.

    Micro-batch ``j`` holds rows ``j, j + n, j + 2n, ...`` (so each device of a
    batch-sharded mesh keeps an even share). Losses and gradients are the micro-batch
    means' mean (equal to the full batch's for the cross-entropy); integer aux counts
    (``tokens_per_expert``, ``dropped_tokens``, ``dropped_per_layer``) are summed over the
    micro-batches.
    Non-parameter state the forward changes (e.g. router-jitter rng counts) is carried.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rows = jax.tree.leaves(batch)[0].shape[0] // micro_batches
    # each array [n, rows, seq + 1]
    micro = jax.tree.map(lambda a: a.reshape(rows, micro_batches, -1).swapaxes(0, 1), batch)

    def loss_of(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        loss, (ce, aux) = lm_loss(model, batch)
        return loss, (ce, aux, nnx.split(model, nnx.Param, ...)[2])

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def body(carry, batch):
        rest, total = carry
        (loss, (ce, aux, rest)), grads = grad_fn(params, rest, batch)
        total = jax.tree.map(jnp.add, total, ((loss, (ce, aux)), grads))
        return (rest, total), None

    shapes = jax.eval_shape(grad_fn, params, rest, jax.tree.map(lambda a: a[0], micro))
    zeros = jax.tree.map(
        jnp.zeros_like, ((shapes[0][0], shapes[0][1][:2]), shapes[1])
    )  # ((loss, (ce, aux)), grads)
    (rest, total), _ = jax.lax.scan(body, (rest, zeros), micro)
    nnx.update(model, rest)
    mean = lambda x: x / micro_batches if jnp.issubdtype(x.dtype, jnp.floating) else x
    return jax.tree.map(mean, total)


def train_step(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    batch,
    *,
    grad_accum: int = 1,
    skip_nonfinite: bool = False,
):
    """One AdamW step on ``(model, optimizer)`` state: ``-> (new state, metrics)``.

    ``grad_accum > 1``: the gradient of ``batch`` (see `lm_loss`) is accumulated over
    that many micro-batches (`accumulated_loss_and_grads`). ``metrics["nonfinite"]`` is
    1 when the loss or the gradient norm is NaN or inf; with ``skip_nonfinite`` such a
    step returns the state unchanged (model, optimizer moments and count, expert biases).
    """
    # merge shares the state's Variables, which the update mutates: keep the old values apart
    before = jax.tree.map(lambda x: x, state) if skip_nonfinite else None
    model, opt = nnx.merge(graphdef, state)
    if grad_accum == 1:
        (loss, (ce, aux)), grads = nnx.value_and_grad(lm_loss, has_aux=True)(model, batch)
    else:
        (loss, (ce, aux)), grads = accumulated_loss_and_grads(model, batch, grad_accum)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    opt.update(model, grads)
    update_expert_bias(model, aux)  # aux-loss-free balancing (no-op without expert bias)
    new_state = nnx.state((model, opt))
    if skip_nonfinite:
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, before)
        model, opt = nnx.merge(graphdef, new_state)
    metrics = {
        "loss": loss,
        "ce": ce,
        "aux_loss": aux["aux_loss"],
        "grad_norm": grad_norm,
        "nonfinite": (~finite).astype(jnp.int32),
        "tokens_per_expert": aux["tokens_per_expert"],
        "dropped_tokens": aux["dropped_tokens"],
        "dropped_per_layer": aux["dropped_per_layer"],
    }
    if (biases := expert_biases(model)) is not None:
        metrics["expert_bias"] = biases  # [moe layers, E], after this step's update
    return new_state, metrics


def eval_step(graphdef: nnx.GraphDef, state: nnx.State, batch) -> jax.Array:
    """Validation cross-entropy (no aux loss) of a batch (see `lm_loss`)."""
    model, _ = nnx.merge(graphdef, state)
    return lm_loss(model, batch)[1][0]


def _interval_record(
    config: TrainConfig,
    step: int,
    host: list[dict],
    seconds: float,
    train_time: float,
    lr: float,
    peak_flops: float | None = None,
) -> dict:
    """Averages the per-step metrics of one logging interval into a record.

    ``peak_flops``: the devices' summed peak FLOP/s, for ``mfu`` (omitted when None).
    """
    mean = lambda key: float(np.mean([float(m[key]) for m in host]))
    counts = np.array([m["tokens_per_expert"] for m in host], np.float64)  # [steps, layers, E]
    load = counts.sum(axis=0)  # [moe layers, E]
    imbalance = counts.max(-1) / np.maximum(counts.mean(-1), 1e-9)  # max / mean load per step
    moe = config.model.moe
    assignments = len(host) * config.tokens_per_step * moe.top_k * len(config.model.moe_layers)
    tokens_per_s = len(host) * config.tokens_per_step / seconds
    model_flops = tokens_per_s * flops.flops_per_token(config.model)
    return {
        "kind": "train",
        "step": step,
        "loss": mean("loss"),
        "ce": mean("ce"),
        "aux_loss": mean("aux_loss"),
        "grad_norm": mean("grad_norm"),
        "lr": lr,
        "step_time_s": seconds / len(host),
        "tokens_per_s": tokens_per_s,
        "tflops_per_s": model_flops / 1e12,
        **({} if peak_flops is None else {"mfu": model_flops / peak_flops}),
        "train_time_s": train_time,
        "skipped_steps": int(sum(int(m.get("nonfinite", 0)) for m in host)),
        "dropped_tokens": int(sum(int(m["dropped_tokens"]) for m in host)),
        "assignments": assignments,
        # [moe layers]: dropped / routed assignments of each MoE layer in the interval
        "dropped_fraction_per_layer": (
            np.sum([m["dropped_per_layer"] for m in host], axis=0, dtype=np.float64).reshape(-1)
            / (len(host) * config.tokens_per_step * moe.top_k)
        ).tolist(),
        "expert_load": (load / np.maximum(load.sum(-1, keepdims=True), 1)).tolist(),
        "load_imbalance": imbalance.mean(axis=0).tolist(),
        **(
            {"expert_bias": np.asarray(host[-1]["expert_bias"]).tolist()}
            if "expert_bias" in host[-1]
            else {}
        ),
    }


def summarize(config: TrainConfig, records: list[dict], name: str, extra: dict) -> dict:
    """Run summary from its metrics (consistent across resumes)."""
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    train_time = train[-1]["train_time_s"]
    assignments = sum(r["assignments"] for r in train)
    tokens_per_s = train[-1]["step"] * config.tokens_per_step / train_time
    return {
        "name": name,
        "steps": train[-1]["step"],
        "tokens_per_step": config.tokens_per_step,
        "final_val_loss": val[-1]["val_loss"],
        "final_train_ce": train[-1]["ce"],
        "train_time_s": train_time,
        "tokens_per_s": tokens_per_s,
        "tflops_per_s": tokens_per_s * flops.flops_per_token(config.model) / 1e12,
        "median_step_s": float(np.median([r["step_time_s"] for r in train])),
        "dropped_fraction": sum(r["dropped_tokens"] for r in train) / max(assignments, 1),
        "skipped_steps": sum(r.get("skipped_steps", 0) for r in train),
        **extra,
    }


def _evaluate(evaluate, state, batches: list[dict]) -> float:
    return float(np.mean([evaluate(state, batch) for batch in batches]))


def _global_batch(placement: distributed.Placement, local: dict) -> dict:
    """This process's rows of a batch -> the batch the step takes (global on a mesh)."""
    if placement.mesh is None:
        return local
    return {
        name: jax.make_array_from_process_local_data(placement.batch_sharding, rows)
        for name, rows in local.items()
    }


def _corpora(config: TrainConfig, main: bool):
    """``(training records, validation records, vocab size)``; process 0
    prepares a text file or the default corpus, the others wait for it."""
    if main:
        pipeline.prepared(config.data, config.cache_dir)
        if config.eval_data is not None:
            pipeline.prepared(config.eval_data, config.cache_dir)
    distributed.barrier("train: data prepared")
    corpus = pipeline.Corpus(pipeline.prepared(config.data, config.cache_dir))
    if config.eval_data is None:
        return *corpus.split(0.05), corpus.vocab_size
    held_out = pipeline.Corpus(pipeline.prepared(config.eval_data, config.cache_dir))
    if held_out.metadata["tokenizer"] != corpus.metadata["tokenizer"] or (
        held_out.vocab_size != corpus.vocab_size
    ):
        raise ValueError(
            f"eval_data {config.eval_data!r} must share data's tokenizer "
            f"({corpus.metadata['tokenizer']}, vocab {corpus.vocab_size})"
        )
    return corpus.records, held_out.records, corpus.vocab_size


def _with_data_vocab(config: TrainConfig, vocab_size: int) -> TrainConfig:
    """The model's vocab is the data's; a Hugging Face start keeps its own (which must cover it)."""
    if config.init_from_hf is None:
        return dataclasses.replace(config, model=config.model.replace(vocab_size=vocab_size))
    if vocab_size > config.model.vocab_size:
        raise ValueError(
            f"--init-from-hf {config.init_from_hf}: vocab_size={config.model.vocab_size} is "
            f"below the data's {vocab_size} token ids"
        )
    return config


def _model_and_optimizer(config: TrainConfig):
    model = MoETransformer(config.model, rngs=nnx.Rngs(config.seed))
    return model, nnx.Optimizer(model, optimizer(config), wrt=nnx.Param)


# Model fields that change only how a step computes, not the state a checkpoint holds.
_COMPUTE_ONLY = ("remat", "moe.dtype", "moe.impl")


def _check_same_model(config: TrainConfig, meta: dict, step: int):
    """Refuses to continue a run whose checkpoint holds another model."""
    saved = meta.get("model")
    if saved is None:
        return
    now = overrides.flatten(overrides.model_dict(config.model))
    saved = overrides.flatten(saved)
    changed = sorted(k for k in now.keys() | saved.keys() if now.get(k) != saved.get(k))
    changed = [k for k in changed if k not in _COMPUTE_ONLY]
    if changed:
        raise ValueError(
            f"{config.out} holds a run of another model (step {step}; differing: "
            + ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
            + "); pass --overwrite to discard it, or choose another --out"
        )


def _first_nonfinite(host: list[dict], first_step: int) -> int | None:
    """The step (counted from 1) of the first non-finite metrics in ``host``, or None."""
    bad = [first_step + j for j, m in enumerate(host) if int(m["nonfinite"])]
    return bad[0] if bad else None


def _device_peak(config: TrainConfig, placement: distributed.Placement) -> float | None:
    """Summed bfloat16 peak FLOP/s of the run's devices (bfloat16 compute only), or None."""
    if jnp.dtype(config.model.moe.dtype) != jnp.bfloat16:
        return None
    devices = jax.devices()[: 1 if placement.mesh is None else placement.mesh.size]
    peak = flops.peak_flops(devices[0].device_kind)
    return None if peak is None else peak * len(devices)


def _postfix(record: dict, val_loss: float | None) -> dict:
    """The progress bar's fields: cross-entropy and aux loss apart, throughput, MFU."""
    fields = {"ce": f"{record['ce']:.3f}", "aux": f"{record['aux_loss']:.3f}"}
    if val_loss is not None:
        fields["val"] = f"{val_loss:.3f}"
    fields["tok_s"] = f"{record['tokens_per_s']:,.0f}"
    if "mfu" in record:
        fields["mfu"] = f"{record['mfu']:.1%}"
    return fields


def _host_json(metrics: dict) -> dict:
    """One step's host metrics as JSON (kept in a checkpoint saved mid-interval)."""
    return {k: np.asarray(v).tolist() for k, v in metrics.items()}


def train(config: TrainConfig, name: str = "run") -> dict | None:
    """Runs training, continuing from the latest checkpoint in ``config.out`` unless
    ``config.overwrite``; returns the summary (also in ``summary.json``).

    SIGTERM saves a checkpoint (with the metrics of the unfinished logging interval)
    and raises `Preempted`; rerunning continues exactly where it stopped. A non-finite
    loss or gradient raises FloatingPointError naming the step (checkpoints are only
    saved after the metrics before them are checked) unless ``config.skip_nonfinite``.
    With several processes (`experiments.distributed`) every process calls
    this; only process 0 writes files and returns the summary, the others None.
    """
    main = distributed.is_main_process()
    out = Path(config.out)
    placement = distributed.Placement(
        config.mesh,
        batch_size=config.batch_size,
        num_experts=config.model.moe.num_experts if config.model.moe_layers else None,
        fsdp=config.fsdp,
    )
    if (
        placement.mesh is not None
        and (config.batch_size // config.grad_accum) % placement.mesh.size
    ):
        raise ValueError(
            f"--grad-accum {config.grad_accum}: micro-batches of "
            f"{config.batch_size // config.grad_accum} sequences do not split over the "
            f"{placement.mesh.size} devices of the mesh"
        )
    train_records, val_records, vocab_size = _corpora(config, main)
    config = _with_data_vocab(config, vocab_size)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").unlink(missing_ok=True)  # written again when the run completes
        if config.overwrite:
            for stale in ("checkpoints", "tensorboard"):
                shutil.rmtree(out / stale, ignore_errors=True)
        (out / MODEL_CONFIG).write_text(
            json.dumps(overrides.model_dict(config.model), indent=2) + "\n"
        )
    distributed.barrier("train: run directory ready")
    shard = dict(process_index=jax.process_index(), process_count=jax.process_count())
    rows = dict(
        seq_len=config.model.max_seq_len, batch_size=config.batch_size // jax.process_count()
    )
    data = pipeline.train_batches(train_records, seed=config.seed, **rows, **shard)
    val_batches = [
        _global_batch(placement, batch)
        for batch in pipeline.eval_batches(
            val_records, num_batches=config.eval_batches, **rows, **shard
        )
    ]
    graphdef, state = placement.init_state(functools.partial(_model_and_optimizer, config))
    params = sum(p.size for p in jax.tree.leaves(nnx.filter_state(state[0], nnx.Param)))
    state_bytes = bytes_per_device(state, jax.tree.map(lambda a: a.sharding, state))

    checkpoints = Checkpoints(out / "checkpoints", config.checkpoint_every)
    start, train_time, meta = 0, 0.0, {}
    if checkpoints.latest_step() is not None:
        start = checkpoints.latest_step()
        _check_same_model(config, checkpoints.meta(start), start)
        state, meta = checkpoints.restore(start, state, data)
        train_time = meta["train_time_s"]
    elif config.init_from_hf is not None:
        state = with_hf_weights(state, config.init_from_hf, config.model, placement.mesh)
    log = Logbook(out, start, tensorboard=config.tensorboard) if main else None
    peak = _device_peak(config, placement)
    save_meta = lambda **more: {
        "train_time_s": train_time,
        "model": overrides.model_dict(config.model),
        **more,
    }

    with placement.context(), Preemption() as preemption:
        t0 = time.perf_counter()
        step_of = functools.partial(
            train_step,
            graphdef,
            grad_accum=config.grad_accum,
            skip_nonfinite=config.skip_nonfinite,
        )
        step_fn = (
            placement.jit_step(step_of, donate_argnums=0).lower(state, val_batches[0]).compile()
        )
        compile_s = time.perf_counter() - t0
        evaluate = placement.jit_eval(functools.partial(eval_step, graphdef))
        schedule = learning_rate(config)
        write = lambda record: main and log.write(record)
        if start == 0:
            write(
                {
                    "kind": "val",
                    "step": 0,
                    "val_loss": _evaluate(evaluate, state, val_batches),
                    "train_time_s": 0.0,
                }
            )
        bar = tqdm(
            total=config.steps,
            initial=start,
            desc=name,
            unit="step",
            dynamic_ncols=True,
            disable=not main,
        )
        # A run preempted mid-interval saved that interval's metrics and time so far.
        pending = meta.get("pending", [])
        mark = time.perf_counter() - meta.get("interval_s", 0.0)
        try:
            for i in range(start, config.steps):
                state, metrics = step_fn(state, _global_batch(placement, next(data)))
                pending.append(metrics)
                step = i + 1
                last = step == config.steps
                boundary = step % config.log_every == 0 or last
                if not boundary:
                    if preemption.requested(agree=False):
                        interval = time.perf_counter() - mark
                        pending = [_host_json(m) for m in jax.device_get(pending)]
                        meta = save_meta(pending=pending, interval_s=interval)
                        checkpoints.save(step, state, meta, data, force=True)
                        raise Preempted(step, str(out))
                    continue
                host = jax.device_get(pending)
                seconds = time.perf_counter() - mark
                train_time += seconds
                lr = float(schedule(i))
                record = _interval_record(config, step, host, seconds, train_time, lr, peak)
                write(record)
                bad = _first_nonfinite(host, step - len(host) + 1)
                if bad is not None and not config.skip_nonfinite:
                    raise FloatingPointError(
                        f"step {bad}: the loss or gradient is not finite (interval mean loss "
                        f"{record['loss']}, grad norm {record['grad_norm']}); stopped. The "
                        f"checkpoints of earlier steps in {out / 'checkpoints'} are kept; "
                        "rerun with --skip-nonfinite to skip such updates"
                    )
                bar.update(len(pending))
                pending, val_loss = [], None
                if step % config.eval_every == 0 or last:
                    val_loss = _evaluate(evaluate, state, val_batches)
                    write(
                        {
                            "kind": "val",
                            "step": step,
                            "val_loss": val_loss,
                            "train_time_s": train_time,
                        }
                    )
                bar.set_postfix(_postfix(record, val_loss))
                stop = preemption.requested(agree=True)
                checkpoints.save(step, state, save_meta(), data, force=last or stop)
                if stop and not last:
                    raise Preempted(step, str(out))
                mark = time.perf_counter()
        finally:
            bar.close()
            checkpoints.close()
            data.close()
            if main:
                log.close()
    if not main:
        return None
    return _finish(
        config,
        name,
        {"params": int(params), "compile_s": compile_s, "state_bytes_per_device": state_bytes},
    )


def _finish(config: TrainConfig, name: str, extra: dict) -> dict:
    """Plots the run, writes ``summary.json`` and prints the summary line."""
    out = Path(config.out)
    records = read_metrics(out / "metrics.jsonl")
    plotting.plot_run(records, out / "training.png", title=name)
    total, active = flops.param_counts(config.model)
    summary = summarize(
        config,
        records,
        name,
        {
            "ffn": config.model.ffn,
            "capacity_factor": config.model.moe.capacity_factor,
            "seed": config.seed,
            "grad_accum": config.grad_accum,
            **extra,
            "params_active": active,
            "flops_per_token": flops.flops_per_token(config.model),
            "model": overrides.model_dict(config.model),
            "out": str(out),
        },
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"[{name}] {summary['steps']} steps | val loss {summary['final_val_loss']:.4f} | "
        f"train time {summary['train_time_s']:.0f}s | {summary['tokens_per_s']:,.0f} tok/s | "
        f"dropped {summary['dropped_fraction']:.2%} | {out}",
        flush=True,
    )
    return summary


def main(argv=None) -> dict | None:
    """Command-line entry; the summary (None on processes other than 0).

    Exits with a one-line message for a bad flag value or config (status 2), a
    non-finite loss (1), and after saving on SIGTERM (143, as a killed process)."""
    args = parse_args(argv)
    distributed.start_runtime(args)
    try:
        config, name = config_from_args(args)
    except ValueError as error:
        print(f"python -m experiments.train: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        return train(config, name)
    except FloatingPointError as error:
        print(f"python -m experiments.train: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except Preempted as preempted:
        print(f"python -m experiments.train: {preempted}", file=sys.stderr)
        raise SystemExit(EXIT_CODE) from None


if __name__ == "__main__":
    main()
