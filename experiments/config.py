"""A training run's configuration: `TrainConfig` and the command line that builds it.

``config_from_args(parse_args(argv))`` -> ``(TrainConfig, run name)``; the
training loop is `experiments.train`.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from experiments import distributed
from experiments.presets import PRESET_TRAINING, PRESETS, preset
from jmoe.transformer import FFN_KINDS, REMAT_KINDS, TransformerConfig

DESCRIPTION = "Train a byte-level MoE transformer language model on a 2-core CPU."


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
      mesh: ``(data, expert)``: train on that device mesh (see
        `experiments.distributed.Placement`); None: one device.
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
    mesh: tuple[int, int] | None = None

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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.train", description=DESCRIPTION)
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
    )
    return config, name
