"""jmoe.hf's Qwen2-MoE and DeepSeek-V3 options beyond the fixtures (no forward
passes; tests/test_hf.py compares the fixtures' logits with transformers'):
which blocks are dense, round trips of jmoe-built models through both formats
(MHA attention biases, MLA without a query LoRA, several shared experts),
the latent decode cache's size, and what cannot be saved."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jmoe.hf
from helpers.hf_fixtures import FIXTURES, random_model
from jmoe import MoEConfig
from jmoe.hf.config import from_hf
from jmoe.mla import MLAConfig
from jmoe.transformer import MoETransformer, TransformerConfig
from jmoe.yarn import YarnScaling


def _hf(name, **changes):
    return {**json.loads((FIXTURES / name / "config.json").read_text()), **changes}


@pytest.mark.parametrize(
    "name, changes, routed, dense_hidden",
    [
        ("qwen2_moe", {}, (0, 2), 48),
        ("qwen2_moe", dict(mlp_only_layers=[], decoder_sparse_step=2), (1,), 48),
        ("qwen2_moe", dict(mlp_only_layers=[]), None, None),
        ("qwen3_moe", dict(mlp_only_layers=[0]), (1,), 48),
        ("deepseek_v3", {}, (1, 2), 40),
        ("deepseek_v3", dict(first_k_dense_replace=0), None, None),
        ("deepseek_v3", dict(first_k_dense_replace=2), (2,), 40),
    ],
)
def test_dense_blocks_of_each_family(name, changes, routed, dense_hidden):
    config = from_hf(_hf(name, **changes))
    assert (config.routed_layers, config.dense_hidden) == (routed, dense_hidden)


def test_family_options_are_read():
    qwen2, deepseek = from_hf(_hf("qwen2_moe")), from_hf(_hf("deepseek_v3"))
    assert qwen2.attention_bias and qwen2.moe.shared_expert_gate
    assert (qwen2.moe.num_shared_experts, qwen2.moe.shared_hidden) == (1, 40)
    moe = deepseek.moe
    assert (moe.score_function, moe.num_expert_groups, moe.top_k_groups) == ("sigmoid", 4, 2)
    assert (moe.routed_scaling_factor, moe.expert_bias, moe.shared_hidden) == (2.5, True, 16)
    assert deepseek.mla == MLAConfig(
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
        q_lora_rank=24,
        yarn=YarnScaling(
            factor=4.0, original_max_position_embeddings=16, mscale=0.8, mscale_all_dim=1.0
        ),
    )
    # Hub files name YaRN under rope_scaling with "type"
    hub = _hf("deepseek_v3", rope_scaling={**_hf("deepseek_v3")["rope_parameters"]})
    hub["rope_scaling"]["type"] = hub["rope_scaling"].pop("rope_type")
    del hub["rope_parameters"]
    assert from_hf(hub).mla == deepseek.mla


def test_qwen3_dense_block_needs_its_mlp_tensors(tmp_path):
    folder = tmp_path / "q"
    folder.mkdir()
    for f in (FIXTURES / "qwen3_moe").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "config.json").write_text(json.dumps(_hf("qwen3_moe", mlp_only_layers=[1])))
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.gate_proj.weight: missing"):
        jmoe.hf.load(folder)


def _state(model):
    return {p: np.asarray(v.get_value()) for p, v in nnx.state(model).flat_state()}


QWEN2 = TransformerConfig(
    vocab_size=30,
    d_model=16,
    num_layers=3,
    num_heads=2,
    max_seq_len=8,
    moe=MoEConfig(
        d_model=16,
        d_ff=8,
        num_experts=4,
        top_k=2,
        expert_type="glu",
        num_shared_experts=1,
        shared_d_ff=12,
        shared_expert_gate=True,
    ),
    routed_layers=(1,),
    dense_hidden=20,
    attention_bias=True,
    load_balancing_loss_scope="global",  # what a loaded checkpoint trains with
)
DEEPSEEK = TransformerConfig(
    vocab_size=30,
    d_model=16,
    num_layers=3,
    num_heads=2,
    max_seq_len=8,
    moe=MoEConfig(
        d_model=16,
        d_ff=8,
        num_experts=4,
        top_k=2,
        expert_type="glu",
        score_function="sigmoid",
        normalize_top_k=1.0,
        num_shared_experts=2,
        num_expert_groups=2,
        top_k_groups=1,
        routed_scaling_factor=1.5,
        expert_bias=True,
        load_balancing_loss_weight=0.0,  # DeepSeek-V3 balances by the bias alone
    ),
    routed_layers=(1, 2),
    dense_hidden=20,
    load_balancing_loss_scope="global",
    mla=MLAConfig(
        kv_lora_rank=6, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=3, rope_interleave=False
    ),
)


@pytest.mark.parametrize("config", [QWEN2, DEEPSEEK], ids=["qwen2_moe", "deepseek_v3"])
def test_jmoe_models_round_trip(config, tmp_path):
    model = random_model(config)
    jmoe.hf.save(model, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["model_type"] == ("deepseek_v3" if config.mla else "qwen2_moe")
    again = jmoe.hf.load(tmp_path)
    assert again.config.replace(num_kv_heads=None) == config
    want, got = _state(model), _state(again)
    assert want.keys() == got.keys()  # expert_bias included
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))


def test_latent_cache_holds_the_compressed_latents():
    """Per token and layer: kv_lora_rank + qk_rope_head_dim values (6 + 2),
    not heads * (qk_nope + qk_rope + v_head_dim) = 2 * 9."""
    model = nnx.eval_shape(lambda: MoETransformer(DEEPSEEK, rngs=nnx.Rngs(0)))
    caches = model.init_cache(3, 5)
    assert [tuple(a.shape) for a in caches[0]] == [(3, 5, 6), (3, 5, 2)]
    assert sum(a.size for c in caches for a in c) == 3 * 5 * 3 * (6 + 2)
    assert all(a.dtype == jnp.float32 for c in caches for a in c)


@pytest.mark.parametrize(
    "config, match",
    [
        (DEEPSEEK.replace(routed_layers=(0, 2)), r"routed_layers must be \(1, 2\)"),
        (QWEN2.replace(qk_norm="head"), "qk_norm must be None to save as qwen2_moe"),
        (QWEN2.replace(moe=QWEN2.moe.replace(shared_expert_gate=False)), "num_shared_experts"),
        (
            DEEPSEEK.replace(moe=DEEPSEEK.moe.replace(score_function="softmax")),
            "moe.score_function must be 'sigmoid'",
        ),
        (
            QWEN2.replace(moe=QWEN2.moe.replace(num_shared_experts=0, shared_expert_gate=False)),
            r"routed_layers must be \(0, 1, 2\) to save as mixtral",
        ),
    ],
)
def test_save_refuses_what_the_family_cannot_express(config, match, tmp_path):
    model = nnx.eval_shape(lambda: MoETransformer(config, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=match):
        jmoe.hf.save(model, tmp_path)


def test_bfloat16_load_keeps_the_selection_bias_in_float32():
    model = jmoe.hf.load(FIXTURES / "deepseek_v3", dtype=jnp.bfloat16)
    assert model.blocks[1].ffn.router.expert_bias.get_value().dtype == jnp.float32
    assert model.blocks[1].attn.kv_b.kernel.get_value().dtype == jnp.bfloat16


def test_five_architectures():
    assert jmoe.hf.MODEL_TYPES == ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v3")
