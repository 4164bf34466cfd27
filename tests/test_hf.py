"""jmoe.hf against checkpoints transformers wrote (tests/fixtures/hf, made by
scripts/make_hf_fixtures.py; no torch here): logits equal transformers' to
float32 rounding, the fused layout loads the same weights, save writes the
same files back (bitwise) and load -> save -> load round-trips, and every
refusal names what it refuses."""

import json
import shutil
import subprocess
import sys

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jmoe.hf
from helpers.hf_fixtures import FIXTURES, MODEL_TYPES, expected, random_model
from jmoe import MoEConfig
from jmoe.hf.files import read_tensors, write_tensors
from jmoe.transformer import MoETransformer, TransformerConfig


def _params(model):
    return {path: np.asarray(v.get_value()) for path, v in nnx.state(model, nnx.Param).flat_state()}


def _assert_same_params(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for path in pa:
        np.testing.assert_array_equal(pa[path], pb[path], err_msg=str(path))


@pytest.fixture(scope="module", params=MODEL_TYPES)
def loaded(request):
    # ragged_dot products run eagerly without compiling per-expert loops; the
    # default CPU path (xla) is checked against transformers in test_generate.
    return request.param, jmoe.hf.load(FIXTURES / request.param, impl="ragged_dot")


def test_logits_match_transformers(loaded):
    name, model = loaded
    want = expected(name)
    logits, aux = model(jnp.asarray(want["logits_tokens"]))
    chex.assert_shape(logits, want["logits"].shape)
    scale = np.abs(want["logits"]).max()
    np.testing.assert_array_less(np.abs(np.asarray(logits) - want["logits"]).max(), 1e-4 * scale)
    counts = np.asarray(aux["tokens_per_expert"])  # [layers, E]
    np.testing.assert_array_equal(
        counts.sum(1), want["logits_tokens"].size * model.config.moe.top_k
    )


def test_config_of_each_architecture(loaded):
    name, model = loaded
    c = model.config
    qk, kv, head, tied, renorm = {
        "mixtral": (None, 2, 8, False, 1.0),
        "qwen3_moe": ("head", 2, 16, True, 1.0),
        "olmoe": ("projection", 4, 8, False, None),
        "qwen2_moe": (None, 2, 8, False, None),
        "deepseek_v3": (None, 4, 8, False, 1.0),
    }[name]
    assert (c.qk_norm, c.kv_heads, c.head_size, c.tie_embeddings, c.moe.normalize_top_k) == (
        qk,
        kv,
        head,
        tied,
        renorm,
    )
    assert model.lm_head is None if tied else model.lm_head.kernel.shape == (32, c.vocab_size)


def test_fused_layout_loads_the_same_weights():
    _assert_same_params(
        jmoe.hf.load(FIXTURES / "mixtral_fused"), jmoe.hf.load(FIXTURES / "mixtral")
    )


@pytest.mark.parametrize("name", MODEL_TYPES)
def test_save_writes_the_files_back(name, tmp_path):
    """Same config values, same tensor names and bytes as transformers wrote
    (the sharded fixture compared tensor by tensor), and load(save(m)) == m."""
    model = jmoe.hf.load(FIXTURES / name)
    jmoe.hf.save(model, tmp_path)
    original, written = read_tensors(FIXTURES / name), read_tensors(tmp_path)
    assert original.keys() == written.keys()
    for key in original:
        np.testing.assert_array_equal(original[key], written[key], err_msg=key)
    hf, ours = (json.loads((p / "config.json").read_text()) for p in (FIXTURES / name, tmp_path))
    for key, value in ours.items():
        if key in hf and key != "num_experts":
            assert hf[key] == value, key
    _assert_same_params(jmoe.hf.load(tmp_path), model)


def test_fused_sharded_save_round_trips(tmp_path):
    model = jmoe.hf.load(FIXTURES / "olmoe")
    jmoe.hf.save(model, tmp_path, fused=True, max_shard_bytes=50_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert "model.layers.1.mlp.experts.gate_up_proj" in index["weight_map"]
    _assert_same_params(jmoe.hf.load(tmp_path), model)


def test_save_of_a_jmoe_model_round_trips(tmp_path):
    moe = MoEConfig(
        d_model=16, d_ff=8, num_experts=4, top_k=2, expert_type="glu", normalize_top_k=1.0
    )
    config = TransformerConfig(
        vocab_size=37,
        d_model=16,
        num_layers=1,
        num_heads=4,
        num_kv_heads=1,
        head_dim=6,
        max_seq_len=8,
        moe=moe,
        qk_norm="head",
        tie_embeddings=True,
    )
    model = random_model(config)
    jmoe.hf.save(model, tmp_path)
    again = jmoe.hf.load(tmp_path)
    _assert_same_params(again, model)
    # transformers' loss is top_k at balance, jmoe's per-layer loss 1: the
    # saved coefficient is the weight / top_k, and the model loads with it.
    moe = moe.replace(load_balancing_loss_weight=moe.load_balancing_loss_weight / 2)
    want = config.replace(head_dim=None, moe=moe, load_balancing_loss_scope="global")
    assert again.config.replace(head_dim=None) == want


# --- refusals ---------------------------------------------------------------


def _variant(tmp_path, name="mixtral", *, config=None, tensors=None):
    """A copy of fixture ``name`` with ``config(dict)`` / ``tensors(dict)`` edits applied."""
    shutil.copytree(FIXTURES / name, tmp_path / name)
    folder = tmp_path / name
    if config is not None:
        hf = json.loads((folder / "config.json").read_text())
        config(hf)
        (folder / "config.json").write_text(json.dumps(hf))
    if tensors is not None:
        data = read_tensors(folder)
        tensors(data)
        for f in folder.glob("model*"):
            f.unlink()
        write_tensors(folder, data)
    return folder


LAYER0 = "model.layers.0.block_sparse_moe"


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda t: t.pop(f"{LAYER0}.experts.3.w2.weight"),
            rf"{LAYER0}.experts.3.w2.weight: missing",
        ),
        (lambda t: t.pop("lm_head.weight"), "lm_head.weight: missing"),
        (
            lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}),
            r"model.layers.0.self_attn.q_proj.bias: unexpected",
        ),
        (
            lambda t: t.update({f"{LAYER0}.experts.8.w1.weight": np.zeros((32, 32), np.float32)}),
            rf"{LAYER0}.experts.8.w1.weight: unexpected",
        ),
        (
            lambda t: t.update(
                {"model.layers.1.self_attn.k_proj.weight": np.zeros((32, 32), np.float32)}
            ),
            r"model.layers.1.self_attn.k_proj.weight: expected shape \[16, 32\], got \[32, 32\]",
        ),
    ],
)
def test_refuses_bad_tensors(tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        jmoe.hf.load(_variant(tmp_path, tensors=edit))


def test_refuses_misshapen_fused_tensor(tmp_path):
    name = "model.layers.1.mlp.experts.gate_up_proj"
    folder = _variant(
        tmp_path, "mixtral_fused", tensors=lambda t: t.update({name: t[name][:, :40]})
    )
    with pytest.raises(ValueError, match=rf"{name}: the fused layout needs .*\[8, 40, 32\]"):
        jmoe.hf.load(folder)


def test_refuses_index_naming_a_missing_tensor(tmp_path):
    folder = _variant(tmp_path, "qwen3_moe")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.gate.extra"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model.layers.0.mlp.gate.extra: listed in"):
        jmoe.hf.load(folder)


