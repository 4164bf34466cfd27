"""Independent NumPy (float64) references for the tests.

Plain Python loops over rows and tokens with hand-written backward passes. This
file shares no code with ``jmoe`` or ``pallas_kernels`` (it reads only a
config's plain attributes), so a test comparing the two can fail.
"""

from __future__ import annotations

import numpy as np

# --------------------------------------------------------------------------- layout


def bins(group_sizes, block_size: int) -> list[tuple[int, int, int]]:
    """``(expert, first row, padded rows)`` of each expert's bin, in expert order."""
    out, row = [], 0
    for expert, size in enumerate(int(g) for g in group_sizes):
        padded = -(-size // block_size) * block_size
        out.append((expert, row, padded))
        row += padded
    return out


def layout(group_sizes, block_size: int, num_rows: int):
    """``(row_expert [num_rows], valid [num_rows] bool)`` of the padded layout.

    ``row_expert`` is ``E`` past the last bin; ``valid`` marks the rows that
    hold an assignment (the first ``group_sizes[e]`` rows of each bin).
    """
    num_experts = len(group_sizes)
    row_expert = np.full(num_rows, num_experts, np.int64)
    valid = np.zeros(num_rows, bool)
    for expert, start, padded in bins(group_sizes, block_size):
        row_expert[start : start + padded] = expert
        valid[start : start + int(group_sizes[expert])] = True
    return row_expert, valid


def worst_case_block_rows(num_rows: int, num_experts: int, block_size: int) -> int:
    """Most blocks any split of at most ``num_rows`` rows over the experts needs,
    by exhaustive search over group sizes (small arguments only)."""
    best = {0: 0}  # rows used -> most blocks, over the experts seen so far
    for _ in range(num_experts):
        nxt = dict(best)
        for used, blocks in best.items():
            for size in range(1, num_rows - used + 1):
                key = used + size
                nxt[key] = max(nxt.get(key, 0), blocks + -(-size // block_size))
        best = nxt
    return max(best.values())


# --------------------------------------------------------------------------- products


def grouped_matmul(lhs, rhs, group_sizes, block_size: int, transpose_rhs: bool = False):
    """``out[p] = lhs[p] @ rhs[e(p)]`` (``rhs[e]ᵀ`` if transposed) on valid rows, else 0."""
    row_expert, valid = layout(group_sizes, block_size, lhs.shape[0])
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out = np.zeros((lhs.shape[0], n))
    for p in range(lhs.shape[0]):
        if valid[p]:
            w = rhs[row_expert[p]]
            out[p] = lhs[p] @ (w.T if transpose_rhs else w)
    return out


def weight_grad(lhs, rhs, group_sizes, block_size: int):
    """``out[e] = sum over valid rows p of expert e of outer(lhs[p], rhs[p])``."""
    row_expert, valid = layout(group_sizes, block_size, lhs.shape[0])
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    out = np.zeros((len(group_sizes), lhs.shape[1], rhs.shape[1]))
    for p in range(lhs.shape[0]):
        if valid[p]:
            out[row_expert[p]] += np.outer(lhs[p], rhs[p])
    return out


# --------------------------------------------------------------------------- dispatch


def dropless_rows(indices, num_experts: int, block_size: int) -> np.ndarray:
    """Row of each flattened assignment ``t * k + j`` in the padded layout:
    expert by expert, in token order, each expert's bin padded to blocks."""
    flat = np.asarray(indices).reshape(-1)
    counts = np.bincount(flat, minlength=num_experts)
    rows = np.zeros(flat.shape[0], np.int64)
    for expert, start, _ in bins(counts, block_size):
        for rank, a in enumerate(np.flatnonzero(flat == expert)):
            rows[a] = start + rank
    return rows


def capacity_kept(indices, num_experts: int, capacity: int) -> np.ndarray:
    """``[T*k] bool``: walking assignments in token order, an expert keeps its
    first ``capacity`` ones (so later tokens are dropped first)."""
    seen = np.zeros(num_experts, np.int64)
    kept = []
    for expert in np.asarray(indices).reshape(-1):
        kept.append(seen[expert] < capacity)
        seen[expert] += 1
    return np.array(kept)


# --------------------------------------------------------------------------- MoE layer


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _gelu_tanh(x):
    """``(gelu(x), gelu'(x))`` of the tanh approximation."""
    c = np.sqrt(2.0 / np.pi)
    t = np.tanh(c * (x + 0.044715 * x**3))
    return 0.5 * x * (1 + t), 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)


def _silu(x):
    """``(silu(x), silu'(x))``."""
    s = _sigmoid(x)
    return x * s, s * (1 + x * (1 - s))


def _mlp(x, w1, w3, w2):
    """One token through one MLP; returns ``(out [d], backward(dout))``."""
    gate = x @ w1
    if w3 is None:
        act, dact = _gelu_tanh(gate)
        up = None
        hidden = act
    else:
        up = x @ w3
        act, dact = _silu(gate)
        hidden = act * up
    out = hidden @ w2

    def backward(dout):
        dhidden = w2 @ dout
        grads = {"w2": np.outer(hidden, dout)}
        if w3 is None:
            dgate = dhidden * dact
        else:
            dgate = dhidden * up * dact
            dup = dhidden * act
            grads["w3"] = np.outer(x, dup)
        grads["w1"] = np.outer(x, dgate)
        dx = w1 @ dgate + (0 if w3 is None else w3 @ dup)
        return dx, grads

    return out, backward


def _route_token(logits, token: int, config):
    """Scores, probs, chosen experts and weights of one token, plus
    ``dweights -> dscores`` (as ``[E]``) for the backward pass."""
    num_experts, top_k = logits.shape[0], config.top_k
    if config.score_function == "softmax":
        scores = np.exp(logits - logits.max())
        scores /= scores.sum()
        probs = scores
    else:
        scores = _sigmoid(logits)
        probs = scores / scores.sum()
    if config.uniform_expert_assignment:
        chosen = [(token * top_k + j) % num_experts for j in range(top_k)]
    else:
        chosen = list(np.argsort(-scores, kind="stable")[:top_k])
    raw = scores[chosen]
    p = config.normalize_top_k
    norm = 1.0 if p is None else np.sum(raw**p) ** (1.0 / p)
    weights = raw / norm

    def dscores(dweights):
        draw = dweights / norm
        if p is not None:  # d norm / d raw_i = raw_i^(p-1) norm^(1-p)
            draw -= np.dot(dweights, raw) / norm**2 * raw ** (p - 1) * norm ** (1 - p)
        out = np.zeros(num_experts)
        np.add.at(out, chosen, draw)
        return out

    return scores, probs, chosen, weights, dscores


def _dlogits(logits, scores, probs, dscores, dprobs, config):
    """Backward of ``logits -> (scores, probs)``."""
    if config.score_function == "softmax":
        ds = dscores + dprobs
        return scores * (ds - np.dot(ds, scores))
    ds = dscores + (dprobs - np.dot(dprobs, probs)) / scores.sum()
    return ds * scores * (1 - scores)


def moe(params: dict, x, config, dy, mask=None):
    """Dropless MoE on ``x [T, d_model]`` by a loop over tokens, in float64.

    ``mask`` (None or ``[T]`` bool): only its True tokens are routed, counted
    and averaged in the losses; the others' outputs and gradients are 0.

    Args:
      params: nested dict of arrays named like the layer's parameters
        (``router.kernel``, ``experts.w1/w3/w2``, ``shared.mlp.w1/w3/w2``,
        ``shared_gate``).
      config: the layer's `MoEConfig` (only its plain attributes are read).
      dy: ``[T, d_model]`` cotangent of the output.

    Returns:
      ``(y [T, d], aux, grads)``. ``aux`` holds the weighted losses,
      ``tokens_per_expert``, ``expert_ids`` and ``gates``; ``grads`` are the
      gradients of ``sum(y * dy) + load_balancing_loss + router_z_loss`` for
      ``x`` (key ``"x"``) and every parameter (same nesting as ``params``).
    """
    f64 = lambda a: None if a is None else np.asarray(a, np.float64)
    x, dy = f64(x), f64(dy)
    kernel = f64(params["router"]["kernel"])
    ex = params["experts"]
    w1, w3, w2 = f64(ex["w1"]), f64(ex.get("w3")), f64(ex["w2"])
    tokens, num_experts, top_k = x.shape[0], kernel.shape[1], config.top_k

    real = [t for t in range(tokens) if mask is None or mask[t]]
    routes = [_route_token(x[t] @ kernel, t, config) for t in range(tokens)]
    counts = np.zeros(num_experts, np.int64)
    for t in real:
        np.add.at(counts, routes[t][2], 1)
    n_real = max(len(real), 1)
    mean_probs = np.sum([routes[t][1] for t in real] or [np.zeros(num_experts)], axis=0) / n_real
    lb_scale = config.load_balancing_loss_weight * num_experts / (n_real * top_k)
    lse = np.array([np.log(np.sum(np.exp(x[t] @ kernel))) for t in range(tokens)])
    aux = {
        "load_balancing_loss": lb_scale * np.dot(counts, mean_probs),
        "router_z_loss": config.router_z_loss_weight * np.sum(lse[real] ** 2) / n_real,
        "tokens_per_expert": counts,
        "expert_ids": np.array([r[2] for r in routes]),
        "gates": np.array([r[3] for r in routes]),
    }

    grads = {
        "x": np.zeros_like(x),
        "router": {"kernel": np.zeros_like(kernel)},
        "experts": {
            k: np.zeros_like(v) for k, v in (("w1", w1), ("w3", w3), ("w2", w2)) if v is not None
        },
    }
    shared = params.get("shared")
    if shared is not None:
        sw = {k: f64(v) for k, v in shared["mlp"].items()}
        grads["shared"] = {"mlp": {k: np.zeros_like(v) for k, v in sw.items()}}
        gate_w = f64(params.get("shared_gate"))
        if gate_w is not None:
            grads["shared_gate"] = np.zeros_like(gate_w)

    y = np.zeros_like(x)
    for t in real:
        scores, probs, chosen, weights, dscores_fn = routes[t]
        dweights = np.zeros(top_k)
        for j, e in enumerate(chosen):
            out, backward = _mlp(x[t], w1[e], None if w3 is None else w3[e], w2[e])
            y[t] += weights[j] * out
            dweights[j] = np.dot(dy[t], out)
            dx, g = backward(weights[j] * dy[t])
            grads["x"][t] += dx
            for name, value in g.items():
                grads["experts"][name][e] += value
        if shared is not None:
            out, backward = _mlp(x[t], sw["w1"], sw.get("w3"), sw["w2"])
            scale = 1.0
            if gate_w is not None:
                scale = _sigmoid(x[t] @ gate_w[:, 0])
                dpre = np.dot(dy[t], out) * scale * (1 - scale)
                grads["shared_gate"][:, 0] += x[t] * dpre
                grads["x"][t] += gate_w[:, 0] * dpre
            y[t] += scale * out
            dx, g = backward(scale * dy[t])
            grads["x"][t] += dx
            for name, value in g.items():
                grads["shared"]["mlp"][name] += value
        logits = x[t] @ kernel
        dprobs = lb_scale * counts / n_real
        dlogits = _dlogits(logits, scores, probs, dscores_fn(dweights), dprobs, config)
        softmax = np.exp(logits - lse[t])
        dlogits += config.router_z_loss_weight * 2 * lse[t] / n_real * softmax
        grads["router"]["kernel"] += np.outer(x[t], dlogits)
        grads["x"][t] += kernel @ dlogits
    return y, aux, grads


# --------------------------------------------------------------------------- DeepSeek-V3


def deepseek_route(logits, config, bias=None):
    """DeepSeek-V3 routing of ``logits [T, E]`` token by token, in float64.

    Selection ranks ``scores + bias`` among the experts of the
    ``top_k_groups`` groups whose two best selection scores sum highest (ties:
    lower id first); weights are the unbiased scores of the chosen experts,
    divided by their sum if ``normalize_top_k == 1.0`` (None: kept), times
    ``routed_scaling_factor``.

    Returns ``(chosen [T, k], weights [T, k], scores [T, E], probs [T, E],
    dscores)`` where ``dscores(t, dweights [k]) -> [E]`` is the backward of
    token ``t``'s weights with respect to its scores.
    """
    logits = np.asarray(logits, np.float64)
    tokens, num_experts = logits.shape
    groups, per_group = config.num_expert_groups, num_experts // config.num_expert_groups
    if config.normalize_top_k not in (None, 1.0):
        raise NotImplementedError("the reference renormalises by the sum only")
    if config.score_function == "softmax":
        scores = np.exp(logits - logits.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
    else:
        scores = _sigmoid(logits)
    probs = scores / scores.sum(-1, keepdims=True)
    bias = np.zeros(num_experts) if bias is None else np.asarray(bias, np.float64)
    chosen, norms = [], []
    for t in range(tokens):
        choice = scores[t] + bias
        group_scores = (
            [sum(sorted(choice[g * per_group : (g + 1) * per_group])[-2:]) for g in range(groups)]
            if groups > 1
            else [0.0]
        )
        best = np.argsort(-np.array(group_scores), kind="stable")[: config.top_k_groups]
        eligible = [e for e in range(num_experts) if e // per_group in best]
        ranked = sorted(eligible, key=lambda e: (-choice[e], e))
        chosen.append(ranked[: config.top_k])
        norms.append(scores[t, chosen[-1]].sum() if config.normalize_top_k else 1.0)
    chosen, norms = np.array(chosen), np.array(norms)
    scale = config.routed_scaling_factor
    weights = np.take_along_axis(scores, chosen, -1) / norms[:, None] * scale

    def dscores(t, dweights):
        raw = scores[t, chosen[t]]
        draw = scale * dweights / norms[t]
        if config.normalize_top_k:
            draw -= scale * np.dot(dweights, raw) / norms[t] ** 2
        out = np.zeros(num_experts)
        out[chosen[t]] = draw
        return out

    return chosen, weights, scores, probs, dscores


def deepseek_moe(params: dict, x, config, dy, bias=None, num_sequences: int = 1):
    """DeepSeek-V3 MoE block on ``x [T, d_model]`` by loops over tokens, in float64.

    Routed experts weighted by `deepseek_route`, plus the shared MLP
    (``shared.mlp``, added unweighted). The loss differentiated is ``sum(y *
    dy) + load_balancing_loss + router_z_loss + sequence_aux_loss``; the
    sequence-wise loss takes the rows as ``num_sequences`` consecutive
    sequences. Returns ``(y, aux, grads)`` like `moe`.
    """
    f64 = lambda a: None if a is None else np.asarray(a, np.float64)
    x, dy, kernel = f64(x), f64(dy), f64(params["router"]["kernel"])
    tokens, num_experts, top_k = x.shape[0], kernel.shape[1], config.top_k
    logits = x @ kernel
    chosen, weights, scores, probs, dscores = deepseek_route(logits, config, bias)
    counts = np.bincount(chosen.reshape(-1), minlength=num_experts)
    lb_scale = config.load_balancing_loss_weight * num_experts / (tokens * top_k)
    seq_len = tokens // num_sequences
    seq_counts = np.array(
        [
            np.bincount(chosen[s * seq_len : (s + 1) * seq_len].reshape(-1), minlength=num_experts)
            for s in range(num_sequences)
        ]
    )
    f = num_experts / (top_k * seq_len) * seq_counts  # [S, E]
    seq_probs = probs.reshape(num_sequences, seq_len, num_experts).mean(1)
    lse = np.log(np.exp(logits).sum(-1))
    aux = {
        "load_balancing_loss": lb_scale * np.dot(counts, probs.mean(0)),
        "router_z_loss": config.router_z_loss_weight * np.mean(lse**2),
        "sequence_aux_loss": config.sequence_aux_loss_weight * np.mean(np.sum(f * seq_probs, -1)),
        "tokens_per_expert": counts,
        "expert_ids": chosen,
        "gates": weights,
    }

    ex = {k: f64(v) for k, v in params["experts"].items()}
    shared = {k: f64(v) for k, v in params["shared"]["mlp"].items()} if "shared" in params else None
    grads = {
        "x": np.zeros_like(x),
        "router": {"kernel": np.zeros_like(kernel)},
        "experts": {k: np.zeros_like(v) for k, v in ex.items()},
    }
    if shared is not None:
        grads["shared"] = {"mlp": {k: np.zeros_like(v) for k, v in shared.items()}}
    y = np.zeros_like(x)
    for t in range(tokens):
        blocks = [
            (weights[t, j], {k: v[e] for k, v in ex.items()}, grads["experts"], e)
            for j, e in enumerate(chosen[t])
        ]
        if shared is not None:
            blocks.append((1.0, shared, grads["shared"]["mlp"], None))
        dweights = np.zeros(top_k)
        for j, (weight, w, g_out, e) in enumerate(blocks):
            out, backward = _mlp(x[t], w["w1"], w.get("w3"), w["w2"])
            y[t] += weight * out
            if e is not None:
                dweights[j] = np.dot(dy[t], out)
            dx, g = backward(weight * dy[t])
            grads["x"][t] += dx
            for name, value in g.items():
                if e is None:
                    g_out[name] += value
                else:
                    g_out[name][e] += value
        dprobs = (
            lb_scale * counts / tokens
            + config.sequence_aux_loss_weight / num_sequences * f[t // seq_len] / seq_len
        )
        dlogits = _dlogits(logits[t], scores[t], probs[t], dscores(t, dweights), dprobs, config)
        dlogits += config.router_z_loss_weight * 2 * lse[t] / tokens * np.exp(logits[t] - lse[t])
        grads["router"]["kernel"] += np.outer(x[t], dlogits)
        grads["x"][t] += kernel @ dlogits
    return y, aux, grads


def expert_bias_update(bias, tokens_per_expert, rate: float):
    """``b_e + rate`` for experts below the mean load, ``- rate`` above, unchanged at it."""
    load = np.asarray(tokens_per_expert, np.float64)
    mean = load.sum() / len(load)
    return np.array(
        [
            b + rate * (1 if n < mean else -1 if n > mean else 0)
            for b, n in zip(np.asarray(bias, np.float64), load)
        ]
    )
