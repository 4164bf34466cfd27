"""The loss a loaded Hugging Face checkpoint trains with equals transformers'
(tests/fixtures/hf/*/expected.npz, from scripts/make_hf_fixtures.py): the
``"global"`` balancing loss, the total training loss (cross-entropy +
``router_aux_loss_coef`` * aux, with padding masked) and its gradients; and
the ``"layer_mean"`` scope is the mean of the layers' own losses."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jmoe.hf
from helpers.hf_fixtures import FIXTURES, MODEL_TYPES, expected, random_model
from jmoe import MoEConfig
from jmoe.hf import config as hf_config
from jmoe.hf import tensors as hf_tensors
from jmoe.loss_scope import pooled_load_balancing_loss
from jmoe.transformer import TransformerConfig, aggregate_aux

RTOL = 1e-5


def _loss(model, tokens, mask):
    """transformers' training loss: mean CE over the real next tokens + aux."""
    logits, aux = model(tokens, mask=mask)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
    real = mask[:, 1:].astype(jnp.float32)
    ce = jnp.sum(ce * real) / jnp.sum(real)
    return ce + aux["aux_loss"], (ce, aux["load_balancing_loss"])


@nnx.jit
def _outputs(model, tokens, mask):
    """``(aux_loss without a mask, ((loss, (ce, balance)), grads) with it)``."""
    return model(tokens)[1]["aux_loss"], nnx.value_and_grad(_loss, has_aux=True)(
        model, tokens, mask
    )


@pytest.fixture(scope="module", params=MODEL_TYPES)
def run(request, tmp_path_factory):
    """``(name, model, expected, outputs)``: fixture ``name`` loaded with
    ``router_aux_loss_coef`` set to the one its loss expectations used."""
    name, want = request.param, expected(request.param)
    folder = tmp_path_factory.mktemp(name) / name
    shutil.copytree(FIXTURES / name, folder)
    hf = json.loads((folder / "config.json").read_text())
    hf["router_aux_loss_coef"] = float(want["loss_aux_coef"])
    (folder / "config.json").write_text(json.dumps(hf))
    model = jmoe.hf.load(folder, impl="ragged_dot")
    tokens, mask = jnp.asarray(want["logits_tokens"]), jnp.asarray(want["loss_mask"])
    return name, model, want, _outputs(model, tokens, mask)


def test_loads_transformers_loss_settings():
    for name in MODEL_TYPES:
        config = jmoe.hf.load_config(FIXTURES / name)
        hf = json.loads((FIXTURES / name / "config.json").read_text())
        # DeepSeek-V3 trains with no balancing loss in transformers ("noaux_tc")
        coef = 0.0 if name == "deepseek_v3" else hf["router_aux_loss_coef"]
        assert config.load_balancing_loss_scope == "global"
        assert config.moe.load_balancing_loss_weight == coef


@pytest.mark.slow
def test_aux_loss_equals_transformers(run):
    """``aux["aux_loss"]`` == ``router_aux_loss_coef * aux_loss`` (output_router_logits=True)."""
    _, _, want, (aux_loss, _) = run
    np.testing.assert_allclose(float(aux_loss), want["loss_aux_coef"] * want["aux_loss"], rtol=RTOL)


def _hf_gradients(model, grads) -> dict[str, np.ndarray]:
    """jmoe gradients under the names transformers keeps in memory (fused experts)."""
    config = model.config
    arch = hf_config.architecture(hf_config.to_hf(config))
    flat = dict(nnx.to_flat_state(grads))
    out = {}
    for mapping in hf_tensors.mappings(config, arch):
        if mapping.path not in flat:  # DeepSeek-V3's expert_bias: a buffer, no gradient
            continue
        value = np.asarray(flat[mapping.path].get_value())
        out.update(zip(mapping.names, hf_tensors.from_param(mapping, value)))
    for layer in config.moe_layers:
        out = hf_tensors.fuse_layer(out, layer, config, arch)
    return out


