"""The Eagle3 draft on megatron-core tensor-parallel layers (``--algorithm eagle3``).

One decoder layer whose attention reads ``[RMSNorm(embed(x)); RMSNorm(g)]`` (width 2H),
unrolled for ``ttt_steps`` test-time-training steps: step 0 takes ``g = fc(aux)`` (three
tapped target layers concatenated), step t > 0 the layer's own output of step t − 1 at the
same position. The query of step t at position p attends to step 0's keys at positions
≤ p and to each later step's key at p only (:func:`ttt_attention`, the cache formulation;
``tests/eagle3_reference.py`` states the same attention over explicitly concatenated
steps). The LM head predicts a **draft vocabulary** of N target tokens (``draft_to_target``),
vocab-parallel over TP; the soft labels are the target's distribution over the same N
tokens, computed from the target's last hidden state and the rows of its frozen LM head at
the draft ids, never gathered: :meth:`Eagle3Draft.loss_sums` is a vocab-parallel soft
cross-entropy.

Tensor parallelism as in Megatron: q/k/v, gate/up and both heads column-parallel (heads,
FFN and vocabularies split over TP), ``o_proj`` / ``down`` / ``fc`` row-parallel.
Activations are sequence-first ``[S, b, ·]``.

Sequence parallelism (``config.sequence_parallel``, ``--sequence-parallel``) as Megatron
does it: the residual stream between the TP regions (``fc``'s output, the embeddings, the
norms) holds ``S/tp`` positions per rank; the column-parallel projections all-gather the
sequence (the TTT attention sees all positions of its heads), the row-parallel ones
reduce-scatter it; the norms' weights are marked ``sequence_parallel`` so that megatron's
``finalize_model_grads`` sums their partial gradients over TP. The frozen target heads and
``fc`` take whole sequences (their own non-SP config).

``attention_type = "mla"`` (``--draft-attention mla``) gives the DeepSeek-V3-shaped draft
(SpecForge's ``DeepseekV3ForCausalLMEagle3``): the same layer with multi-head latent
attention — megaspark's :class:`~megaspark.models.dspark.mla.DualSourceMLA` projections and
TP split over the 2H-wide input (compressed KV latent, per-head nope/rope query and key dims
with one shared interleaved-RoPE key, YaRN softmax scale), every head its own KV head in the
TTT attention.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from megaspark.config import AttentionShape, ConfigError
from megaspark.models.dspark.norms import RMSNorm
from megaspark.models.dspark.model import seeded_init
from megaspark.models.dspark.rope import apply_rope, apply_rope_interleaved, rope_cos_sin


@dataclass
class Eagle3Config(AttentionShape):
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    ffn_hidden_size: int
    vocab_size: int  # the target's
    draft_vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    ttt_steps: int = 7
    step_decay: float = 0.8
    init_std: float = 0.02
    # "mla": DeepSeek-V3 latent attention (num_query_groups = heads, kv_channels = the rope dim)
    attention_type: str = "gqa"
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_yarn: Optional[dict] = None  # resolved YaRN parameters (megaspark.config.yarn_parameters)

    # what DualSourceMLA reads besides the shape (its block-attention kernels are not used here)
    attention_backend = "dense"
    attention_chunk_blocks = 1

    def validate(self, tp: int = 1) -> "Eagle3Config":
        """Raise :class:`~megaspark.config.ConfigError` naming the flag for anything that
        cannot work (the attention and TP rules shared with DSpark's config, then Eagle3's)."""
        self.validate_attention(tp)

        def need(ok, msg):
            if not ok:
                raise ConfigError(msg)

        need(self.ttt_steps >= 1, f"--ttt-steps {self.ttt_steps} must be >= 1")
        need(0 < self.step_decay <= 1, f"the step decay {self.step_decay} must be in (0, 1]")
        need(0 < self.draft_vocab_size <= self.vocab_size,
             f"--draft-vocab-size {self.draft_vocab_size} must be in [1, {self.vocab_size}] (the target's vocabulary)")
        for what, n in (("draft vocabulary entries", self.draft_vocab_size),
                        ("target vocabulary entries", self.vocab_size)):
            need(n % tp == 0, f"--tensor-model-parallel-size {tp} does not divide the {n} {what}")
        return self

    def to_dict(self) -> dict:
        import dataclasses

        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Eagle3Config":
        import dataclasses

        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    def shape_signature(self) -> dict:
        """Fields that must match for a checkpoint to load into this draft."""
        keys = ("hidden_size", "num_attention_heads", "num_query_groups", "kv_channels", "ffn_hidden_size",
                "vocab_size", "draft_vocab_size", "ttt_steps", "attention_type", "q_lora_rank", "kv_lora_rank",
                "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        return {k: getattr(self, k) for k in keys}

    def transformer_config(self, tensor_model_parallel_size: int = 1, params_dtype=torch.float32,
                           sequence_parallel: bool = False):
        """``params_dtype`` bf16: bf16 weights and activations (megatron's mixed-precision
        optimizer keeps fp32 masters); the softmaxes and losses run in fp32.
        ``sequence_parallel``: see the module docstring (needs TP > 1)."""
        from megatron.core.transformer import TransformerConfig

        def init(t):
            return torch.nn.init.normal_(t, mean=0.0, std=self.init_std)

        return TransformerConfig(
            num_layers=1, hidden_size=self.hidden_size, num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups, kv_channels=self.kv_channels,
            ffn_hidden_size=self.ffn_hidden_size, add_bias_linear=False, hidden_dropout=0.0,
            attention_dropout=0.0, init_method=init, output_layer_init_method=init,
            init_method_std=self.init_std, tensor_model_parallel_size=tensor_model_parallel_size,
            params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16, use_cpu_initialization=True,
            gradient_accumulation_fusion=False, layernorm_epsilon=self.rms_norm_eps,
            sequence_parallel=sequence_parallel and tensor_model_parallel_size > 1,
            bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        )


#: megaspark parameter → (HF Eagle3 tensor name, dimension split over TP or None). The HF
#: names are EAGLE-3's / SpecForge's ``LlamaForCausalLMEagle3``; the two target heads are
#: the target's LM head (all rows, and the rows at the draft ids).
STATE_DICT_MAP = {
    "embedding.weight": ("embed_tokens.weight", 0),
    "fc.weight": ("fc.weight", 1),
    "input_layernorm.weight": ("midlayer.input_layernorm.weight", None),
    "hidden_norm.weight": ("midlayer.hidden_norm.weight", None),
    "linear_q.weight": ("midlayer.self_attn.q_proj.weight", 0),
    "linear_k.weight": ("midlayer.self_attn.k_proj.weight", 0),
    "linear_v.weight": ("midlayer.self_attn.v_proj.weight", 0),
    "linear_proj.weight": ("midlayer.self_attn.o_proj.weight", 1),
    "post_attention_layernorm.weight": ("midlayer.post_attention_layernorm.weight", None),
    "linear_gate.weight": ("midlayer.mlp.gate_proj.weight", 0),
    "linear_up.weight": ("midlayer.mlp.up_proj.weight", 0),
    "linear_down.weight": ("midlayer.mlp.down_proj.weight", 1),
    "final_norm.weight": ("norm.weight", None),
    "lm_head.weight": ("lm_head.weight", 0),
}
FROZEN = ("embedding.weight", "target_head.weight", "target_draft_head.weight")
_ATTENTION = ("linear_q.weight", "linear_k.weight", "linear_v.weight", "linear_proj.weight")


def state_dict_map(e: Eagle3Config) -> dict:
    """:data:`STATE_DICT_MAP` of a draft: for MLA the attention's tensors are DeepSeek-V3's
    (``q_proj`` or ``q_a_proj`` / ``q_a_layernorm`` / ``q_b_proj``, ``kv_a_proj_with_mqa``,
    ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``; the down-projections and latent norms
    replicated over TP, the rest split by heads)."""
    if not e.is_mla:
        return dict(STATE_DICT_MAP)
    out = {k: v for k, v in STATE_DICT_MAP.items() if k not in _ATTENTION}
    a, hf = "self_attention.", "midlayer.self_attn."
    if e.q_lora_rank > 0:
        out.update({a + "linear_q_down_proj.weight": (hf + "q_a_proj.weight", None),
                    a + "q_down_layernorm.weight": (hf + "q_a_layernorm.weight", None),
                    a + "linear_q_up_proj.weight": (hf + "q_b_proj.weight", 0)})
    else:
        out[a + "linear_q.weight"] = (hf + "q_proj.weight", 0)
    out.update({a + "linear_kv_down_proj.weight": (hf + "kv_a_proj_with_mqa.weight", None),
                a + "kv_down_layernorm.weight": (hf + "kv_a_layernorm.weight", None),
                a + "linear_kv_up_proj.weight": (hf + "kv_b_proj.weight", 0),
                a + "linear_proj.weight": (hf + "o_proj.weight", 1)})
    return out


def ttt_attention(q: torch.Tensor, ks: list, vs: list, scale: float) -> torch.Tensor:
    """Attention of TTT step t = len(ks) − 1: q [b, nh, S, hd]; ks / vs the keys / values
    [b, nkv, S, hd] of steps 0 … t. Scores against step 0's keys (causal) and one score per
    later step against its key at the query's own position, one softmax over all of them."""
    b, nh, S, hd = q.shape
    rep = nh // ks[0].shape[1]
    qf = q.float()

    def heads(x):
        return x.float().repeat_interleave(rep, dim=1) if rep > 1 else x.float()

    k0, v0 = heads(ks[0]), heads(vs[0])
    s0 = torch.matmul(qf, k0.transpose(-1, -2)) * scale
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1)
    s0 = s0.masked_fill(causal, torch.finfo(torch.float32).min)
    diag = [(qf * heads(k)).sum(-1, keepdim=True) * scale for k in ks[1:]]
    p = torch.softmax(torch.cat([s0, *diag], dim=-1), dim=-1)
    out = torch.matmul(p[..., :S], v0)
    for i, v in enumerate(vs[1:]):
        out = out + p[..., S + i:S + i + 1] * heads(v)
    return out.to(q.dtype)


