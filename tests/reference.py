"""Plain, single-process reference of the DSpark training forward + loss.

Written only from ``/work/shared/docs/DSPARK_SPEC.md`` (sections 0-6, 9.1, 13) so that
the parallel implementation can be checked against it.  Everything is deliberately
naive: dense boolean attention mask over ``[N*B, S+N*B]``, full-vocabulary logits,
explicit Python loops over samples / heads / RNN slots, no fusion, no chunking.

Computation dtype: float64 if ``fc.weight`` is float64, otherwise float32 (so the
"everything downstream of the backbone in fp32" rule holds trivially).

Public API
----------
reference_forward_loss(weights, cfg, batch) -> dict
random_weights(cfg, seed, L=None, dtype=torch.float32) -> dict
random_batch(cfg, Bt, S, L, seed, num_anchors=None, dtype=torch.float32) -> dict
build_blocks(cfg, input_ids, loss_mask, anchors, keep) -> dict   (one sample, spec §3)
sample_anchors(loss_mask_row, N, generator) -> (anchors, keep)    (spec §3.1)
decay_weights(cfg) -> Tensor [B]                                  (spec §6.1 / §3.7)
markov_bias(weights, cfg, h, prev) -> Tensor [..., B, V]          (spec §4)
rnn_step(weights, cfg, state, e, h) -> (bias, new_state)          (spec §4.3, one slot)
l1_and_acceptance(p_d, p_t) -> (l1, c_star)                       (spec §5.2 / §6.2)
bce_soft(logit, target) -> Tensor                                 (spec §6.2)
metrics_from(p_d, p_t, eval_mask, first_slot=0, keep=None) -> dict (spec §6.4)

Extra (optional) cfg keys understood here: ``weight_scale`` (float, default 1.0:
multiplies every decay weight, used to test the shared denominator),
``num_tapped_layers`` / ``intermediate_size`` (only for ``random_weights``).

MLA draft attention (not in the spec; written from DeepSeek-V2/V3's attention):
``attention_type="mla"`` with ``q_lora_rank`` (0 = q_proj), ``kv_lora_rank``,
``qk_nope_head_dim``, ``qk_rope_head_dim``, ``v_head_dim`` and optional ``rope_yarn``
(see ``_mla_attention``); the rest of the draft is unchanged.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "reference_forward_loss",
    "random_weights",
    "random_batch",
    "build_blocks",
    "sample_anchors",
    "decay_weights",
    "markov_bias",
    "rnn_step",
    "l1_and_acceptance",
    "bce_soft",
    "metrics_from",
    "rms_norm",
]


# ----------------------------------------------------------------------------------
# small building blocks
# ----------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * w over the last dim, in (at least) fp32."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(dt)
    return xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * w.to(dt)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1 = x[..., :half]
    x2 = x[..., half:]
    return torch.cat([-x2, x1], dim=-1)


def _rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype):
    """HF convention: inv_freq = 1/theta^(arange(0,hd,2)/hd); emb = cat(freqs, freqs)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # [T, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [T, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, hd]; cos/sin: [T, hd]."""
    return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]


def _linear(x, weights, name, dt):
    """x @ W^T (+ b if a bias tensor named ``name.bias`` exists)."""
    y = x @ weights[name + ".weight"].to(dt).t()
    if name + ".bias" in weights:
        y = y + weights[name + ".bias"].to(dt)
    return y


def _compute_dtype(weights) -> torch.dtype:
    return torch.float64 if weights["fc.weight"].dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------
# §3: block construction (one sample)
# ----------------------------------------------------------------------------------
def decay_weights(cfg: dict) -> torch.Tensor:
    """Per-slot decay w_k (float64, [B]).

    Convention S: exp(-k/gamma); Convention D: exp(-max(k-1,0)/gamma).
    gamma None or <= 0 -> all ones.  Multiplied by cfg["weight_scale"] (default 1).
    """
    B = cfg["block_size"]
    gamma = cfg.get("gamma")
    conv = cfg.get("convention", "S")
    w = []
    for k in range(B):
        if gamma is None or gamma <= 0:
            w.append(1.0)
        elif conv == "S":
            w.append(math.exp(-k / gamma))
        else:
            w.append(math.exp(-max(k - 1, 0) / gamma))
    return torch.tensor(w, dtype=torch.float64) * float(cfg.get("weight_scale", 1.0))


