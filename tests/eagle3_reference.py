"""Independent plain-PyTorch reference of the Eagle3 objective (issue 16), written from the
issue's description and EAGLE-3's published training recipe, with no megaspark imports.
megaspark's tensor-parallel Eagle3 draft must reproduce :func:`eagle3_loss` (loss and
gradients) within 1e-5.

Notation: batch b, sequence S, target hidden H, target vocabulary V, draft vocabulary N
(``draft_to_target`` [N], increasing target ids), T test-time-training steps.

Inputs per sample: ``input_ids`` x [S]; ``loss_mask`` [S] (1 where the token x_j is a
supervised answer token); ``aux`` [S, 3H], the three tapped target layers' outputs at every
position concatenated (low, mid, high); ``target_logits`` [S, V], the target's logits at
every position (row j predicts x_{j+1}).

The draft (one decoder layer, ``midlayer``):

* step 0 input at position p: ``g_0[p] = fc(aux[p])`` and the embedding of the next token
  ``e_0[p] = embed(x_{p+1})``; step t > 0: ``g_t[p] = o_{t-1}[p]`` (the draft's own output
  of the previous step at the same position) and ``e_t[p] = embed(x_{p+1+t})``;
* layer: ``a = [RMSNorm_in(e); RMSNorm_hidden(g)]`` (width 2H) → q, k, v projections of
  ``a`` with RoPE at position p (the same positions at every step); attention; ``o_proj``;
  residual ``g + attn``; post-attention RMSNorm, SwiGLU MLP, residual → ``o_t[p]``;
* logits over the draft vocabulary: ``lm_head(RMSNorm_final(o_t[p]))`` [N].

Attention of step t (test-time training): the query at (t, p) sees the step-0 keys at
positions q ≤ p (causal) and the keys of every later step s = 1 … t at its own position p
only. :func:`explicit_step_attention` computes it over the explicitly concatenated keys of
all steps with that mask.

MLA variant (``cfg["attention"] == "mla"``, the DeepSeek-V3-shaped draft,
``DeepseekV3ForCausalLMEagle3``): the same layer with DeepSeek-V3's multi-head latent
attention over the 2H-wide input ``a``: queries ``q = q_proj(a)`` (or ``q_b_proj(
RMSNorm_qa(q_a_proj(a)))`` with a query rank), per head ``[q_nope (nope dims); q_pe (rope
dims)]``; ``kv_a_proj_with_mqa(a) = [c (latent); k_pe (rope dims, one key shared by all
heads)]``, ``c`` normed by ``kv_a_layernorm``, ``kv_b_proj(c)`` per head ``[k_nope; v]``;
keys ``[k_nope; RoPE(k_pe)]``; RoPE rotates the pairs of adjacent dims ``(2i, 2i+1)``
(DeepSeek's interleaved convention); softmax scale ``(nope + rope)^-1/2``; every head its
own key/value head; the same step mask.

Labels: step t at position p predicts x_{p+2+t}; its soft label is the target's
distribution at position p+1+t restricted to the draft vocabulary, ``softmax(
target_logits[p+1+t][draft_to_target])``. The position counts (mask ``m_t[p] = 1``) when
p+2+t < S, x_{p+2+t} is supervised (``loss_mask``) and the target's top token at p+1+t is in
the draft vocabulary. Loss: ``Σ_t 0.8^t Σ_p m_t[p]·CE_t[p] / Σ_t 0.8^t Σ_p m_t[p]`` over the
whole (global) batch, CE_t[p] the soft cross-entropy. Metrics: per-step accuracy
``acc_t`` (argmax of the draft = argmax of the soft label, over m_t) and the analytic
acceptance length ``τ = 1 + Σ_k Σ_p Π_{t≤k} (m_t·correct_t)[p] / Σ_p m_0[p]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.double() if x.dtype == torch.float64 else x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """x [..., S, hd] rotated at positions ``pos`` [S] (half-split convention)."""
    hd = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = pos.double()[:, None] * inv[None]
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def step_mask(S: int, t: int) -> torch.Tensor:
    """[S, (t+1)·S] bool: may query (t, p) see key (s, q)? Keys are ordered by step, then
    position."""
    p = torch.arange(S)[:, None]
    parts = [torch.arange(S)[None, :] <= p]  # step 0: causal
    for _ in range(1, t + 1):
        parts.append(torch.arange(S)[None, :] == p)  # later steps: the same position only
    return torch.cat(parts, dim=1)


def explicit_step_attention(q, ks, vs, scale: float) -> torch.Tensor:
    """q [b, nh, S, hd] of step t = len(ks) − 1; ks / vs: the keys / values [b, nkv, S, hd] of
    steps 0 … t. Attention over their concatenation with :func:`step_mask`."""
    b, nh, S, hd = q.shape
    k = torch.cat(ks, dim=2)
    v = torch.cat(vs, dim=2)
    rep = nh // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    allowed = step_mask(S, len(ks) - 1)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(scores, dim=-1), v)


def random_steps(seed: int, b: int, S: int, hd: int, steps: int, heads: int = 4, kv_heads: int = 2):
    """Random float64 q [b, heads, S, hd] and per-step keys / values [b, kv_heads, S, hd]
    (for attention tests)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, heads, S, hd, generator=g, dtype=torch.float64)
    ks = [torch.randn(b, kv_heads, S, hd, generator=g, dtype=torch.float64) for _ in range(steps)]
    vs = [torch.randn(b, kv_heads, S, hd, generator=g, dtype=torch.float64) for _ in range(steps)]
    return q, ks, vs


