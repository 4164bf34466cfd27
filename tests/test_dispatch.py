"""Device choice (``impl="auto"``) on stubbed devices, and the expert MLP as the
unit of dispatch: a backend's fused ``expert_mlp`` is what runs, and the generic
composition of the products computes the same function as the fused xla one.

Tolerances: float32 ``rtol=atol=1e-5`` between the fused loop and the composed
products (both accumulate in float32; values are O(1)).
"""

import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jmoe import DroplessMoE, MoEConfig, permutation
from pallas_kernels import expert_mlp, products
from pallas_kernels.backend import ExpertWeights, RowMap

F32_TOL = dict(rtol=1e-5, atol=1e-5)


def _device(platform="gpu", kind="NVIDIA H100 80GB HBM3", capability="9.0"):
    stub = types.SimpleNamespace(platform=platform, device_kind=kind)
    if capability is not None:
        stub.compute_capability = capability
    return stub


@pytest.mark.parametrize(
    "device,impl",
    [
        (_device("cpu", "cpu", None), "xla"),
        (_device("tpu", "TPU v5 lite", None), "xla"),
        (_device("gpu", "AMD Instinct MI300X", None), "xla"),
        (_device(kind="NVIDIA H100 80GB HBM3", capability="9.0"), "mosaic"),
        (_device(kind="NVIDIA H200", capability="9.0"), "mosaic"),
        (_device(kind="NVIDIA B200", capability="10.0"), "triton"),  # no wgmma on sm_100
        (_device(kind="NVIDIA GeForce RTX 5090", capability="12.0"), "triton"),
        (_device(kind="NVIDIA A100-SXM4-80GB", capability="8.0"), "triton"),
        (_device(kind="NVIDIA L4", capability="8.9"), "triton"),
        (_device(kind="Tesla V100-SXM2-16GB", capability="7.0"), "ragged_dot"),
        (_device(kind="NVIDIA unknown", capability=None), "ragged_dot"),
    ],
)
def test_impl_for_device(device, impl):
    assert products.impl_for_device(device) == impl


@pytest.fixture
def stub_device(monkeypatch):
    """Makes ``impl="auto"`` choose for a stubbed default device."""

    def install(device):
        monkeypatch.setattr(products, "_default_device", lambda: device)

    return install


def test_auto_follows_the_default_device(stub_device):
    stub_device(_device(kind="NVIDIA A100-SXM4-80GB", capability="8.0"))
    assert products.resolve_impl("auto", jnp.bfloat16) == "triton"
    assert products.layout_block_size("auto", 64) == 64  # triton's block layout
    stub_device(_device(kind="NVIDIA GeForce RTX 5090", capability="12.0"))
    assert products.resolve_impl("auto", jnp.float16) == "triton"
    stub_device(_device("cpu", "cpu", None))
    assert products.resolve_impl("auto", jnp.float32) == "xla"
    assert products.layout_block_size("auto", 64) == 1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_auto_refuses_32_bit_compute_on_nvidia(stub_device, dtype):
    stub_device(_device(kind="NVIDIA H200", capability="9.0"))
    with pytest.raises(
        ValueError,
        match=r"impl='auto' on NVIDIA H200 picks 'mosaic'.*"
        r"set MoEConfig\(dtype=jnp.bfloat16\).*impl='xla'",
    ):
        products.resolve_impl("auto", dtype)
    assert products.resolve_impl("xla", dtype) == "xla"  # an explicit impl is kept


def test_layer_refuses_float32_auto_on_a_stubbed_gpu(stub_device):
    stub_device(_device(kind="Tesla V100-SXM2-16GB", capability="7.0"))
    config = MoEConfig(d_model=8, d_ff=16, num_experts=4, top_k=2, impl="auto")
    layer = DroplessMoE(config, rngs=nnx.Rngs(0))
    with pytest.raises(
        ValueError,
        match=r"picks 'ragged_dot'.*compute dtype float32: set "
        r"MoEConfig\(dtype=",
    ):
        jax.eval_shape(layer, jax.ShapeDtypeStruct((4, 8), jnp.float32))


