"""jmoe.generate: greedy decoding reproduces transformers' generate token for
token (fixtures from scripts/make_hf_fixtures.py), equals greedy decoding by
full recomputation without a cache, traces its decode step once (not per
token), keeps the decode step's expert GEMMs at the batch's assignments (no
expert x block padding), samples within top-k / top-p, and validates input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jmoe
import jmoe.hf
from helpers.hf_fixtures import FIXTURES, expected, random_model
from helpers.jaxpr_tools import all_eqns
from jmoe import MoEConfig
from jmoe.decoding import greedy_tokens, sample_logits
from jmoe.mla import MLAConfig
from jmoe.transformer import MoETransformer, TransformerConfig
from jmoe.yarn import YarnScaling

VOCAB = 40


def _config(ffn="dmoe", **kw):
    moe = MoEConfig(
        d_model=32,
        d_ff=16,
        num_experts=4,
        top_k=2,
        expert_type="glu",
        normalize_top_k=1.0,
        impl="xla",
    )
    return TransformerConfig(
        **{
            **dict(
                vocab_size=VOCAB,
                d_model=32,
                num_layers=2,
                num_heads=4,
                num_kv_heads=2,
                max_seq_len=16,
                moe=moe,
                ffn=ffn,
            ),
            **kw,
        }
    )


def _prompt(batch=3, length=5, seed=0, vocab=VOCAB):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


def _reference_model(config, seed=0):
    """The same random weights with ``ragged_dot`` products (an independent expert path)."""
    return random_model(config.replace(moe=config.moe.replace(impl="ragged_dot")), seed)


def _greedy_by_recomputation(model, prompt, new_tokens):
    """Greedy decoding that runs the whole sequence through ``model(tokens)``
    each step, without a cache. The sequence is padded to its final length so
    one compiled forward serves every step: position ``t``'s logits do not
    depend on later positions (causal attention, per-token dropless routing)."""
    batch, length = prompt.shape
    forward = jax.jit(lambda m, t: m(t)[0])
    tokens = np.zeros((batch, length + new_tokens), np.int32)
    tokens[:, :length] = prompt
    for t in range(length, length + new_tokens):
        tokens[:, t] = np.argmax(np.asarray(forward(model, tokens))[:, t - 1], axis=-1)
    return tokens


@pytest.fixture(scope="module")
def mixtral_runs():
    """Generates twice from the Mixtral fixture (same shapes, other prompt values)
    counting how often the model's cached forward is traced."""
    traces = []
    original = MoETransformer.cached

    def counting(self, tokens, caches, position, **kw):
        traces.append(tokens.shape)
        return original(self, tokens, caches, position, **kw)

    MoETransformer.cached = counting
    try:
        model = jmoe.hf.load(FIXTURES / "mixtral")
        want = expected("mixtral")
        new = want["generated"].shape[1] - want["generate_prompt"].shape[1]
        first = jmoe.generate(model, want["generate_prompt"], new)
        after_first = list(traces)
        second = jmoe.generate(model, (want["generate_prompt"] + 1) % 96, new)
    finally:
        MoETransformer.cached = original
    return want, first, second, after_first, traces


def test_greedy_matches_transformers(mixtral_runs):
    want, first, second, _, _ = mixtral_runs
    assert first.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(first), want["generated"])
    assert not np.array_equal(np.asarray(second)[:, 6:], want["generated"][:, 6:])


def test_decode_step_is_traced_once(mixtral_runs):
    """Prefill traced once with the prompt, the decode step once with one token
    (10 new tokens); a second call with the same shapes traces nothing."""
    want, _, _, after_first, traces = mixtral_runs
    assert after_first == [(2, 6), (2, 1)]
    assert traces == after_first


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v3"])
def test_greedy_matches_transformers_other_architectures(name):
    want = expected(name)
    model = jmoe.hf.load(FIXTURES / name)
    new = want["generated"].shape[1] - want["generate_prompt"].shape[1]
    np.testing.assert_array_equal(
        np.asarray(jmoe.generate(model, want["generate_prompt"], new)), want["generated"]
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(ffn="dense"),
        dict(qk_norm="projection", num_kv_heads=None, head_dim=6, tie_embeddings=True),
    ],
)
def test_greedy_equals_recomputation(kw):
    config = _config(**kw)
    prompt = _prompt()
    np.testing.assert_array_equal(
        np.asarray(jmoe.generate(random_model(config), prompt, 7)),
        _greedy_by_recomputation(_reference_model(config), prompt, 7),
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "kw",
    [
        dict(qk_norm="head"),
        dict(
            mla=MLAConfig(
                kv_lora_rank=12,
                qk_nope_head_dim=6,
                qk_rope_head_dim=4,
                v_head_dim=5,
                q_lora_rank=10,
                yarn=YarnScaling(
                    factor=2.0, original_max_position_embeddings=4, mscale=0.9, mscale_all_dim=1.0
                ),
            ),
            routed_layers=(1,),
            dense_hidden=24,
        ),
    ],
    ids=["gqa", "mla"],
)
def test_cached_forward_equals_full_forward(kw):
    """Prefill of 5 positions then 3 single-token steps give the full forward's
    logits (for MLA: the absorbed latent-cache path vs expanded keys/values)."""
    model = _reference_model(_config(**kw))
    tokens = jnp.asarray(_prompt(length=8))
    full, _ = jax.jit(lambda m, t: m(t))(model, tokens)
    cached = jax.jit(lambda m, t, c, p: m.cached(t, c, p))
    caches = model.init_cache(3, 8)
    logits, caches = cached(model, tokens[:, :5], caches, jnp.int32(0))
    steps = [logits]
    for p in range(5, 8):
        logits, caches = cached(model, tokens[:, p : p + 1], caches, jnp.int32(p))
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)
    last, _ = jax.jit(lambda m, t, c: m.cached(t, c, jnp.int32(0), last_only=True))(
        model, tokens[:, :5], model.init_cache(3, 8)
    )
    np.testing.assert_allclose(last, full[:, 4:5], atol=1e-5, rtol=1e-5)


