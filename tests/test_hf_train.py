"""From and to the trainer: ``experiments.train --init-from-hf`` starts from a
Hugging Face checkpoint's weights and model, ``experiments.export_hf`` writes
a run's latest checkpoint as a Hugging Face folder, and refuses models the
format cannot express, naming the field."""

import json

import numpy as np
import pytest
from flax import nnx

import jmoe.hf
from experiments import export_hf, train
from experiments.config import TRAINING_EP_BUFFER_FACTOR
from experiments.overrides import model_dict
from experiments.presets import preset
from experiments.run_config import MODEL_CONFIG, config_from_json
from helpers.hf_fixtures import FIXTURES, random_model
from jmoe import MoEConfig
from jmoe.transformer import TransformerConfig


def _params(model) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def byte_checkpoint(tmp_path_factory):
    """A tiny Qwen3-MoE-layout checkpoint with the byte vocabulary (256)."""
    moe = MoEConfig(
        d_model=16,
        d_ff=8,
        num_experts=4,
        top_k=2,
        expert_type="glu",
        normalize_top_k=1.0,
        load_balancing_loss_weight=0.02,
    )
    config = TransformerConfig(
        vocab_size=256,
        d_model=16,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        max_seq_len=16,
        moe=moe,
        qk_norm="head",
        load_balancing_loss_scope="global",
    )
    folder = tmp_path_factory.mktemp("hf") / "byte-qwen"
    jmoe.hf.save(random_model(config, seed=1), folder)
    return folder


@pytest.mark.slow
def test_init_from_hf_then_export(byte_checkpoint, text_file, tmp_path):
    """Two steps at lr 1e-9: the run's model is the checkpoint's (its config,
    with transformers' loss scope), and its export loads back to the
    checkpoint's weights (up to that step)."""
    out = tmp_path / "run"
    summary = train.main(
        [
            "--init-from-hf",
            str(byte_checkpoint),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--lr",
            "1e-9",
            "--log-every",
            "1",
            "--eval-every",
            "1",
            "--checkpoint-every",
            "1",
            "--eval-batches",
            "1",
            "--data",
            str(text_file),
            "--out",
            str(out),
        ]
    )
    assert summary["name"] == "hf-byte-qwen"
    saved = config_from_json(json.loads((out / MODEL_CONFIG).read_text()))
    loaded = jmoe.hf.load_config(byte_checkpoint)  # with the trainer's EP buffer default
    assert saved == loaded.replace(
        moe=loaded.moe.replace(ep_buffer_factor=TRAINING_EP_BUFFER_FACTOR)
    )
    assert saved.load_balancing_loss_scope == "global"
    exported = export_hf.main(["--run", str(out), "--out", str(tmp_path / "hf")])
    again, original = _params(jmoe.hf.load(exported)), _params(jmoe.hf.load(byte_checkpoint))
    assert again.keys() == original.keys()
    for path in original:
        np.testing.assert_allclose(again[path], original[path], atol=1e-6, err_msg=str(path))
    hf = json.loads((exported / "config.json").read_text())
    assert hf["model_type"] == "qwen3_moe" and hf["router_aux_loss_coef"] == 0.02


def test_init_from_hf_needs_the_byte_vocabulary():
    with pytest.raises(ValueError, match="vocab_size=80 is below the 256 byte tokens"):
        train.config_from_args(train.parse_args(["--init-from-hf", str(FIXTURES / "olmoe")]))


def test_model_config_round_trips():
    config = preset("xs").replace(load_balancing_loss_scope="global")
    assert config_from_json(json.loads(json.dumps(model_dict(config)))) == config


@pytest.mark.parametrize(
    "model, field",
    [
        (preset("xs"), "moe.expert_type"),
        (preset("xs", ffn="moe"), "ffn"),
        (preset("xs").replace(moe_every=2), "moe_every"),
    ],
)
def test_export_refuses_what_hf_cannot_express(tmp_path, model, field):
    (tmp_path / MODEL_CONFIG).write_text(json.dumps(model_dict(model)))
    with pytest.raises(SystemExit, match=rf"cannot be saved: {field} must be"):
        export_hf.main(["--run", str(tmp_path), "--out", str(tmp_path / "hf")])