@pytest.mark.parametrize(
    "name, edit, match",
    [
        ("mixtral", lambda c: c.update(model_type="llama"), r"model_type must be one of .*'llama'"),
        ("mixtral", lambda c: c.update(hidden_act="gelu"), "hidden_act must be 'silu'"),
        ("mixtral", lambda c: c.update(sliding_window=16), "sliding_window"),
        (
            "mixtral",
            lambda c: c["rope_parameters"].update(rope_type="yarn"),
            "rope_parameters.rope_type must be 'default'",
        ),
        (
            "mixtral",
            lambda c: c.update(rope_scaling={"type": "linear", "factor": 2.0}),
            "rope_scaling.rope_type must be 'default'",
        ),
        ("mixtral", lambda c: c.pop("num_local_experts"), r"missing keys \['num_local_experts'\]"),
        ("qwen3_moe", lambda c: c.update(attention_bias=True), "attention_bias"),
        ("mixtral", lambda c: c.update(mlp_only_layers=[1]), "mlp_only_layers"),
        ("olmoe", lambda c: c.update(decoder_sparse_step=2), "decoder_sparse_step"),
        ("deepseek_v3", lambda c: c.update(scoring_func="softmax"), "scoring_func must be"),
        ("deepseek_v3", lambda c: c.pop("kv_lora_rank"), r"missing keys \['kv_lora_rank'\]"),
        (
            "qwen2_moe",
            lambda c: c.pop("shared_expert_intermediate_size"),
            r"missing keys \['shared_expert_intermediate_size'\]",
        ),
        (
            "qwen3_moe",
            lambda c: c.update(use_sliding_window=True, sliding_window=8),
            "sliding_window",
        ),
        ("olmoe", lambda c: c.update(clip_qkv=8.0), "clip_qkv must be null"),
        ("olmoe", lambda c: c.update(head_dim=16), "head_dim of olmoe"),
    ],
)
def test_refuses_unsupported_configs(tmp_path, name, edit, match):
    with pytest.raises(ValueError, match=f"config.json: {match}"):
        jmoe.hf.load(_variant(tmp_path, name, config=edit))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(ffn="dense"), "ffn must be 'dmoe'"),
        (dict(moe_every=2), "moe_every must be 1"),
        (dict(moe=dict(expert_type="mlp")), "moe.expert_type must be 'glu'"),
        (dict(moe=dict(score_function="sigmoid")), "moe.score_function"),
        (dict(moe=dict(num_shared_experts=1)), "moe.num_shared_experts"),
        (
            dict(moe=dict(normalize_top_k=None)),
            "moe.normalize_top_k must be 1.0 to save as mixtral",
        ),
        (dict(qk_norm="projection", head_dim=8), "head_dim must be 4 to save as olmoe"),
    ],
)
def test_save_refuses_what_the_format_cannot_express(tmp_path, change, match):
    change = dict(change)
    moe = MoEConfig(
        **{
            **dict(
                d_model=16, d_ff=8, num_experts=4, top_k=2, expert_type="glu", normalize_top_k=1.0
            ),
            **change.pop("moe", {}),
        }
    )
    config = TransformerConfig(
        vocab_size=20, d_model=16, num_layers=2, num_heads=4, max_seq_len=8, moe=moe, **change
    )
    model = nnx.eval_shape(lambda: MoETransformer(config, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=match):
        jmoe.hf.save(model, tmp_path)


@pytest.mark.slow
def test_import_jmoe_needs_no_safetensors():
    code = (
        "import sys; sys.modules['safetensors'] = None; import jmoe, jmoe.hf\n"
        "try:\n    jmoe.hf.load(sys.argv[1])\nexcept ImportError as e:\n    print(e)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(FIXTURES / "mixtral")],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert "jmoe.hf needs the safetensors package" in out.stdout


def test_bfloat16_load_and_save(tmp_path):
    model = jmoe.hf.load(FIXTURES / "olmoe", dtype=jnp.bfloat16)
    assert model.config.moe.dtype == jnp.bfloat16
    jmoe.hf.save(model, tmp_path)
    written = read_tensors(tmp_path)
    assert {t.dtype.name for t in written.values()} == {"bfloat16"}
    original = read_tensors(FIXTURES / "olmoe")
    name = "model.layers.1.mlp.experts.5.down_proj.weight"
    np.testing.assert_array_equal(written[name], original[name].astype(written[name].dtype))
    _assert_same_params(jmoe.hf.load(tmp_path, dtype=jnp.bfloat16), model)