def _routed_case(glu: bool, seed=0):
    """A routing with an empty expert and a token count no multiple of anything."""
    tokens, d, f, e, k = 13, 8, 16, 4, 2
    rng = np.random.default_rng(seed)
    expert_ids = np.stack([rng.choice([0, 2, 3], 2, replace=False) for _ in range(tokens)])
    dispatch, topo = permutation.dropless_dispatch(jnp.asarray(expert_ids, jnp.int32), e, 1)
    gates = jnp.asarray(rng.uniform(0.1, 1.0, (tokens, k)), jnp.float32)
    normal = lambda *shape: jnp.asarray(
        rng.standard_normal(shape) / np.sqrt(shape[-2] if len(shape) > 2 else 1), jnp.float32
    )
    ops = dict(
        x=normal(tokens, d),
        gates=gates,
        w1=normal(e, d, f),
        w3=normal(e, d, f) if glu else None,
        w2=normal(e, f, d),
    )
    return dispatch, topo, ops


@pytest.mark.slow
def test_composed_expert_mlp_matches_the_fused_xla_one():
    """Output and gradients of x, router gates and all weights (SwiGLU),
    through `permutation.row_map` as the layer builds it."""
    dispatch, topo, ops = _routed_case(True)
    activation = "swiglu"

    def run(compose, ops):
        rows = permutation.row_map(ops["gates"], dispatch)
        weights = ExpertWeights(ops["w1"], ops["w3"], ops["w2"])
        args = (ops["x"], rows, topo, weights, activation)
        if compose:
            return expert_mlp.composed_expert_mlp("xla", *args)
        return expert_mlp.routed_mlp(*args[:-1], activation=activation, impl="xla")

    def loss(compose, ops):
        y = run(compose, ops)
        return jnp.sum(y * jnp.cos(y)), y

    (_, y_fused), g_fused = jax.value_and_grad(lambda o: loss(False, o), has_aux=True)(ops)
    (_, y_comp), g_comp = jax.value_and_grad(lambda o: loss(True, o), has_aux=True)(ops)
    chex.assert_trees_all_close(y_comp, y_fused, **F32_TOL)
    chex.assert_trees_all_close(g_comp, g_fused, **F32_TOL)
    assert float(jnp.abs(g_fused["w1"][1]).max()) == 0.0  # expert 1 is empty


def test_identity_rows_match_in_both_paths():
    """``rows=None`` (the expert-parallel call: rows already in the layout)."""
    dispatch, topo, ops = _routed_case(True, seed=1)
    rows = permutation.permute(ops["x"], dispatch)
    weights = ExpertWeights(ops["w1"], ops["w3"], ops["w2"])
    fused = expert_mlp.routed_mlp(rows, None, topo, weights, activation="swiglu", impl="xla")
    composed = expert_mlp.composed_expert_mlp("xla", rows, None, topo, weights, "swiglu")
    chex.assert_trees_all_close(composed, fused, **F32_TOL)
    assert fused.shape == rows.shape


def test_routed_mlp_dispatches_to_the_backends_expert_mlp(monkeypatch):
    calls = []

    def fake_expert_mlp(x, rows, topo, weights, activation, recompute_hidden):
        calls.append(activation)
        return jnp.zeros_like(x)

    fake = products.backend("xla")._replace(expert_mlp=fake_expert_mlp)
    monkeypatch.setattr(products, "backend", lambda impl: fake)
    dispatch, topo, ops = _routed_case(False)
    rows = RowMap(dispatch.row_tokens, jnp.ones(topo.padded_rows), dispatch.assignment_rows)
    weights = ExpertWeights(ops["w1"], None, ops["w2"])
    expert_mlp.routed_mlp(ops["x"], rows, topo, weights, activation="gelu", impl="xla")
    assert calls == ["gelu"]


def test_bad_activation_name():
    dispatch, topo, ops = _routed_case(False)
    with pytest.raises(ValueError, match=r"activation must be one of \('gelu', 'swiglu'\)"):
        weights = ExpertWeights(ops["w1"], None, ops["w2"])
        expert_mlp.routed_mlp(ops["x"], None, topo, weights, activation="relu", impl="xla")