def _shift(x: torch.Tensor, k: int, fill=0) -> torch.Tensor:
    """x[j + k] at j along dim 0 (``fill`` past the end)."""
    if k == 0:
        return x
    pad = torch.full_like(x[:k], fill)
    return torch.cat([x[k:], pad], dim=0)


def _tp_group():
    return parallel_state.get_tensor_model_parallel_group()


def _vp_argmax(x: torch.Tensor, start: int) -> torch.Tensor:
    """The global argmax over the TP-split last dimension (the smallest index on ties)."""
    value, index = x.max(dim=-1)
    best = value.clone()
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(best, op=torch.distributed.ReduceOp.MAX, group=_tp_group())
    big = torch.iinfo(torch.int64).max
    cand = torch.where(value == best, index + start, torch.full_like(index, big))
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(cand, op=torch.distributed.ReduceOp.MIN, group=_tp_group())
    return cand


def _vp_log_normalizer(z: torch.Tensor) -> torch.Tensor:
    """logsumexp over the TP-split last dimension (differentiable: the sum's all-reduce has
    an identity backward, as in megatron's vocab-parallel cross-entropy)."""
    m = z.detach().amax(dim=-1)
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=_tp_group())
    s = torch.exp(z - m[..., None]).sum(dim=-1)
    s = tensor_parallel.reduce_from_tensor_model_parallel_region(s)
    return m + torch.log(s)


