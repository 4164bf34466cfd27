"""MegaBlocks' comparison in miniature: dense vs token-dropping MoE (capacity
factors 1.0, 1.5, 2.0) vs dropless MoE, same active FLOPs per token, same
data, seed and steps.

    python -m experiments.compare --out runs/compare --results-dir experiments/results
    python -m experiments.compare --seeds 1 ...   # one seed (the 5 runs only)
    python -m experiments.compare --runs dense dmoe --steps 6000 --seeds 1 \\
        --eval-every 100 --out runs/long --results-dir experiments/results/long
    python -m experiments.compare --set moe.num_experts=64 --steps 3000 --step-time 200 ...

Runs the five trainings for each of ``--seeds`` seeds one after another (a
finished run is reused, an interrupted one resumed from its checkpoint), then
writes ``results.md`` (the command and machine, the first seed's table with
the times logged during training, and the table over seeds: mean ± sd of the
final validation loss, the paired difference to the dMoE of the same seed,
tokens and time to reach the best token-dropping configuration's mean final
loss and how many seeds do, dropped fractions), ``results.json``,
``val_loss_vs_time.png`` and ``val_loss_vs_tokens.png`` (first seed) and
``dropped_per_layer.png`` (each capacity factor's drops per MoE layer over
training) to ``--results-dir``. ``--runs`` trains a subset (always with
``dense``, the baseline every table compares against); ``--set KEY=VALUE``
(repeatable) reaches every run's trainer (dense ignores the MoE-only fields).

``--step-time STEPS`` then times the configurations' train steps side by side
in this process (`experiments.step_time`, from the first seed's final
checkpoints) and writes ``step_times.json``; the over-seeds table's time is
then each seed's tokens to the target x that measured seconds per token (the
logged wall times depend on whatever else the machine ran).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
from pathlib import Path

import numpy as np

from experiments import plotting, step_time, train
from experiments.presets import PRESETS
from experiments.step_time import RUNS  # (run name, --ffn, --capacity-factor)


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
        if (summary["steps"], summary["seed"], summary.get("set", [])) == (
            args.steps,
            seed,
            args.set,
        ):
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
    argv += [arg for text in args.set for arg in ("--set", text)]
    if args.rerun:
        argv.append("--overwrite")
    summary = train.main(argv)
    summary["name"] = out.name
    summary["set"] = args.set
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
        "| run | final val loss | logged train time (s) | logged tokens/s "
        "| logged median step (ms) | assignments dropped "
        "| logged time to dense final loss (s) | logged speed-up vs dense "
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


def seeds_table(
    summaries: dict[str, list[dict]],
    records: dict[str, list[list[dict]]],
    seconds_per_token: dict[str, float] | None = None,
):
    """Rows over seeds, and the target: the best token-dropping configuration's
    mean final loss (dense's when no token-dropping configuration ran).

    ``summaries[name]``/``records[name]``: the summaries and metrics of each
    seed of configuration ``name``. Each row: ``val_mean``, ``val_sd``
    (sample sd; 0 for one seed), ``reached`` (how many seeds reach the target),
    the mean time and tokens to reach it over those seeds (None if none does),
    ``dropped_fraction``, and ``minus_dmoe_mean`` / ``minus_dmoe_sd``: the final
    loss minus the dMoE's of the same seed (same data order), over seeds (None
    without a dmoe run). The time is each seed's tokens to the target times
    ``seconds_per_token[name]`` (`experiments.step_time`, measured side by side;
    ``time_basis`` ``"measured"``) when given, else the logged training wall time
    (``"logged"``).
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
        tokens = [tokens_to_reach(v, target, s["tokens_per_step"]) for v, s in zip(vals, runs)]
        times = (
            [time_to_reach(v, target) for v in vals]
            if seconds_per_token is None
            else [None if t is None else t * seconds_per_token[name] for t in tokens]
        )
        rows.append(
            {
                "run": name,
                "seeds": len(runs),
                "val_mean": float(finals[name].mean()),
                "val_sd": float(np.std(finals[name], ddof=1)) if len(runs) > 1 else 0.0,
                "reached": sum(t is not None for t in tokens),
                "time_to_target_s": _mean_of_reached(times),
                "time_basis": "logged" if seconds_per_token is None else "measured",
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
    measured = rows[0]["time_basis"] == "measured"
    time = "time (s) = tokens x measured s/token" if measured else "logged wall time (s)"
    header = (
        f"| run | seeds | final val loss (mean ± sd) | {target_name}'s mean final loss "
        f"{target:.4f}: seeds reaching it | {time} | tokens | assignments dropped "
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
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model field for every run, passed to the trainer's --set (dense ignores the "
        "MoE-only ones), e.g. --set moe.num_experts=64; repeatable",
    )
    parser.add_argument(
        "--step-time",
        type=int,
        default=0,
        metavar="STEPS",
        help="after training, time every configuration's step side by side over STEPS rounds "
        "from the first seed's trained state (experiments.step_time; run nothing else on "
        "the machine), write step_times.json and give the table's times as tokens x measured "
        "seconds per token; 0: use the results directory's step_times.json if it matches, "
        "else the logged wall times",
    )
    return parser.parse_args(argv)


def step_times(args, names: list[str], results: Path) -> dict | None:
    """``--step-time N``: measures the configurations' steps (`experiments.step_time`, from
    the first seed's trained states) and writes ``results/step_times.json``; ``0``: reads
    that file if it holds every configuration measured with the same ``--set``, else None."""
    path = results / "step_times.json"
    if args.step_time:
        configs = step_time.run_configs(args.preset, names, args.set, str(Path(args.out) / "cache"))
        measured = {
            "steps": args.step_time,
            "set": args.set,
            **step_time.measure(configs, args.step_time, runs_dir=args.out),
        }
        path.write_text(json.dumps(measured, indent=2) + "\n")
        return measured
    if not path.exists():
        return None
    measured = json.loads(path.read_text())
    if measured["set"] != args.set or not set(names) <= set(measured["configs"]):
        print(f"ignoring {path}: measured for other configurations (--set {measured['set']})")
        return None
    return measured


def _setup(args, argv, first: dict, machine: dict) -> str:
    """The results' first lines: the command, the run shape, the machine."""
    command = shlex.join(["python", "-m", "experiments.compare", *argv])
    load = " / ".join(f"{x:.2f}" for x in machine["load_average"])
    return (
        f"`{command}`\n\n"
        f"preset `{args.preset}`{''.join(f', `--set {s}`' for s in args.set)}, "
        f"{args.steps} steps x {first['tokens_per_step']} tokens, seed {args.seed}; "
        f"{platform.processor() or platform.machine()}, {machine['cpu_count']} cores, "
        f"jax {machine['jax']} on {machine['backend']}; started {machine['utc']} "
        f"(load averages {load})"
    )


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.seeds < 1:
        raise ValueError(f"--seeds must be a positive int, got {args.seeds}")
    if args.step_time < 0:
        raise ValueError(f"--step-time must be >= 0, got {args.step_time}")
    machine = step_time.machine_state()
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
    results = Path(args.results_dir or args.out)
    results.mkdir(parents=True, exist_ok=True)
    measured = step_times(args, list(all_summaries), results)
    summaries = {name: runs[0] for name, runs in all_summaries.items()}
    records = {name: runs[0] for name, runs in all_records.items()}
    rows = results_table(summaries, records)
    seed_rows, target_name, target = seeds_table(
        all_summaries,
        all_records,
        None
        if measured is None
        else {n: c["seconds_per_token"] for n, c in measured["configs"].items()},
    )
    first = next(iter(summaries.values()))
    setup = _setup(args, argv, first, machine)
    table = (
        "First seed; times logged during training (the machine's load included):\n\n"
        f"{markdown(rows)}\nOver seeds {seeds.start}-{seeds.stop - 1}:\n\n"
        f"{seeds_markdown(seed_rows, target_name, target)}"
    )
    if measured is not None:
        table += (
            f"\nStep times measured side by side (`experiments.step_time`, "
            f"{measured['steps']} rounds; step_times.json):\n\n{step_time.markdown(measured)}"
        )
    (results / "results.md").write_text(f"{setup}\n\n{table}")
    (results / "results.json").write_text(
        json.dumps(
            {
                "setup": setup,
                "machine_at_start": machine,
                "machine_at_end": step_time.machine_state(),
                "rows": rows,
                "seed_rows": seed_rows,
                "target": target_name,
            },
            indent=2,
        )
    )
    _plots(args, records, all_records, summaries, results)
    print(f"\n{setup}\n\n{table}\nwritten to {results}")
    return rows


def _plots(args, records: dict, all_records: dict, summaries: dict, results: Path):
    """val_loss_vs_time.png and val_loss_vs_tokens.png (first seed), dropped_per_layer.png
    (the token-dropping runs, mean over seeds)."""
    tokens_per_step = next(iter(summaries.values()))["tokens_per_step"]
    plotting.plot_val_vs_time(
        records,
        results / "val_loss_vs_time.png",
        title=f"{args.preset}: validation loss vs logged training time",
        target=summaries["dense"]["final_val_loss"],
    )
    plotting.plot_val_vs_time(
        records,
        results / "val_loss_vs_tokens.png",
        title=f"{args.preset}: validation loss vs training tokens",
        target=summaries["dense"]["final_val_loss"],
        tokens_per_step=tokens_per_step,
    )
    plotting.plot_dropped_per_layer(
        {name: runs for name, runs in all_records.items() if name.startswith("moe-")},
        results / "dropped_per_layer.png",
        title=f"{args.preset}: assignments dropped per MoE layer (mean over seeds)",
        tokens_per_step=tokens_per_step,
    )


if __name__ == "__main__":
    main()
