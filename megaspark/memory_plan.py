"""Start-up memory plan: what one rank will hold, computed before anything heavy is loaded.

:func:`plan_memory` takes the run's :class:`PlanSettings`, the :class:`~megaspark.config.DSparkConfig` and
the target's HF (text) config, and returns a :class:`MemoryPlan` for one rank, given its
tensor-parallel rank, pipeline stage, data-parallel size and whether it runs the target:

* **draft parameters**, trainable and frozen (the embedding and LM head are frozen copies of
  the target's), counted *exactly* from the config: which stage holds the embedding, the
  context projector and its norm (first), which layers (the model's ``_layer_range``, with
  virtual stages), the final norm, LM head, Markov and confidence heads (last); vocab-parallel
  and column/row-parallel tables split over TP, small projections replicated. Stored in
  bf16 with ``--bf16``, else fp32 (the MLA latent norms stay fp32 either way);
* **gradients**: megatron-core DDP reduces in fp32 (``grad_reduce_in_fp32``), 4 B per
  trainable parameter;
* **optimizer state**: Adam's ``exp_avg`` and ``exp_avg_sq`` in fp32 (8 B) plus fp32 master
  weights with ``--bf16`` (4 B); ``--use-distributed-optimizer`` divides them by DP;
* **target weights** (only on a rank that runs the target): its parameter count from the
  config alone (``AutoModelForCausalLM.from_config`` on the ``meta`` device) times the
  target's dtype;
* **target activations** of one micro-batch in inference mode: all ``L+1`` hidden states
  (``output_hidden_states=True``), the largest per-layer working set (SDPA attention, no
  ``S×S`` scores) and the features it hands to the draft;
* **inputs**: the draft inputs of the micro-batches in flight and one more (the trainer
  streams them: built when the schedule asks, one prefetched): the tapped features
  ``[b, S, L·H]`` on the first stage, the aligned target state ``[b, N, B, H]`` on the last,
  the block index tensors everywhere;
* **activations** of the draft in training, derived from the code (the local layer spec):
  the tensors every layer saves for backward (``T = S + N·B`` rows of the hidden state for
  the key/value side, ``N·B`` block rows elsewhere, fp32 copies where the code computes in
  fp32), the structured block attention's fp32 probabilities, the loss inputs, plus the
  largest transient: the chunked vocab-parallel loss (``[chunk, V/tp]`` fp32 tensors) on the
  last stage. With pipeline parallelism a stage holds up to the number of micro-batches the
  1F1B (or interleaved) schedule keeps in flight there.

The attention term is an upper bound: every block is assumed to see the whole context
(``a_j ≈ S``), which is what chat data does when the answers (where the anchors are) sit at
the end of long prompts; with anchors spread evenly over the sequence it is about half.

``total = params + grads + optimizer + target weights + inputs + the largest of (target
activations, draft activations, optimizer step)``: the target runs before the draft's
forward passes of a step, and the optimizer steps after their activations are freed.
:meth:`MemoryPlan.check` refuses a plan over the budget with a message naming the largest
items and the flags that shrink them. ``tests/test_memory_plan.py`` checks the counts against
the built model and the estimate against measured peak memory of CPU training steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

GIB = 1024**3
MIB = 1024**2

# Element sizes.
_FP32 = 4
_INDEX = 8  # int64 index tensors


class MemoryPlanError(ValueError):
    """The memory plan of a rank exceeds the budget; the message says what to change."""


# ----------------------------------------------------------------------------- parameters
def _dtype_bytes(dtype) -> int:
    import torch

    if isinstance(dtype, str):
        dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                 "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[dtype]
    return torch.empty((), dtype=dtype).element_size()


def _div(n: int, tp: int) -> int:
    return n // tp


def layer_parameters(d, tp: int) -> int:
    """Parameters of one draft layer on one TP rank (all trainable)."""
    H, hd = d.hidden_size, d.kv_channels
    nh, nkv = d.num_attention_heads, d.num_query_groups
    n = 2 * H  # input_layernorm, pre_mlp_layernorm (replicated)
    if d.is_mla:
        qk = d.qk_nope_head_dim + d.qk_rope_head_dim
        if d.q_lora_rank > 0:
            n += d.q_lora_rank * H + d.q_lora_rank  # replicated q_a proj + its norm
            n += _div(nh * qk, tp) * d.q_lora_rank  # column-parallel q_b
        else:
            n += _div(nh * qk, tp) * H  # column-parallel q_proj
        n += (d.kv_lora_rank + d.qk_rope_head_dim) * H + d.kv_lora_rank  # replicated kv_a + norm
        n += _div(nh * (d.qk_nope_head_dim + d.v_head_dim), tp) * d.kv_lora_rank  # kv_b (column)
        n += H * _div(nh * d.v_head_dim, tp)  # o_proj (row)
    else:
        q, kv = _div(nh * hd, tp), _div(2 * nkv * hd, tp)
        n += q * H + kv * H + H * q  # linear_q, fused linear_kv (column), linear_proj (row)
        if d.attention_bias:
            n += q + kv
        if d.qk_norm:
            n += 2 * hd  # per-head q/k norms (replicated)
    F = _div(d.ffn_hidden_size, tp)
    n += 2 * F * H + H * F  # SwiGLU fc1 [gate; up] (column), fc2 (row)
    return n


def chunk_parameters(d, tp: int, pre_process: bool, post_process: bool, num_layers: int):
    """(trainable, frozen) parameters of one model chunk on one TP rank."""
    H, V, r = d.hidden_size, d.vocab_size, d.markov_rank
    trainable = num_layers * layer_parameters(d, tp)
    frozen = 0
    if pre_process:
        frozen += _div(V, tp) * H  # vocab-parallel embedding (target copy)
        trainable += H * _div(d.context_width, tp) + H  # row-parallel fc + hidden_norm
    if post_process:
        trainable += H  # final norm
        frozen += _div(V, tp) * H  # column-parallel LM head (target copy)
        if r > 0:
            trainable += 2 * _div(V, tp) * r  # Markov W1 (vocab-parallel), W2 (column)
            if d.markov_head_type == "gated":
                trainable += (H + r) * r + r
            elif d.markov_head_type == "rnn":
                trainable += (2 * r + H) * 3 * r + 3 * r
        if d.confidence_head:
            trainable += H + (r if d.confidence_with_markov else 0) + 1
    return trainable, frozen


def model_chunks(d, pp: int, vpp: Optional[int], pp_rank: int):
    """[(pre_process, post_process, first layer, layer count)] of the chunks on ``pp_rank``
    (the layout of :meth:`DSparkModel._layer_range` and ``build_model_chunks``)."""
    vpp_n = vpp or 1
    chunks = pp * vpp_n
    if d.num_layers % chunks:
        raise ValueError(
            f"--num-layers {d.num_layers} is not divisible by the {chunks} pipeline model chunks")
    per = d.num_layers // chunks
    out = []
    for v in range(vpp_n):
        pre = v == 0 and pp_rank == 0
        post = v == vpp_n - 1 and pp_rank == pp - 1
        out.append((pre, post, (v * pp + pp_rank) * per, per))
    return out


def target_parameter_count(hf_config) -> int:
    """Parameters of the target from its config alone (no weights): the causal LM built on the
    ``meta`` device. Tied embeddings count once."""
    cfg = getattr(hf_config, "text_config", None) or hf_config
    key = cfg.to_json_string(use_diff=False) if hasattr(cfg, "to_json_string") else None
    if key is not None and key in _TARGET_COUNTS:
        return _TARGET_COUNTS[key]
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters())
    if key is not None:
        _TARGET_COUNTS[key] = n
    return n


_TARGET_COUNTS: dict = {}


# ----------------------------------------------------------------------------- activations
@dataclass
class _Shape:
    b: int  # micro-batch size
    S: int  # sequence length
    tp: int
    a: int  # bytes of a draft activation (2 with --bf16, else 4)
    f: int  # bytes of a target feature (the target's dtype)

    @property
    def fp32(self) -> bool:
        return self.a == _FP32


def _attention_core(d, s: _Shape, nq: int, nkv: int, hd: int, hd_v: int) -> dict:
    """Saved tensors of :func:`structured_block_attention` per micro-batch (every block
    assumed to see the whole context, see the module docstring)."""
    b, S, B = s.b, s.S, d.block_size
    N = d.num_anchors
    R, T = N * B, S + N * B
    g = nq // max(nkv, 1)
    chunks = math.ceil(N / max(1, d.attention_chunk_blocks))
    out = {}
    if d.attention_backend == "dense":
        out["scores"] = b * nq * R * T * _FP32 + b * R * T  # fp32 probabilities + mask
    else:
        out["scores"] = b * nq * R * (S + B) * _FP32 + b * N * S  # fp32 probabilities + masks
    # einsum operands made contiguous in fp32 for the batched matmuls
    q_copies = 1 if (g == 1 and not s.fp32) else 2
    out["attn_copies"] = b * R * (q_copies * nq * hd + nkv * (hd + hd_v)) * _FP32
    if g > 1:
        out["attn_copies"] += b * R * nq * B * _FP32
    if not s.fp32:  # fp32 copies of each chunk's context keys and values
        out["attn_copies"] += b * chunks * S * nkv * (hd + hd_v) * _FP32
    return out


def _norm(rows: int, width: int, s: _Shape, keeps_input: bool = True) -> int:
    """Saved tensors of megaspark's fp32 RMSNorm: the fp32 input (a copy unless the input is
    already fp32, then the input itself is kept: counted by the caller), the normalised fp32
    product and the output in the activation dtype (``keeps_input=False``: output not saved
    by its consumer)."""
    n = rows * width * _FP32 + rows * _FP32
    if not s.fp32:
        n += rows * width * _FP32
    if keeps_input:
        n += rows * width * s.a
    return n


def layer_activations(d, s: _Shape) -> dict:
    """Bytes one draft layer keeps for backward per micro-batch, by part."""
    b, S, H, tp, a = s.b, s.S, d.hidden_size, s.tp, s.a
    R = d.num_anchors * d.block_size
    T = S + R
    nh = d.num_attention_heads // tp
    parts = {}
    # input_layernorm and pre_mlp_layernorm (their outputs feed linears that save them);
    # in fp32 the layer output / residual themselves are kept through the norms' inputs
    parts["norms"] = 2 * b * _norm(R, H, s)
    if s.fp32:
        parts["norms"] += b * (T + R) * H * a
    parts["kv_input"] = b * T * H * a  # [C; norm(X)] saved by the key/value projection
    if d.is_mla:
        qk, vd, rope, lat = d.qk_head_dim, d.v_head_dim, d.qk_rope_head_dim, d.kv_lora_rank
        proj = b * _norm(T, lat, s)  # kv_a_layernorm (output saved by kv_b)
        if s.fp32:
            # kv_a output, kv_b output (holds the values) and the assembled keys
            proj += b * T * (lat + rope + nh * (d.qk_nope_head_dim + vd) + nh * qk) * a
        if d.q_lora_rank > 0:
            proj += b * _norm(R, d.q_lora_rank, s)
            if s.fp32:
                proj += b * R * d.q_lora_rank * a
        proj += b * R * nh * vd * a  # attention output, saved by o_proj
        parts["attn_proj"] = proj
        parts.update(_attention_core(d, s, nh, nh, qk, vd))
    else:
        hd, nkv = d.kv_channels, d.num_query_groups // tp
        proj = b * R * nh * hd * a  # attention output, saved by linear_proj
        if s.fp32:
            proj += b * T * (2 * nkv * hd + nkv * hd) * a  # [k; v] projection + rotated keys
        if d.qk_norm:
            proj += b * R * nh * (hd * 2 * _FP32 + _FP32)
            proj += b * T * nkv * (hd * _FP32 * (1 if s.fp32 else 2) + _FP32)
        parts["attn_proj"] = proj
        parts.update(_attention_core(d, s, nh, nkv, hd, hd))
    parts["mlp"] = 5 * b * R * (d.ffn_hidden_size // tp) * a  # fc1 out, silu, up, product
    return parts


def embed_activations(d, s: _Shape) -> int:
    """First stage: the context projector's saved input, its norm, the hidden state [C; X⁰]
    (kept in fp32 by the first layer's norm) and RoPE tables (every stage, added by caller)."""
    b, S, H, tp, a = s.b, s.S, d.hidden_size, s.tp, s.a
    T = S + d.num_anchors * d.block_size
    n = 0
    if tp > 1:
        n += b * S * (d.context_width // tp) * a  # the fc input shard (a contiguous copy)
    elif s.f != a:
        n += b * S * d.context_width * a  # features converted to the draft's dtype
    n += b * _norm(S, H, s, keeps_input=False)
    if s.fp32:
        n += b * S * H * a + b * T * H * a  # fc output (the norm's fp32 input), [C; X⁰]
    return n


def rope_tables(d, s: _Shape) -> int:
    T = s.S + d.num_anchors * d.block_size
    return 2 * s.b * T * d.rope_head_dim * _FP32


def head_activations(d, s: _Shape, loss_rows: int) -> dict:
    """Last stage: final norm, Markov / confidence heads and the saved loss inputs."""
    b, H, a, r = s.b, d.hidden_size, s.a, d.markov_rank
    R = d.num_anchors * d.block_size
    rows = b * R
    parts = {"final_norm": b * _norm(R, H, s, keeps_input=False)}
    heads = 0
    if r > 0:
        if d.markov_head_type == "gated":
            heads += rows * ((H + r) + 3 * r) * a
        elif d.markov_head_type == "rnn":
            heads += rows * (H + 8 * r) * a
    if d.confidence_head and d.confidence_with_markov:
        heads += rows * (H + r) * a
    parts["heads"] = heads
    # the fused loss keeps, from forward to backward, its fp32 gradients (one α-combined
    # set: d/dh [rows, H], d/dfeat [rows, r], d/dW2 [V/tp, r]) and per-row values
    parts["loss_grads"] = (loss_rows * (H + r) + (d.vocab_size // s.tp) * r) * _FP32 \
        + loss_rows * (3 * _INDEX + 4 * _FP32)
    return parts


def loss_transient(d, s: _Shape, loss_rows: int) -> int:
    """Peak of one chunk of the fused loss: the draft logits (turned in place into the
    gradient w.r.t. the logits) and the row groups' Markov bias / target probabilities /
    summed gradient — two [chunk, V/tp] fp32 — an int8 sign(p_t − p_d), plus, with bf16
    weights, a bf16 copy of one for the gradient GEMMs."""
    chunk = min(d.loss_chunk_rows, loss_rows)
    slices = 2 * _FP32 + 1 + (s.a if s.a != _FP32 else 0)
    return chunk * (d.vocab_size // s.tp) * slices


def attention_transient(d, s: _Shape) -> int:
    """Forward temporaries of the last attention chunk (raw, masked and joined scores)."""
    B = d.block_size
    n = min(d.attention_chunk_blocks, d.num_anchors)
    nh = d.num_attention_heads // s.tp
    return 3 * s.b * nh * n * B * (s.S + B) * _FP32


def input_bytes(d, s: _Shape, first: bool, last: bool) -> int:
    """Draft inputs of one micro-batch on one rank (see the module docstring)."""
    b, S, N, B, H = s.b, s.S, d.num_anchors, d.block_size, d.hidden_size
    R, T = N * B, S + N * B
    n = b * (_INDEX * T + 17 * N + 37 * R)  # positions, anchors, ids, labels, weights, masks
    if first:
        n += b * S * d.context_width * s.f
    if last:
        n += b * R * H * s.f
    return n


def target_activation_bytes(hf_config, b: int, S: int, dtype_bytes: int, features: int) -> int:
    """Inference peak of the target for one micro-batch: all L+1 hidden states, plus the larger
    of the per-layer working set and the features handed to the draft."""
    cfg = getattr(hf_config, "text_config", None) or hf_config
    H = int(cfg.hidden_size)
    L = int(cfg.num_hidden_layers)
    nh = int(cfg.num_attention_heads)
    nkv = int(getattr(cfg, "num_key_value_heads", None) or nh)
    hd = int(getattr(cfg, "head_dim", None) or H // nh)
    inter = int(getattr(cfg, "intermediate_size", None) or 4 * H)
    if getattr(cfg, "moe_intermediate_size", None):
        inter = max(inter, int(cfg.moe_intermediate_size) * int(getattr(cfg, "num_experts_per_tok", 1) or 1))
    tokens = b * S
    states = (L + 1) * tokens * H * dtype_bytes
    mlp = (3 * inter + 2 * H) * dtype_bytes  # act(gate), up, their product; residual + output
    attn = (2 * (nh + 2 * nkv) * hd + H) * dtype_bytes  # q, k, v, rotated q, k, output
    norm = 2 * H * _FP32 + H * dtype_bytes  # fp32 RMSNorm temporaries
    working = tokens * max(mlp, attn, norm)
    return states + max(working, features)


# ----------------------------------------------------------------------------- the plan
@dataclass
class MemoryPlan:
    """Bytes one rank will hold (see the module docstring for what each item is)."""

    draft_trainable_params: int
    draft_frozen_params: int
    grads: int
    optimizer: int  # as configured (sharded over DP with the distributed optimizer)
    optimizer_without_distributed: int
    target_weights: int
    target_activations: int
    activations: int  # the draft's, for the micro-batches in flight on this stage
    total: int
    inputs: int = 0  # draft inputs of the micro-batches in flight (+1 prefetched), streamed
    optimizer_distributed: int = 0
    trainable_numel: int = 0
    frozen_numel: int = 0
    target_numel: int = 0
    role: str = ""
    distributed_optimizer: bool = False
    bf16: bool = False
    in_flight: int = 1
    microbatches: int = 1
    activation_parts: dict = field(default_factory=dict)  # the activation estimate, by part
    budget: Optional[int] = None  # bytes, from --memory-budget-gb (shown by format())

    # -------------------------------------------------------------- presentation
    def items(self) -> list:
        """(label, bytes, note) rows of the table, in display order."""
        what = "Adam fp32 moments" + (" + fp32 master weights" if self.bf16 else "")
        if self.distributed_optimizer:
            opt_note = (f"{what}, sharded over DP; {_fmt(self.optimizer_without_distributed)} "
                        "without --use-distributed-optimizer")
        else:
            opt_note = f"{what}; {_fmt(self.optimizer_distributed)} with --use-distributed-optimizer"
        held = f"{self.microbatches} micro-batch{'es' if self.microbatches != 1 else ''}"
        rows = [
            ("draft params, trainable", self.draft_trainable_params, f"{self.trainable_numel:,} params"),
            ("draft params, frozen", self.draft_frozen_params,
             f"{self.frozen_numel:,} params (embedding / LM head copies)"),
            ("gradients", self.grads, "fp32 (megatron DDP grad_reduce_in_fp32)"),
            ("optimizer state", self.optimizer, opt_note),
            ("target weights", self.target_weights,
             f"{self.target_numel:,} params" if self.target_numel else "not on this rank"),
            ("target activations", self.target_activations,
             "one micro-batch, inference" if self.target_activations else "not on this rank"),
            ("draft inputs in flight", self.inputs,
             f"features and blocks of {held} (in flight + 1 prefetched; streamed per micro-batch)"),
            ("draft activations", self.activations,
             f"{self.in_flight} micro-batch{'es' if self.in_flight != 1 else ''} in flight"),
        ]
        return rows

    def format(self) -> str:
        width = max(len(label) for label, _, _ in self.items())
        lines = [f"memory plan ({self.role})" if self.role else "memory plan"]
        for label, n, note in self.items():
            lines.append(f"  {label:<{width}}  {_fmt(n):>10}  {note}")
        budget = "" if self.budget is None else f" of {_fmt(self.budget)} budget"
        lines.append(f"  {'total':<{width}}  {_fmt(self.total):>10}{budget}")
        return "\n".join(lines)

    # -------------------------------------------------------------- the check
    def check(self, budget_bytes: Optional[int]) -> "MemoryPlan":
        """Raise :class:`MemoryPlanError` when the plan exceeds ``budget_bytes`` (None: no
        limit). The message names the largest items and the flags that shrink them."""
        if budget_bytes is None or self.total <= budget_bytes:
            return self
        self.budget = budget_bytes
        items = sorted(self.items(), key=lambda row: -row[1])[:3]
        largest = ", ".join(f"{label} {_fmt(n)}" for label, n, _ in items if n > 0)
        names = {label for label, n, _ in items if n > 0}
        levers = []
        if names & {"draft activations", "draft inputs in flight", "target activations"}:
            levers.append("a smaller --micro-batch-size, --seq-length or --num-anchors")
        if "draft activations" in names:
            levers.append("a smaller --loss-chunk-rows")
        if names & {"optimizer state", "gradients", "draft params, trainable"} and not self.distributed_optimizer:
            levers.append(f"--use-distributed-optimizer (optimizer state {_fmt(self.optimizer_without_distributed)}"
                          f" -> {_fmt(self.optimizer_distributed)})")
        if names & {"draft activations", "optimizer state", "gradients", "draft params, trainable",
                    "draft params, frozen"}:
            levers.append("more --tensor-model-parallel-size / --pipeline-model-parallel-size "
                          "(splits the draft's heads and vocabulary tables / its layers)")
        if names & {"target weights", "target activations"}:
            if self.target_numel and self.target_weights > 2 * self.target_numel:
                levers.append("--target-dtype bf16")
            levers.append("--target-backend offline (precomputed hidden states: no target on the "
                          "training ranks) or one SGLang engine per node (--target-backend sglang)")
        unique = list(dict.fromkeys(levers))
        raise MemoryPlanError(
            f"the memory plan of {self.role or 'this rank'} needs {_fmt(self.total)} but the "
            f"budget is {_fmt(budget_bytes)} (--memory-budget-gb); largest: {largest}. "
            f"Try: {'; '.join(unique)}.\n{self.format()}"
        )


def _fmt(n: int) -> str:
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / MIB:.1f} MiB"


@dataclass(frozen=True)
class PlanSettings:
    """What the plan needs of a run besides the draft and target configs (megatron's names;
    built from the flags by :func:`megaspark.arguments.configs.plan_settings`).
    ``num_microbatches``: micro-batches per step on this rank; ``target_dtype``: the dtype
    the target runs in; ``memory_budget_gb``: the refusal threshold (None: the device's)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    micro_batch_size: int = 1
    seq_length: int = 512
    num_microbatches: int = 1
    bf16: bool = False
    use_distributed_optimizer: bool = False
    target_dtype: Any = None  # torch.dtype; None: bf16 with bf16 parameters, else fp32
    memory_budget_gb: Optional[float] = None


def in_flight_units(pp: int, vpp: Optional[int], pp_rank: int, microbatches: int) -> list:
    """Micro-batches whose activations a stage holds at once, per model chunk: 1F1B keeps
    ``pp − rank`` in flight; the interleaved schedule warms up with
    ``(pp − rank − 1)·2 + (vpp − 1)·pp`` chunk forwards (megatron-core's schedules)."""
    vpp_n = vpp or 1
    if pp == 1:
        return [1]
    if vpp_n == 1:
        return [max(1, min(pp - pp_rank, microbatches))]
    total = microbatches * vpp_n
    units = min(total, (pp - pp_rank - 1) * 2 + (vpp_n - 1) * pp + 1)
    counts = [0] * vpp_n
    for k in range(units):
        counts[(k // pp) % vpp_n] += 1
    return counts


def plan_memory(settings: PlanSettings, dcfg, hf_config, *, tp_rank: int, pp_rank: int, dp_size: int,
                computes_target: bool, target_tp: int = 1) -> MemoryPlan:
    """The memory plan of one rank (module docstring). ``target_tp`` > 1: the target's weights
    are sharded over that many ranks (a tensor-parallel SGLang target)."""
    import torch

    tp = int(settings.tensor_model_parallel_size)
    pp = int(settings.pipeline_model_parallel_size)
    vpp = settings.virtual_pipeline_model_parallel_size or None
    bf16 = bool(settings.bf16)
    dist_opt = bool(settings.use_distributed_optimizer)
    M = int(settings.num_microbatches or 1)
    target_dtype = settings.target_dtype or (torch.bfloat16 if bf16 else torch.float32)
    a = 2 if bf16 else _FP32
    s = _Shape(b=int(settings.micro_batch_size), S=int(settings.seq_length), tp=tp, a=a,
               f=_dtype_bytes(target_dtype))
    d = dcfg
    first, last = pp_rank == 0, pp_rank == pp - 1

    # ---- parameters, gradients, optimizer
    chunks = model_chunks(d, pp, vpp, pp_rank)
    trainable = frozen = 0
    for pre, post, _, count in chunks:
        t, f = chunk_parameters(d, tp, pre, post, count)
        trainable += t
        frozen += f
    trainable_bytes = trainable * a  # every parameter follows params_dtype
    grads = 4 * trainable
    # Adam moments (8 B) for every trainable parameter; fp32 master copies with --bf16
    opt_full = 8 * trainable + (4 * trainable if bf16 else 0)
    opt_dist = math.ceil(opt_full / max(1, dp_size))
    optimizer = opt_dist if dist_opt else opt_full

    # ---- target
    target_numel = target_parameter_count(hf_config) if computes_target else 0
    target_numel = math.ceil(target_numel / max(1, int(target_tp)))
    target_weights = target_numel * s.f
    per_mb_inputs = input_bytes(d, s, first, last)
    target_act = 0
    if computes_target:
        R = d.num_anchors * d.block_size
        feats = s.b * s.S * d.context_width * s.f + s.b * R * d.hidden_size * s.f
        target_act = target_activation_bytes(hf_config, s.b, s.S, s.f, feats)

    # ---- draft activations
    units = in_flight_units(pp, vpp, pp_rank, M)
    R = d.num_anchors * d.block_size
    T = s.S + R
    loss_rows = s.b * R
    per_layer = layer_activations(d, s)
    parts = {f"layer.{k}": 0 for k in per_layer}

    def add(name, n):
        parts[name] = parts.get(name, 0) + n

    for (pre, post, _, count), n_units in zip(chunks, units):
        if n_units == 0:
            continue
        for k, v in per_layer.items():
            add(f"layer.{k}", n_units * count * v)
        add("rope", n_units * rope_tables(d, s))
        if pre:
            add("embed", n_units * embed_activations(d, s))
        elif pp > 1:  # the received hidden state, kept by the schedule for backward
            add("stage_input", n_units * s.b * T * d.hidden_size * a)
        if post:
            for k, v in head_activations(d, s, loss_rows).items():
                add(k, n_units * v)
        elif pp > 1:  # the sent output (megatron frees its data on GPU only)
            add("stage_output", n_units * s.b * T * d.hidden_size * a)
    saved = sum(parts.values())
    transient = attention_transient(d, s)
    if any(post for _, post, _, _ in chunks):
        transient = max(transient, loss_transient(d, s, loss_rows))
    parts["transient"] = transient
    activations = saved + transient

    # StepInputs streams the micro-batches: a stage holds the inputs of those in flight and
    # of one more (prefetched on the first stage, its receive posted on the last)
    held = min(M, max(units) + 1)
    inputs = held * per_mb_inputs
    optimizer_step = 4 * (math.ceil(trainable / max(1, dp_size)) if dist_opt else trainable)
    static = trainable_bytes + frozen * a + grads + optimizer + target_weights
    phases = [inputs + activations, optimizer_step + inputs]
    if computes_target:
        phases.append(inputs - per_mb_inputs + target_act)
    total = static + max(phases)

    stage = "+".join(n for n, ok in (("first", first), ("last", last)) if ok) or "middle"
    role = (f"TP rank {tp_rank} of {tp}, PP stage {pp_rank} of {pp} ({stage}), DP {dp_size}"
            + (", runs the target" if computes_target else ""))
    budget = settings.memory_budget_gb
    return MemoryPlan(
        draft_trainable_params=trainable_bytes,
        draft_frozen_params=frozen * a,
        grads=grads,
        optimizer=optimizer,
        optimizer_without_distributed=opt_full,
        target_weights=target_weights,
        target_activations=target_act,
        activations=activations,
        total=total,
        inputs=inputs,
        optimizer_distributed=opt_dist,
        trainable_numel=trainable,
        frozen_numel=frozen,
        target_numel=target_numel,
        role=role,
        distributed_optimizer=dist_opt,
        bf16=bf16,
        in_flight=max(units),
        microbatches=held,
        activation_parts=parts,
        budget=None if budget is None else int(budget * 1e9),
    )


def budget_bytes(memory_budget_gb: Optional[float], device=None) -> Optional[int]:
    """``--memory-budget-gb`` in bytes (GB = 1e9 B); without it the device's total memory on a
    GPU, no limit on the CPU."""
    budget = memory_budget_gb
    if budget is not None:
        return int(budget * 1e9)
    import torch

    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    return None


__all__ = ["MemoryPlan", "MemoryPlanError", "PlanSettings", "plan_memory", "budget_bytes", "chunk_parameters",
           "layer_parameters", "model_chunks", "target_parameter_count", "in_flight_units"]

