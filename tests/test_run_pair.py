"""`experiments.run_pair` on synthetic runs: the shared evaluations, the
differences, the imbalance over the last tenth and the whole run, the files."""

import json

import chex
import pytest

from experiments import run_pair


def _write_run(path, val_losses, imbalances, final_ce):
    """Val losses at steps 0, 100, ...; train records at steps 10, 20, ... with
    per-layer imbalances ``[x, x + 0.2]`` (their layer mean is ``x + 0.1``)."""
    path.mkdir(parents=True)
    records = [{"kind": "val", "step": 100 * i, "val_loss": v} for i, v in enumerate(val_losses)]
    records += [
        {"kind": "train", "step": 10 * (i + 1), "load_imbalance": [x, x + 0.2]}
        for i, x in enumerate(imbalances)
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {
        "final_val_loss": val_losses[-1],
        "final_train_ce": final_ce,
        "dropped_fraction": 0.0,
    }
    (path / "summary.json").write_text(json.dumps(summary))


def test_pair_of_runs(tmp_path):
    _write_run(tmp_path / "a", [3.0, 2.0, 1.5, 1.25], [1.9] * 10 + [1.3] * 10, 1.1)
    # b has one evaluation more (step 400): only the shared steps 0-300 are compared
    _write_run(tmp_path / "b", [3.0, 2.1, 1.4, 1.3, 1.2], [1.5] * 20, 1.2)
    out = tmp_path / "out"
    result = run_pair.main(
        [str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "A", "B", "--out", str(out)]
    )
    assert result["steps"] == [0, 100, 200, 300]
    chex.assert_trees_all_close(result["val_loss_difference"], [0.0, 0.1, -0.1, 0.05], atol=1e-12)
    first, second = result["runs"]
    assert first["imbalance_last_tenth"] == pytest.approx(1.4)  # last 2 of 20 intervals
    assert first["imbalance_mean"] == pytest.approx(1.7)
    assert second["imbalance_last_tenth"] == pytest.approx(1.6)
    text = (out / "pair.md").read_text()
    assert "| A | 1.2500 | 1.1000 | 1.400 | 1.700 | 0.0% |" in text
    assert "B minus A, validation loss: +0.0500 at the end; -0.0250 ± 0.0750" in text
    assert json.loads((out / "pair.json").read_text())["labels"] == ["A", "B"]
    assert (out / "val_loss.png").stat().st_size and (out / "imbalance.png").stat().st_size