def build_blocks(cfg: dict, input_ids, loss_mask, anchors, keep) -> dict:
    """Everything of spec §3.2-§3.7 for ONE sequence (1-D inputs of length S / N).

    Returns (all plain tensors):
      noise_ids [N*B] long, positions [S+N*B] long, attn_mask [N*B, S+N*B] bool,
      label_idx (raw λ) [N,B], safe_label_idx (λ̂) [N,B], labels y [N,B],
      prev [N,B], aligned_idx [N,B], valid v [N,B] bool, eval_mask e [N,B] bool,
      decay [B] float64, omega [N,B] float64.
    """
    B = cfg["block_size"]
    M = cfg["mask_token_id"]
    conv = cfg.get("convention", "S")
    truncate = cfg.get("truncate_eval_mask", True)
    S = int(input_ids.shape[0])
    N = int(anchors.shape[0])
    x = [int(t) for t in input_ids.tolist()]
    lm = [int(t) for t in loss_mask.tolist()]
    a = [int(t) for t in anchors.tolist()]
    kp = [bool(t) for t in keep.tolist()]

    # §3.2 noise ids
    noise = []
    for j in range(N):
        for k in range(B):
            if k == 0 and kp[j]:
                noise.append(x[a[j]])
            else:
                noise.append(M)

    # §3.3 positions
    positions = list(range(S))
    for j in range(N):
        for k in range(B):
            positions.append(a[j] + k)

    # §3.4 dense mask
    mask = torch.zeros(N * B, S + N * B, dtype=torch.bool)
    for q in range(N * B):
        j = q // B
        if not kp[j]:
            continue
        for kappa in range(S + N * B):
            if kappa < S:
                allowed = kappa < a[j]
            else:
                allowed = (kappa - S) // B == j
            mask[q, kappa] = allowed

    # §3.5 / §3.7 labels, prev, validity, eval mask
    offset = 1 if conv == "S" else 0
    lam = [[a[j] + offset + k for k in range(B)] for j in range(N)]
    safe = [[(min(lam[j][k], S - 1) if kp[j] else 0) for k in range(B)] for j in range(N)]
    y = [[x[safe[j][k]] for k in range(B)] for j in range(N)]
    prev = [[(x[a[j]] if k == 0 else y[j][k - 1]) for k in range(B)] for j in range(N)]
    aligned = [[max(safe[j][k] - 1, 0) for k in range(B)] for j in range(N)]
    valid = []
    for j in range(N):
        row = []
        for k in range(B):
            ok = kp[j] and lam[j][k] < S and lm[safe[j][k]] == 1
            if conv == "D":
                ok = ok and k > 0
            row.append(ok)
        valid.append(row)
    first = 0 if conv == "S" else 1  # first supervised ("draft") slot
    evm = []
    for j in range(N):
        row = [False] * B
        if truncate:
            run = True
            for k in range(first, B):
                run = run and valid[j][k]
                row[k] = run
        else:
            row = list(valid[j])
        evm.append(row)

    decay = decay_weights(cfg)
    e_t = torch.tensor(evm, dtype=torch.bool).reshape(N, B)
    omega = e_t.to(torch.float64) * decay[None, :]
    return {
        "noise_ids": torch.tensor(noise, dtype=torch.long),
        "positions": torch.tensor(positions, dtype=torch.long),
        "attn_mask": mask,
        "label_idx": torch.tensor(lam, dtype=torch.long).reshape(N, B),
        "safe_label_idx": torch.tensor(safe, dtype=torch.long).reshape(N, B),
        "labels": torch.tensor(y, dtype=torch.long).reshape(N, B),
        "prev": torch.tensor(prev, dtype=torch.long).reshape(N, B),
        "aligned_idx": torch.tensor(aligned, dtype=torch.long).reshape(N, B),
        "valid": torch.tensor(valid, dtype=torch.bool).reshape(N, B),
        "eval_mask": e_t,
        "decay": decay,
        "omega": omega,
    }


