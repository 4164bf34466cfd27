"""`experiments.compare` over seeds: the target (the best token-dropping
configuration's mean final loss), mean ± sd, time and tokens to reach it, paired
differences to the dMoE, measured step times, drops per layer."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from experiments import compare, plotting


def _run(final: float, losses: list[float], dropped: float = 0.0):
    """A summary and metrics: val losses at steps 0, 10, 20, ... (1 s per step)."""
    val = [
        {"kind": "val", "step": 10 * i, "train_time_s": 10.0 * i, "val_loss": v}
        for i, v in enumerate(losses)
    ]
    return (
        {"final_val_loss": final, "tokens_per_step": 100, "dropped_fraction": dropped},
        [{"kind": "train", "step": 1}, *val],
    )


def test_seeds_table():
    runs = {
        "dense": [_run(2.0, [5.0, 3.0, 2.0]), _run(2.2, [5.0, 3.0, 2.2])],
        "moe-cf1.0": [_run(2.5, [5.0, 3.0, 2.5], 0.1), _run(2.7, [5.0, 3.0, 2.7], 0.3)],
        "moe-cf2.0": [_run(2.4, [5.0, 2.4, 2.4], 0.0), _run(2.2, [5.0, 2.2, 2.2], 0.02)],
        "dmoe": [_run(2.1, [5.0, 2.1, 2.1]), _run(2.5, [5.0, 4.0, 2.5])],
    }
    rows, target_name, target = compare.seeds_table(
        {n: [s for s, _ in r] for n, r in runs.items()},
        {n: [m for _, m in r] for n, r in runs.items()},
    )
    assert target_name == "moe-cf2.0" and target == pytest.approx(2.3)
    by_run = {r["run"]: r for r in rows}
    assert by_run["dense"]["val_mean"] == pytest.approx(2.1)
    assert by_run["dense"]["val_sd"] == pytest.approx(0.1414214)  # sample sd of 2.0, 2.2
    # dense: 3.0 -> 2.0 between steps 10 and 20 reaches 2.3 at step 17 (seed 0), and
    # 3.0 -> 2.2 at step 18.75 (seed 1): mean 17.875 steps = 17.875 s = 1787.5 tokens.
    assert by_run["dense"]["time_to_target_s"] == pytest.approx(17.875)
    assert by_run["dense"]["tokens_to_target"] == pytest.approx(1787.5)
    assert by_run["dense"]["reached"] == 2
    assert by_run["moe-cf1.0"]["time_to_target_s"] is None  # never reached
    assert by_run["moe-cf1.0"]["reached"] == 0
    assert by_run["moe-cf1.0"]["dropped_fraction"] == pytest.approx(0.2)
    # dmoe: seed 0 reaches 2.3 between step 0 (5.0) and 10 (2.1), at step 10 * 2.7/2.9;
    # seed 1 never does: the mean is over the one seed that does.
    assert by_run["dmoe"]["reached"] == 1
    assert by_run["dmoe"]["tokens_to_target"] == pytest.approx(100 * 10 * 2.7 / 2.9)
    table = compare.seeds_markdown(rows, target_name, target)
    # minus dmoe, seed by seed: dense 2.0 - 2.1 and 2.2 - 2.5
    assert by_run["dense"]["minus_dmoe_mean"] == pytest.approx(-0.2)
    assert by_run["dense"]["minus_dmoe_sd"] == pytest.approx(0.1414214)
    assert "| dense | 2 | 2.1000 ± 0.1414 | 2/2 | 18 | 1,788 | 0.0% | -0.2000 ± 0.1414 |" in table
    assert (
        "| moe-cf1.0 | 2 | 2.6000 ± 0.1414 | 0/2 | never | never | 20.0% | +0.3000 ± 0.1414 |"
        in table
    )
    assert "| dmoe | 2 | 2.3000 ± 0.2828 | 1/2 |" in table and table.count("| - |") == 1
    assert "moe-cf2.0's mean final loss 2.3000: seeds reaching it" in table


def test_seed_run_dirs():
    assert compare.run_dir("runs/c", "dmoe", 0, 0).as_posix() == "runs/c/dmoe"
    assert compare.run_dir("runs/c", "dmoe", 2, 0).as_posix() == "runs/c/dmoe-seed2"


def test_overtaking_tokens():
    """The tokens from which a run stays below dense at every later shared evaluation."""
    val = lambda losses: [
        {"kind": "val", "step": 10 * i, "val_loss": v} for i, v in enumerate(losses)
    ]
    dense = val([5.0, 3.0, 2.5, 2.2, 2.0])
    # below at step 10, above at 20, below from step 30 on: ahead from 30 steps x 100 tokens.
    assert compare.overtaking_tokens(val([5.0, 2.9, 2.6, 2.1, 1.9]), dense, 100) == 3000.0
    assert compare.overtaking_tokens(val([4.0, 2.0, 2.0, 2.0, 1.0]), dense, 100) == 0.0
    assert compare.overtaking_tokens(val([4.0, 2.0, 2.0, 2.0, 2.0]), dense, 100) is None  # tie
    # only the evaluations both runs have count
    assert compare.overtaking_tokens(val([5.0, 3.5, 2.4])[::2], dense, 100) == 2000.0


def test_seeds_table_without_token_dropping_runs():
    """`--runs dense dmoe`: the target is dense's mean final loss."""
    runs = {"dense": [_run(2.0, [5.0, 3.0, 2.0])], "dmoe": [_run(1.9, [5.0, 2.5, 1.9])]}
    rows, target_name, target = compare.seeds_table(
        {n: [s for s, _ in r] for n, r in runs.items()},
        {n: [m for _, m in r] for n, r in runs.items()},
    )
    assert (target_name, target) == ("dense", 2.0)
    # dmoe: 2.5 -> 1.9 between steps 10 and 20 reaches 2.0 at step 10 + 10 * 5/6.
    assert rows[1]["tokens_to_target"] == pytest.approx(100 * (10 + 50 / 6))


