"""`TransformerConfig.remat`: where the checkpoints go, and that recomputation
changes neither the loss nor any gradient (``"none"`` is the reference)."""

import chex
import jax
import numpy as np
import optax
import pytest
from flax import nnx

from helpers.jaxpr_tools import all_eqns
from jmoe import MoEConfig
from jmoe.transformer import REMAT_KINDS, MoETransformer, TransformerConfig

LAYERS = 2


def _config(remat: str) -> TransformerConfig:
    moe = MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2, block_size=32, impl="xla")
    return TransformerConfig(
        vocab_size=256,
        d_model=16,
        num_layers=LAYERS,
        num_heads=2,
        max_seq_len=16,
        moe=moe,
        remat=remat,
    )


def _loss_and_grads(remat: str, tokens):
    model = MoETransformer(_config(remat), rngs=nnx.Rngs(0))

    def loss(model):
        logits, aux = model(tokens[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        return ce + aux["aux_loss"]

    graphdef, state = nnx.split(model)
    fn = lambda state: nnx.value_and_grad(loss)(nnx.merge(graphdef, state))
    value, grads = jax.jit(fn)(state)
    forward = jax.make_jaxpr(lambda state: loss(nnx.merge(graphdef, state)))(state)
    checkpoints = sum(e.primitive.name in ("checkpoint", "remat2") for e in all_eqns(forward))
    return value, nnx.to_pure_dict(nnx.state(grads)), checkpoints


@pytest.mark.slow
def test_remat_keeps_loss_and_gradients():
    tokens = np.random.default_rng(0).integers(0, 256, (2, 17)).astype(np.int32)
    want_loss, want_grads, none_checkpoints = _loss_and_grads("none", tokens)
    assert none_checkpoints == 0
    for remat in ("ffn", "block"):
        loss, grads, checkpoints = _loss_and_grads(remat, tokens)
        assert checkpoints == LAYERS, remat  # one per block: around its FFN or all of it
        chex.assert_trees_all_close(loss, want_loss, rtol=1e-6, atol=1e-6)
        chex.assert_trees_all_close(grads, want_grads, rtol=1e-5, atol=1e-6)


def test_bad_remat_raises():
    assert REMAT_KINDS == ("none", "ffn", "block")
    with pytest.raises(ValueError, match="remat must be one of"):
        _config("attention")