# ----------------------------------------------------------------------------------
# §2.3 backbone (one sample)
# ----------------------------------------------------------------------------------
def _backbone_one(weights, cfg, feats, noise_ids, positions, mask, dt) -> torch.Tensor:
    """feats [S, L*H], noise_ids [N*B], positions [S+N*B], mask [N*B, S+N*B] -> h [N*B, H]."""
    eps = cfg["rms_norm_eps"]
    nH, nKV, hd = cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"]
    assert nH % nKV == 0
    group = nH // nKV
    S = feats.shape[0]
    T = noise_ids.shape[0]

    # 1. context projection
    C = rms_norm(feats.to(dt) @ weights["fc.weight"].to(dt).t(), weights["hidden_norm.weight"], eps)
    # noise embedding (frozen table, but we keep it differentiable if the caller asks)
    X = weights["embed_tokens.weight"].to(dt)[noise_ids]

    cos_all, sin_all = _rope_cos_sin(positions, hd, cfg["rope_theta"], dt)
    if cfg.get("rope_yarn"):  # YaRN frequencies, cos/sin times the attention factor (HF Llama/Qwen)
        angles, magnitude = _rope_angles(positions, hd, cfg["rope_theta"], cfg["rope_yarn"])
        emb = torch.cat([angles, angles], dim=-1)
        cos_all, sin_all = (emb.cos() * magnitude).to(dt), (emb.sin() * magnitude).to(dt)
    cos_q, sin_q = cos_all[S:], sin_all[S:]
    scale = hd ** -0.5
    mla = cfg.get("attention_type", "gqa") == "mla"

    for i in range(cfg["num_layers"]):
        p = f"layers.{i}."
        Y = rms_norm(X, weights[p + "input_layernorm.weight"], eps)
        if mla:
            X = X + _mla_attention(weights, cfg, p, C, Y, positions, mask, dt)
            Zn = rms_norm(X, weights[p + "post_attention_layernorm.weight"], eps)
            gate = _linear(Zn, weights, p + "mlp.gate_proj", dt)
            up = _linear(Zn, weights, p + "mlp.up_proj", dt)
            X = X + _linear(torch.nn.functional.silu(gate) * up, weights, p + "mlp.down_proj", dt)
            continue
        q = _linear(Y, weights, p + "self_attn.q_proj", dt).reshape(T, nH, hd)
        kv_in = torch.cat([C, Y], dim=0)  # context first
        k = _linear(kv_in, weights, p + "self_attn.k_proj", dt).reshape(S + T, nKV, hd)
        v = _linear(kv_in, weights, p + "self_attn.v_proj", dt).reshape(S + T, nKV, hd)
        if cfg.get("qk_norm", True):
            q = rms_norm(q, weights[p + "self_attn.q_norm.weight"], eps)
            k = rms_norm(k, weights[p + "self_attn.k_norm.weight"], eps)
        q = _apply_rope(q, cos_q, sin_q)
        k = _apply_rope(k, cos_all, sin_all)

        row_has_key = mask.any(dim=-1)  # [T]
        heads = []
        for hh in range(nH):
            kvh = hh // group  # consecutive query heads share one kv head
            scores = (q[:, hh, :] @ k[:, kvh, :].t()) * scale  # [T, S+T]
            scores = scores.masked_fill(~mask, float("-inf"))
            # fully-masked rows: make them finite before softmax, then zero them
            scores = torch.where(row_has_key[:, None], scores, torch.zeros_like(scores))
            probs = torch.softmax(scores, dim=-1)
            probs = probs * mask.to(dt)
            heads.append(probs @ v[:, kvh, :])  # [T, hd]
        attn = torch.cat(heads, dim=-1)  # [T, nH*hd], head-major
        X = X + _linear(attn, weights, p + "self_attn.o_proj", dt)

        Zn = rms_norm(X, weights[p + "post_attention_layernorm.weight"], eps)
        gate = _linear(Zn, weights, p + "mlp.gate_proj", dt)
        up = _linear(Zn, weights, p + "mlp.up_proj", dt)
        X = X + _linear(torch.nn.functional.silu(gate) * up, weights, p + "mlp.down_proj", dt)

    return rms_norm(X, weights["norm.weight"], eps)


# ----------------------------------------------------------------------------------
# MLA draft attention (DeepSeek-V2/V3 multi-head latent attention, dual-source)
# ----------------------------------------------------------------------------------
def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _rope_angles(positions: torch.Tensor, dim: int, theta: float, yarn) -> tuple:
    """Per-pair rotation angles [T, dim/2] (float64) and the cos/sin magnitude. ``yarn``:
    dict with factor, original_max_position_embeddings, beta_fast, beta_slow,
    attention_factor, truncate (the YaRN paper's frequency ramp), or None."""
    i = torch.arange(0, dim, 2, dtype=torch.float64)
    freq = 1.0 / theta ** (i / dim)  # pair k rotates with theta^(-2k/dim)
    magnitude = 1.0
    if yarn:
        L0 = yarn["original_max_position_embeddings"]
        # dimension index at which a pair completes r rotations over the original context
        def dim_at(r):
            return dim * math.log(L0 / (2 * math.pi * r)) / (2 * math.log(theta))
        lo, hi = dim_at(yarn["beta_fast"]), dim_at(yarn["beta_slow"])
        if yarn.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
        freq = freq * (1 - ramp) + (freq / yarn["factor"]) * ramp
        magnitude = yarn["attention_factor"]
    return positions.to(torch.float64)[:, None] * freq[None, :], magnitude


