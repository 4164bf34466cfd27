"""Two finished training runs side by side (one setting changed, same seed and data order).

    python -m experiments.run_pair runs/e8/dmoe runs/e8-sum/dmoe \\
        --labels "mean, 0.1" "sum (mean, 0.4)" --out experiments/results/e8-sum

Reads each run's ``summary.json`` and ``metrics.jsonl`` and writes to ``--out``:
``pair.md`` and ``pair.json`` (final validation loss, the second run minus the
first at every shared evaluation, final training cross-entropy, load imbalance
= max / mean tokens per expert averaged over the MoE layers, over the last
tenth of training and over all of it, dropped fraction), ``val_loss.png`` and
``imbalance.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from experiments.logbook import read_metrics
from experiments.plotting import plot_lines
from experiments.routing_study import imbalance_curve


def compare_runs(first: list[dict], second: list[dict]) -> dict:
    """``first`` and ``second`` are ``metrics.jsonl`` records. Returns the shared
    evaluation steps, ``second - first`` validation loss at each, and per run the
    imbalance over the last tenth of its logging intervals and over all of them."""
    val = [{r["step"]: r["val_loss"] for r in run if r["kind"] == "val"} for run in (first, second)]
    steps = sorted(set(val[0]) & set(val[1]))
    runs = []
    for records in (first, second):
        imbalance = imbalance_curve(records)[1]
        last = imbalance[-max(1, len(imbalance) // 10) :]
        runs.append(
            {
                "imbalance_last_tenth": float(np.mean(last)),
                "imbalance_mean": float(np.mean(imbalance)),
            }
        )
    return {
        "steps": steps,
        "val_loss_difference": [val[1][s] - val[0][s] for s in steps],
        "runs": runs,
    }


def markdown(labels: list[str], summaries: list[dict], pair: dict) -> str:
    diff = np.array(pair["val_loss_difference"])
    half = diff[len(diff) // 2 :]
    lines = [
        "| run | final val loss | final train CE | load imbalance, last tenth | "
        "load imbalance, whole run | dropped |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, summary, run in zip(labels, summaries, pair["runs"]):
        lines.append(
            f"| {label} | {summary['final_val_loss']:.4f} | {summary['final_train_ce']:.4f} | "
            f"{run['imbalance_last_tenth']:.3f} | {run['imbalance_mean']:.3f} | "
            f"{summary['dropped_fraction']:.1%} |"
        )
    lines += [
        "",
        f"{labels[1]} minus {labels[0]}, validation loss: {diff[-1]:+.4f} at the end; "
        f"{half.mean():+.4f} ± {half.std():.4f} (mean ± sd) over the last {len(half)} of "
        f"{len(diff)} shared evaluations.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs=2, type=Path, help="two run directories")
    parser.add_argument("--labels", nargs=2, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    summaries = [json.loads((run / "summary.json").read_text()) for run in args.runs]
    records = [read_metrics(run / "metrics.jsonl") for run in args.runs]
    pair = compare_runs(*records)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"runs": [str(run) for run in args.runs], "labels": args.labels, **pair}
    (args.out / "pair.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(args.labels, summaries, pair)
    (args.out / "pair.md").write_text(text)
    val = {
        label: (
            [r["step"] for r in run if r["kind"] == "val"],
            [r["val_loss"] for r in run if r["kind"] == "val"],
        )
        for label, run in zip(args.labels, records)
    }
    plot_lines(val, args.out / "val_loss.png", "validation loss", "step", "nats per byte")
    imbalance = {label: imbalance_curve(run) for label, run in zip(args.labels, records)}
    plot_lines(
        imbalance,
        args.out / "imbalance.png",
        "load imbalance (max / mean tokens per expert, mean over MoE layers)",
        "step",
        "imbalance",
        baseline=1.0,
    )
    print(text, end="")
    return result


if __name__ == "__main__":
    main()
