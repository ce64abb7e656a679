"""Which HF tensors a DSpark draft has and their global shapes (DSPARK_SPEC.md §2.2, §9.1).

Tensor names come from :data:`megaspark.models.dspark.state_dict_adapter.MAPPINGS`
(megaspark parameter ↔ HF name); :data:`TENSORS` says which of them a config has and
their shapes, and is the source of :func:`parameter_counts`. :data:`IMPORT_KEY_RULES`
clean up the names read from a checkpoint (``model.`` prefix; rotary-embedding buffers,
which are never written and are ignored on import). :class:`ExportError`, the error of
every export / import module, lives here, the lowest of them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Optional

from megaspark.config import DSparkConfig
from megaspark.models.dspark.state_dict_adapter import MAPPINGS

FROZEN_TENSORS = ("embed_tokens.weight", "lm_head.weight")


class ExportError(ValueError):
    """An export or import that cannot be done; the message says what is wrong and where."""


@dataclass(frozen=True)
class TensorSpec:
    hf: str  # HF name; "{i}" = draft layer
    shape: Callable[[DSparkConfig], tuple]
    present: Callable[[DSparkConfig], bool] = lambda d: True


def _q(d):
    return d.num_attention_heads * d.qk_head_dim


def _o(d):
    return d.num_attention_heads * d.value_head_dim


def _kv(d):
    return d.num_query_groups * d.kv_channels


def _gqa(d):
    return d.attention_type == "gqa"


def _mla(d):
    return d.attention_type == "mla"


def _q_lora(d):
    return _mla(d) and d.q_lora_rank > 0


def _gated(d):
    return d.has_markov and d.markov_head_type == "gated"


def _rnn(d):
    return d.has_markov and d.markov_head_type == "rnn"


def _confidence_width(d):
    return d.hidden_size + (d.markov_rank if d.confidence_with_markov else 0)


TENSORS = (
    TensorSpec("embed_tokens.weight", lambda d: (d.vocab_size, d.hidden_size)),
    TensorSpec("fc.weight", lambda d: (d.hidden_size, d.context_width)),
    TensorSpec("hidden_norm.weight", lambda d: (d.hidden_size,)),
    TensorSpec("layers.{i}.input_layernorm.weight", lambda d: (d.hidden_size,)),
    # q_proj: GQA, or MLA without query compression ([heads·(nope+rope), H])
    TensorSpec("layers.{i}.self_attn.q_proj.weight", lambda d: (_q(d), d.hidden_size),
               lambda d: _gqa(d) or not _q_lora(d)),
    TensorSpec("layers.{i}.self_attn.q_proj.bias", lambda d: (_q(d),), lambda d: d.attention_bias),
    TensorSpec("layers.{i}.self_attn.k_proj.weight", lambda d: (_kv(d), d.hidden_size), _gqa),
    TensorSpec("layers.{i}.self_attn.k_proj.bias", lambda d: (_kv(d),), lambda d: d.attention_bias),
    TensorSpec("layers.{i}.self_attn.v_proj.weight", lambda d: (_kv(d), d.hidden_size), _gqa),
    TensorSpec("layers.{i}.self_attn.v_proj.bias", lambda d: (_kv(d),), lambda d: d.attention_bias),
    TensorSpec("layers.{i}.self_attn.q_norm.weight", lambda d: (d.kv_channels,), lambda d: d.qk_norm),
    TensorSpec("layers.{i}.self_attn.k_norm.weight", lambda d: (d.kv_channels,), lambda d: d.qk_norm),
    # MLA (DeepSeek-V3 layout; no biases, no per-head norms)
    TensorSpec("layers.{i}.self_attn.q_a_proj.weight", lambda d: (d.q_lora_rank, d.hidden_size), _q_lora),
    TensorSpec("layers.{i}.self_attn.q_a_layernorm.weight", lambda d: (d.q_lora_rank,), _q_lora),
    TensorSpec("layers.{i}.self_attn.q_b_proj.weight", lambda d: (_q(d), d.q_lora_rank), _q_lora),
    TensorSpec("layers.{i}.self_attn.kv_a_proj_with_mqa.weight",
               lambda d: (d.kv_lora_rank + d.qk_rope_head_dim, d.hidden_size), _mla),
    TensorSpec("layers.{i}.self_attn.kv_a_layernorm.weight", lambda d: (d.kv_lora_rank,), _mla),
    TensorSpec("layers.{i}.self_attn.kv_b_proj.weight",
               lambda d: (d.num_attention_heads * (d.qk_nope_head_dim + d.v_head_dim), d.kv_lora_rank), _mla),
    TensorSpec("layers.{i}.self_attn.o_proj.weight", lambda d: (d.hidden_size, _o(d))),
    TensorSpec("layers.{i}.post_attention_layernorm.weight", lambda d: (d.hidden_size,)),
    TensorSpec("layers.{i}.mlp.gate_proj.weight", lambda d: (d.ffn_hidden_size, d.hidden_size)),
    TensorSpec("layers.{i}.mlp.up_proj.weight", lambda d: (d.ffn_hidden_size, d.hidden_size)),
    TensorSpec("layers.{i}.mlp.down_proj.weight", lambda d: (d.hidden_size, d.ffn_hidden_size)),
    TensorSpec("norm.weight", lambda d: (d.hidden_size,)),
    TensorSpec("lm_head.weight", lambda d: (d.vocab_size, d.hidden_size)),
    TensorSpec("markov_head.markov_w1.weight", lambda d: (d.vocab_size, d.markov_rank), lambda d: d.has_markov),
    TensorSpec("markov_head.markov_w2.weight", lambda d: (d.vocab_size, d.markov_rank), lambda d: d.has_markov),
    TensorSpec("markov_head.gate_proj.weight", lambda d: (d.markov_rank, d.hidden_size + d.markov_rank), _gated),
    TensorSpec("markov_head.gate_proj.bias", lambda d: (d.markov_rank,), _gated),
    TensorSpec("markov_head.joint_proj.weight",
           lambda d: (3 * d.markov_rank, 2 * d.markov_rank + d.hidden_size), _rnn),
    TensorSpec("markov_head.joint_proj.bias", lambda d: (3 * d.markov_rank,), _rnn),
    TensorSpec("confidence_head.proj.weight", lambda d: (1, _confidence_width(d)), lambda d: d.confidence_head),
    TensorSpec("confidence_head.proj.bias", lambda d: (1,), lambda d: d.confidence_head),
)

# every HF name the model adapter knows is described above, and nothing else
assert {t.hf for t in TENSORS} == {n for m in MAPPINGS for n in m.hf}


def hf_tensor_shapes(dcfg: DSparkConfig, include_embeddings: bool = True) -> dict:
    """HF name → global shape of every tensor of this draft (in table order)."""
    out = {}
    for t in TENSORS:
        if not t.present(dcfg) or (not include_embeddings and t.hf in FROZEN_TENSORS):
            continue
        layers = range(dcfg.num_layers) if "{i}" in t.hf else [None]
        for i in layers:
            out[t.hf.replace("{i}", str(i))] = tuple(int(s) for s in t.shape(dcfg))
    return out


def parameter_counts(dcfg: DSparkConfig) -> dict:
    """Parameter counts from the shapes alone (DSPARK_SPEC.md §2.2, §13 item 21).

    ``trainable`` excludes the frozen embedding and LM head (``frozen`` = 2·V·H);
    ``per_layer`` is one draft layer; ``markov_head`` / ``confidence_head`` the heads.
    """
    shapes = hf_tensor_shapes(dcfg)
    numel = {k: math.prod(s) for k, s in shapes.items()}
    frozen = sum(numel[k] for k in FROZEN_TENSORS)
    total = sum(numel.values())
    return dict(
        trainable=total - frozen,
        frozen=frozen,
        total=total,
        per_layer=sum(v for k, v in numel.items() if k.startswith("layers.0.")),
        markov_head=sum(v for k, v in numel.items() if k.startswith("markov_head.")),
        confidence_head=sum(v for k, v in numel.items() if k.startswith("confidence_head.")),
    )


def trainable_parameter_count(dcfg: DSparkConfig) -> int:
    """Trainable parameters of the draft (Qwen3-8B DSpark: 1,126,422,017)."""
    return parameter_counts(dcfg)["trainable"]


@dataclass(frozen=True)
class KeyRule:
    pattern: str
    replacement: Optional[str]  # None: drop the tensor
    why: str


# Applied in order to every tensor name read from a checkpoint.
IMPORT_KEY_RULES = (
    KeyRule(r"(^|\.)rotary_emb\.", None, "RoPE buffers are recomputed, never shipped"),
    KeyRule(r"^model\.", "", "transformers-style wrapper prefix"),
)
_COMPILED_RULES = [(re.compile(r.pattern), r.replacement) for r in IMPORT_KEY_RULES]


def clean_key(name: str) -> Optional[str]:
    """``name`` after :data:`IMPORT_KEY_RULES`; None for a tensor that is dropped."""
    for pattern, replacement in _COMPILED_RULES:
        if pattern.search(name):
            if replacement is None:
                return None
            name = pattern.sub(replacement, name, count=1)
    return name


def check_tensors(state: dict, dcfg: DSparkConfig, include_embeddings: bool, where: str) -> None:
    """Raise :class:`ExportError` unless ``state`` holds exactly this draft's tensors, in its shapes."""
    expected = hf_tensor_shapes(dcfg, include_embeddings=include_embeddings)
    problems = []
    missing = [k for k in expected if k not in state]
    stray = [k for k in state if k not in expected]
    if missing:
        problems.append(f"missing tensors {missing}")
    if stray:
        problems.append(f"unexpected tensors {stray}")
    for k, shape in expected.items():
        if k in state and tuple(state[k].shape) != shape:
            problems.append(f"'{k}' has shape {tuple(state[k].shape)}, the config implies {shape}")
    if problems:
        raise ExportError(f"{where}: " + "; ".join(problems))


__all__ = [
    "ExportError", "FROZEN_TENSORS", "TensorSpec", "TENSORS", "KeyRule", "IMPORT_KEY_RULES",
    "hf_tensor_shapes", "parameter_counts", "trainable_parameter_count", "clean_key", "check_tensors",
]