def _rotate_pairs(x: torch.Tensor, angles: torch.Tensor, magnitude: float) -> torch.Tensor:
    """Interleaved-pair RoPE in place: dims (2k, 2k+1) rotate by angles[..., k].
    x [T, ..., d], angles broadcastable to [T, ..., d/2]."""
    c, s = angles.cos().to(x.dtype) * magnitude, angles.sin().to(x.dtype) * magnitude
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], dim=-1).flatten(-2)


def _mla_attention(weights, cfg, p, C, Y, positions, mask, dt) -> torch.Tensor:
    """Dual-source MLA of one layer: queries from the block rows Y [T, H], one compressed
    latent per row of [C; Y] expanded to per-head keys/values, a rope key shared by all
    heads, DeepSeek's interleaved-pair RoPE on the rope dims, softmax scale
    (nope+rope)^-1/2 · mscale(factor, mscale_all_dim)^2 under YaRN. Returns o_proj output [T, H]."""
    eps = cfg["rms_norm_eps"]
    nH = cfg["num_heads"]
    dn, dr, dv = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    r, rq = cfg["kv_lora_rank"], cfg.get("q_lora_rank", 0)
    yarn = cfg.get("rope_yarn")
    S, T = C.shape[0], Y.shape[0]
    a = p + "self_attn."
    if rq:
        cq = rms_norm(_linear(Y, weights, a + "q_a_proj", dt), weights[a + "q_a_layernorm.weight"], eps)
        q = _linear(cq, weights, a + "q_b_proj", dt)
    else:
        q = _linear(Y, weights, a + "q_proj", dt)
    q = q.reshape(T, nH, dn + dr)
    rows = torch.cat([C, Y], dim=0)
    compressed = _linear(rows, weights, a + "kv_a_proj_with_mqa", dt)  # [S+T, r+dr]
    latent = rms_norm(compressed[:, :r], weights[a + "kv_a_layernorm.weight"], eps)
    kv = _linear(latent, weights, a + "kv_b_proj", dt).reshape(S + T, nH, dn + dv)
    angles, magnitude = _rope_angles(positions, dr, cfg["rope_theta"], yarn)
    k_pe = _rotate_pairs(compressed[:, r:], angles, magnitude)  # [S+T, dr], one for all heads
    q_pe = _rotate_pairs(q[..., dn:], angles[S:, None, :], magnitude)  # [T, nH, dr]
    scale = (dn + dr) ** -0.5
    if yarn and yarn.get("mscale_all_dim"):
        scale *= _yarn_mscale(yarn["factor"], yarn["mscale_all_dim"]) ** 2
    row_has_key = mask.any(dim=-1)
    heads = []
    for h in range(nH):
        scores = (q[:, h, :dn] @ kv[:, h, :dn].t() + q_pe[:, h] @ k_pe.t()) * scale  # [T, S+T]
        scores = scores.masked_fill(~mask, float("-inf"))
        scores = torch.where(row_has_key[:, None], scores, torch.zeros_like(scores))
        probs = torch.softmax(scores, dim=-1) * mask.to(dt)
        heads.append(probs @ kv[:, h, dn:])  # [T, dv]
    return _linear(torch.cat(heads, dim=-1), weights, a + "o_proj", dt)


# ----------------------------------------------------------------------------------
# §4 Markov head, §5 confidence head
# ----------------------------------------------------------------------------------
def rnn_step(weights, cfg, state, e, h):
    """One GRU-like step of spec §4.3. state/e: [..., r], h: [..., H] -> (bias [..., V], new state)."""
    dt = h.dtype
    r = cfg["markov_rank"]
    z = torch.cat([state, e, h], dim=-1)
    out = z @ weights["markov_head.joint_proj.weight"].to(dt).t() + weights["markov_head.joint_proj.bias"].to(dt)
    g_raw, c_raw, o_raw = out[..., :r], out[..., r : 2 * r], out[..., 2 * r : 3 * r]
    bias = torch.tanh(o_raw) @ weights["markov_head.markov_w2.weight"].to(dt).t()
    g = torch.sigmoid(g_raw)
    new_state = g * state + (1.0 - g) * torch.tanh(c_raw)
    return bias, new_state


