"""Writes the tiny Hugging Face checkpoints tests/test_hf.py and
tests/test_generate.py check jmoe against (needs torch and transformers;
run by hand, not by the test suite):

    python3.11 -m venv .venv-hf && .venv-hf/bin/pip install torch==2.13.0 transformers==5.24.0 \
        safetensors numpy
    .venv-hf/bin/python scripts/make_hf_fixtures.py   # any venv with torch + transformers

For each architecture, ``tests/fixtures/hf/<name>/`` gets ``config.json`` and
safetensors weights written by transformers' ``save_pretrained`` (per-expert
layout; ``qwen3_moe`` sharded with an index), and ``expected.npz``: the
logits of ``logits_tokens`` and the greedy continuation ``generated`` of
``generate_prompt`` by transformers' ``generate``; for ``qwen2_moe`` also
transformers' training loss of ``logits_tokens`` as their own labels with
``output_router_logits=True``: ``loss`` (cross-entropy + coef * aux),
``aux_loss`` (its ``load_balancing_loss_func``, unweighted) and
``router_aux_loss_coef``. Names on the command line write only those
architectures (``... make_hf_fixtures.py qwen2_moe deepseek_v3``). ``mixtral_fused/`` holds the
Mixtral weights as transformers keeps them in memory (fused experts,
``mlp.experts.gate_up_proj``), for the fused-layout loader. Weights are random
with scales large enough that routing is far from uniform (printed).

`add_loss_expectations` adds transformers' training loss to ``expected.npz``
(``--loss-only``: for the existing fixtures, leaving the other arrays as they are).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "hf"
LOGITS_SHAPE, PROMPT_LEN, NEW_TOKENS = (2, 12), 6, 10

COMMON = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    num_experts_per_tok=2,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    eos_token_id=None,
)
MODELS = {
    "mixtral": transformers.MixtralConfig(
        **COMMON,
        vocab_size=96,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=32,
        num_local_experts=8,
        rope_theta=1e6,
        tie_word_embeddings=False,
    ),
    "qwen3_moe": transformers.Qwen3MoeConfig(
        **COMMON,
        vocab_size=100,
        num_key_value_heads=2,
        head_dim=16,
        moe_intermediate_size=24,
        intermediate_size=48,
        num_experts=8,
        norm_topk_prob=True,
        rope_theta=10_000.0,
        tie_word_embeddings=True,
    ),
    "olmoe": transformers.OlmoeConfig(
        **COMMON,
        vocab_size=80,
        num_key_value_heads=4,
        intermediate_size=32,
        num_experts=8,
        norm_topk_prob=False,
        rope_theta=10_000.0,
        tie_word_embeddings=False,
    ),
    "qwen2_moe": transformers.Qwen2MoeConfig(
        **{**COMMON, "num_hidden_layers": 3},
        vocab_size=88,
        num_key_value_heads=2,
        intermediate_size=48,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=40,
        num_experts=8,
        norm_topk_prob=False,
        mlp_only_layers=[1],
        qkv_bias=True,
        router_aux_loss_coef=0.02,
        rope_theta=10_000.0,
        tie_word_embeddings=False,
    ),
    "deepseek_v3": transformers.DeepseekV3Config(
        **{**COMMON, "num_hidden_layers": 3},
        vocab_size=72,
        num_key_value_heads=4,
        intermediate_size=40,
        moe_intermediate_size=16,
        n_routed_experts=8,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        first_k_dense_replace=1,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
        rope_interleave=True,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10_000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.8,
            "mscale_all_dim": 1.0,
        },
        tie_word_embeddings=False,
    ),
}
SHARD = {"qwen3_moe": "150KB"}
# Architectures whose expected.npz also holds transformers' training loss.
WITH_LOSS = ("qwen2_moe",)


def randomize(model: torch.nn.Module, generator: torch.Generator):
    """Norm scales around 1, routers and other weights with a spread that makes
    routing decisive and logits far from uniform."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("gate.weight"):  # routers
                param.copy_(0.5 * noise)
            elif "embed_tokens" in name:
                param.copy_(noise)
            elif name == "lm_head.weight":
                param.copy_(0.6 * noise)
            else:
                param.copy_(0.2 * noise)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's selection bias
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))


def routing_sharpness(model, tokens) -> float:
    """Mean over tokens and layers of the top router probability (1/E: uniform)."""
    out = model(tokens, output_router_logits=True)
    probs = [
        torch.sigmoid(logits.float()) / torch.sigmoid(logits.float()).sum(-1, keepdim=True)
        if model.config.model_type == "deepseek_v3"  # sigmoid scores, normalised
        else torch.softmax(logits.float(), dim=-1)
        for logits in out.router_logits
    ]
    return float(torch.stack([p.max(-1).values.mean() for p in probs]).mean())


def greedy_margin(model, sequence, prompt_len) -> float:
    """Smallest gap between the best and second-best logit at the generated positions."""
    logits = model(sequence).logits[:, prompt_len - 1 : -1]
    top2 = logits.topk(2, dim=-1).values
    return float((top2[..., 0] - top2[..., 1]).min())