def rope_pairs(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """x [..., S, d] rotated at positions ``pos`` [S], DeepSeek's convention: dims (2i, 2i+1)
    form the pair of frequency i."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = pos.double()[:, None] * inv[None]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return out.flatten(-2)


def _mla_qkv(w: dict, cfg: dict, a: torch.Tensor):
    """DeepSeek-V3 attention projections of a [b, S, 2H] → q, k [b, nh, S, nope+rope], v."""
    b, S, _ = a.shape
    nh, nope, rp, vd = cfg["num_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    r, eps, pos = cfg["kv_lora_rank"], cfg["rms_norm_eps"], torch.arange(S)
    at = "midlayer.self_attn."
    if cfg.get("q_lora_rank"):
        q = rms_norm(a @ w[at + "q_a_proj.weight"].T, w[at + "q_a_layernorm.weight"], eps) @ w[at + "q_b_proj.weight"].T
    else:
        q = a @ w[at + "q_proj.weight"].T
    q = q.view(b, S, nh, nope + rp).transpose(1, 2)
    kv_a = a @ w[at + "kv_a_proj_with_mqa.weight"].T
    c, k_pe = kv_a[..., :r], kv_a[..., r:]
    kv = (rms_norm(c, w[at + "kv_a_layernorm.weight"], eps) @ w[at + "kv_b_proj.weight"].T)
    kv = kv.view(b, S, nh, nope + vd).transpose(1, 2)
    k_pe = rope_pairs(k_pe[:, None], pos, cfg["rope_theta"]).expand(-1, nh, -1, -1)
    q = torch.cat([q[..., :nope], rope_pairs(q[..., nope:], pos, cfg["rope_theta"])], dim=-1)
    return q, torch.cat([kv[..., :nope], k_pe], dim=-1), kv[..., nope:], (nope + rp) ** -0.5


def midlayer(w: dict, cfg: dict, e: torch.Tensor, g: torch.Tensor, ks: list, vs: list):
    """One step of the draft layer: e, g [b, S, H]; appends this step's k, v to ks / vs."""
    b, S, H = g.shape
    nh, nkv, hd, eps = cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"], cfg["rms_norm_eps"]
    pos = torch.arange(S)
    a = torch.cat([rms_norm(e, w["midlayer.input_layernorm.weight"], eps),
                   rms_norm(g, w["midlayer.hidden_norm.weight"], eps)], dim=-1)
    if cfg.get("attention") == "mla":
        q, k, v, scale = _mla_qkv(w, cfg, a)
    else:
        q = (a @ w["midlayer.self_attn.q_proj.weight"].T).view(b, S, nh, hd).transpose(1, 2)
        k = (a @ w["midlayer.self_attn.k_proj.weight"].T).view(b, S, nkv, hd).transpose(1, 2)
        v = (a @ w["midlayer.self_attn.v_proj.weight"].T).view(b, S, nkv, hd).transpose(1, 2)
        q, k, scale = rope(q, pos, cfg["rope_theta"]), rope(k, pos, cfg["rope_theta"]), hd ** -0.5
    ks.append(k)
    vs.append(v)
    att = explicit_step_attention(q, ks, vs, scale)
    att = att.transpose(1, 2).reshape(b, S, -1) @ w["midlayer.self_attn.o_proj.weight"].T
    h = g + att
    m = rms_norm(h, w["midlayer.post_attention_layernorm.weight"], eps)
    mlp = (F.silu(m @ w["midlayer.mlp.gate_proj.weight"].T) * (m @ w["midlayer.mlp.up_proj.weight"].T)) \
        @ w["midlayer.mlp.down_proj.weight"].T
    return h + mlp


def shifted(x: torch.Tensor, k: int, fill=0) -> torch.Tensor:
    """x[:, j + k] at j (``fill`` past the end)."""
    if k == 0:
        return x
    pad = torch.full_like(x[:, :k], fill)
    return torch.cat([x[:, k:], pad], dim=1)


def eagle3_forward(w: dict, cfg: dict, input_ids, aux):
    """Draft logits [T, b, S, N] of every TTT step."""
    eps = cfg["rms_norm_eps"]
    g = aux @ w["fc.weight"].T
    ks, vs, out = [], [], []
    for t in range(cfg["ttt_steps"]):
        e = F.embedding(shifted(input_ids, 1 + t), w["embed_tokens.weight"])
        o = midlayer(w, cfg, e, g, ks, vs)
        out.append(rms_norm(o, w["norm.weight"], eps) @ w["lm_head.weight"].T)
        g = o
    return torch.stack(out)


def eagle3_labels(cfg: dict, input_ids, loss_mask, target_logits, draft_to_target):
    """(soft labels [T, b, S, N], masks m_t [T, b, S])."""
    S = input_ids.shape[1]
    in_draft = torch.zeros(target_logits.shape[-1], dtype=torch.bool)
    in_draft[draft_to_target] = True
    labels, masks = [], []
    for t in range(cfg["ttt_steps"]):
        tl = shifted(target_logits, 1 + t)  # target at p+1+t
        p = torch.softmax(tl[..., draft_to_target].double(), dim=-1).to(target_logits.dtype)
        valid = (torch.arange(S) + 2 + t < S)[None]
        m = valid & shifted(loss_mask, 2 + t).bool() & in_draft[tl.argmax(-1)]
        labels.append(p)
        masks.append(m)
    return torch.stack(labels), torch.stack(masks)


def eagle3_loss(w: dict, cfg: dict, input_ids, loss_mask, aux, target_logits, draft_to_target,
                decay: float = 0.8) -> dict:
    """The objective and metrics (see the module docstring) for one global batch."""
    logits = eagle3_forward(w, cfg, input_ids, aux)
    labels, masks = eagle3_labels(cfg, input_ids, loss_mask, target_logits, draft_to_target)
    T = cfg["ttt_steps"]
    wt = torch.tensor([decay ** t for t in range(T)], dtype=logits.dtype)[:, None, None]
    ce = -(labels * torch.log_softmax(logits, dim=-1)).sum(-1)  # [T, b, S]
    m = masks.to(logits.dtype)
    denom = (wt * m).sum()
    loss = (wt * m * ce).sum() / denom
    correct = (logits.argmax(-1) == labels.argmax(-1)) & masks
    acc = [(correct[t].sum() / masks[t].sum().clamp(min=1)).item() for t in range(T)]
    chain = torch.cumprod(correct.to(torch.float64), dim=0)  # all steps ≤ k right
    tau = 1.0 + (chain.sum() / masks[0].sum().clamp(min=1)).item()
    return {"loss": loss, "ce": ce, "masks": masks, "acc": acc, "tau": tau, "logits": logits}


def random_weights(cfg: dict, seed: int, dtype=torch.float64) -> dict:
    g = torch.Generator().manual_seed(seed)
    H, V, N, I = cfg["hidden_size"], cfg["vocab_size"], cfg["draft_vocab_size"], cfg["intermediate_size"]
    nh, nkv, hd = cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"]

    def lin(*shape, std=0.1):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)

    def norm(n):
        return (1 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype)

    out = {"embed_tokens.weight": lin(V, H, std=1.0), "fc.weight": lin(H, 3 * H),
           "midlayer.input_layernorm.weight": norm(H), "midlayer.hidden_norm.weight": norm(H)}
    at = "midlayer.self_attn."
    if cfg.get("attention") == "mla":
        nope, rp, vd, r = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
        if cfg.get("q_lora_rank"):
            qr = cfg["q_lora_rank"]
            out.update({at + "q_a_proj.weight": lin(qr, 2 * H), at + "q_a_layernorm.weight": norm(qr),
                        at + "q_b_proj.weight": lin(nh * (nope + rp), qr)})
        else:
            out[at + "q_proj.weight"] = lin(nh * (nope + rp), 2 * H)
        out.update({at + "kv_a_proj_with_mqa.weight": lin(r + rp, 2 * H), at + "kv_a_layernorm.weight": norm(r),
                    at + "kv_b_proj.weight": lin(nh * (nope + vd), r), at + "o_proj.weight": lin(H, nh * vd)})
    else:
        out.update({at + "q_proj.weight": lin(nh * hd, 2 * H), at + "k_proj.weight": lin(nkv * hd, 2 * H),
                    at + "v_proj.weight": lin(nkv * hd, 2 * H), at + "o_proj.weight": lin(H, nh * hd)})
    return {
        **out,
        "midlayer.post_attention_layernorm.weight": norm(H),
        "midlayer.mlp.gate_proj.weight": lin(I, H), "midlayer.mlp.up_proj.weight": lin(I, H),
        "midlayer.mlp.down_proj.weight": lin(H, I), "norm.weight": norm(H), "lm_head.weight": lin(N, H, std=0.5),
    }
