"""FSDP and named meshes from the command line (`experiments.distributed`): ``--mesh
data=2,fsdp=2,expert=2`` parsing and its errors, the placement of the batch and the state
(``state_bytes_per_device``), and (slow) the tiny model trained on ``--mesh fsdp=8`` and
``--mesh data=2,fsdp=2,expert=2 --fsdp``: the single-device losses within 2e-4 with at most
0.2x the replicated state per device.

8 host CPU devices (tests/conftest.py).
"""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from experiments import distributed
from experiments.train import read_metrics
from helpers import scale_out_worker
from helpers.host_devices import held_bytes
from jmoe.parallel.mesh import bytes_per_device
from jmoe.transformer import MoETransformer

LOSS_TOL = 2e-4  # the bound on the logged loss


@pytest.mark.parametrize(
    "text,axes",
    [
        ("2x4", {"data": 2, "expert": 4}),
        ("data=2,fsdp=2,expert=2", {"data": 2, "fsdp": 2, "expert": 2}),
        ("expert=8,fsdp=2", {"fsdp": 2, "expert": 8}),  # mesh order: data, fsdp, expert
        ("fsdp=8", {"fsdp": 8}),
    ],
)
def test_parse_mesh(text, axes):
    got = distributed.parse_mesh(text)
    assert got == axes and list(got) == list(axes)


@pytest.mark.parametrize(
    "text", ["data=2,data=2", "tensor=2", "data=0", "data=2,", "data2,expert=2", "data=x"]
)
def test_bad_named_mesh(text):
    with pytest.raises(ValueError, match="--mesh must be DATAxEXPERT .* or NAME=SIZE"):
        distributed.parse_mesh(text)


@pytest.mark.parametrize(
    "axes,num_experts,batch_size,match",
    [
        ({"fsdp": 4, "expert": 4}, 8, 16, r"--mesh fsdp=4,expert=4 needs 16 devices"),
        ({"fsdp": 2, "expert": 4}, 6, 16, r"the 6 experts are not divisible by the expert axis 4"),
        (
            {"data": 2, "fsdp": 2, "expert": 2},
            8,
            12,
            r"--batch-size 12 is not divisible by "
            r"data x fsdp x expert = 8 \(--mesh data=2,fsdp=2,expert=2\)",
        ),
    ],
)
def test_placement_rejects_bad_named_meshes(axes, num_experts, batch_size, match):
    with pytest.raises(ValueError, match=match):
        distributed.Placement(axes, num_experts=num_experts, batch_size=batch_size)


def _placed_state(axes, fsdp=False):
    placement = distributed.Placement(axes, num_experts=8, batch_size=8, fsdp=fsdp)
    model = scale_out_worker.tiny_model()
    _, state = placement.init_state(lambda: MoETransformer(model, rngs=nnx.Rngs(0)))
    return placement, state


def test_placement_splits_batch_and_state():
    placement, state = _placed_state({"data": 2, "fsdp": 2, "expert": 2})
    assert placement.batch_sharding.spec == P(("data", "fsdp", "expert"), None)
    specs = nnx.to_pure_dict(jax.tree.map(lambda a: a.sharding.spec, state))
    w1 = specs["blocks"][0]["ffn"]["experts"]["w1"]  # [E=8, d=16, d_ff=32]
    assert w1 == P("expert", None, "fsdp")
    assert specs["embed"]["embedding"] == P("fsdp", None)  # [vocab=256, d=16]
    _, with_data = _placed_state({"data": 2, "fsdp": 2, "expert": 2}, fsdp=True)
    specs = nnx.to_pure_dict(jax.tree.map(lambda a: a.sharding.spec, with_data))
    assert specs["embed"]["embedding"] == P(("data", "fsdp"), None)
    # per device: the shards the arrays really hold
    shardings = jax.tree.map(lambda a: a.sharding, with_data)
    assert bytes_per_device(with_data, shardings) == held_bytes(with_data)


def _train(tmp_path, corpus, name, *flags):
    out = tmp_path / name
    argv = ["--steps=4", "--batch-size=8", "--lr=1e-2", "--log-every=1", "--eval-every=2"]
    argv += ["--eval-batches=1", "--checkpoint-every=4", "--data", str(corpus)]
    argv += ["--out", str(out), "--cache-dir", str(tmp_path / "cache"), *flags]
    scale_out_worker.main(argv)
    summary = json.loads((out / "summary.json").read_text())
    losses = {
        (r["kind"], r["step"]): r.get("loss", r.get("val_loss"))
        for r in read_metrics(out / "metrics.jsonl")
    }
    return summary["state_bytes_per_device"], losses


@pytest.mark.slow
def test_fsdp_runs_log_single_device_losses_with_a_fifth_of_the_state(tmp_path, text_file):
    # A replicated run holds the whole state on each device: the one-device run's bytes.
    replicated, want = _train(tmp_path, text_file, "one")
    for name, flags in {
        "fsdp8": ["--mesh", "fsdp=8"],
        "dfe": ["--mesh", "data=2,fsdp=2,expert=2", "--fsdp"],
    }.items():
        state_bytes, got = _train(tmp_path, text_file, name, *flags)
        assert state_bytes <= 0.2 * replicated, name
        assert got.keys() == want.keys()
        np.testing.assert_allclose(
            [got[k] for k in want], list(want.values()), rtol=0, atol=LOSS_TOL, err_msg=name
        )