def make(name: str, config, seed: int):
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    ).eval()
    randomize(model, generator)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    rng = np.random.default_rng(seed)
    logits_tokens = torch.tensor(rng.integers(0, config.vocab_size, LOGITS_SHAPE))
    prompt = torch.tensor(rng.integers(0, config.vocab_size, (2, PROMPT_LEN)))
    with torch.no_grad():
        logits = model(logits_tokens).logits
        generated = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
        )
        assert generated.shape == (2, PROMPT_LEN + NEW_TOKENS), generated.shape
        margin = greedy_margin(model, generated, PROMPT_LEN)
        sharpness = routing_sharpness(model, logits_tokens)
        losses = {}
        if name in WITH_LOSS:
            out = model(logits_tokens, labels=logits_tokens, output_router_logits=True)
            losses = dict(
                loss=np.float32(out.loss.item()),
                aux_loss=np.float32(out.aux_loss.item()),
                router_aux_loss_coef=np.float32(config.router_aux_loss_coef),
            )
    folder = OUT / name
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder, max_shard_size=SHARD.get(name, "10GB"))
    (folder / "generation_config.json").unlink(missing_ok=True)
    np.savez(
        folder / "expected.npz",
        logits_tokens=logits_tokens.numpy().astype(np.int32),
        logits=logits.numpy().astype(np.float32),
        generate_prompt=prompt.numpy().astype(np.int32),
        generated=generated.numpy().astype(np.int32),
        **losses,
    )
    print(
        f"{name}: files {sorted(p.name for p in folder.iterdir())}, "
        f"mean top router prob {sharpness:.2f} (uniform {1 / 8:.3f}), "
        f"smallest greedy logit margin {margin:.3f}, max |logit| {logits.abs().max():.2f}"
    )
    return model, folder


def write_fused(model, source: Path, name: str):
    """The in-memory (fused-expert) state dict as one safetensors file."""
    folder = OUT / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copy(source / "config.json", folder / "config.json")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    fused = sorted(k for k in state if "gate_up_proj" in k)
    print(f"{name}: {len(state)} tensors, e.g. {fused[0]} {list(state[fused[0]].shape)}")


LOSS_AUX_COEF, LOSS_PAD = 0.5, 4  # a coefficient that makes the aux gradient count


def add_loss_expectations(name: str):
    """transformers' training loss on ``logits_tokens`` into ``expected.npz``:
    ``aux_loss`` (``output_router_logits=True``, no mask, unweighted) and,
    with ``router_aux_loss_coef=LOSS_AUX_COEF``, the last ``LOSS_PAD`` tokens
    of row 1 padding (``loss_mask``, labels -100 there): ``loss`` (CE +
    coef * aux), ``loss_ce``, ``loss_aux`` (masked, unweighted), every
    parameter's gradient norm (``grad_names``, ``grad_norms``; in-memory names,
    fused experts) and the routers' full gradients (``grad.<name>``)."""
    folder = OUT / name
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager", dtype=torch.float32
    ).eval()
    with np.load(folder / "expected.npz") as data:
        want = dict(data)
    tokens = torch.tensor(want["logits_tokens"], dtype=torch.long)
    with torch.no_grad():
        aux = model(tokens, output_router_logits=True).aux_loss
    mask = torch.ones_like(tokens)
    mask[1, -LOSS_PAD:] = 0
    model.router_aux_loss_coef = LOSS_AUX_COEF
    out = model(
        tokens,
        attention_mask=mask,
        labels=tokens.masked_fill(mask == 0, -100),
        output_router_logits=True,
    )
    out.loss.backward()
    grads = {n: p.grad.numpy() for n, p in model.named_parameters()}
    routers = [n for n in grads if n.endswith(".gate.weight")]  # not shared_expert_gate
    # architectures without an aux loss (DeepSeek-V3's "noaux_tc") report None
    masked_aux = torch.zeros(()) if out.aux_loss is None else out.aux_loss.detach()
    aux = torch.zeros(()) if aux is None else aux
    want.update(
        aux_loss=np.float32(aux),
        loss_mask=mask.numpy().astype(np.int32),
        loss_aux_coef=np.float32(LOSS_AUX_COEF),
        loss=np.float32(out.loss.detach()),
        loss_ce=np.float32(out.loss.detach() - LOSS_AUX_COEF * masked_aux),
        loss_aux=np.float32(masked_aux),
        grad_names=np.array(list(grads)),
        grad_norms=np.array([np.linalg.norm(g) for g in grads.values()], np.float32),
        **{f"grad.{n}": grads[n] for n in routers},
    )
    np.savez(folder / "expected.npz", **want)
    print(f"{name}: loss {float(out.loss.detach()):.5f}, aux {float(aux):.5f}, routers {routers}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Writes tests/fixtures/hf.")
    parser.add_argument("names", nargs="*", help=f"some of {list(MODELS)} (default: all)")
    parser.add_argument(
        "--loss-only",
        action="store_true",
        help="only add transformers' training loss and gradients to existing fixtures",
    )
    args = parser.parse_args(argv)
    names = args.names or list(MODELS)
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown architectures {unknown}; choose from {list(MODELS)}")
    torch.set_num_threads(1)
    if args.loss_only:
        for name in names:
            add_loss_expectations(name)
        return
    for seed, (name, config) in enumerate(MODELS.items()):  # seeds fixed by the order
        if name not in names:
            continue
        model, folder = make(name, config, seed)
        if name == "mixtral":
            write_fused(model, folder, "mixtral_fused")
        add_loss_expectations(name)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(
        f"transformers {transformers.__version__}, torch {torch.__version__}: "
        f"{total / 1e6:.2f} MB in {OUT}"
    )


if __name__ == "__main__":
    main()
