"""A training run's configuration: `TrainConfig` and the command line that builds it.

``config_from_args(parse_args(argv))`` -> ``(TrainConfig, run name)``; the
training loop is `experiments.train`.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp

from experiments import distributed, overrides
from experiments.presets import PRESET_TRAINING, PRESETS, preset
from jmoe.hf import load_config
from jmoe.transformer import FFN_KINDS, REMAT_KINDS, TransformerConfig
from pallas_kernels.products import IMPLS

DESCRIPTION = "Train an MoE transformer language model (byte-level presets on the KJV Bible)."
DTYPES = ("float32", "bfloat16")
# The dropless layer's expert-parallel receive buffer in training: 1.25x the balanced rows,
# more rounds when routing is skewed (docs/expert_parallel_rounds.md#measured-step-time).
TRAINING_EP_BUFFER_FACTOR = 1.25


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run.

    Attributes:
      model: the model to train.
      out: run directory.
      cache_dir: where tokenized corpora are stored (shared between runs).
      data: a prepared directory (`experiments.prepare_data`), a text file
        (prepared byte-level into ``cache_dir`` on first use), or None for
        the KJV Bible. The model's vocab size is the data's.
      eval_data: a prepared directory (same tokenizer) to validate on; None:
        the last 5% of ``data``'s records.
      steps, batch_size: optimizer steps and sequences per step.
      lr, warmup_fraction, min_lr_ratio: peak learning rate, share of the
        steps spent in linear warmup, final lr as a fraction of the peak.
      weight_decay, clip_norm: AdamW decay (matrices only), global-norm clip.
      log_every, eval_every, checkpoint_every: intervals in steps; the last
        two must be multiples of ``log_every``. The last step always logs,
        evaluates and checkpoints.
      eval_batches: validation batches per evaluation.
      seed: parameter initialisation and data order.
      mesh: ``(data, expert)`` or ``{axis name: size}`` (``"data"``,
        ``"fsdp"``, ``"expert"``): train on that device mesh (see
        `experiments.distributed.Placement`); None: one device.
      fsdp: also split the state over the mesh's ``"data"`` axis (it is
        always split over ``"fsdp"``).
      grad_accum: micro-batches per optimizer step (``batch_size`` sequences
        in all, ``batch_size / grad_accum`` per forward and backward).
      overwrite: discard the checkpoints and metrics in ``out``; otherwise a
        run continues from its latest checkpoint (if any).
      skip_nonfinite: a step whose loss or gradient is not finite leaves the
        model and optimizer unchanged (counted as ``skipped_steps``); otherwise
        it stops the run.
      tensorboard: also write TensorBoard event files to ``out/tensorboard``.
      init_from_hf: a Hugging Face folder whose weights the model starts from
        (``model`` must be its configuration, `jmoe.hf.load_config`).
    """

    model: TransformerConfig
    out: str
    cache_dir: str
    data: str | None = None
    eval_data: str | None = None
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
    mesh: tuple[int, int] | dict[str, int] | None = None
    fsdp: bool = False
    grad_accum: int = 1
    overwrite: bool = False
    skip_nonfinite: bool = False
    tensorboard: bool = False
    init_from_hf: str | None = None

    def __post_init__(self):
        for name in (
            "steps",
            "batch_size",
            "log_every",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
            "grad_accum",
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
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"grad_accum={self.grad_accum} must divide batch_size={self.batch_size}"
            )

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