class Eagle3Draft(MegatronModule):
    def __init__(self, config, e: Eagle3Config, draft_to_target: torch.Tensor, seed: int = 1234):
        super().__init__(config=config)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        e.validate(tp)
        self.eagle3_config = e
        self.model_type = ModelType.encoder_or_decoder
        self.input_tensor = None  # one pipeline stage: nothing arrives from another
        H, V, N, I = e.hidden_size, e.vocab_size, e.draft_vocab_size, e.ffn_hidden_size
        hd, nh, nkv = e.kv_channels, e.num_attention_heads, e.num_query_groups
        self.heads_per_rank, self.groups_per_rank, self.head_dim = nh // tp, nkv // tp, hd
        self.sequence_parallel = bool(config.sequence_parallel)
        init = config.init_method
        import dataclasses

        # whole sequences in and out: fc (its output is then split) and the frozen target heads
        whole = dataclasses.replace(config, sequence_parallel=False) if self.sequence_parallel else config

        def column(name, fan_in, fan_out, cfg=config):
            with seeded_init(seed, name):
                return tensor_parallel.ColumnParallelLinear(
                    fan_in, fan_out, config=cfg, init_method=init, bias=False, gather_output=False,
                    skip_bias_add=False)

        def row(name, fan_in, fan_out, input_is_parallel, cfg=config):
            with seeded_init(seed, name):
                return tensor_parallel.RowParallelLinear(
                    fan_in, fan_out, config=cfg, init_method=init, bias=False,
                    input_is_parallel=input_is_parallel, skip_bias_add=False)

        with seeded_init(seed, "embedding"):
            self.embedding = tensor_parallel.VocabParallelEmbedding(V, H, init_method=init, config=config)
        self.fc = row("fc", 3 * H, H, input_is_parallel=False, cfg=whole)
        self.input_layernorm = RMSNorm(config, H, e.rms_norm_eps)
        self.hidden_norm = RMSNorm(config, H, e.rms_norm_eps)
        if e.is_mla:
            from megaspark.models.dspark.mla import DualSourceMLA

            with seeded_init(seed, "mla"):
                self.self_attention = DualSourceMLA(config, e, input_size=2 * H)
        else:
            self.linear_q = column("q", 2 * H, nh * hd)
            self.linear_k = column("k", 2 * H, nkv * hd)
            self.linear_v = column("v", 2 * H, nkv * hd)
            self.linear_proj = row("o", nh * hd, H, input_is_parallel=True)
        self.post_attention_layernorm = RMSNorm(config, H, e.rms_norm_eps)
        self.linear_gate = column("gate", H, I)
        self.linear_up = column("up", H, I)
        self.linear_down = row("down", I, H, input_is_parallel=True)
        self.final_norm = RMSNorm(config, H, e.rms_norm_eps)
        self.lm_head = column("lm_head", H, N)
        # frozen copies of the target's LM head: every row (the target's top token decides
        # whether a position counts) and the rows at the draft ids (the soft labels)
        self.target_head = column("target_head", H, V, cfg=whole)
        self.target_draft_head = column("target_draft_head", H, N, cfg=whole)
        for name in FROZEN:
            getattr(self, name.split(".")[0]).weight.requires_grad_(False)
        if self.sequence_parallel:  # replicated weights that see one sequence shard per rank
            for name, p in self.named_parameters():
                if p.dim() == 1 or any(k in name for k in ("linear_q_down_proj", "linear_kv_down_proj")):
                    p.sequence_parallel = True
        ids = torch.as_tensor(draft_to_target, dtype=torch.int64)
        if ids.numel() != N:
            raise ValueError(f"draft_to_target has {ids.numel()} entries for a draft vocabulary of {N}")
        self.register_buffer("draft_to_target", ids)  # checkpointed: the export's d2t
        self.register_buffer("t2d", torch.zeros(V, dtype=torch.bool), persistent=False)
        self.set_draft_vocab(ids)

    @torch.no_grad()
    def set_draft_vocab(self, draft_to_target: torch.Tensor) -> None:
        """The draft vocabulary (increasing target ids) and its mask over the target's
        (call after loading a checkpoint, whose ``draft_to_target`` rules)."""
        ids = torch.as_tensor(draft_to_target, dtype=torch.int64, device=self.draft_to_target.device)
        self.draft_to_target.copy_(ids)
        self.t2d.zero_()
        self.t2d[ids.to(self.t2d.device)] = True

    @torch.no_grad()
    def load_target_weights(self, source) -> None:
        """Copy this rank's shards of the target's embedding and LM head (all rows, and the
        rows at the draft ids) from ``source`` (a :class:`megaspark.targets.checkpoint.
        TargetInfo`: ``weight_rows(which, start, stop)``)."""
        rank = parallel_state.get_tensor_model_parallel_rank()
        for module, which in ((self.embedding, "embedding"), (self.target_head, "lm_head")):
            rows = module.weight.shape[0]
            shard = source.weight_rows(which, rank * rows, (rank + 1) * rows)
            module.weight.copy_(shard.to(module.weight.device, module.weight.dtype))
        n = self.target_draft_head.weight.shape[0]
        ids = self.draft_to_target[rank * n:(rank + 1) * n].cpu()
        rows = []
        for start in range(0, ids.numel(), 4096):  # contiguous runs would be cheaper; fine at start-up
            part = ids[start:start + 4096]
            block = source.weight_rows("lm_head", int(part.min()), int(part.max()) + 1)
            rows.append(block[part - int(part.min())])
        self.target_draft_head.weight.copy_(torch.cat(rows).to(self.target_draft_head.weight.device,
                                                               self.target_draft_head.weight.dtype))

    def set_input_tensor(self, input_tensor):  # megatron's schedule calls it on every model
        self.input_tensor = input_tensor

    # ------------------------------------------------------------------ forward
    def rope(self, positions: torch.Tensor):
        """(cos, sin) [b, S, rope dim] of positions [b, S]."""
        e = self.eagle3_config
        return rope_cos_sin(positions, e.rope_head_dim, e.rope_theta, yarn=e.rope_yarn)

    def qkv(self, a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Attention input a [S, b, 2H] → rotated q [b, nh, S, dq], k [b, nkv, S, dq] and v
        [b, nkv, S, dv] of this rank's heads (MLA: nkv = nh, dq = nope + rope). With sequence
        parallelism a holds S/tp positions and the outputs all S."""
        b = a.shape[1]
        S = a.shape[0] * (parallel_state.get_tensor_model_parallel_world_size() if self.sequence_parallel else 1)
        if self.eagle3_config.is_mla:
            attn = self.self_attention
            q_nope, q_pe = attn._queries(a)
            latent, k_pe = attn._latent(a)
            if self.sequence_parallel:  # the shared key of every position (backward: summed, split)
                k_pe = tensor_parallel.gather_from_sequence_parallel_region(
                    k_pe.permute(2, 0, 1, 3).contiguous()).permute(1, 2, 0, 3)
            elif attn.tp > 1:  # every rank's heads read the one shared key
                k_pe = tensor_parallel.copy_to_tensor_model_parallel_region(k_pe)
            kv, _ = attn.linear_kv_up_proj(latent)
            kv = kv.view(S, b, attn.heads_per_rank, attn.nope_dim + attn.v_dim).permute(1, 2, 0, 3)
            k_pe = apply_rope_interleaved(k_pe, cos, sin).expand(-1, attn.heads_per_rank, -1, -1)
            q = torch.cat([q_nope, apply_rope_interleaved(q_pe, cos, sin)], dim=-1)
            return q, torch.cat([kv[..., :attn.nope_dim], k_pe], dim=-1), kv[..., attn.nope_dim:]
        hd, nq, nkv = self.head_dim, self.heads_per_rank, self.groups_per_rank
        q, _ = self.linear_q(a)
        k, _ = self.linear_k(a)
        v, _ = self.linear_v(a)
        q = apply_rope(q.view(S, b, nq, hd).permute(1, 2, 0, 3), cos, sin)
        k = apply_rope(k.view(S, b, nkv, hd).permute(1, 2, 0, 3), cos, sin)
        return q, k, v.view(S, b, nkv, hd).permute(1, 2, 0, 3)

    def attention_output(self, att: torch.Tensor) -> torch.Tensor:
        """att [b, nh, S, dv] → o_proj output [S, b, H]."""
        if self.eagle3_config.is_mla:
            return self.self_attention._output(att)
        b, nh, S, dv = att.shape
        out, _ = self.linear_proj(att.permute(2, 0, 1, 3).reshape(S, b, nh * dv))
        return out

    def _layer(self, emb, g, ks, vs, cos, sin):
        a = torch.cat([self.input_layernorm(emb), self.hidden_norm(g)], dim=-1)
        q, k, v = self.qkv(a, cos, sin)
        ks.append(k)
        vs.append(v)
        att = ttt_attention(q, ks, vs, self.eagle3_config.softmax_scale)
        h = g + self.attention_output(att)
        m = self.post_attention_layernorm(h)
        gate, _ = self.linear_gate(m)
        up, _ = self.linear_up(m)
        mlp, _ = self.linear_down(F.silu(gate) * up)
        return h + mlp

    def forward(self, input_ids: torch.Tensor, aux: torch.Tensor) -> list:
        """input_ids [b, S]; aux [S, b, 3H] → this rank's draft logits [S, b, N/tp] of every
        TTT step (step t at position p reads the token x_{p+1+t})."""
        e = self.eagle3_config
        S, b, _ = aux.shape
        g, _ = self.fc(aux.to(self.fc.weight.dtype))  # features arrive in the target's dtype
        if self.sequence_parallel:
            g = tensor_parallel.scatter_to_sequence_parallel_region(g)  # [S/tp, b, H]
        pos = torch.arange(S, device=aux.device)[None].expand(b, S)
        cos, sin = self.rope(pos)
        ids = input_ids.t()  # [S, b]
        ks, vs, logits = [], [], []
        for t in range(e.ttt_steps):
            emb = self.embedding(_shift(ids, 1 + t).t()).transpose(0, 1).to(g.dtype)  # [S, b, H]
            if self.sequence_parallel:
                emb = tensor_parallel.scatter_to_sequence_parallel_region(emb)
            o = self._layer(emb, g, ks, vs, cos, sin)
            z, _ = self.lm_head(self.final_norm(o))
            logits.append(z)
            g = o
        return logits

    # ------------------------------------------------------------------ loss
    @torch.no_grad()
    def labels(self, target_last_hidden: torch.Tensor) -> dict:
        """What the loss needs of the target, computed once per micro-batch (every TTT step
        reads it shifted): whether the target's top token at each position is in the draft
        vocabulary (full-vocabulary argmax, vocab-parallel), the soft labels (this rank's
        shard of the draft vocabulary) and their argmax. target_last_hidden [S, b, H]."""
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        target_last_hidden = target_last_hidden.to(self.target_head.weight.dtype)
        full, _ = self.target_head(target_last_hidden)  # [S, b, V/tp]
        top = _vp_argmax(full.float(), tp_rank * self.target_head.weight.shape[0])
        del full
        tz, _ = self.target_draft_head(target_last_hidden)
        tz = tz.float()
        return {"in_draft": self.t2d[top], "soft": torch.exp(tz - _vp_log_normalizer(tz)[..., None]),
                "top": _vp_argmax(tz, tp_rank * self.lm_head.weight.shape[0])}

    def step_masks(self, loss_mask: torch.Tensor, labels: dict) -> list:
        """m_t [S, b] of every TTT step: x_{p+2+t} exists and is supervised, and the target's
        top token at p+1+t is in the draft vocabulary. loss_mask [b, S]."""
        S = loss_mask.shape[1]
        mask = loss_mask.t().bool()
        pos = torch.arange(S, device=mask.device)[:, None]
        return [(pos + 2 + t < S) & _shift(mask, 2 + t, False) & _shift(labels["in_draft"], 1 + t, False)
                for t in range(self.eagle3_config.ttt_steps)]

    def denominator(self, loss_mask: torch.Tensor, labels: dict) -> torch.Tensor:
        """Σ_t w_t Σ_p m_t[p] of a micro-batch (before the forward: the global denominator)."""
        e = self.eagle3_config
        return sum(e.step_decay ** t * m.sum(dtype=torch.float32)
                   for t, m in enumerate(self.step_masks(loss_mask, labels)))

    def loss_sums(self, logits: list, input_ids, loss_mask, target_last_hidden=None, labels=None) -> dict:
        """Σ_t w_t Σ_p m_t·CE_t (``num``) and Σ_t w_t Σ_p m_t (``den``) of this micro-batch,
        plus per-step (correct, count) sums and the chained-acceptance sum for τ
        (tests/eagle3_reference.py states the objective). ``labels`` from :meth:`labels`,
        else computed here from target_last_hidden [S, b, H]."""
        e = self.eagle3_config
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        n_local = self.lm_head.weight.shape[0]
        if labels is None:
            labels = self.labels(target_last_hidden)
        num = den = None
        correct, counts, chain, chain_sum = [], [], None, None
        for t, (z, m) in enumerate(zip(logits, self.step_masks(loss_mask, labels))):
            z = z.float()
            q = _shift(labels["soft"], 1 + t)
            qz = tensor_parallel.reduce_from_tensor_model_parallel_region((q * z).sum(-1))
            ce = _vp_log_normalizer(z) - qz  # [S, b]
            w = e.step_decay ** t
            mf = m.to(ce.dtype)
            term, weight = w * (mf * ce).sum(), w * mf.sum()
            num = term if num is None else num + term
            den = weight if den is None else den + weight
            with torch.no_grad():
                right = (_vp_argmax(z, tp_rank * n_local) == _shift(labels["top"], 1 + t, -1)) & m
                correct.append(right.sum())
                counts.append(m.sum())
                chain = right.double() if chain is None else chain * right.double()
                chain_sum = chain.sum() if chain_sum is None else chain_sum + chain.sum()
        return {"num": num, "den": den, "correct": torch.stack(correct), "count": torch.stack(counts),
                "chain": chain_sum, "positions": counts[0]}


def load_hf_tensors(model: Eagle3Draft, tensors: dict, target_lm_head: Optional[torch.Tensor] = None) -> None:
    """Copy this rank's shards of HF-named Eagle3 tensors (and, given, of the target's LM
    head [V, H]) into ``model``."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    params = dict(model.named_parameters())

    def put(name, full, dim):
        p = params[name]
        shard = full if dim is None else full.chunk(tp, dim=dim)[rank]
        with torch.no_grad():
            p.copy_(shard.to(p.dtype))

    for name, (hf, dim) in state_dict_map(model.eagle3_config).items():
        put(name, tensors[hf], dim)
    if target_lm_head is not None:
        put("target_head.weight", target_lm_head, 0)
        put("target_draft_head.weight", target_lm_head[model.draft_to_target.cpu()], 0)


__all__ = ["Eagle3Config", "Eagle3Draft", "ttt_attention", "load_hf_tensors", "STATE_DICT_MAP", "FROZEN",
           "state_dict_map"]