def markov_bias(weights, cfg, h, prev) -> torch.Tensor:
    """Bias B_k for teacher-forced prev tokens. h: [..., B, H], prev: [..., B] -> [..., B, V]."""
    dt = h.dtype
    kind = cfg.get("markov_head_type", "vanilla")
    W1 = weights["markov_head.markov_w1.weight"].to(dt)
    W2 = weights["markov_head.markov_w2.weight"].to(dt)
    e = W1[prev]  # [..., B, r]
    if kind == "vanilla":
        return e @ W2.t()
    if kind == "gated":
        g = torch.sigmoid(
            torch.cat([h, e], dim=-1) @ weights["markov_head.gate_proj.weight"].to(dt).t()
            + weights["markov_head.gate_proj.bias"].to(dt)
        )
        return (g * e) @ W2.t()
    if kind == "rnn":
        B = h.shape[-2]
        state = torch.zeros_like(e[..., 0, :])  # reset at every block
        biases = []
        for k in range(B):
            b_k, state = rnn_step(weights, cfg, state, e[..., k, :], h[..., k, :])
            biases.append(b_k)
        return torch.stack(biases, dim=-2)
    raise ValueError(f"unknown markov_head_type {kind!r}")


# ----------------------------------------------------------------------------------
# §5.2 / §6 helpers
# ----------------------------------------------------------------------------------
def l1_and_acceptance(p_d, p_t):
    """Full L1 = sum|p_d - p_t| (= 2 TV) and c* = clamp(1 - l1/2, 0, 1) over the last dim."""
    p_d = torch.as_tensor(p_d, dtype=torch.float64) if not torch.is_tensor(p_d) else p_d
    p_t = torch.as_tensor(p_t, dtype=p_d.dtype) if not torch.is_tensor(p_t) else p_t
    l1 = (p_d - p_t).abs().sum(dim=-1)
    c_star = torch.clamp(1.0 - 0.5 * l1, 0.0, 1.0)
    return l1, c_star


def bce_soft(logit, target):
    """-[c log σ(ℓ) + (1-c) log(1-σ(ℓ))] = c·softplus(-ℓ) + (1-c)·softplus(ℓ)."""
    logit = torch.as_tensor(logit, dtype=torch.float64) if not torch.is_tensor(logit) else logit
    target = torch.as_tensor(target, dtype=logit.dtype) if not torch.is_tensor(target) else target
    sp = torch.nn.functional.softplus
    return target * sp(-logit) + (1.0 - target) * sp(logit)


def _tau(acc, eval_mask, keep, first_slot):
    """Mean over valid blocks of 1 + Σ_k Π_{first<=i<=k} e_i·acc_i.  acc/eval_mask: [..., N, B]."""
    B = acc.shape[-1]
    acc2 = acc.reshape(-1, B).to(torch.float64)
    e2 = eval_mask.reshape(-1, B).to(torch.float64)
    if keep is None:
        kp = torch.ones(acc2.shape[0], dtype=torch.bool)
    else:
        kp = keep.reshape(-1).to(torch.bool)
    total, n = 0.0, 0
    for blk in range(acc2.shape[0]):
        if not (bool(kp[blk]) and bool((e2[blk] > 0).any())):
            continue
        t, run = 1.0, 1.0
        for k in range(first_slot, B):
            run = run * float(e2[blk, k] * acc2[blk, k])
            t += run
        total += t
        n += 1
    return torch.tensor(total / n if n > 0 else float("nan"), dtype=torch.float64)


def metrics_from(p_d, p_t, eval_mask, first_slot: int = 0, keep=None) -> dict:
    """§6.4 metrics from distributions [..., N, B, V] (or acceptance directly, see below).

    If ``p_t`` is None, ``p_d`` is interpreted as the acceptance tensor c* [..., N, B].
    Returns accept_rate [B] (nan where count 0), count [B], tau (scalar).
    """
    if p_t is None:
        acc = torch.as_tensor(p_d, dtype=torch.float64)
    else:
        _, acc = l1_and_acceptance(torch.as_tensor(p_d), torch.as_tensor(p_t))
    e = torch.as_tensor(eval_mask).to(torch.float64)
    B = acc.shape[-1]
    acc_f = acc.reshape(-1, B).to(torch.float64)
    e_f = e.reshape(-1, B)
    count = e_f.sum(dim=0)
    num = (e_f * acc_f).sum(dim=0)
    accept_rate = torch.where(count > 0, num / torch.where(count > 0, count, torch.ones_like(count)),
                              torch.full_like(count, float("nan")))
    return {"accept_rate": accept_rate, "count": count, "tau": _tau(acc, e, keep, first_slot)}


