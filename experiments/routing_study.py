"""Routing study: softmax + load-balancing loss vs sigmoid + aux-loss-free expert bias.

    python -m experiments.routing_study                  # preset xs, 3 seeds, 300 steps
    python -m experiments.routing_study --steps 200 --runs runs/routing_study

Trains preset ``xs`` (dropless MoE, 8 experts, top-1) once per setting and
seed with `experiments.train.train`, then writes
``experiments/results/routing_study.{json,md,png}``: final validation loss
(mean ± sd over seeds) and the load imbalance (max / mean tokens per expert,
averaged over the MoE layers) over training. A finished run (its
``summary.json`` exists) is not trained again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from experiments.plotting import plot_lines
from experiments.presets import PRESET_TRAINING, preset
from experiments.train import TrainConfig, read_metrics, train

SETTINGS = {
    "softmax + LBL 0.01": dict(score_function="softmax", load_balancing_loss_weight=0.01),
    "softmax + LBL 0.1": dict(score_function="softmax", load_balancing_loss_weight=0.1),
    "sigmoid + expert bias": dict(
        score_function="sigmoid", load_balancing_loss_weight=0.0, expert_bias=True
    ),
}
RESULTS = Path(__file__).parent / "results"


def _slug(setting: str) -> str:
    return setting.replace(" + ", "-").replace(" ", "")


def run_config(setting: str, seed: int, steps: int, runs: Path, bias_rate: float) -> TrainConfig:
    """The `TrainConfig` of one (setting, seed) run of preset xs."""
    model = preset("xs")
    changes = dict(SETTINGS[setting])
    if changes.get("expert_bias"):
        changes["expert_bias_update_rate"] = bias_rate
    training = PRESET_TRAINING["xs"]
    return TrainConfig(
        model=model.replace(moe=model.moe.replace(**changes)),
        out=str(runs / f"{_slug(setting)}-seed{seed}"),
        cache_dir=str(runs / "cache"),
        steps=steps,
        batch_size=training["batch_size"],
        lr=training["lr"],
        log_every=10,
        eval_every=40,
        checkpoint_every=steps,
        seed=seed,
    )


def imbalance_curve(records: list[dict]) -> tuple[list[int], list[float]]:
    """Steps and load imbalance (max / mean load, mean over MoE layers) per logging interval."""
    train_records = [r for r in records if r["kind"] == "train"]
    return (
        [r["step"] for r in train_records],
        [float(np.mean(r["load_imbalance"])) for r in train_records],
    )


def summarize_setting(runs: list[tuple[dict, list[dict]]]) -> dict:
    """Mean ± sd of the final validation loss and the imbalance curve over seeds."""
    losses = [summary["final_val_loss"] for summary, _ in runs]
    curves = np.array([imbalance_curve(records)[1] for _, records in runs])
    return {
        "seeds": [summary["seed"] for summary, _ in runs],
        "final_val_loss": losses,
        "final_val_loss_mean": float(np.mean(losses)),
        "final_val_loss_sd": float(np.std(losses, ddof=1)) if len(losses) > 1 else 0.0,
        "imbalance_steps": imbalance_curve(runs[0][1])[0],
        "imbalance_mean_over_seeds": curves.mean(0).tolist(),
        "imbalance_mean_over_training": float(curves.mean()),
    }


def markdown(study: dict) -> str:
    """The results table: one row per setting."""
    steps = study["settings"][next(iter(study["settings"]))]["imbalance_steps"]
    marks = sorted({steps[0], steps[len(steps) // 4], steps[len(steps) // 2], steps[-1]})
    head = " | ".join(f"imbalance, step {s}" for s in marks)
    lines = [
        f"preset `xs` (8 experts, top-1), {study['steps']} steps x "
        f"{study['tokens_per_step']} tokens, seeds {study['seeds']}; expert-bias rate "
        f"{study['expert_bias_update_rate']:g}; load imbalance = max / mean tokens per "
        "expert of a step, mean over the interval's steps, the 4 MoE layers and the seeds",
        "",
        f"| setting | final val loss (mean ± sd) | {head} | imbalance, mean over training |",
        "|---|---:|" + "---:|" * len(marks) + "---:|",
    ]
    for name, row in study["settings"].items():
        curve = dict(zip(row["imbalance_steps"], row["imbalance_mean_over_seeds"]))
        cells = " | ".join(f"{curve[s]:.2f}" for s in marks)
        lines.append(
            f"| {name} | {row['final_val_loss_mean']:.4f} ± "
            f"{row['final_val_loss_sd']:.4f} | {cells} | "
            f"{row['imbalance_mean_over_training']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.routing_study", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--expert-bias-update-rate",
        type=float,
        default=1e-2,
        help="gamma of the bias runs (DeepSeek-V3 uses 1e-3 over far longer runs)",
    )
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=[_slug(s) for s in SETTINGS],
        default=[_slug(s) for s in SETTINGS],
        help="settings to run",
    )
    parser.add_argument("--runs", default="runs/routing_study", help="run directories")
    parser.add_argument("--results", default=str(RESULTS), help="where the json/md go")
    args = parser.parse_args(argv)
    chosen = [setting for setting in SETTINGS if _slug(setting) in args.settings]
    runs, finished = Path(args.runs), {setting: [] for setting in chosen}
    for seed in args.seeds:  # seed by seed: a partial study still compares every setting
        for setting in chosen:
            config = run_config(setting, seed, args.steps, runs, args.expert_bias_update_rate)
            summary_path = Path(config.out) / "summary.json"
            summary = (
                json.loads(summary_path.read_text())
                if summary_path.exists()
                else train(config, name=f"{_slug(setting)}-seed{seed}")
            )
            finished[setting].append((summary, read_metrics(Path(config.out) / "metrics.jsonl")))
    settings = {setting: summarize_setting(runs) for setting, runs in finished.items()}
    study = {
        "preset": "xs",
        "steps": args.steps,
        "seeds": args.seeds,
        "tokens_per_step": config.tokens_per_step,
        "expert_bias_update_rate": args.expert_bias_update_rate,
        "settings": settings,
    }
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "routing_study.json").write_text(json.dumps(study, indent=2) + "\n")
    (results / "routing_study.md").write_text(markdown(study))
    plot_lines(
        {
            name: (row["imbalance_steps"], row["imbalance_mean_over_seeds"])
            for name, row in settings.items()
        },
        results / "routing_study.png",
        title=f"preset xs: load imbalance, mean over MoE layers and seeds {args.seeds}",
        xlabel="step",
        ylabel="max / mean tokens per expert",
        baseline=1.0,
    )
    print(markdown(study))
    return study


if __name__ == "__main__":
    main()
