"""Seconds per training step of several configurations, measured side by side in one process.

    python -m experiments.step_time --steps 50 --set moe.num_experts=64 --json step_times.json
    python -m experiments.step_time --steps 50 --set moe.num_experts=64 --runs-dir runs/e64

Builds each configuration's jitted train step exactly as `experiments.train` does (its
`train_step`, optimizer and batch shape, the state donated), feeds all of them the same real
training batch, and times them with `benchmarks.timing.interleaved_samples`: every round runs
each configuration's step once untimed and once timed, so a slow spell of the machine slows all
of them alike. Per configuration it reports the median seconds per step, the spread (min, quartiles,
max over the rounds) and tokens/s, with the machine's state (load averages before and after,
``os.cpu_count()``, jax version and backend, UTC time). Run it with nothing else on the machine.

A dropless MoE's step depends on how evenly it routes (groups are padded to blocks), so a step
timed at initialisation is not one timed late in training: ``--runs-dir`` restores each
configuration's latest checkpoint from ``<runs-dir>/<name>`` (`experiments.compare`'s layout)
where there is one.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from benchmarks.timing import interleaved_samples
from experiments import config as train_config
from experiments import pipeline, train
from experiments.checkpoint import Checkpoints
from experiments.presets import PRESETS
from jmoe.transformer import MoETransformer

# (run name, --ffn, --capacity-factor): the configurations `experiments.compare` trains.
RUNS = (
    ("dense", "dense", 1.0),
    ("moe-cf1.0", "moe", 1.0),
    ("moe-cf1.5", "moe", 1.5),
    ("moe-cf2.0", "moe", 2.0),
    ("dmoe", "dmoe", 1.0),
)


def run_configs(
    preset: str, names: list[str], sets: list[str], cache_dir: str
) -> dict[str, train_config.TrainConfig]:
    """``{name: TrainConfig}`` of the `RUNS` in ``names``, built by the trainer's command line
    (``--preset``, ``--ffn``, ``--capacity-factor`` and each ``--set KEY=VALUE`` of ``sets``)."""
    unknown = sorted(set(names) - {name for name, _, _ in RUNS})
    if unknown:
        raise ValueError(f"runs: unknown {unknown}; choose from {[n for n, _, _ in RUNS]}")
    configs = {}
    for name, ffn, capacity_factor in RUNS:
        if name not in names:
            continue
        argv = ["--preset", preset, "--ffn", ffn, "--capacity-factor", str(capacity_factor)]
        argv += ["--cache-dir", cache_dir]
        argv += [arg for text in sets for arg in ("--set", text)]
        configs[name] = train_config.config_from_args(train_config.parse_args(argv))[0]
    return configs


def training_batch(config: train_config.TrainConfig) -> tuple[dict, int]:
    """The first training batch of ``config``'s data (seed 0; a dict of
    ``[batch_size, seq_len + 1] int32`` arrays, `pipeline.FIELDS`) and the data's vocab size."""
    corpus = pipeline.Corpus(pipeline.prepared(config.data, config.cache_dir))
    records = corpus.split(0.05)[0]
    data = pipeline.train_batches(
        records, seq_len=config.model.max_seq_len, batch_size=config.batch_size, seed=0
    )
    try:
        return next(data), corpus.vocab_size
    finally:
        data.close()


def _latest_state(run: Path, like):
    """The state of the latest checkpoint under ``run/checkpoints``, or None."""
    if not (run / "checkpoints").is_dir():
        return None
    checkpoints = Checkpoints(run / "checkpoints", every=1)
    try:
        step = checkpoints.latest_step()
        return None if step is None else checkpoints.restore(step, like)[0]
    finally:
        checkpoints.close()


class _Stepper:
    """Each call is one jitted train step on a fixed batch, the state carried as in training."""

    def __init__(self, config: train_config.TrainConfig, batch: dict, state_from: Path | None):
        model = MoETransformer(config.model, rngs=nnx.Rngs(config.seed))
        graphdef, self.state = nnx.split(
            (model, nnx.Optimizer(model, train.optimizer(config), wrt=nnx.Param))
        )
        restored = None if state_from is None else _latest_state(state_from, self.state)
        self.restored = restored is not None
        self.state = restored if self.restored else self.state
        self.batch = batch
        step = functools.partial(
            train.train_step,
            graphdef,
            grad_accum=config.grad_accum,
            skip_nonfinite=config.skip_nonfinite,
        )
        self.step = jax.jit(step, donate_argnums=0).lower(self.state, batch).compile()

    def __call__(self):
        self.state, metrics = self.step(self.state, self.batch)
        return self.state, metrics


