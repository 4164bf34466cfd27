"""GPU-only checks (``pytest -m gpu``; run by ``scripts/gpu_check.sh``): the
kernels compiled on the device against `pallas_kernels.reference`, the whole
layer against ``impl="xla"`` on the same GPU, a short LM run, and the compiled
Mosaic kernels' ptxas / SASS report. Skipped as a module without a GPU.

Every product check runs through the differentiable products API and
compares the output and both operand gradients (VJPs) with the reference's,
computed by autodiff on clean inputs, while the kernels get NaN in every row
outside a group (input and cotangent): output rows there and the gradients of
those rows must be exactly zero, and so must empty experts' weight gradients.

Tolerances, relative to the largest reference magnitude (at least 1): float16
5e-3 and bfloat16 2e-2 (8-bit mantissa, float32 accumulation); float32 1e-2
(Triton's float32 dots run as TF32, 10-bit mantissa).
"""

import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jmoe import DroplessMoE, MoEConfig
from pallas_kernels import products, reference
from pallas_kernels.topology import make_topology

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (pytest -m gpu)"),
]

TOLERANCE = {
    jnp.dtype(jnp.float32): 1e-2,
    jnp.dtype(jnp.bfloat16): 2e-2,
    jnp.dtype(jnp.float16): 5e-3,
}
NUM_EXPERTS = 4


def _capability() -> tuple[int, int]:
    return products._nvidia_capability(jax.devices()[0]) or (0, 0)


def _needs(impl: str):
    """Skips unless ``impl``'s kernels run on this GPU (`products.impl_for_device`)."""
    capability = _capability()
    if impl == "mosaic" and capability != products.MOSAIC_CAPABILITY:
        pytest.skip(f"mosaic needs sm_90, this GPU is sm_{capability[0]}{capability[1]}")
    if impl == "triton" and capability < products.TRITON_MIN_CAPABILITY:
        pytest.skip(f"triton needs sm_80+, this GPU is sm_{capability[0]}{capability[1]}")


def _case(impl, group_sizes, dtype, *, block_size=64, k=128, n=192, slack=5, seed=0):
    """Topology of ``group_sizes`` (+ ``slack`` unrouted rows) and operands:
    ``clean`` (zeros outside the groups) and ``poisoned`` (NaN there)."""
    group_sizes = jnp.asarray(group_sizes, jnp.int32)
    topo = make_topology(
        group_sizes, int(group_sizes.sum()) + slack, products.layout_block_size(impl, block_size)
    )
    valid = topo.row_is_valid()[:, None]
    keys = iter(jax.random.split(jax.random.key(seed), 8))
    normal = lambda *shape: jax.random.normal(next(keys), shape, jnp.float32)
    rows = dict(
        x=normal(topo.padded_rows, k),
        h=normal(topo.padded_rows, n),
        dy=normal(topo.padded_rows, n),
        dx=normal(topo.padded_rows, k),
    )
    clean = {name: jnp.where(valid, v, 0).astype(dtype) for name, v in rows.items()}
    poisoned = {name: jnp.where(valid, v, jnp.nan).astype(dtype) for name, v in rows.items()}
    weights = dict(
        w=(normal(NUM_EXPERTS, k, n) / np.sqrt(k)).astype(dtype),
        g=normal(NUM_EXPERTS, k, n).astype(dtype),
    )
    return topo, {**clean, **weights}, {**poisoned, **weights}


def _vjps(topo, a, *, impl=None):
    """``name -> (out, d lhs, d rhs)`` of sdd ``x @ w``, dsd ``h @ wᵀ`` and dstd
    ``xᵀ dy``; ``impl=None`` is the reference."""
    if impl is None:
        sdd = lambda x, w: reference.grouped_matmul(x, w, topo)
        dsd_t = lambda h, w: reference.grouped_matmul(h, w, topo, transpose_rhs=True)
        dstd = lambda x, dy: reference.grouped_weight_grad(x, dy, topo)
    else:
        sdd = lambda x, w: products.sdd(x, w, topo, impl=impl)
        dsd_t = lambda h, w: products.dsd(h, w, topo, transpose_rhs=True, impl=impl)
        dstd = lambda x, dy: products.dstd(x, dy, topo, out_dtype=jnp.float32, impl=impl)
    out = {}
    for name, fn, args, cotangent in (
        ("sdd", sdd, (a["x"], a["w"]), a["dy"]),
        ("dsd_t", dsd_t, (a["h"], a["w"]), a["dx"]),
        ("dstd", dstd, (a["x"], a["dy"]), a["g"]),
    ):
        y, vjp = jax.vjp(fn, *args)
        out[name] = (y, *vjp(cotangent.astype(y.dtype)))
    return out