def _tables(runs: dict, seconds_per_token=None):
    return compare.seeds_table(
        {n: [s for s, _ in r] for n, r in runs.items()},
        {n: [m for _, m in r] for n, r in runs.items()},
        seconds_per_token,
    )


def test_seeds_table_measured_time_and_paired_differences():
    """Time = each reaching seed's tokens x the measured seconds per token; the paired
    differences pair by seed (sorting both would give another sd); a configuration no
    seed of which reaches the target reads "never"."""
    curve = lambda final: [5.0, 3.0, final]
    runs = {
        "dense": [_run(f, curve(f)) for f in (2.0, 2.4, 2.2)],
        "moe-cf1.0": [_run(f, curve(f), d) for f, d in ((2.5, 0.1), (2.6, 0.2), (2.7, 0.3))],
        "moe-cf2.0": [_run(f, curve(f)) for f in (2.0, 2.5, 2.4)],
        "dmoe": [_run(f, curve(f)) for f in (2.1, 2.2, 2.25)],
    }
    rows, target_name, target = _tables(
        runs, {"dense": 0.1, "moe-cf1.0": 0.2, "moe-cf2.0": 0.3, "dmoe": 0.05}
    )
    assert target_name == "moe-cf2.0" and target == pytest.approx(2.3)
    by_run = {r["run"]: r for r in rows}
    # dense: seed 0 reaches 2.3 at step 10 + 10 * 0.7 / 1.0 = 17, seed 2 at 10 + 10 * 0.7 / 0.8
    # = 18.75, seed 1 (2.4) never: 2/3, mean 1787.5 tokens x 0.1 s/token = 178.75 s.
    assert by_run["dense"]["reached"] == 2
    assert by_run["dense"]["tokens_to_target"] == pytest.approx(1787.5)
    assert by_run["dense"]["time_to_target_s"] == pytest.approx(178.75)
    # dmoe: steps 10 + 7/0.9, 10 + 7/0.8, 10 + 7/0.75 (mean 18.6204) x 100 tokens x 0.05 s
    assert by_run["dmoe"]["time_to_target_s"] == pytest.approx(93.1019, rel=1e-5)
    # dense - dmoe per seed: -0.1, +0.2, -0.05 -> mean 0.016667, sample sd 0.160728
    assert by_run["dense"]["minus_dmoe_mean"] == pytest.approx(0.0166667, rel=1e-5)
    assert by_run["dense"]["minus_dmoe_sd"] == pytest.approx(0.160728, rel=1e-5)
    # cf 1.0 - dmoe: +0.4, +0.4, +0.45 -> 0.416667 ± 0.028868
    assert by_run["moe-cf1.0"]["minus_dmoe_mean"] == pytest.approx(0.416667, rel=1e-5)
    assert by_run["moe-cf1.0"]["minus_dmoe_sd"] == pytest.approx(0.0288675, rel=1e-5)
    assert by_run["moe-cf1.0"]["reached"] == 0
    assert by_run["moe-cf1.0"]["time_to_target_s"] is None
    table = compare.seeds_markdown(rows, target_name, target)
    assert "| time (s) = tokens x measured s/token | tokens |" in table
    assert "| dense | 3 | 2.2000 ± 0.2000 | 2/3 | 179 | 1,788 | 0.0% | +0.0167 ± 0.1607 |" in table
    assert (
        "| moe-cf1.0 | 3 | 2.6000 ± 0.1000 | 0/3 | never | never | 20.0% | +0.4167 ± 0.0289 |"
        in table
    )
    assert "| dmoe | 3 | 2.1833 ± 0.0764 | 3/3 | 93 | 1,862 | 0.0% | - |" in table
    logged = compare.seeds_markdown(*_tables(runs))
    assert "| logged wall time (s) | tokens |" in logged
    # logged: 1 s per step, so dense's 17.875 steps are 17.875 s
    assert "| dense | 3 | 2.2000 ± 0.2000 | 2/3 | 18 | 1,788 |" in logged