def parse_args(argv=None, extend=None) -> argparse.Namespace:
    """The command line; ``extend(parser)`` may add flags first (`experiments.plan`)."""
    parser = argparse.ArgumentParser(prog="python -m experiments.train", description=DESCRIPTION)
    parser.add_argument(
        "--preset",
        choices=PRESETS,
        default="xs",
        help="model: byte-level xs, s, m or a published shape (default: %(default)s)",
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
    parser.add_argument(
        "--data",
        help="prepared directory (python -m experiments.prepare_data) or a .txt/.jsonl/.parquet "
        "file, prepared byte-level into --cache-dir (default: the KJV Bible)",
    )
    parser.add_argument(
        "--eval-data",
        help="prepared directory to validate on (default: the last 5%% of --data's records)",
    )
    parser.add_argument(
        "--out",
        help="run directory (default: runs/<preset>-<ffn>, with -cf<cf> for --ffn moe and "
        "-every2 for --moe-every 2, e.g. runs/xs-moe-cf1.5)",
    )
    parser.add_argument("--cache-dir", help="tokenized corpora (default: <out>/../cache)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="discard the run in --out (checkpoints, metrics) and start over; without it, "
        "rerunning a command continues from its latest checkpoint (default: off)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="no-op, kept for old commands: runs always continue from their latest checkpoint "
        "(default: off)",
    )
    parser.add_argument(
        "--init-from-hf",
        metavar="PATH",
        help="start from this Hugging Face checkpoint's weights; the model is its config.json's "
        "(--preset, --ffn and the routing flags do not apply; --set overrides it; docs/hf.md)",
    )
    parser.add_argument(
        "--grad-accum",
        type=int,
        default=1,
        metavar="N",
        help="micro-batches per optimizer step, accumulated inside one jitted step; must "
        "divide --batch-size, which stays the sequences per optimizer step "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--skip-nonfinite",
        action="store_true",
        help="skip an update whose loss or gradient is NaN/inf and count it (skipped_steps "
        "in the metrics) instead of stopping the run (default: stop)",
    )
    parser.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write TensorBoard event files to <out>/tensorboard (default: off)",
    )
    model = parser.add_argument_group(
        "model fields and precision (applied over the preset in this order: the flags "
        "above and below, then --config, then --set)"
    )
    model.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a TransformerConfig field, or a MoEConfig field as moe.FIELD, e.g. "
        "--set num_layers=12 --set moe.num_experts=64; repeatable (default: none)",
    )
    model.add_argument(
        "--config",
        metavar="FILE.json",
        help="a JSON object of the same keys as --set, dotted or nested "
        '({"num_layers": 12, "moe": {"top_k": 8}}) (default: none)',
    )
    model.add_argument(
        "--dtype",
        choices=("auto", *DTYPES),
        default="auto",
        help="compute dtype (MoEConfig.dtype); auto: bfloat16 on a GPU or TPU, float32 on "
        "CPU. The router, logits and losses are float32 either way (default: %(default)s)",
    )
    model.add_argument(
        "--param-dtype",
        choices=DTYPES,
        default="float32",
        help="dtype of the parameters and so of the optimizer state (MoEConfig.param_dtype; "
        "default: %(default)s)",
    )
    model.add_argument(
        "--impl",
        choices=IMPLS,
        help="expert product kernels (MoEConfig.impl; default: the preset's, auto)",
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


def compute_dtype(flag: str) -> str:
    """``--dtype``'s value: ``"auto"`` is bfloat16 on a GPU or TPU, float32 on CPU."""
    if flag != "auto":
        return flag
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def model_from_args(args: argparse.Namespace) -> TransformerConfig:
    """The preset with the model flags, then ``--config``, then ``--set`` applied.

    Training bounds the dropless layer's expert-parallel buffers by default:
    ``moe.ep_buffer_factor`` is `TRAINING_EP_BUFFER_FACTOR` unless the model
    sets it or ``moe.ep_capacity_factor`` (``--set moe.ep_buffer_factor=none``
    restores worst-case buffers).
    """
    if args.init_from_hf is None:
        model = preset(args.preset, ffn=args.ffn, capacity_factor=args.capacity_factor).replace(
            moe_every=args.moe_every, remat=args.remat
        )
    else:
        model = load_config(args.init_from_hf).replace(remat=args.remat)
        if model.vocab_size < 256:
            raise ValueError(
                f"--init-from-hf {args.init_from_hf}: vocab_size={model.vocab_size} is below "
                "the 256 byte tokens of the training data"
            )
    precision = dict(
        dtype=getattr(jnp, compute_dtype(args.dtype)),
        param_dtype=getattr(jnp, args.param_dtype),
        **({} if args.impl is None else {"impl": args.impl}),
    )
    moe = model.moe.replace(**routing_changes(args), **precision)
    if moe.ep_buffer_factor is None and moe.ep_capacity_factor is None:
        moe = moe.replace(ep_buffer_factor=TRAINING_EP_BUFFER_FACTOR)
    model = model.replace(moe=moe)
    if args.config is not None:
        model = overrides.apply(
            model, overrides.read_config_file(args.config), f"--config {args.config}"
        )
    assignments = dict(overrides.parse_assignment(text) for text in args.set)
    return overrides.apply(model, assignments, "--set")


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, str]:
    """``(TrainConfig, run name)`` from parsed command-line arguments."""
    model = model_from_args(args)
    name = run_name(args.preset, model.ffn, model.moe.capacity_factor, model.moe_every)
    if args.init_from_hf is not None:
        name = f"hf-{Path(args.init_from_hf).name}"
    out = Path(args.out or Path("runs") / name)
    defaults = PRESET_TRAINING[args.preset]
    pick = lambda key: defaults[key] if getattr(args, key) is None else getattr(args, key)
    config = TrainConfig(
        model=model,
        out=str(out),
        cache_dir=args.cache_dir or str(out.absolute().parent / "cache"),
        data=args.data,
        eval_data=args.eval_data,
        steps=pick("steps"),
        batch_size=pick("batch_size"),
        lr=pick("lr"),
        log_every=args.log_every,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        mesh=args.mesh,
        fsdp=args.fsdp,
        grad_accum=args.grad_accum,
        overwrite=args.overwrite,
        skip_nonfinite=args.skip_nonfinite,
        tensorboard=args.tensorboard,
        init_from_hf=args.init_from_hf,
    )
    return config, name
