"""PNG plots of training runs.

Figures are built with matplotlib's object API (`matplotlib.figure.Figure`,
saved through the Agg canvas), so plotting needs no display and leaves the
global pyplot backend alone (a notebook importing this keeps inline plots).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter


def _records(records: list[dict], kind: str) -> list[dict]:
    return [r for r in records if r["kind"] == kind]


def plot_run(records: list[dict], path: str | Path, title: str):
    """Train/validation loss vs step and the per-layer load imbalance on top;
    below, one panel per MoE layer with the share of routed assignments each
    expert received, per logging interval, and (with expert bias) one with
    each expert's bias.

    ``records``: the run's metrics (``kind`` ``"train"`` with ``step``, ``ce``,
    ``expert_load [layers][E]`` and optionally ``load_imbalance [layers]`` and
    ``expert_bias [layers][E]``; ``kind`` ``"val"`` with ``val_loss``).
    """
    train, val = _records(records, "train"), _records(records, "val")
    load = np.array([r["expert_load"] for r in train])  # [intervals, layers, E]
    layers = load.shape[1] if load.ndim == 3 else 0
    bias = np.array([r["expert_bias"] for r in train if "expert_bias" in r])
    rows = 1 + bool(layers) + bool(len(bias))
    fig = Figure(figsize=(max(8, 3 * layers), 3.5 * rows), layout="constrained")
    grid = fig.add_gridspec(rows, max(layers, 2))
    steps = [r["step"] for r in train]
    imbalance = [r["load_imbalance"] for r in train if "load_imbalance" in r]
    ax = fig.add_subplot(grid[0, :] if not imbalance else grid[0, : max(layers, 2) // 2])
    ax.plot(steps, [r["ce"] for r in train], label="train cross-entropy")
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats/byte)", title=title)
    ax.legend()
    if imbalance:
        axi = fig.add_subplot(grid[0, max(layers, 2) // 2 :])
        axi.plot(
            steps[-len(imbalance) :],
            imbalance,
            linewidth=1,
            label=[f"layer {i}" for i in range(len(imbalance[0]))],
        )
        axi.legend()
        axi.axhline(1, color="k", linestyle=":", linewidth=1)
        axi.set(xlabel="step", ylabel="max / mean load", title="load imbalance per MoE layer")
    for layer in range(layers):
        axl = fig.add_subplot(grid[1, layer])
        axl.plot(steps, load[:, layer, :], linewidth=1)
        axl.axhline(1 / load.shape[2], color="k", linestyle=":", linewidth=1)
        axl.set(
            xlabel="step",
            title=f"MoE layer {layer}: expert load",
            ylabel="share of assignments" if layer == 0 else None,
        )
        if len(bias):
            axb = fig.add_subplot(grid[2, layer])
            axb.plot(steps[-len(bias) :], bias[:, layer, :], linewidth=1)
            axb.set(
                xlabel="step",
                title=f"MoE layer {layer}: expert bias",
                ylabel="bias" if layer == 0 else None,
            )
    fig.savefig(path, dpi=90)


def plot_val_vs_time(
    runs: dict[str, list[dict]],
    path: str | Path,
    title: str,
    target: float | None = None,
    tokens_per_step: int | None = None,
):
    """Validation loss vs training wall time (seconds), one line per run; vs
    training tokens instead when ``tokens_per_step`` is given.

    ``runs``: run name -> its metrics records. ``target`` draws a horizontal
    line (e.g. the dense baseline's final loss).
    """
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    x_of = (
        (lambda r: r["train_time_s"])
        if tokens_per_step is None
        else (lambda r: r["step"] * tokens_per_step)
    )
    for name, records in runs.items():
        val = _records(records, "val")
        ax.plot(
            [x_of(r) for r in val], [r["val_loss"] for r in val], "o-", markersize=3, label=name
        )
    if target is not None:
        ax.axhline(target, color="k", linestyle=":", linewidth=1, label="dense final loss")
    losses = [r["val_loss"] for records in runs.values() for r in _records(records, "val")]
    ax.set_ylim(min(losses) - 0.05, np.percentile(losses, 90) + 0.1)
    xlabel = "training wall time (s)" if tokens_per_step is None else "training tokens"
    ax.set(xlabel=xlabel, ylabel="validation loss (nats/byte)", title=title)
    ax.legend()
    fig.savefig(path, dpi=90)


def plot_lines(
    series: dict[str, tuple[list, list]],
    path: str | Path,
    title: str,
    xlabel: str,
    ylabel: str,
    baseline: float | None = None,
):
    """One line per entry of ``series`` (name -> ``(xs, ys)``); ``baseline``
    draws a dotted horizontal line."""
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, "o-", markersize=3, label=name)
    if baseline is not None:
        ax.axhline(baseline, color="k", linestyle=":", linewidth=1)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend()
    fig.savefig(path, dpi=90)


def dropped_per_layer_curves(
    runs: dict[str, list[list[dict]]], tokens_per_step: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Run name -> ``(tokens [intervals], fractions [intervals, layers])``: the fraction of each
    MoE layer's routed assignments dropped per logging interval, the mean over the run's seeds
    at the steps every seed logged.

    ``runs``: run name -> one metrics list per seed (``kind`` ``"train"`` records with
    ``step`` and ``dropped_fraction_per_layer [layers]``; records without it, from runs
    logged before it existed, are left out, and so is a run none of whose records has it).
    """
    curves = {}
    for name, seeds in runs.items():
        per_seed = [
            {
                r["step"]: r["dropped_fraction_per_layer"]
                for r in _records(records, "train")
                if "dropped_fraction_per_layer" in r
            }
            for records in seeds
        ]
        steps = sorted(set.intersection(*(set(seed) for seed in per_seed)))
        if steps:
            fractions = np.mean([[seed[s] for s in steps] for seed in per_seed], axis=0)
            curves[name] = (np.array(steps) * tokens_per_step, fractions)
    return curves


def plot_dropped_per_layer(
    runs: dict[str, list[list[dict]]], path: str | Path, title: str, tokens_per_step: int
) -> bool:
    """One panel per run of `dropped_per_layer_curves` (same arguments), one line per
    layer vs training tokens. Returns whether there was anything to plot (nothing is
    written otherwise)."""
    curves = dropped_per_layer_curves(runs, tokens_per_step)
    if not curves:
        return False
    fig = Figure(figsize=(4 * len(curves), 3.5), layout="constrained")
    fig.suptitle(title)
    first = None
    for i, (name, (tokens, fractions)) in enumerate(curves.items()):
        ax = fig.add_subplot(1, len(curves), i + 1, sharey=first)
        first = first or ax
        layers = [f"layer {j}" for j in range(fractions.shape[1])]
        ax.plot(tokens, fractions, "o-", markersize=2, linewidth=1, label=layers)
        ax.set(xlabel="training tokens", ylabel="fraction dropped" if i == 0 else None, title=name)
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.legend()
    fig.savefig(path, dpi=90)
    return True
