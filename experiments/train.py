"""Train a byte-level MoE transformer language model on a 2-core CPU.

    python -m experiments.train                       # xs dropless MoE on the KJV Bible
    python -m experiments.train --preset xs --ffn moe --capacity-factor 1.5 --steps 300
    python -m experiments.train --ffn dense --data my.txt --out runs/mine
    python -m experiments.train --out runs/xs-dmoe --resume   # continue a run
    python -m experiments.train --mesh 2x4 --host-devices 8   # data x expert parallel on CPU
    python -m experiments.train --mesh data=2,fsdp=2,expert=2 --host-devices 8  # + FSDP
    python -m experiments.launch_local --processes 2 -- \\
        experiments.train --mesh 2x4 --host-devices 4
    python -m experiments.train --score-function sigmoid --expert-bias \
        --load-balancing-loss-weight 0 --num-expert-groups 4 --top-k-groups 2  # DeepSeek-V3

Loss = cross-entropy + the MoE aux losses; AdamW with linear warmup and cosine
decay, global-norm clipping. A run directory holds ``checkpoints/`` (Orbax:
model, optimizer state and step), ``metrics.jsonl`` (one ``"train"`` record
per logging interval, one ``"val"`` record per evaluation), ``training.png``
and ``summary.json``. Wall times count training steps only: compilation,
evaluation and checkpointing are excluded. Meshes and multi-process runs:
`experiments.distributed` (only process 0 writes metrics, plots and summary).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import shutil
import time
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from experiments import distributed, plotting
from experiments.checkpoint import Checkpoints
from experiments.data import Batches, tokenized_corpus
from experiments.presets import PRESET_TRAINING, PRESETS, preset
from jmoe.parallel.mesh import bytes_per_device
from jmoe.router import expert_biases, update_expert_bias
from jmoe.transformer import FFN_KINDS, REMAT_KINDS, MoETransformer, TransformerConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run.

    Attributes:
      model: the model to train.
      out: run directory.
      cache_dir: where tokenized corpora are stored (shared between runs).
      data: a text file, or None for the KJV Bible.
      steps, batch_size: optimizer steps and sequences per step.
      lr, warmup_fraction, min_lr_ratio: peak learning rate, share of the
        steps spent in linear warmup, final lr as a fraction of the peak.
      weight_decay, clip_norm: AdamW decay (matrices only), global-norm clip.
      log_every, eval_every, checkpoint_every: intervals in steps; the last
        two must be multiples of ``log_every``. The last step always logs,
        evaluates and checkpoints.
      eval_batches: validation batches per evaluation.
      seed: parameter initialisation and data order.
      resume: continue from the latest checkpoint in ``out`` (if any).
      mesh: ``(data, expert)`` or ``{axis name: size}`` (``"data"``,
        ``"fsdp"``, ``"expert"``): train on that device mesh (see
        `experiments.distributed.Placement`); None: one device.
      fsdp: also split the state over the mesh's ``"data"`` axis (it is
        always split over ``"fsdp"``).
    """

    model: TransformerConfig
    out: str
    cache_dir: str
    data: str | None = None
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    warmup_fraction: float = 0.1
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 100
    seed: int = 0
    resume: bool = False
    mesh: tuple[int, int] | dict[str, int] | None = None
    fsdp: bool = False

    def __post_init__(self):
        for name in (
            "steps",
            "batch_size",
            "log_every",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) % self.log_every:
                raise ValueError(
                    f"{name}={getattr(self, name)} must be a multiple of log_every={self.log_every}"
                )
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")

    @property
    def tokens_per_step(self) -> int:
        """Predicted tokens per step: ``batch_size * max_seq_len``."""
        return self.batch_size * self.model.max_seq_len


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