def machine_state() -> dict:
    """Load averages (1, 5, 15 min), CPU count, jax version and backend, UTC time."""
    return {
        "load_average": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def summarize(samples: list[float], tokens_per_step: int) -> dict:
    """Seconds per step over the rounds -> median, min, quartiles, max, tokens/s, s/token."""
    q25, median, q75 = np.percentile(samples, [25, 50, 75])
    return {
        "median_step_s": float(median),
        "min_step_s": float(np.min(samples)),
        "q25_step_s": float(q25),
        "q75_step_s": float(q75),
        "max_step_s": float(np.max(samples)),
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_step / float(median),
        "seconds_per_token": float(median) / tokens_per_step,
        "rounds": len(samples),
    }


def measure(
    configs: dict[str, train_config.TrainConfig], steps: int, runs_dir: str | None = None
) -> dict:
    """Times the configurations' train steps interleaved over ``steps`` rounds.

    Returns ``{"configs": {name: summarize(...) + "restored"}, "machine_before",
    "machine_after"}`` (`machine_state`); ``runs_dir``: see the module docstring.
    """
    if steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps}")
    first = next(iter(configs.values()))
    batch, vocab_size = training_batch(first)
    steppers = {
        name: _Stepper(
            dataclasses.replace(config, model=config.model.replace(vocab_size=vocab_size)),
            batch,
            None if runs_dir is None else Path(runs_dir) / name,
        )
        for name, config in configs.items()
    }
    before = machine_state()
    samples = interleaved_samples({name: (fn, ()) for name, fn in steppers.items()}, steps)
    after = machine_state()
    return {
        "configs": {
            name: {
                **summarize(times, configs[name].tokens_per_step),
                "restored": steppers[name].restored,
            }
            for name, times in samples.items()
        },
        "machine_before": before,
        "machine_after": after,
    }


def markdown(measured: dict) -> str:
    """A table of `measure`'s result with the machine state under it."""
    rows = "".join(
        f"| {name} | {1000 * r['median_step_s']:.1f} | {1000 * r['min_step_s']:.1f} / "
        f"{1000 * r['q25_step_s']:.1f} / {1000 * r['q75_step_s']:.1f} / "
        f"{1000 * r['max_step_s']:.1f} | {r['tokens_per_s']:,.0f} | {r['rounds']} | "
        f"{'trained' if r['restored'] else 'initial'} |\n"
        for name, r in measured["configs"].items()
    )
    machine = lambda m: (
        f"load {' / '.join(f'{x:.2f}' for x in m['load_average'])}, {m['cpu_count']} cores, "
        f"jax {m['jax']} on {m['backend']}, {m['utc']}"
    )
    return (
        "| run | median step (ms) | min / q25 / q75 / max (ms) | tokens/s | rounds | state |\n"
        "|---|---:|---:|---:|---:|---|\n"
        f"{rows}\nMachine before: {machine(measured['machine_before'])}; "
        f"after: {machine(measured['machine_after'])}.\n"
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.step_time",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    names = [name for name, _, _ in RUNS]
    parser.add_argument("--runs", nargs="+", choices=names, default=names)
    parser.add_argument("--preset", choices=PRESETS, default="xs")
    parser.add_argument("--steps", type=int, default=50, help="timed rounds")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model field for every configuration, as the trainer's --set; repeatable",
    )
    parser.add_argument(
        "--cache-dir", help="tokenized corpora (None: <runs-dir>/cache, else runs/cache)"
    )
    parser.add_argument("--runs-dir", help="restore <runs-dir>/<name>'s latest checkpoint")
    parser.add_argument("--json", help="also write the result to this JSON file")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cache_dir = args.cache_dir or str(Path(args.runs_dir or "runs") / "cache")
    configs = run_configs(args.preset, args.runs, args.set, cache_dir)
    measured = {"steps": args.steps, "set": args.set, **measure(configs, args.steps, args.runs_dir)}
    print(markdown(measured))
    if args.json:
        Path(args.json).write_text(json.dumps(measured, indent=2) + "\n")
    return measured


if __name__ == "__main__":
    main()