def _check_products(impl, group_sizes, dtype, **case):
    topo, clean, poisoned = _case(impl, group_sizes, dtype, **case)
    got = jax.jit(lambda a: _vjps(topo, a, impl=impl))(poisoned)
    want = _vjps(topo, clean)
    invalid = ~np.asarray(topo.row_is_valid())
    empty = np.asarray(topo.group_sizes) == 0
    for name in want:
        for part, g, w in zip(("out", "d lhs", "d rhs"), got[name], want[name]):
            g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
            assert g.shape == w.shape, (name, part)
            scale = max(1.0, float(np.abs(w).max()))
            tol = TOLERANCE[jnp.dtype(dtype)] * scale
            np.testing.assert_allclose(g, w, atol=tol, rtol=0, err_msg=f"{impl} {name} {part}")
            if g.shape[0] == topo.padded_rows:  # row outputs: zero outside the groups
                assert np.all(g[invalid] == 0), f"{name} {part}: nonzero padding rows"
            else:  # [E, ...]: empty experts exactly zero
                assert np.all(g[empty] == 0), f"{name} {part}: nonzero empty-expert rows"


# Group sizes: empty experts, a group of block + 3 rows, a one-row group.
MIXED = lambda block: [0, block + 3, 1, 0]
EDGE_CASES = {
    "one_token": [0, 1, 0, 0],
    "all_on_one_expert": [0, 0, 300, 0],
    "no_multiple_of_the_tile": [129, 77, 0, 191],
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("block_size", [32, 64, 128])
def test_triton_products(block_size, dtype):
    _needs("triton")
    _check_products("triton", MIXED(block_size), dtype, block_size=block_size)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_mosaic_products(dtype):
    _needs("mosaic")
    _check_products("mosaic", MIXED(128), dtype)


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
@pytest.mark.parametrize("impl", ["triton", "mosaic", "ragged_dot"])
def test_edge_routings(impl, case):
    _needs(impl)
    _check_products(impl, EDGE_CASES[case], jnp.bfloat16, block_size=128)


def _layer_grads(config, x):
    layer = DroplessMoE(config, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(x, params):
        y, aux = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(jnp.sin(y.astype(jnp.float32))) + aux["load_balancing_loss"], y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, params)
    return y, grads


@pytest.mark.parametrize("impl", ["triton", "mosaic", "ragged_dot", "auto"])
def test_layer_matches_xla_on_this_gpu(impl):
    """The whole dMoE (glu, E 8, top-2, 200 tokens) forward and backward, bf16."""
    if impl != "auto":
        _needs(impl)
    config = MoEConfig(
        d_model=128,
        d_ff=256,
        num_experts=8,
        top_k=2,
        expert_type="glu",
        dtype=jnp.bfloat16,
        param_dtype=jnp.float32,
        impl=impl,
    )
    x = jax.random.normal(jax.random.key(1), (200, 128), jnp.bfloat16)
    got = jax.tree.leaves(_layer_grads(config, x))
    want = jax.tree.leaves(_layer_grads(config.replace(impl="xla"), x))
    assert len(got) == len(want)
    for g, w in zip(got, want):  # max error relative to the largest value: bf16 rounding
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.all(np.isfinite(g))
        assert np.abs(g - w).max() <= 2e-2 * max(1e-6, float(np.abs(w).max()))


def test_xs_lm_loss_falls_in_20_steps():
    """The xs LM (dMoE, ``impl="auto"``, bfloat16 compute) on a fixed batch."""
    import dataclasses

    import optax

    from experiments.presets import preset
    from jmoe.transformer import MoETransformer

    base = preset("xs")
    config = dataclasses.replace(base, moe=base.moe.replace(dtype=jnp.bfloat16))
    model = MoETransformer(config, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    # 16 distinct ids: learning their frequencies alone takes the loss from ln 256 to ln 16.
    tokens = jax.random.randint(jax.random.key(0), (16, config.max_seq_len + 1), 0, 16)

    @nnx.jit
    def step(model, opt, tokens):
        def loss_fn(model):
            logits, aux = model(tokens[:, :-1])
            ce = optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), tokens[:, 1:]
            ).mean()
            return ce + aux["aux_loss"]

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt, tokens)) for _ in range(20)]
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < 0.8 * losses[0], losses