# ----------------------------------------------------------------------------------
# the whole thing
# ----------------------------------------------------------------------------------
def reference_forward_loss(weights: dict[str, torch.Tensor], cfg: dict, batch: dict) -> dict:
    dt = _compute_dtype(weights)
    eps = cfg.get("eps", 1e-6)
    B = cfg["block_size"]
    r = cfg.get("markov_rank", 0) or 0
    conv = cfg.get("convention", "S")
    first_slot = 0 if conv == "S" else 1
    use_conf = bool(cfg.get("confidence_head", False))
    conf_with_markov = bool(cfg.get("confidence_with_markov", True))
    a_ce = float(cfg.get("alpha_ce", 0.1))
    a_l1 = float(cfg.get("alpha_l1", 0.9))
    a_conf = float(cfg.get("alpha_conf", 1.0))

    input_ids = batch["input_ids"]
    loss_mask = batch["loss_mask"]
    feats = batch["target_hidden_states"]
    last = batch.get("target_last_hidden_states")
    anchors = batch["anchors"]
    keep = batch["keep"].to(torch.bool)
    Bt, S = input_ids.shape
    N = anchors.shape[1]

    if (a_l1 > 0 or use_conf) and last is None:
        raise ValueError("L1 / confidence terms need target_last_hidden_states")
    if use_conf and conf_with_markov and r <= 0:
        raise ValueError("confidence_with_markov requires markov_rank > 0")

    # ---- block construction + backbone, one sample at a time ----
    blocks = [build_blocks(cfg, input_ids[b], loss_mask[b], anchors[b], keep[b]) for b in range(Bt)]
    hs = []
    for b in range(Bt):
        blk = blocks[b]
        h_b = _backbone_one(weights, cfg, feats[b], blk["noise_ids"], blk["positions"], blk["attn_mask"], dt)
        hs.append(h_b.reshape(N, B, -1))
    h = torch.stack(hs, dim=0)  # [Bt, N, B, H]

    def stack(key):
        return torch.stack([blk[key] for blk in blocks], dim=0)

    labels = stack("labels")  # [Bt, N, B]
    prev = stack("prev")
    aligned = stack("aligned_idx")
    eval_mask = stack("eval_mask")
    omega = stack("omega").to(dt)

    # ---- logits ----
    lm_head = weights["lm_head.weight"].to(dt)
    U = h @ lm_head.t()  # [Bt, N, B, V]
    if r > 0:
        Z = U + markov_bias(weights, cfg, h, prev)
    else:
        Z = U

    conf_logits = None
    if use_conf:
        if conf_with_markov:
            e_prev = weights["markov_head.markov_w1.weight"].to(dt)[prev]
            cin = torch.cat([h, e_prev], dim=-1)
        else:
            cin = h
        conf_logits = (cin @ weights["confidence_head.proj.weight"].to(dt).t()
                       + weights["confidence_head.proj.bias"].to(dt)).squeeze(-1)

    # ---- aligned target distribution (no gradient anywhere) ----
    p_t = None
    if last is not None:
        with torch.no_grad():
            t_rows = torch.stack(
                [last[b].detach().to(dt)[aligned[b].reshape(-1)].reshape(N, B, -1) for b in range(Bt)], dim=0
            )
            p_t = torch.softmax(t_rows @ lm_head.detach().t(), dim=-1)

    # ---- per-token terms ----
    logp = torch.log_softmax(Z, dim=-1)
    ce = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [Bt, N, B]
    D = omega.sum()
    ce_sum = (omega * ce).sum()
    loss = a_ce * ce_sum / (D + eps)

    l1_sum = None
    conf_sum = None
    c_star = None
    l1 = None
    if p_t is not None:
        p_d = torch.exp(logp)
        l1, c_star_raw = l1_and_acceptance(p_d, p_t)
        c_star = c_star_raw.detach()
        l1_sum = (omega * l1).sum()
        if a_l1 > 0:
            loss = loss + a_l1 * l1_sum / (D + eps)
    if use_conf:
        bce = bce_soft(conf_logits, c_star)
        conf_sum = (omega * bce).sum()
        loss = loss + a_conf * conf_sum / (D + eps)

    out = {
        "loss": loss,
        "ce_sum": ce_sum,
        "ce_loss": ce_sum / (D + eps),
        "l1_sum": l1_sum,
        "l1_loss": None if l1_sum is None else l1_sum / (D + eps),
        "conf_sum": conf_sum if conf_sum is not None else torch.zeros((), dtype=dt),
        "confidence_loss": (conf_sum / (D + eps)) if conf_sum is not None else torch.zeros((), dtype=dt),
        "denominator": D,
        "h": h,
        "logits": Z,
        "base_logits": U,
        "confidence_logits": conf_logits,
        "target_probs": p_t,
        "eval_mask": eval_mask,
        "weights": omega,
        "labels": labels,
        "prev": prev,
        "aligned_idx": aligned,
        "l1": l1,
        "c_star": c_star,
        "accept_rate": None,
        "count": eval_mask.to(torch.float64).sum(dim=(0, 1)),
        "tau": None,
        "confidence_abs_error": None,
        "confidence_bias": None,
    }

    # ---- metrics (no gradient) ----
    if c_star is not None:
        m = metrics_from(c_star.detach(), None, eval_mask, first_slot=first_slot, keep=keep)
        out["accept_rate"] = m["accept_rate"]
        out["count"] = m["count"]
        out["tau"] = m["tau"]
        if use_conf:
            with torch.no_grad():
                sig = torch.sigmoid(conf_logits)
                out["confidence_abs_error"] = (omega * (sig - c_star).abs()).sum() / (D + eps)
                out["confidence_bias"] = (omega * (sig - c_star)).sum() / (D + eps)
    return out