@pytest.mark.slow
def test_training_loss_and_gradients_equal_transformers(run):
    """Padding masked: CE over the real next tokens, the balancing loss over
    the real tokens; loss and every parameter's gradient norm within 1e-5
    relative, the routers' gradients elementwise."""
    _, model, want, (_, ((loss, (ce, balance)), grads)) = run
    np.testing.assert_allclose(float(ce), want["loss_ce"], rtol=RTOL)
    np.testing.assert_allclose(float(balance), want["loss_aux_coef"] * want["loss_aux"], rtol=RTOL)
    np.testing.assert_allclose(float(loss), want["loss"], rtol=RTOL)
    got = _hf_gradients(model, grads)
    names = list(want["grad_names"])
    assert set(names) == set(got)
    norms = np.array([np.linalg.norm(got[n]) for n in names])
    np.testing.assert_allclose(norms, want["grad_norms"], rtol=RTOL)
    routers = [k for k in want if k.startswith("grad.")]
    assert routers
    for key in routers:
        reference = want[key]
        np.testing.assert_allclose(
            got[key[len("grad.") :]], reference, atol=RTOL * np.abs(reference).max(), err_msg=key
        )


def test_layer_mean_is_the_mean_of_the_layers_losses():
    """Every routing loss of the model is the mean of its MoE layers' own
    (the dense block of ``moe_every=2`` contributes nothing)."""
    moe = MoEConfig(
        d_model=16,
        d_ff=8,
        num_experts=4,
        top_k=2,
        expert_type="glu",
        load_balancing_loss_weight=0.3,
        router_z_loss_weight=0.01,
        sequence_aux_loss_weight=0.2,
        impl="ragged_dot",
    )
    config = TransformerConfig(
        vocab_size=20, d_model=16, num_layers=4, num_heads=2, max_seq_len=8, moe=moe, moe_every=2
    )
    assert config.load_balancing_loss_scope == "layer_mean"
    model = random_model(config, seed=3)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 20, (3, 8)))
    _, aux = model(tokens)
    x, layers = model.embed(tokens), []
    for block in model.blocks:
        x = x + block.attn(block.attn_norm(x))
        y, layer_aux = block.ffn(block.ffn_norm(x))
        x, _ = x + y, layers.append(layer_aux)
    for key in ("load_balancing_loss", "router_z_loss", "sequence_aux_loss"):
        own = [float(layers[i][key]) for i in config.moe_layers]
        assert len(own) == 2 and min(own) > 0 and own[0] != own[1]
        np.testing.assert_allclose(float(aux[key]), np.mean(own), rtol=1e-6, err_msg=key)


def test_pooled_loss_against_numpy():
    """`pooled_load_balancing_loss` written out in NumPy (transformers'
    formula): masked rows leave both means; 2 at perfect top-2 balance."""
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(4), size=(3, 10)).astype(np.float32)  # [L, T, E]
    ids = np.argsort(-probs, axis=-1)[..., :2]
    mask = (np.arange(10) < 7).astype(np.float32)
    rows = np.broadcast_to(mask, (3, 10)).reshape(-1).astype(bool)
    flat_probs, flat_ids = probs.reshape(-1, 4)[rows], ids.reshape(-1, 2)[rows]
    share = np.array([(flat_ids == e).sum() for e in range(4)]) / len(flat_ids)
    want = 4 * np.dot(share, flat_probs.mean(0))
    got = pooled_load_balancing_loss(jnp.asarray(probs), jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    uniform = jnp.full((2, 4, 4), 0.25)
    balanced = jnp.asarray(np.array([[0, 1], [2, 3], [0, 1], [2, 3]]))[None].repeat(2, 0)
    np.testing.assert_allclose(float(pooled_load_balancing_loss(uniform, balanced)), 2.0, rtol=1e-6)


def test_mask_only_with_the_global_scope():
    layer = {
        "load_balancing_loss": jnp.ones(()),
        "router_z_loss": jnp.zeros(()),
        "sequence_aux_loss": jnp.zeros(()),
        "tokens_per_expert": jnp.zeros((4,), jnp.int32),
        "dropped_tokens": jnp.zeros((), jnp.int32),
    }
    with pytest.raises(ValueError, match="mask: only load_balancing_loss_scope='global'"):
        aggregate_aux([layer], (0,), 4, mask=jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="load_balancing_loss_scope must be one of"):
        TransformerConfig(
            vocab_size=8,
            d_model=16,
            num_layers=1,
            num_heads=2,
            max_seq_len=8,
            moe=MoEConfig(d_model=16, d_ff=8),
            load_balancing_loss_scope="sum",
        )