_DUMP_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from pallas_kernels.mosaic import gmm, tgmm
    from pallas_kernels.mosaic.config import gmm_config, tgmm_config
    sizes = jnp.array([700, 0, 333, 1], jnp.int32)
    x = jnp.ones((1034, 512), jnp.bfloat16)
    w = jnp.ones((4, 512, 1024), jnp.bfloat16)
    dy = jnp.ones((1034, 1024), jnp.bfloat16)
    bf16 = jnp.bfloat16
    for deep in (False, True):  # the default tiles and the deep (block_k 32, 6 stages) ones
        g = gmm_config(1034, 1024, 4, bf16, bf16, deep=deep)
        t = tgmm_config(512, 1024, bf16, bf16, deep=deep)
        jax.block_until_ready(jax.jit(lambda x, w: gmm(x, w, sizes, config=g))(x, w))
        jax.block_until_ready(jax.jit(lambda x, dy: tgmm(x, dy, sizes, config=t))(x, dy))
""")


@pytest.mark.parametrize("deep", [False, True], ids=["bk64x4", "bk32x6"])
def test_mosaic_kernel_tiles_match_ragged_dot(deep):
    """gmm and tgmm compiled with the default and the deep tiles (the two
    variants the benchmark times) vs ``lax.ragged_dot`` on the same GPU, NaN
    rows past the groups, an empty group, a one-row group."""
    _needs("mosaic")
    from pallas_kernels.mosaic import gmm, tgmm
    from pallas_kernels.mosaic.config import gmm_config, tgmm_config

    sizes = jnp.array([700, 0, 333, 1], jnp.int32)
    m, k, n, used = 1040, 512, 1024, 1034
    keys = jax.random.split(jax.random.key(int(deep)), 3)
    valid = (jnp.arange(m) < used)[:, None]
    x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    dy = jax.random.normal(keys[1], (m, n), jnp.bfloat16)
    w = (jax.random.normal(keys[2], (4, k, n)) / np.sqrt(k)).astype(jnp.bfloat16)
    g = gmm_config(m, n, 4, jnp.bfloat16, jnp.float32, deep=deep)
    t = tgmm_config(k, n, jnp.bfloat16, jnp.float32, deep=deep)
    out = jax.jit(lambda x, w: gmm(x, w, sizes, out_dtype=jnp.float32, config=g))(
        jnp.where(valid, x, jnp.nan), w
    )
    dw = jax.jit(lambda x, dy: tgmm(x, dy, sizes, out_dtype=jnp.float32, config=t))(
        jnp.where(valid, x, jnp.nan), jnp.where(valid, dy, jnp.nan)
    )
    x0, dy0 = jnp.where(valid, x, 0), jnp.where(valid, dy, 0)
    want = jax.lax.ragged_dot(x0, w, sizes, preferred_element_type=jnp.float32)
    want_dw = jnp.stack(
        [
            x0[s : s + z].astype(jnp.float32).T @ dy0[s : s + z].astype(jnp.float32)
            for s, z in ((0, 700), (700, 0), (700, 333), (1033, 1))
        ]
    )
    assert not np.any(np.asarray(out[used:])), "rows in no group must be exactly zero"
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(np.asarray(dw), np.asarray(want_dw), rtol=1e-3, atol=1e-2)
    assert not np.any(np.asarray(dw[1])), "an empty group's gradient must be exactly zero"


def test_mosaic_kernels_do_not_spill_or_serialize_wgmma(tmp_path):
    """ptxas ``-v`` and SASS of the compiled gmm and tgmm, default and deep tiles (Mosaic GPU's dump
    switches, read at compile time, hence a fresh process): no spills, no
    serialized wgmma warning, and the SASS holds HGMMA (wgmma) instructions."""
    _needs("mosaic")
    env = {
        **os.environ,
        "MOSAIC_GPU_DUMP_PTXAS": "1",
        "MOSAIC_GPU_DUMP_SASS": "1",
        "MOSAIC_GPU_DUMP_TO": str(tmp_path),
        "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])),
    }
    run = subprocess.run(
        [sys.executable, "-c", _DUMP_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    # The dumps go to stdout or to files under MOSAIC_GPU_DUMP_TO: read both.
    log = (
        run.stdout
        + run.stderr
        + "".join(
            path.read_text(errors="replace") for path in tmp_path.rglob("*") if path.is_file()
        )
    )
    registers = re.findall(r"Used (\d+) registers", log)
    assert registers, "no ptxas report in the output:\n" + log[-3000:]
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    assert not any(spills), f"register spills: {spills}\n" + log[-3000:]
    assert "serialized" not in log, "ptxas serialized wgmma:\n" + log[-3000:]
    assert "HGMMA" in log, "no wgmma (HGMMA) in the SASS dump"


def test_benchmark_rows_on_this_gpu(tmp_path):
    """`benchmarks.gpu_kernels` rows (what gpu_check times) are correct here: mosaic, the
    mgpu peers and lax.ragged_dot against per-expert dense dots, at a small shape."""
    _needs("mosaic")
    from benchmarks import gpu_kernels
    from benchmarks.gpu_rows import RowWriter, read_rows
    from benchmarks.shapes import Shape

    shape, problems = Shape(512, 256, 256, 8, 2), {}
    writer = RowWriter(str(tmp_path / "rows.jsonl"), "kernels")
    for impl in ("mosaic", "mosaic-bk32x6", "ragged_dot_mgpu", "lax.ragged_dot"):
        for op in gpu_kernels.OPS:
            gpu_kernels.measure_op(writer, "small", shape, impl, op, problems, 1, 2)
    rows = [row for row in read_rows(tmp_path / "rows.jsonl") if "status" in row]
    assert len(rows) == 8
    for row in rows:
        assert row["status"] == "ok", row
        assert row["max_rel_err"] < 2e-2, row
    assert isinstance(rows[-2]["lowering"]["cudnn"], bool)


def test_packed_attention_runs_on_cudnn_and_matches_xla():
    """Packed documents in bfloat16: `jmoe.attention.attention` compiles to cuDNN's fused
    kernel, and its output and q/k/v gradients equal XLA's float32 attention under the
    same segment mask (a row of two documents, a row with trailing padding)."""
    from jmoe.attention import attention, same_segment

    batch, seq, heads, kv_heads, head_dim = 2, 256, 8, 2, 64
    rng = np.random.default_rng(0)
    q = rng.standard_normal((batch, seq, heads, head_dim))
    k, v = (rng.standard_normal((batch, seq, kv_heads, head_dim)) for _ in range(2))
    cotangent = rng.standard_normal(q.shape)
    segments = np.stack(
        [np.repeat([1, 2], [100, 156]), np.repeat([1, 2, 0], [30, 200, 26])]
    ).astype(np.int32)
    mask = same_segment(jnp.asarray(segments))

    def loss(q, k, v, implementation=None):
        if implementation is None:
            out = attention(q, k, v, mask, is_causal=True)
        else:
            out = jax.nn.dot_product_attention(
                q, k, v, mask=mask, is_causal=True, implementation=implementation
            )
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    bf16 = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)]
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    assert "cudnn" in step.lower(*bf16).compile().as_text().lower()
    (_, got), got_grads = step(*bf16)
    f32 = [a.astype(jnp.float32) for a in bf16]  # the same inputs, float32 arithmetic
    (_, want), want_grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        *f32, implementation="xla"
    )
    for g, w in zip((got, *got_grads), (want, *want_grads)):
        w = np.asarray(w)
        scale = max(1.0, float(np.abs(w).max()))
        np.testing.assert_allclose(
            np.asarray(g, np.float32), w, atol=TOLERANCE[jnp.dtype(jnp.bfloat16)] * scale
        )