def lm_loss(model: MoETransformer, tokens: jax.Array):
    """``tokens [batch, seq + 1]`` -> ``(ce + aux_loss, (ce, aux))``; ce in nats/token."""
    logits, aux = model(tokens[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return ce + aux["aux_loss"], (ce, aux)


def train_step(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array):
    """One AdamW step on ``(model, optimizer)`` state: ``-> (new state, metrics)``."""
    model, opt = nnx.merge(graphdef, state)
    (loss, (ce, aux)), grads = nnx.value_and_grad(lm_loss, has_aux=True)(model, tokens)
    opt.update(model, grads)
    update_expert_bias(model, aux)  # aux-loss-free balancing (no-op without expert bias)
    metrics = {
        "loss": loss,
        "ce": ce,
        "aux_loss": aux["aux_loss"],
        "grad_norm": optax.tree.norm(grads),
        "tokens_per_expert": aux["tokens_per_expert"],
        "dropped_tokens": aux["dropped_tokens"],
    }
    if (biases := expert_biases(model)) is not None:
        metrics["expert_bias"] = biases  # [moe layers, E], after this step's update
    return nnx.state((model, opt)), metrics


def eval_step(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array) -> jax.Array:
    """Validation cross-entropy (no aux loss) of ``tokens [batch, seq + 1]``."""
    model, _ = nnx.merge(graphdef, state)
    return lm_loss(model, tokens)[1][0]


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _interval_record(
    config: TrainConfig, step: int, host: list[dict], seconds: float, train_time: float, lr: float
) -> dict:
    """Averages the per-step metrics of one logging interval into a record."""
    mean = lambda key: float(np.mean([m[key] for m in host]))
    counts = np.array([m["tokens_per_expert"] for m in host], np.float64)  # [steps, layers, E]
    load = counts.sum(axis=0)  # [moe layers, E]
    imbalance = counts.max(-1) / np.maximum(counts.mean(-1), 1e-9)  # max / mean load per step
    moe = config.model.moe
    assignments = len(host) * config.tokens_per_step * moe.top_k * len(config.model.moe_layers)
    return {
        "kind": "train",
        "step": step,
        "loss": mean("loss"),
        "ce": mean("ce"),
        "aux_loss": mean("aux_loss"),
        "grad_norm": mean("grad_norm"),
        "lr": lr,
        "step_time_s": seconds / len(host),
        "tokens_per_s": len(host) * config.tokens_per_step / seconds,
        "train_time_s": train_time,
        "dropped_tokens": int(sum(int(m["dropped_tokens"]) for m in host)),
        "assignments": assignments,
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
    return {
        "name": name,
        "steps": train[-1]["step"],
        "tokens_per_step": config.tokens_per_step,
        "final_val_loss": val[-1]["val_loss"],
        "final_train_ce": train[-1]["ce"],
        "train_time_s": train_time,
        "tokens_per_s": train[-1]["step"] * config.tokens_per_step / train_time,
        "median_step_s": float(np.median([r["step_time_s"] for r in train])),
        "dropped_fraction": sum(r["dropped_tokens"] for r in train) / max(assignments, 1),
        **extra,
    }


def _start_metrics(path: Path, resume_step: int):
    """Keeps the records up to ``resume_step`` (all of a fresh run's are dropped)."""
    kept = [r for r in read_metrics(path) if r["step"] <= resume_step] if path.exists() else []
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)


def _evaluate(evaluate, state, batches: Batches, placement: distributed.Placement) -> float:
    shape = (batches.batch_size, batches.seq_len + 1)
    return float(
        np.mean(
            [
                evaluate(state, placement.batch(functools.partial(batches.val_batch, index), shape))
                for index in range(batches.num_val_batches)
            ]
        )
    )


def _model_and_optimizer(config: TrainConfig):
    model = MoETransformer(config.model, rngs=nnx.Rngs(config.seed))
    return model, nnx.Optimizer(model, optimizer(config), wrt=nnx.Param)


def train(config: TrainConfig, name: str = "run") -> dict | None:
    """Runs (or resumes) training; returns the summary (also in ``summary.json``).

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
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").unlink(missing_ok=True)  # written again when the run completes
        if not config.resume:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
    distributed.barrier("train: run directory ready")
    batches = Batches(
        tokenized_corpus(config.data, config.cache_dir),
        seq_len=config.model.max_seq_len,
        batch_size=config.batch_size,
        seed=config.seed,
        eval_batches=config.eval_batches,
    )
    graphdef, state = placement.init_state(functools.partial(_model_and_optimizer, config))
    params = sum(p.size for p in jax.tree.leaves(nnx.filter_state(state[0], nnx.Param)))
    state_bytes = bytes_per_device(state, jax.tree.map(lambda a: a.sharding, state))

    checkpoints = Checkpoints(out / "checkpoints", config.checkpoint_every)
    start, train_time = 0, 0.0
    if config.resume and checkpoints.latest_step() is not None:
        start = checkpoints.latest_step()
        state, meta = checkpoints.restore(start, state)
        train_time = meta["train_time_s"]
    if main:
        _start_metrics(out / "metrics.jsonl", start)
    shape = (config.batch_size, config.model.max_seq_len + 1)
    train_batch = lambda step: placement.batch(functools.partial(batches.train_batch, step), shape)

    with (
        placement.context(),
        open(out / "metrics.jsonl", "a") if main else contextlib.nullcontext() as log,
    ):
        t0 = time.perf_counter()
        step_fn = (
            placement.jit_step(functools.partial(train_step, graphdef), donate_argnums=0)
            .lower(state, train_batch(start))
            .compile()
        )
        compile_s = time.perf_counter() - t0
        evaluate = placement.jit_eval(functools.partial(eval_step, graphdef))
        schedule = learning_rate(config)
        write = lambda record: main and (log.write(json.dumps(record) + "\n"), log.flush())
        if start == 0:
            write(
                {
                    "kind": "val",
                    "step": 0,
                    "val_loss": _evaluate(evaluate, state, batches, placement),
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
        pending, mark = [], time.perf_counter()
        for i in range(start, config.steps):
            state, metrics = step_fn(state, train_batch(i))
            pending.append(metrics)
            step = i + 1
            last = step == config.steps
            if step % config.log_every and not last:
                continue
            host = jax.device_get(pending)
            seconds = time.perf_counter() - mark
            train_time += seconds
            record = _interval_record(config, step, host, seconds, train_time, float(schedule(i)))
            write(record)
            bar.update(len(pending))
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
            pending = []
            if step % config.eval_every == 0 or last:
                val_loss = _evaluate(evaluate, state, batches, placement)
                write(
                    {"kind": "val", "step": step, "val_loss": val_loss, "train_time_s": train_time}
                )
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}",
                    val=f"{val_loss:.3f}",
                    tok_s=f"{record['tokens_per_s']:,.0f}",
                )
            checkpoints.save(step, state, {"train_time_s": train_time}, force=last)
            mark = time.perf_counter()
        bar.close()
    checkpoints.close()
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
    summary = summarize(
        config,
        records,
        name,
        {
            "ffn": config.model.ffn,
            "capacity_factor": config.model.moe.capacity_factor,
            "seed": config.seed,
            **extra,
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


def run_name(preset_name: str, ffn: str, capacity_factor: float, moe_every: int = 1) -> str:
    """E.g. ``xs-dmoe``, ``xs-dense``, ``xs-moe-cf1.5``, ``xs-dmoe-every2``."""
    suffix = f"-cf{capacity_factor:g}" if ffn == "moe" else ""
    every = f"-every{moe_every}" if moe_every != 1 and ffn != "dense" else ""
    return f"{preset_name}-{ffn}{suffix}{every}"


# MoEConfig routing fields settable from the command line (flag -> type).
ROUTING_FLAGS = {
    "--top-k": int,
    "--load-balancing-loss-weight": float,
    "--num-expert-groups": int,
    "--top-k-groups": int,
    "--routed-scaling-factor": float,
    "--expert-bias-update-rate": float,
    "--sequence-aux-loss-weight": float,
}


def parse_args(argv=None, extend=None) -> argparse.Namespace:
    """The command line; ``extend(parser)`` may add flags first (`experiments.plan`)."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.train", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--preset", choices=PRESETS, default="xs", help="model size (default: %(default)s)"
    )
    parser.add_argument(
        "--ffn",
        choices=FFN_KINDS,
        default="dmoe",
        help="dropless MoE, token-dropping MoE, or dense MLP (default: %(default)s)",
    )
    parser.add_argument(
        "--capacity-factor",
        type=float,
        default=1.0,
        help="expert capacity factor of --ffn moe (default: %(default)s)",
    )
    parser.add_argument(
        "--moe-every",
        type=int,
        choices=(1, 2),
        default=1,
        help="2: MoE FFN only in blocks 1, 3, ..., dense in between (GLaM) (default: %(default)s)",
    )
    parser.add_argument(
        "--remat",
        choices=REMAT_KINDS,
        default="none",
        help="recompute activations in the backward: none, each FFN, each block "
        "(TransformerConfig.remat; default: %(default)s)",
    )
    parser.add_argument("--steps", type=int, help="optimizer steps (default: per preset)")
    parser.add_argument("--batch-size", type=int, help="sequences per step (default: per preset)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: per preset)")
    parser.add_argument("--data", help="UTF-8 text file to train on (default: the KJV Bible)")
    parser.add_argument(
        "--out",
        help="run directory (default: runs/<preset>-<ffn>, with -cf<cf> for --ffn moe and "
        "-every2 for --moe-every 2, e.g. runs/xs-moe-cf1.5)",
    )
    parser.add_argument("--cache-dir", help="tokenized corpora (default: <out>/../cache)")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --out"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="initialisation and data order (default: %(default)s)"
    )
    parser.add_argument(
        "--log-every", type=int, default=10, help="steps per logged interval (default: %(default)s)"
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=50,
        help="steps between validations, a multiple of --log-every (default: %(default)s)",
    )
    parser.add_argument(
        "--eval-batches",
        type=int,
        default=4,
        help="validation batches per evaluation (default: %(default)s)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=100,
        help="steps between Orbax checkpoints, a multiple of --log-every (default: %(default)s)",
    )
    distributed.add_arguments(parser)
    routing = parser.add_argument_group("routing (default: the preset's; see docs/routing.md)")
    for flag, kind in ROUTING_FLAGS.items():
        routing.add_argument(flag, type=kind, help=f"MoEConfig.{flag[2:].replace('-', '_')}")
    routing.add_argument(
        "--score-function", choices=("softmax", "sigmoid"), help="MoEConfig.score_function"
    )
    routing.add_argument(
        "--expert-bias",
        action="store_true",
        default=None,
        help="aux-loss-free balancing bias (DeepSeek-V3)",
    )
    if extend is not None:
        extend(parser)
    return parser.parse_args(argv)


