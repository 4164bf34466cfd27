"""MegaBlocks' comparison in miniature: dense vs token-dropping MoE (capacity
factors 1.0, 1.5, 2.0) vs dropless MoE, same active FLOPs per token, same
data, seed and steps.

    python -m experiments.compare --out runs/compare --results-dir experiments/results
    python -m experiments.compare --seeds 1 ...   # one seed (the 5 runs only)
    python -m experiments.compare --runs dense dmoe --steps 6000 --seeds 1 \\
        --eval-every 100 --out runs/long --results-dir experiments/results/long

Runs the five trainings for each of ``--seeds`` seeds one after another (a
finished run is reused, an interrupted one resumed from its checkpoint), then
writes ``results.md`` (the first seed's table, and the table over seeds: mean
± sd of the final validation loss, time and tokens to reach the best
token-dropping configuration's mean final loss, dropped fractions),
``results.json``, ``val_loss_vs_time.png`` and ``val_loss_vs_tokens.png``
(first seed) to ``--results-dir``. ``--runs`` trains a subset (always with
``dense``, the baseline every table compares against).
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
from experiments.presets import PRESETS

# (run name, --ffn, --capacity-factor)
RUNS = (
    ("dense", "dense", 1.0),
    ("moe-cf1.0", "moe", 1.0),
    ("moe-cf1.5", "moe", 1.5),
    ("moe-cf2.0", "moe", 2.0),
    ("dmoe", "dmoe", 1.0),
)


def _first_reach(xs: list[float], losses: list[float], target: float) -> float | None:
    """First ``x`` at which ``losses`` reaches ``target`` (linear in between); None if never."""
    for i, loss in enumerate(losses):
        if loss <= target:
            if i == 0:
                return xs[0]
            fraction = (losses[i - 1] - target) / (losses[i - 1] - loss)
            return xs[i - 1] + fraction * (xs[i] - xs[i - 1])
    return None


def time_to_reach(val_records: list[dict], target: float) -> float | None:
    """Training wall time at which validation loss first reaches ``target``,
    linearly interpolated between evaluations; None if it never does."""
    return _first_reach(
        [r["train_time_s"] for r in val_records], [r["val_loss"] for r in val_records], target
    )


def tokens_to_reach(val_records: list[dict], target: float, tokens_per_step: int) -> float | None:
    """Training tokens at which validation loss first reaches ``target`` (as `time_to_reach`)."""
    return _first_reach(
        [r["step"] * tokens_per_step for r in val_records],
        [r["val_loss"] for r in val_records],
        target,
    )


def overtaking_tokens(
    val_records: list[dict], baseline_records: list[dict], tokens_per_step: int
) -> float | None:
    """Tokens from which on a run's validation loss stays below the baseline's
    at every later evaluation (the evaluations both have); None if it ends at or
    above it. ``0`` if it is below from the first shared evaluation on."""
    baseline = {r["step"]: r["val_loss"] for r in baseline_records}
    shared = [
        (r["step"], r["val_loss"] < baseline[r["step"]])
        for r in val_records
        if r["step"] in baseline
    ]
    if not shared or not shared[-1][1]:
        return None
    first_below = len(shared)
    while first_below > 0 and shared[first_below - 1][1]:
        first_below -= 1
    return float(shared[first_below][0] * tokens_per_step) if first_below else 0.0


def run_dir(out: str, name: str, seed: int, first_seed: int) -> Path:
    """``out/<name>`` for the first seed (as with one seed), ``out/<name>-seed<s>`` after."""
    return Path(out) / (name if seed == first_seed else f"{name}-seed{seed}")


def _run(args, name: str, ffn: str, capacity_factor: float, seed: int) -> dict:
    """Trains one configuration unless a finished run with the same steps exists."""
    out = run_dir(args.out, name, seed, args.seed)
    summary_path = out / "summary.json"
    if summary_path.exists() and not args.rerun:
        summary = json.loads(summary_path.read_text())
        if (summary["steps"], summary["seed"]) == (args.steps, seed):
            print(f"[{out.name}] reusing {summary_path}")
            return summary
    argv = [
        "--preset",
        args.preset,
        "--ffn",
        ffn,
        "--capacity-factor",
        str(capacity_factor),
        "--steps",
        str(args.steps),
        "--seed",
        str(seed),
        "--out",
        str(out),
        "--cache-dir",
        str(Path(args.out) / "cache"),
        "--log-every",
        "5",
        "--eval-every",
        str(args.eval_every),
        "--eval-batches",
        str(args.eval_batches),
        "--checkpoint-every",
        str(args.checkpoint_every),
    ]
    if args.rerun:
        argv.append("--overwrite")
    summary = train.main(argv)
    summary["name"] = out.name
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def results_table(summaries: dict[str, dict], records: dict[str, list[dict]]) -> list[dict]:
    """One row per run: final loss, time, throughput, drops, time to dense's
    final loss, and the tokens from which it stays ahead of dense."""
    target = summaries["dense"]["final_val_loss"]
    dense_time = summaries["dense"]["train_time_s"]
    dense_val = [r for r in records["dense"] if r["kind"] == "val"]
    rows = []
    for name, summary in summaries.items():
        val = [r for r in records[name] if r["kind"] == "val"]
        reach = time_to_reach(val, target)
        ahead = (
            None
            if name == "dense"
            else overtaking_tokens(val, dense_val, summary["tokens_per_step"])
        )
        rows.append(
            {
                "run": name,
                "final_val_loss": summary["final_val_loss"],
                "train_time_s": summary["train_time_s"],
                "tokens_per_s": summary["tokens_per_s"],
                "median_step_ms": 1000 * summary["median_step_s"],
                "dropped_fraction": summary["dropped_fraction"],
                "time_to_dense_loss_s": reach,
                "speedup_vs_dense": None if reach is None else dense_time / reach,
                "ahead_of_dense_from_tokens": ahead,
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    header = (
        "| run | final val loss | train time (s) | tokens/s | median step (ms) "
        "| assignments dropped | time to dense final loss (s) | speed-up vs dense "
        "| ahead of dense from (tokens) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    fmt = lambda value, spec, unit="": "never" if value is None else format(value, spec) + unit
    return header + "".join(
        f"| {r['run']} | {r['final_val_loss']:.4f} | {r['train_time_s']:.0f} | "
        f"{r['tokens_per_s']:,.0f} | {r['median_step_ms']:.0f} | {r['dropped_fraction']:.1%} | "
        f"{fmt(r['time_to_dense_loss_s'], '.0f')} | {fmt(r['speedup_vs_dense'], '.2f', 'x')} | "
        f"{'-' if r['run'] == 'dense' else fmt(r['ahead_of_dense_from_tokens'], ',.0f')} |\n"
        for r in rows
    )


def _mean_of_reached(values: list[float | None]) -> float | None:
    """Mean of the values that are not None (seeds that reached a target); None if none did."""
    reached = [v for v in values if v is not None]
    return float(np.mean(reached)) if reached else None


def seeds_table(summaries: dict[str, list[dict]], records: dict[str, list[list[dict]]]):
    """Rows over seeds, and the target: the best token-dropping configuration's
    mean final loss (dense's when no token-dropping configuration ran).

    ``summaries[name]``/``records[name]``: the summaries and metrics of each
    seed of configuration ``name``. Each row: ``val_mean``, ``val_sd``
    (sample sd; 0 for one seed), ``reached`` (how many seeds reach the target),
    the mean time and tokens to reach it over those seeds (None if none does),
    ``dropped_fraction``, and ``minus_dmoe_mean`` / ``minus_dmoe_sd``: the final
    loss minus the dMoE's of the same seed (same data order), over seeds (None
    without a dmoe run).
    Returns ``(rows, target_name, target)``.
    """
    finals = {
        name: np.array([s["final_val_loss"] for s in runs]) for name, runs in summaries.items()
    }
    dropping = [n for n in summaries if n.startswith("moe-")]
    target_name = min(dropping or ["dense"], key=lambda name: finals[name].mean())
    target = float(finals[target_name].mean())
    rows = []
    for name, runs in summaries.items():
        paired = finals[name] - finals["dmoe"] if "dmoe" in finals else None
        vals = [[r for r in recs if r["kind"] == "val"] for recs in records[name]]
        times = [time_to_reach(v, target) for v in vals]
        tokens = [tokens_to_reach(v, target, s["tokens_per_step"]) for v, s in zip(vals, runs)]
        rows.append(
            {
                "run": name,
                "seeds": len(runs),
                "val_mean": float(finals[name].mean()),
                "val_sd": float(np.std(finals[name], ddof=1)) if len(runs) > 1 else 0.0,
                "reached": sum(t is not None for t in tokens),
                "time_to_target_s": _mean_of_reached(times),
                "tokens_to_target": _mean_of_reached(tokens),
                "dropped_fraction": float(np.mean([s["dropped_fraction"] for s in runs])),
                "minus_dmoe_mean": None if paired is None else float(paired.mean()),
                "minus_dmoe_sd": None
                if paired is None or len(runs) < 2
                else float(np.std(paired, ddof=1)),
            }
        )
    return rows, target_name, target


def seeds_markdown(rows: list[dict], target_name: str, target: float) -> str:
    header = (
        f"| run | seeds | final val loss (mean ± sd) | {target_name}'s mean final loss "
        f"{target:.4f}: seeds reaching it | time (s) | tokens | assignments dropped "
        "| minus dmoe, same seed (mean ± sd) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    fmt = lambda value, spec: "never" if value is None else format(value, spec)
    paired = lambda r: (
        "-"
        if r["run"] == "dmoe" or r["minus_dmoe_mean"] is None
        else f"{r['minus_dmoe_mean']:+.4f} ± {r['minus_dmoe_sd'] or 0.0:.4f}"
    )
    return header + "".join(
        f"| {r['run']} | {r['seeds']} | {r['val_mean']:.4f} ± {r['val_sd']:.4f} | "
        f"{r['reached']}/{r['seeds']} | {fmt(r['time_to_target_s'], '.0f')} | "
        f"{fmt(r['tokens_to_target'], ',.0f')} | "
        f"{r['dropped_fraction']:.1%} | {paired(r)} |\n"
        for r in rows
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.compare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    names = [name for name, _, _ in RUNS]
    parser.add_argument(
        "--runs",
        nargs="+",
        choices=names,
        default=names,
        help="configurations to train (dense, the baseline, is always trained)",
    )
    parser.add_argument("--preset", choices=PRESETS, default="xs")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument(
        "--seeds", type=int, default=3, help="seeds per configuration: --seed, --seed + 1, ..."
    )
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--out", default="runs/compare", help="run directories")
    parser.add_argument("--results-dir", help="table and plot (default: --out)")
    parser.add_argument(
        "--rerun", action="store_true", help="train every run from scratch, ignoring finished ones"
    )
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.seeds < 1:
        raise ValueError(f"--seeds must be a positive int, got {args.seeds}")
    seeds = range(args.seed, args.seed + args.seeds)
    selected = {"dense", *args.runs}
    all_summaries = {
        name: [_run(args, name, ffn, cf, seed) for seed in seeds]
        for name, ffn, cf in RUNS
        if name in selected
    }
    all_records = {
        name: [
            train.read_metrics(run_dir(args.out, name, seed, args.seed) / "metrics.jsonl")
            for seed in seeds
        ]
        for name in all_summaries
    }
    summaries = {name: runs[0] for name, runs in all_summaries.items()}
    records = {name: runs[0] for name, runs in all_records.items()}
    rows = results_table(summaries, records)
    seed_rows, target_name, target = seeds_table(all_summaries, all_records)
    results = Path(args.results_dir or args.out)
    results.mkdir(parents=True, exist_ok=True)
    first = next(iter(summaries.values()))
    setup = (
        f"preset `{args.preset}`, {args.steps} steps x {first['tokens_per_step']} tokens, "
        f"seed {args.seed}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, jax {jax.__version__} on {jax.devices()[0].platform}; "
        f"{datetime.date.today()}"
    )
    table = (
        f"{markdown(rows)}\nOver seeds {seeds.start}-{seeds.stop - 1}:\n\n"
        f"{seeds_markdown(seed_rows, target_name, target)}"
    )
    (results / "results.md").write_text(f"{setup}\n\n{table}")
    (results / "results.json").write_text(
        json.dumps(
            {"setup": setup, "rows": rows, "seed_rows": seed_rows, "target": target_name}, indent=2
        )
    )
    plotting.plot_val_vs_time(
        records,
        results / "val_loss_vs_time.png",
        title=f"{args.preset}: validation loss vs training time",
        target=summaries["dense"]["final_val_loss"],
    )
    plotting.plot_val_vs_time(
        records,
        results / "val_loss_vs_tokens.png",
        title=f"{args.preset}: validation loss vs training tokens",
        target=summaries["dense"]["final_val_loss"],
        tokens_per_step=first["tokens_per_step"],
    )
    print(f"\n{setup}\n\n{table}\nwritten to {results}")
    return rows


if __name__ == "__main__":
    main()