# ----------------------------------------------------------------------------------
# random inputs
# ----------------------------------------------------------------------------------
def random_weights(cfg: dict, seed: int, L: int | None = None, dtype=torch.float32) -> dict:
    """All §9.1 tensors for ``cfg``: Linear/Embedding ~ N(0, 0.02), norms 1 + N(0, 0.1), biases N(0, 0.02).

    L = number of tapped target layers (fc input width L*H); default
    cfg.get("num_tapped_layers", cfg["num_layers"]).
    """
    g = torch.Generator().manual_seed(seed)
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    nH, nKV, hd = cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"]
    I = cfg.get("intermediate_size", 2 * H)
    L = L if L is not None else cfg.get("num_tapped_layers", cfg["num_layers"])
    r = cfg.get("markov_rank", 0) or 0

    def lin(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * 0.02).to(dtype)

    def norm(n):
        return (1.0 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype)

    w = {
        "embed_tokens.weight": lin(V, H),
        "fc.weight": lin(H, L * H),
        "hidden_norm.weight": norm(H),
    }
    mla = cfg.get("attention_type", "gqa") == "mla"
    for i in range(cfg["num_layers"]):
        p = f"layers.{i}."
        if mla:
            a = p + "self_attn."
            dn, dr, dv = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
            rkv, rq = cfg["kv_lora_rank"], cfg.get("q_lora_rank", 0)
            if rq:
                w[a + "q_a_proj.weight"] = lin(rq, H)
                w[a + "q_a_layernorm.weight"] = norm(rq)
                w[a + "q_b_proj.weight"] = lin(nH * (dn + dr), rq)
            else:
                w[a + "q_proj.weight"] = lin(nH * (dn + dr), H)
            w[a + "kv_a_proj_with_mqa.weight"] = lin(rkv + dr, H)
            w[a + "kv_a_layernorm.weight"] = norm(rkv)
            w[a + "kv_b_proj.weight"] = lin(nH * (dn + dv), rkv)
            w[a + "o_proj.weight"] = lin(H, nH * dv)
        else:
            w[p + "self_attn.q_proj.weight"] = lin(nH * hd, H)
            w[p + "self_attn.k_proj.weight"] = lin(nKV * hd, H)
            w[p + "self_attn.v_proj.weight"] = lin(nKV * hd, H)
            w[p + "self_attn.o_proj.weight"] = lin(H, nH * hd)
        if cfg.get("attention_bias", False) and not mla:
            w[p + "self_attn.q_proj.bias"] = lin(nH * hd)
            w[p + "self_attn.k_proj.bias"] = lin(nKV * hd)
            w[p + "self_attn.v_proj.bias"] = lin(nKV * hd)
        if cfg.get("qk_norm", True) and not mla:
            w[p + "self_attn.q_norm.weight"] = norm(hd)
            w[p + "self_attn.k_norm.weight"] = norm(hd)
        w[p + "mlp.gate_proj.weight"] = lin(I, H)
        w[p + "mlp.up_proj.weight"] = lin(I, H)
        w[p + "mlp.down_proj.weight"] = lin(H, I)
        w[p + "input_layernorm.weight"] = norm(H)
        w[p + "post_attention_layernorm.weight"] = norm(H)
    w["norm.weight"] = norm(H)
    w["lm_head.weight"] = lin(V, H)
    if r > 0:
        w["markov_head.markov_w1.weight"] = lin(V, r)
        w["markov_head.markov_w2.weight"] = lin(V, r)
        kind = cfg.get("markov_head_type", "vanilla")
        if kind == "gated":
            w["markov_head.gate_proj.weight"] = lin(r, H + r)
            w["markov_head.gate_proj.bias"] = lin(r)
        elif kind == "rnn":
            w["markov_head.joint_proj.weight"] = lin(3 * r, 2 * r + H)
            w["markov_head.joint_proj.bias"] = lin(3 * r)
    if cfg.get("confidence_head", False):
        d_in = H + r if cfg.get("confidence_with_markov", True) else H
        w["confidence_head.proj.weight"] = lin(1, d_in)
        w["confidence_head.proj.bias"] = lin(1)
    return w


