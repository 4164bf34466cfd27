"""`experiments.step_time`: the configurations it builds, the statistics it reports, and
one side-by-side measurement of tiny models (one restored from a trained run)."""

import numpy as np
import pytest
from flax import nnx

from experiments import step_time
from experiments import train as train_module
from experiments.config import TrainConfig
from jmoe import MoEConfig
from jmoe.transformer import MoETransformer, TransformerConfig


def test_run_configs_pass_set_to_every_configuration(tmp_path):
    """xs with --set moe.num_experts=64: 64 top-1 experts of the dense FFN's width, the
    paper's balancing loss (0.1, mean over the MoE layers); dense ignores the MoE fields."""
    sets = ["moe.num_experts=64", "load_balancing_loss_scope=layer_mean"]
    configs = step_time.run_configs("xs", ["dense", "moe-cf1.5", "dmoe"], sets, str(tmp_path))
    assert list(configs) == ["dense", "moe-cf1.5", "dmoe"]
    for config in configs.values():
        model = config.model
        assert (model.moe.num_experts, model.moe.top_k, model.moe.d_ff) == (64, 1, 512)
        assert model.load_balancing_loss_scope == "layer_mean"
        assert model.moe.load_balancing_loss_weight == 0.1
        assert config.tokens_per_step == 16 * 128
    assert configs["dense"].model.moe_layers == ()
    shapes = {
        name: nnx.eval_shape(lambda c=c: MoETransformer(c.model, rngs=nnx.Rngs(0))).blocks[0].ffn
        for name, c in configs.items()
    }
    assert shapes["dense"].mlp.w1.shape == (128, 512)  # the dense FFN: one expert's width
    assert shapes["dmoe"].experts.w1.shape == shapes["moe-cf1.5"].experts.w1.shape
    assert shapes["dmoe"].experts.w1.shape == (64, 128, 512)
    assert configs["moe-cf1.5"].model.moe.capacity_factor == 1.5
    assert configs["dmoe"].model.ffn == "dmoe"
    with pytest.raises(ValueError, match="unknown"):
        step_time.run_configs("xs", ["moe-cf3"], [], str(tmp_path))


def test_summarize_and_markdown():
    stats = step_time.summarize([0.4, 0.1, 0.3, 0.2, 1.0], tokens_per_step=100)
    assert stats["median_step_s"] == pytest.approx(0.3)
    assert (stats["min_step_s"], stats["max_step_s"]) == (0.1, 1.0)
    assert (stats["q25_step_s"], stats["q75_step_s"]) == pytest.approx((0.2, 0.4))
    assert stats["tokens_per_s"] == pytest.approx(100 / 0.3)
    assert stats["seconds_per_token"] == pytest.approx(0.003)
    machine = dict(load_average=[0.5, 0.25, 0.125], cpu_count=2, jax="x", backend="cpu", utc="t")
    table = step_time.markdown(
        {
            "configs": {"dmoe": {**stats, "restored": True}},
            "machine_before": machine,
            "machine_after": machine,
        }
    )
    assert "| dmoe | 300.0 | 100.0 / 200.0 / 400.0 / 1000.0 | 333 | 5 | trained |" in table
    assert "Machine before: load 0.50 / 0.25 / 0.12, 2 cores" in table


def _config(tmp_path, text_file, ffn: str) -> TrainConfig:
    moe = MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=1, block_size=32, impl="xla")
    model = TransformerConfig(
        vocab_size=256, d_model=16, num_layers=2, num_heads=2, max_seq_len=16, moe=moe, ffn=ffn
    )
    return TrainConfig(
        model=model,
        out=str(tmp_path / "runs" / ffn),
        cache_dir=str(tmp_path / "cache"),
        data=str(text_file),
        steps=4,
        batch_size=4,
        log_every=2,
        eval_every=2,
        eval_batches=1,
        checkpoint_every=2,
    )


@pytest.mark.slow
def test_measure_times_every_configuration_from_its_trained_state(tmp_path, text_file):
    configs = {ffn: _config(tmp_path, text_file, ffn) for ffn in ("dense", "dmoe")}
    train_module.train(configs["dmoe"], "dmoe")  # dense has no run: it starts from init
    measured = step_time.measure(configs, steps=2, runs_dir=str(tmp_path / "runs"))
    assert {n: c["restored"] for n, c in measured["configs"].items()} == {
        "dense": False,
        "dmoe": True,
    }
    for stats in measured["configs"].values():
        assert stats["rounds"] == 2 and stats["tokens_per_step"] == 4 * 16
        assert 0 < stats["min_step_s"] <= stats["median_step_s"] <= stats["max_step_s"]
    assert measured["machine_before"]["cpu_count"] >= 1
    # the restored state is the run's: its optimizer has taken the run's 4 steps
    model = MoETransformer(configs["dmoe"].model, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, train_module.optimizer(configs["dmoe"]), wrt=nnx.Param)
    like = nnx.state((model, optimizer))
    restored = step_time._latest_state(tmp_path / "runs" / "dmoe", like)
    assert int(np.asarray(restored[1]["step"][...])) == 4
    assert step_time._latest_state(tmp_path / "runs" / "dense", like) is None