def test_decode_expert_gemms_scale_with_assignments():
    """The decode step's expert GEMMs (``x @ w[e]``, batched over experts) have
    at most ``batch * k`` rows each: the dropless layout of a few tokens is not
    padded to blocks."""
    config = _config(
        moe=MoEConfig(
            d_model=32,
            d_ff=16,
            num_experts=8,
            top_k=2,
            expert_type="glu",
            block_size=128,
            impl="xla",
        )
    )
    model = random_model(config)
    batch = 3
    caches = model.init_cache(batch, 8)
    graphdef, state = nnx.split(model)
    step = lambda state, token, caches: nnx.merge(graphdef, state).cached(
        token, caches, jnp.int32(4)
    )
    jaxpr = jax.make_jaxpr(step)(state, jnp.zeros((batch, 1), jnp.int32), caches)
    expert_weights = {(8, 32, 16), (8, 16, 32)}  # [E, d_model, d_ff], [E, d_ff, d_model]
    expert_rows = [  # the batched GEMMs' lhs: [E, slots, d] (`fused_mlp._few_rows`)
        eqn.invars[0].aval.shape[-2]
        for eqn in all_eqns(jaxpr)
        if eqn.primitive.name == "dot_general" and eqn.invars[1].aval.shape in expert_weights
    ]
    assert expert_rows and max(expert_rows) <= batch * 2, expert_rows


def test_greedy_tokens_equal_argmax():
    """The first maximum, as ``jnp.argmax``: ties, a NaN (counts as the maximum, the
    first one wins), +inf, an all -inf row, an all-equal row, random rows."""
    logits = jax.random.normal(jax.random.key(0), (9, 300))
    logits = logits.at[0, [7, 100]].set(9.0)  # a tie: the first wins
    logits = logits.at[1, [5, 9]].set(jnp.nan)
    logits = logits.at[2, 250].set(jnp.inf)
    logits = logits.at[3].set(-jnp.inf)
    logits = logits.at[4].set(0.0)
    logits = logits.at[5, [3, 200]].set(jnp.inf)
    got = jax.jit(greedy_tokens)(logits)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, jnp.argmax(logits, axis=-1))
    np.testing.assert_array_equal(got[:6], [7, 5, 250, 0, 0, 3])


def test_sample_logits_respects_top_k_and_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.split(jax.random.key(0), 2)
    top_k = np.asarray(sample_logits(logits, keys[0], 1.0, 2, None))
    assert set(top_k) == {0, 1}
    top_p = np.asarray(sample_logits(logits, keys[1], 1.0, None, 0.8))  # 0.5 + 0.3 reaches 0.8
    assert set(top_p) == {0, 1} and abs((top_p == 0).mean() - 0.5 / 0.8) < 0.03
    tiny_p = np.asarray(sample_logits(logits, keys[1], 1.0, None, 1e-6))
    assert set(tiny_p) == {0}
    np.testing.assert_array_equal(sample_logits(logits[:2], None, 0.0, None, None), [0, 0])


@pytest.mark.slow
def test_sampling_is_reproducible_and_top_k_one_is_greedy():
    model = random_model(_config())
    prompt = _prompt()
    greedy = jmoe.generate(model, prompt, 6)
    one = jmoe.generate(model, prompt, 6, temperature=0.7, top_k=1, rng=jax.random.key(3))
    np.testing.assert_array_equal(one, greedy)
    a, b, c = (
        jmoe.generate(model, prompt, 6, temperature=1.5, rng=jax.random.key(seed))
        for seed in (1, 1, 2)
    )
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(
    "args, kw, match",
    [
        ((np.zeros((2, 3), np.float32), 4), {}, "prompt must be an int array"),
        ((np.zeros((3,), np.int32), 4), {}, "prompt must be an int array"),
        ((np.zeros((2, 3), np.int32), 0), {}, "max_new_tokens must be a positive int"),
        ((np.zeros((2, 10), np.int32), 7), {}, "exceeds max_seq_len=16"),
        ((np.full((2, 3), VOCAB, np.int32), 4), {}, "prompt token ids must be in"),
        ((np.zeros((2, 3), np.int32), 4), dict(temperature=1.0), "rng is required"),
        ((np.zeros((2, 3), np.int32), 4), dict(temperature=-1.0), "temperature must be >= 0"),
        ((np.zeros((2, 3), np.int32), 4), dict(top_k=0), "top_k must be None or in"),
        ((np.zeros((2, 3), np.int32), 4), dict(top_p=1.5), "top_p must be None or in"),
    ],
)
def test_generate_validates_input(args, kw, match):
    model = nnx.eval_shape(lambda: MoETransformer(_config(), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=match):
        jmoe.generate(model, *args, **kw)
