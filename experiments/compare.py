"""MegaBlocks' comparison in miniature: dense vs token-dropping MoE (capacity
factors 1.0, 1.5, 2.0) vs dropless MoE, same active FLOPs per token, same
data, seed and steps.

    python -m experiments.compare --out runs/compare --results-dir experiments/results

Runs the five trainings one after another (a finished run is reused, an
interrupted one resumed from its checkpoint), then writes ``results.md`` (the
table), ``results.json`` and ``val_loss_vs_time.png`` to ``--results-dir``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

import jax
import numpy as np

from experiments import plotting, train
from jmoe.transformer import PRESETS

# (run name, --ffn, --capacity-factor)
RUNS = (
    ("dense", "dense", 1.0),
    ("moe-cf1.0", "moe", 1.0),
    ("moe-cf1.5", "moe", 1.5),
    ("moe-cf2.0", "moe", 2.0),
    ("dmoe", "dmoe", 1.0),
)


def time_to_reach(val_records: list[dict], target: float) -> float | None:
    """Training wall time at which validation loss first reaches ``target``,
    linearly interpolated between evaluations; None if it never does."""
    times = [r["train_time_s"] for r in val_records]
    losses = [r["val_loss"] for r in val_records]
    for i, loss in enumerate(losses):
        if loss <= target:
            if i == 0:
                return times[0]
            fraction = (losses[i - 1] - target) / (losses[i - 1] - loss)
            return times[i - 1] + fraction * (times[i] - times[i - 1])
    return None


def _run(args, name: str, ffn: str, capacity_factor: float) -> dict:
    """Trains one configuration unless a finished run with the same steps exists."""
    out = Path(args.out) / name
    summary_path = out / "summary.json"
    if summary_path.exists() and not args.rerun:
        summary = json.loads(summary_path.read_text())
        if (summary["steps"], summary["seed"]) == (args.steps, args.seed):
            print(f"[{name}] reusing {summary_path}")
            return summary
    argv = ["--preset", args.preset, "--ffn", ffn, "--capacity-factor", str(capacity_factor),
            "--steps", str(args.steps), "--seed", str(args.seed), "--out", str(out),
            "--cache-dir", str(Path(args.out) / "cache"), "--log-every", "5",
            "--eval-every", str(args.eval_every), "--eval-batches", str(args.eval_batches),
            "--checkpoint-every", str(args.checkpoint_every)]
    if not args.rerun:
        argv.append("--resume")
    summary = train.main(argv)
    summary["name"] = name
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def results_table(summaries: dict[str, dict], records: dict[str, list[dict]]) -> list[dict]:
    """One row per run: final loss, time, throughput, drops, time to dense's final loss."""
    target = summaries["dense"]["final_val_loss"]
    dense_time = summaries["dense"]["train_time_s"]
    rows = []
    for name, summary in summaries.items():
        val = [r for r in records[name] if r["kind"] == "val"]
        reach = time_to_reach(val, target)
        rows.append({
            "run": name, "final_val_loss": summary["final_val_loss"],
            "train_time_s": summary["train_time_s"], "tokens_per_s": summary["tokens_per_s"],
            "median_step_ms": 1000 * summary["median_step_s"],
            "dropped_fraction": summary["dropped_fraction"],
            "time_to_dense_loss_s": reach,
            "speedup_vs_dense": None if reach is None else dense_time / reach,
        })
    return rows


def markdown(rows: list[dict]) -> str:
    header = ("| run | final val loss | train time (s) | tokens/s | median step (ms) "
              "| assignments dropped | time to dense final loss (s) | speed-up vs dense |\n"
              "|---|---:|---:|---:|---:|---:|---:|---:|\n")
    fmt = lambda value, spec, unit="": "never" if value is None else format(value, spec) + unit
    return header + "".join(
        f"| {r['run']} | {r['final_val_loss']:.4f} | {r['train_time_s']:.0f} | "
        f"{r['tokens_per_s']:,.0f} | {r['median_step_ms']:.0f} | {r['dropped_fraction']:.1%} | "
        f"{fmt(r['time_to_dense_loss_s'], '.0f')} | {fmt(r['speedup_vs_dense'], '.2f', 'x')} |\n"
        for r in rows)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.compare", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="xs")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--out", default="runs/compare", help="run directories")
    parser.add_argument("--results-dir", help="table and plot (default: --out)")
    parser.add_argument("--rerun", action="store_true",
                        help="train every run from scratch, ignoring finished ones")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    summaries = {name: _run(args, name, ffn, cf) for name, ffn, cf in RUNS}
    records = {name: train.read_metrics(Path(args.out) / name / "metrics.jsonl")
               for name in summaries}
    rows = results_table(summaries, records)
    results = Path(args.results_dir or args.out)
    results.mkdir(parents=True, exist_ok=True)
    first = next(iter(summaries.values()))
    setup = (f"preset `{args.preset}`, {args.steps} steps x {first['tokens_per_step']} tokens, "
             f"seed {args.seed}; {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, jax {jax.__version__} on {jax.devices()[0].platform}; "
             f"{datetime.date.today()}")
    table = markdown(rows)
    (results / "results.md").write_text(f"{setup}\n\n{table}")
    (results / "results.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2))
    plotting.plot_val_vs_time(records, results / "val_loss_vs_time.png",
                              title=f"{args.preset}: validation loss vs training time",
                              target=summaries["dense"]["final_val_loss"])
    print(f"\n{setup}\n\n{table}\nwritten to {results}")
    return rows


if __name__ == "__main__":
    main()
