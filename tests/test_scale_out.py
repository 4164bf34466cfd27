"""Scale-out from the command line (`experiments.distributed`, `experiments.launch_local`):
bad flags give errors naming the flag, the launcher fails fast, and (slow) a
2 x 4 mesh in one process with 8 devices logs the single-device run's losses; in
2 processes with 4 devices each (each reading its own shard of the records) it
starts from the same state and trains; a multi-process run resumes exactly.

The multi-process runs use `helpers.scale_out_worker` (experiments.train's command
line with a tiny model) through ``python -m experiments.launch_local``.
"""

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from experiments import distributed, launch_local
from experiments.train import TrainConfig, read_metrics, train
from helpers.launch import launch_two_processes
from helpers.scale_out_worker import tiny_model

LOSS_TOL = 2e-4  # the bound on the logged loss


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("text", ["2", "2x", "0x4", "2x4x1", "axb", "-1x2"])
def test_bad_mesh_flag(text):
    with pytest.raises(ValueError, match="--mesh must be DATAxEXPERT"):
        distributed.parse_mesh(text)
    assert distributed.parse_mesh("2X4") == {"data": 2, "expert": 4}


@pytest.mark.parametrize(
    "mesh,num_experts,batch_size,match",
    [
        ((4, 4), 8, 16, r"--mesh 4x4 needs 16 devices, but 1 process\(es\) have 8"),
        ((2, 4), 6, 16, r"--mesh 2x4: the 6 experts are not divisible by the expert axis 4"),
        ((2, 4), 8, 12, r"--batch-size 12 is not divisible by data x expert = 8"),
    ],
)
def test_placement_rejects_bad_meshes(mesh, num_experts, batch_size, match):
    with pytest.raises(ValueError, match=match):
        distributed.Placement(mesh, num_experts=num_experts, batch_size=batch_size)


def test_dense_model_ignores_expert_count():
    placement = distributed.Placement((2, 4), num_experts=None, batch_size=8)
    assert dict(placement.mesh.shape) == {"data": 2, "expert": 4}


def test_host_devices_after_jax_started():
    distributed.set_host_devices(8)  # pytest's count: accepted
    with pytest.raises(ValueError, match="--host-devices 4: jax already started with 8"):
        distributed.set_host_devices(4)


@pytest.mark.parametrize(
    "address,num,pid,match",
    [
        ("localhost", 2, 1, "--coordinator must be HOST:PORT"),
        (None, 2, 0, "--num-processes 2 needs --coordinator"),
        ("127.0.0.1:1234", 2, 2, r"--process-id must be in \[0, 2\)"),
    ],
)
def test_bad_distributed_flags(address, num, pid, match):
    with pytest.raises(ValueError, match=match):
        distributed.initialize(address, num, pid, timeout=1)


def test_unreachable_coordinator_times_out():
    address = f"127.0.0.1:{launch_local.free_port()}"
    start = time.monotonic()
    with pytest.raises(ValueError, match=f"--coordinator {address} is unreachable after 1 s"):
        distributed.initialize(address, 2, 1, timeout=1)
    assert time.monotonic() - start < 10


def test_launch_local_fails_fast_and_stops_the_rest(tmp_path, monkeypatch, capfd):
    """Process 1 fails at once; process 0 (which would sleep 60 s) is terminated."""
    (tmp_path / "flaky.py").write_text(
        "import sys, time\n"
        "pid = int(sys.argv[sys.argv.index('--process-id') + 1])\n"
        "print('hello from', pid, sys.argv[1], flush=True)\n"
        "sys.exit(3) if pid == 1 else time.sleep(60)\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    start = time.monotonic()
    assert launch_local.main(["--processes", "2", "--", "flaky", "--flag"]) == 3
    assert time.monotonic() - start < 30
    out = capfd.readouterr().out
    assert "[1] hello from 1 --flag" in out and "terminating process 0" in out


# ------------------------------------------------------------------ equal losses (slow)


FLAGS = dict(
    steps=4, batch_size=8, lr=1e-2, log_every=1, eval_every=2, eval_batches=1, checkpoint_every=2
)


def _launch(out: Path, corpus: Path, *extra: str):
    """``launch_local --processes 2 -- helpers.scale_out_worker ...`` on a 2x4 mesh, 4 host
    devices per process."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in FLAGS.items()]
    cache = str(out.parent / "cache")
    run = ["--data", str(corpus), "--out", str(out), "--cache-dir", cache, "--mesh", "2x4"]
    return launch_two_processes("helpers.scale_out_worker", *flags, *run, *extra, timeout=1800)


def _logged(out: Path) -> dict:
    """``{(kind, step): logged loss}`` of a run (train loss and validation loss)."""
    return {
        (r["kind"], r["step"]): r.get("loss", r.get("val_loss"))
        for r in read_metrics(out / "metrics.jsonl")
    }


@pytest.mark.slow
def test_mesh_and_processes_log_single_device_losses(tmp_path, text_file):
    corpus = text_file
    config = TrainConfig(
        model=tiny_model(),
        out=str(tmp_path / "one"),
        cache_dir=str(tmp_path / "cache"),
        data=str(corpus),
        **FLAGS,
    )
    train(config)
    train(dataclasses.replace(config, out=str(tmp_path / "mesh"), mesh=(2, 4)))
    stdout = _launch(tmp_path / "procs", corpus)

    want = _logged(tmp_path / "one")
    assert len(want) == 4 + 3  # train records at steps 1-4, val at 0, 2, 4
    mesh, procs = _logged(tmp_path / "mesh"), _logged(tmp_path / "procs")
    assert mesh.keys() == procs.keys() == want.keys()
    np.testing.assert_allclose([mesh[k] for k in want], list(want.values()), rtol=0, atol=LOSS_TOL)
    # Each process reads its own shard of the training records (experiments.pipeline), so
    # from step 1 on the 2-process run trains on other batches; it starts from the same
    # parameters and has the same validation set.
    assert procs[("val", 0)] == pytest.approx(want[("val", 0)], abs=LOSS_TOL)
    for losses in (want, procs):
        assert losses[("train", 4)] < losses[("train", 1)] - 0.1  # it trains
    # Only process 0 prints the summary and writes the run's files.
    assert "[0] [xs-dmoe] 4 steps" in stdout and "[1] [xs-dmoe]" not in stdout
    summary = json.loads((tmp_path / "procs" / "summary.json").read_text())
    assert summary["steps"] == 4 and (tmp_path / "procs" / "training.png").exists()

    # Kill after step 3: the step-2 checkpoint survives; --resume redoes steps 3-4.
    shutil.copytree(tmp_path / "procs", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "4")
    metrics = tmp_path / "resumed" / "metrics.jsonl"
    metrics.write_text(
        "".join(json.dumps(r) + "\n" for r in read_metrics(metrics) if r["step"] <= 3)
    )
    (tmp_path / "resumed" / "summary.json").unlink()
    _launch(tmp_path / "resumed", corpus, "--resume")
    assert _logged(tmp_path / "resumed") == _logged(tmp_path / "procs")
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["2", "4"]