def routing_changes(args: argparse.Namespace) -> dict:
    """The `MoEConfig` routing fields given on the command line."""
    names = [flag[2:].replace("-", "_") for flag in ROUTING_FLAGS]
    names += ["score_function", "expert_bias"]
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, str]:
    """``(TrainConfig, run name)`` from parsed command-line arguments."""
    model = preset(args.preset, ffn=args.ffn, capacity_factor=args.capacity_factor).replace(
        moe_every=args.moe_every, remat=args.remat
    )
    model = model.replace(moe=model.moe.replace(**routing_changes(args)))
    name = run_name(args.preset, args.ffn, args.capacity_factor, args.moe_every)
    out = Path(args.out or Path("runs") / name)
    defaults = PRESET_TRAINING[args.preset]
    pick = lambda key: defaults[key] if getattr(args, key) is None else getattr(args, key)
    config = TrainConfig(
        model=model,
        out=str(out),
        cache_dir=args.cache_dir or str(out.absolute().parent / "cache"),
        data=args.data,
        steps=pick("steps"),
        batch_size=pick("batch_size"),
        lr=pick("lr"),
        log_every=args.log_every,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        resume=args.resume,
        mesh=args.mesh,
        fsdp=args.fsdp,
    )
    return config, name


def main(argv=None) -> dict | None:
    """Command-line entry; the summary (None on processes other than 0)."""
    args = parse_args(argv)
    distributed.start_runtime(args)
    return train(*config_from_args(args))


if __name__ == "__main__":
    main()