def test_step_times_file_is_reused_only_for_the_same_configurations(tmp_path):
    args = argparse.Namespace(step_time=0, set=["moe.num_experts=64"])
    assert compare.step_times(args, ["dense", "dmoe"], tmp_path) is None
    measured = {"steps": 5, "set": ["moe.num_experts=64"], "configs": {"dense": {}, "dmoe": {}}}
    (tmp_path / "step_times.json").write_text(json.dumps(measured))
    assert compare.step_times(args, ["dense", "dmoe"], tmp_path) == measured
    assert compare.step_times(args, ["dense", "dmoe", "moe-cf1.0"], tmp_path) is None
    other = argparse.Namespace(step_time=0, set=[])
    assert compare.step_times(other, ["dense", "dmoe"], tmp_path) is None


def test_dropped_per_layer_plot(tmp_path):
    """Seeds are averaged on the steps all of them logged; records logged before the
    per-layer fraction existed are left out."""
    train = lambda step, fractions: {
        "kind": "train",
        "step": step,
        **({} if fractions is None else {"dropped_fraction_per_layer": fractions}),
    }
    seeds = [
        [train(5, [0.2, 0.1]), train(10, [0.1, 0.0])],
        [train(5, [0.4, 0.3]), train(10, [0.1, 0.2]), train(15, [0.0, 0.0])],
    ]
    tokens, fractions = plotting.dropped_per_layer_curves({"moe-cf1.0": seeds}, 100)["moe-cf1.0"]
    np.testing.assert_array_equal(tokens, [500, 1000])  # step 15: one seed only
    np.testing.assert_allclose(fractions, [[0.3, 0.2], [0.1, 0.1]])
    path = tmp_path / "dropped.png"
    assert plotting.plot_dropped_per_layer({"moe-cf1.0": seeds}, path, "drops", 100)
    assert path.stat().st_size > 5_000
    old = {"moe-cf1.0": [[train(5, None)]]}
    assert not plotting.plot_dropped_per_layer(old, tmp_path / "old.png", "drops", 100)
    assert not (tmp_path / "old.png").exists()


def test_set_reaches_every_run_and_a_finished_run_is_reused_only_with_the_same_set(
    tmp_path, monkeypatch
):
    calls = []

    def fake_train(argv):  # the trainer makes the run directory
        calls.append(argv)
        (tmp_path / Path(argv[argv.index("--out") + 1]).name).mkdir(exist_ok=True)
        return {"steps": 10, "seed": 0}

    monkeypatch.setattr(compare.train, "main", fake_train)
    args = compare.parse_args(
        ["--out", str(tmp_path), "--steps", "10", "--set", "moe.num_experts=64", "--set", "a=1"]
    )
    for ffn in ("dense", "dmoe"):
        compare._run(args, ffn, ffn, 1.0, seed=0)
    assert [argv[argv.index("--set") :] for argv in calls] == [
        ["--set", "moe.num_experts=64", "--set", "a=1"]
    ] * 2
    compare._run(args, "dmoe", "dmoe", 1.0, seed=0)  # finished with the same --set: reused
    assert len(calls) == 2
    other = compare.parse_args(["--out", str(tmp_path), "--steps", "10"])
    compare._run(other, "dmoe", "dmoe", 1.0, seed=0)  # another --set: trained again
    assert len(calls) == 3 and "--set" not in calls[-1]