def sample_anchors(loss_mask_row, N: int, generator=None):
    """Spec §3.1 for one sequence -> (anchors Long [N], keep Bool [N])."""
    lm = [int(t) for t in torch.as_tensor(loss_mask_row).tolist()]
    S = len(lm)
    cands = [i for i in range(0, S - 1) if lm[i] == 1 and lm[i + 1] == 1]
    n = min(len(cands), N)
    if n > 0:
        perm = torch.randperm(len(cands), generator=generator).tolist()
        chosen = sorted(cands[p] for p in perm[:n])
    else:
        chosen = []
    anchors = chosen + [0] * (N - n)
    keep = [True] * n + [False] * (N - n)
    return torch.tensor(anchors, dtype=torch.long), torch.tensor(keep, dtype=torch.bool)


def random_batch(cfg: dict, Bt: int, S: int, L: int, seed: int, num_anchors: int | None = None,
                 dtype=torch.float32) -> dict:
    """Random ids, a loss mask with a zero prompt prefix (+ occasional gap / tail padding),
    random features, anchors sampled per §3.1 (fixed width N with dummy slots)."""
    g = torch.Generator().manual_seed(seed)
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    N = num_anchors if num_anchors is not None else cfg["num_anchors"]
    input_ids = torch.randint(0, V, (Bt, S), generator=g)
    loss_mask = torch.zeros(Bt, S, dtype=torch.long)
    for b in range(Bt):
        prompt = int(torch.randint(1, max(2, S // 4) + 1, (1,), generator=g))
        loss_mask[b, prompt:] = 1
        if S >= 12 and float(torch.rand(1, generator=g)) < 0.6:  # an unsupervised gap (e.g. user turn)
            start = int(torch.randint(prompt + 2, max(prompt + 3, S - 3), (1,), generator=g))
            ln = int(torch.randint(1, 3, (1,), generator=g))
            loss_mask[b, start : start + ln] = 0
        if b % 2 == 1 and S >= 8:  # right padding on odd samples
            pad = int(torch.randint(1, 3, (1,), generator=g))
            loss_mask[b, S - pad :] = 0
    anchors = torch.zeros(Bt, N, dtype=torch.long)
    keep = torch.zeros(Bt, N, dtype=torch.bool)
    for b in range(Bt):
        anchors[b], keep[b] = sample_anchors(loss_mask[b], N, g)
    feats = torch.randn(Bt, S, L * H, generator=g, dtype=torch.float64).to(dtype)
    last = (3.0 * torch.randn(Bt, S, H, generator=g, dtype=torch.float64)).to(dtype)
    return {
        "input_ids": input_ids,
        "loss_mask": loss_mask,
        "target_hidden_states": feats,
        "target_last_hidden_states": last,
        "anchors": anchors,
        "keep": keep,
    }
