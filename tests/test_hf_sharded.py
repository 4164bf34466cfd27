"""`jmoe.hf.load` on a mesh (each parameter created sharded as the trainer
shards it, from slices of the checkpoint) and `jmoe.hf.save` of a sharded
model (gathered one tensor at a time, streamed into shards): the same
parameters as a one-device load, round trips, (slow) peak host memory, and
(slow) load and save across 2 processes (`helpers.hf_multiprocess_worker`
through ``python -m experiments.launch_local``)."""

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jmoe.hf
from helpers.hf_fixtures import FIXTURES
from helpers.host_devices import host_cpus
from helpers.launch import launch_two_processes
from jmoe import MoEConfig
from jmoe.hf import config as hf_config
from jmoe.hf import tensors as hf_tensors
from jmoe.hf.files import ShardWriter
from jmoe.parallel import make_mesh, state_shardings
from jmoe.transformer import TransformerConfig


def _flat(model) -> dict:
    return {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_same(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for path in fa:
        np.testing.assert_array_equal(np.asarray(fa[path]), np.asarray(fb[path]), str(path))


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(2, 4, devices=host_cpus())


@pytest.mark.parametrize("name, fsdp", [("qwen3_moe", True), ("mixtral_fused", False)])
def test_mesh_load_is_sharded_like_the_trainer(mesh, name, fsdp):
    """Every parameter in `state_shardings`' sharding (experts over
    ``"expert"``, FSDP over ``"data"``), float32 master weights under a
    bfloat16 compute dtype, values equal to a one-device load's."""
    model = jmoe.hf.load(
        FIXTURES / name, mesh=mesh, param_dtype=jnp.float32, dtype=jnp.bfloat16, fsdp=fsdp
    )
    assert model.config.moe.dtype == jnp.bfloat16
    want = dict(nnx.to_flat_state(state_shardings(nnx.state(model), mesh, fsdp=fsdp)))
    flat = _flat(model)
    for path, value in flat.items():
        assert value.dtype == jnp.float32, path
        assert value.sharding.is_equivalent_to(want[path].get_value(), value.ndim), path
    w1 = flat[("blocks", 1, "ffn", "experts", "w1")]
    assert w1.sharding.spec[0] == "expert" and len(w1.addressable_shards) == 8
    if fsdp:
        assert "data" in flat[("embed", "embedding")].sharding.spec
    _assert_same(model, jmoe.hf.load(FIXTURES / name))


def test_mesh_save_round_trips(mesh, tmp_path):
    """2 x 4 mesh (FSDP) -> save (small shards; fused and per expert) -> one
    device: the same parameters."""
    original = jmoe.hf.load(FIXTURES / "olmoe")
    sharded = jmoe.hf.load(FIXTURES / "olmoe", mesh=mesh, fsdp=True)
    for fused in (False, True):
        folder = tmp_path / f"fused{fused}"
        jmoe.hf.save(sharded, folder, fused=fused, max_shard_bytes=60_000)
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        files = set(index["weight_map"].values())
        assert len(files) > 3 and files == {p.name for p in folder.glob("model-*.safetensors")}
        assert not list(folder.glob("*.partial.*"))
        again = jmoe.hf.load(folder)
        assert len(again.blocks[0].ffn.experts.w1.get_value().sharding.device_set) == 1
        _assert_same(again, original)


@pytest.mark.slow
def test_load_and_save_across_two_processes(tmp_path):
    """2 processes x 4 host devices, one 2 x 4 mesh with FSDP: each process
    reads only its half of the checkpoint, process 0 alone writes the shards,
    and the saved folder loads (on one device) to the fixture's parameters."""
    out, report = tmp_path / "saved", tmp_path / "report"
    worker_args = [str(FIXTURES / "olmoe"), str(out), "--report", str(report)]
    launch_two_processes(
        "helpers.hf_multiprocess_worker", *worker_args, "--max-shard-bytes", "60000", timeout=180
    )

    reports = [json.loads((report / f"process-{i}.json").read_text()) for i in range(2)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == 5 and files[-1] == "model-00005-of-00005.safetensors"
    for i, got in enumerate(reports):
        assert got["process"] == i and got["local_devices"] == 4
        # FSDP over "data", one mesh row per process: half the checkpoint each.
        assert got["read_bytes"] * 2 == got["checkpoint_bytes"], got
    # Process 0 wrote each shard once (as a .partial file, renamed by close); process 1 none.
    assert reports[0]["written"] == [f"model-0000{i}.partial.safetensors" for i in range(1, 6)]
    assert reports[1]["written"] == []
    complete = ["config.json", *files, "model.safetensors.index.json"]
    assert sorted(p.name for p in out.iterdir()) == complete
    # save returns on every process only once process 0 has written the whole folder
    assert [got["folder_after_save"] for got in reports] == [complete, complete]
    again = jmoe.hf.load(out)
    assert len(again.blocks[0].ffn.experts.w1.get_value().sharding.device_set) == 1
    _assert_same(again, jmoe.hf.load(FIXTURES / "olmoe"))


def test_shard_writer_limits_each_shard(tmp_path):
    """Shards of at most 100 bytes, in order; the 160-byte tensor alone."""
    writer = ShardWriter(tmp_path, max_shard_bytes=100)
    writer.add({"a": np.zeros(10, np.float32), "b": np.zeros(5, np.float32)})
    writer.add({"c": np.zeros(40, np.float32), "d": np.zeros(1, np.float32)})
    writer.add({"e": np.zeros(20, np.float32)})
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = "model-0000{}-of-00003.safetensors".format
    assert index["weight_map"] == dict(a=shard(1), b=shard(1), c=shard(2), d=shard(3), e=shard(3))
    assert index["metadata"]["total_size"] == 4 * 76


def _write_large_checkpoint(folder: Path, layers: int) -> int:
    """A Mixtral-layout checkpoint of random float32 tensors, written tensor
    by tensor in 100 MB shards (safetensors numpy, no torch); its size in bytes."""
    moe = MoEConfig(
        d_model=512, d_ff=2048, num_experts=8, top_k=2, expert_type="glu", normalize_top_k=1.0
    )
    config = TransformerConfig(
        vocab_size=1024, d_model=512, num_layers=layers, num_heads=8, max_seq_len=64, moe=moe
    )
    hf = hf_config.to_hf(config)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf))
    rng = np.random.default_rng(0)
    writer = ShardWriter(folder, 100 * 2**20)
    for mapping in hf_tensors.mappings(config, hf_config.architecture(hf)):
        for name, shape in zip(mapping.names, mapping.shapes):
            writer.add({name: rng.standard_normal(shape, np.float32)})
    writer.close()
    return writer.total


def _measure(folder: Path, *mesh: str) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).parent / "helpers" / "hf_memory.py"),
            str(folder),
            *mesh,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_load_peak_memory(tmp_path):
    """~650 MB float32 checkpoint: peak anonymous RSS growth during the load <= 1.3x the
    process's shards + the largest parameter, on one device and on a 2 x 4
    mesh with FSDP (8 host devices in one process)."""
    size = _write_large_checkpoint(tmp_path / "ckpt", layers=6)
    assert 600e6 < size < 700e6
    for mesh in ((), ("2x4",)):
        got = _measure(tmp_path / "ckpt", *mesh)
        print(mesh, {k: f"{v / 1e6:.0f} MB" for k, v in got.items()})
        assert got["growth"] <= 1.3 * got["share"] + got["largest"], (mesh, got)