def test_main_writes_the_tables_plots_and_step_times(tmp_path, monkeypatch):
    """`compare.main` end to end on synthetic runs (no training, no timing): the files it
    writes and the columns of its tables, the time column from the measured step times."""
    names = [name for name, _, _ in compare.RUNS]
    final = {"dense": 2.0, "moe-cf1.0": 2.3, "moe-cf1.5": 2.2, "moe-cf2.0": 2.15, "dmoe": 2.1}

    def fake_run(args, name, ffn, capacity_factor, seed):
        loss = final[name] + 0.01 * seed
        records = [
            {"kind": "val", "step": 0, "val_loss": 5.0, "train_time_s": 0.0},
            {"kind": "train", "step": 5, "dropped_fraction_per_layer": [0.1, 0.2]},
            {"kind": "val", "step": 5, "val_loss": 3.0, "train_time_s": 5.0},
            {"kind": "train", "step": 10, "dropped_fraction_per_layer": [0.05, 0.1]},
            {"kind": "val", "step": 10, "val_loss": loss, "train_time_s": 10.0},
        ]
        out = compare.run_dir(args.out, name, seed, args.seed)
        out.mkdir(parents=True)
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return dict(
            steps=10,
            seed=seed,
            final_val_loss=loss,
            train_time_s=10.0,
            tokens_per_s=100.0,
            median_step_s=1.0,
            dropped_fraction=0.1 if name.startswith("moe") else 0.0,
            tokens_per_step=100,
        )

    def fake_measure(configs, steps, runs_dir):
        assert (steps, runs_dir) == (3, str(tmp_path / "runs"))
        assert all(c.model.moe.num_experts == 64 for c in configs.values())
        machine = dict(load_average=[0.1] * 3, cpu_count=2, jax="x", backend="cpu", utc="t")
        stats = dict(compare.step_time.summarize([0.5, 1.0, 1.5], 100), restored=True)
        return {
            "configs": dict.fromkeys(configs, stats),
            "machine_before": machine,
            "machine_after": machine,
        }

    monkeypatch.setattr(compare, "_run", fake_run)
    monkeypatch.setattr(compare.step_time, "measure", fake_measure)
    results = tmp_path / "results"
    argv = ["--out", str(tmp_path / "runs"), "--results-dir", str(results), "--seeds", "2"]
    compare.main([*argv, "--set", "moe.num_experts=64", "--step-time", "3"])
    assert sorted(p.name for p in results.iterdir()) == [
        "dropped_per_layer.png",
        "results.json",
        "results.md",
        "step_times.json",
        "val_loss_vs_time.png",
        "val_loss_vs_tokens.png",
    ]
    table = (results / "results.md").read_text()
    assert table.startswith("`python -m experiments.compare --out ")
    assert "`--set moe.num_experts=64`" in table and "load averages" in table
    assert (
        "| run | seeds | final val loss (mean ± sd) | moe-cf2.0's mean final loss 2.1550: "
        "seeds reaching it | time (s) = tokens x measured s/token | tokens | assignments "
        "dropped | minus dmoe, same seed (mean ± sd) |" in table
    )
    # dense reaches 2.155 from 3.0 (step 5) to 2.0 / 2.01 (step 10) at steps 5 + 5 * 0.845
    # and 5 + 5 * 0.845 / 0.99: 922.5 and 926.8 tokens, mean 924.6, x 0.01 s/token = 9.2 s
    assert "| dense | 2 | 2.0050 ± 0.0071 | 2/2 | 9 | 925 | 0.0% | -0.1000 ± 0.0000 |" in table
    assert "| moe-cf1.0 | 2 | 2.3050 ± 0.0071 | 0/2 | never | never | 10.0% |" in table
    assert set(json.loads((results / "step_times.json").read_text())["configs"]) == set(names)
    assert json.loads((results / "results.json").read_text())["machine_at_start"]["cpu_count"]
