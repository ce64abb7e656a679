"""HF export and import of DSpark drafts (DSPARK_SPEC.md §9), as declarative tables.

A draft leaves megaspark as a directory holding ``config.json`` and ``model.safetensors``
in one of two layouts:

* ``deepspec`` (§9.1, the default; what DeepSpec's released ``deepseek-ai/dspark_*``
  checkpoints, vLLM and SGLang read): the target's text config with the draft's shape and
  every DSpark field at the top level, tensors named as in §9.1 without a ``model.``
  prefix, the frozen ``embed_tokens``/``lm_head`` copies included (bit-for-bit the
  target's);
* ``specforge`` (§9.2): ``architectures: ["DSparkDraftModel"]`` (``DFlashDraftModel`` for
  a plain DFlash draft), ``auto_map``, the algorithm fields nested in ``dflash_config``;
  ``embed_tokens``/``lm_head`` left out by default (the engine shares the target's).

Rotary-embedding tensors are never written, and ignored on import.

What the tables say
-------------------
* tensor names: :data:`megaspark.models.dspark.state_dict_adapter.MAPPINGS` (megaspark
  parameter ↔ HF name); which HF tensors a config has, and their shapes: :data:`TENSORS`
  (also the source of :func:`parameter_counts`);
* config fields: :data:`SHAPE_FIELDS` and :data:`ALGORITHM_FIELDS` (DSparkConfig
  attribute ↔ config key per layout, ``a.b`` = key ``b`` nested in ``a``; default on import);
* per-layout constants (architectures, markers) and which weights a layout ships:
  :data:`LAYOUTS`; key clean-up on import (``model.`` prefix, rotary buffers):
  :data:`IMPORT_KEY_RULES`.

Architecture names. GQA drafts have per-head q/k norms by default whatever the target
family, and export as ``Qwen3DSparkModel`` (the name the engines load; ``model_type``
stays the target's, which SGLang accepts; Qwen2's q/k/v biases are carried by
``attention_bias``). A draft trained with ``--no-qk-norm`` exports as
``LlamaDSparkModel``, ``MistralDSparkModel`` or ``Qwen2DSparkModel``, so no engine
mistakes it for a block with q/k norms. ``dspark_qk_norm`` records which; an import of an
export without it assumes the target family's own block (q/k norms for Qwen3 only).

SGLang's config lookup (``sglang/srt/models/dspark.py``): root keys prefixed ``dspark_``
first (``dspark_block_size``, ``dspark_markov_rank``, ``dspark_markov_head_type``,
``dspark_noise_token_id`` for the mask token, ``dspark_target_layer_ids``), then a
``dspark_config`` dict, ``dflash_config``, ``text_config``, plain root keys. Both layouts
write the ``dspark_`` keys beside their native ones.

Slot convention (§0; DESIGN.md decision 1). Every export records
``dspark_slot_convention`` (``"S"`` or ``"D"``) and the speculators-style flag
``sample_from_anchor`` (true for S: slot k predicts the token after position a+k).
Convention-D exports additionally carry ``speculators_model_type: "dspark"``, the tag
by which SGLang recognises — and refuses — Convention-D checkpoints (§9.3) instead of
serving them at acceptance ≈ 1; the one exception is a plain DFlash draft in the
``specforge`` layout, exported as z-lab's ``DFlashDraftModel``, whose loaders assume
Convention D. On import the convention is taken from
``dspark_slot_convention``, else ``sample_from_anchor``, else that tag or a
``DFlashDraftModel`` architecture (D), else S (DeepSpec).

Besides what engines read, an export records the loss settings (``loss_decay_gamma``,
``ce_loss_alpha``, ``l1_loss_alpha``, ``confidence_loss_alpha``), megaspark's training-only
settings (under ``megaspark``) and its target (``dspark_target``, ``dspark_target_fingerprint``),
so that :func:`read_hf` gives back the DSparkConfig that trained it.

MLA drafts (``--draft-attention mla``, models/dspark/mla.py) carry DeepSeek-V3's attention
tensors (``q_proj`` or ``q_a_proj``/``q_a_layernorm``/``q_b_proj``, ``kv_a_proj_with_mqa``,
``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``) and DeepSeek's top-level keys
``q_lora_rank`` (null when 0: queries projected directly), ``kv_lora_rank``,
``qk_nope_head_dim``, ``qk_rope_head_dim``, ``v_head_dim``, ``qk_head_dim``,
``rope_interleave: true`` and ``draft_attention: "mla"`` (SpecForge layout: also
``dflash_config.attention_mode: "mla"``); ``head_dim`` is the rotary dim and
``num_key_value_heads`` the head count, as in transformers' ``DeepseekV3Config``. They export
as ``DeepseekV3DSparkModel`` (``DeepseekV2DSparkModel`` for a DeepSeek-V2 target); a GQA
draft of a DeepSeek target exports as ``LlamaDSparkModel`` without the MLA keys. For DeepSeek
targets ``first_k_dense_replace`` is set to the draft's depth (every draft layer is dense)
and ``num_nextn_predict_layers`` dropped. On import an export is MLA if it says so or
carries ``kv_lora_rank``. RoPE (default, linear or YaRN) is read from the target's
``rope_parameters`` / ``rope_scaling`` kept in the config.

Where the draft's attention/MLP shape differs from the target's (SmolLM2's 9/3 heads
become 8/4 × 72 for tensor parallelism) the top-level ``num_attention_heads``,
``num_key_value_heads``, ``head_dim`` and ``intermediate_size`` are the draft's (what
an engine must build) and the target's originals are kept under ``dspark_target_shape``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import tempfile
import types
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from megaspark.config import MLA_FLAGS, SUPPORTED_FAMILIES, ConfigError, DSparkConfig, rope_settings
from megaspark.models.dspark.state_dict_adapter import MAPPINGS

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
FROZEN_TENSORS = ("embed_tokens.weight", "lm_head.weight")


class ExportError(ValueError):
    """An export or import that cannot be done; the message says what is wrong and where."""


# =======================================================================================
# Tensors: which HF tensors a draft has and their global shapes (DSPARK_SPEC.md §2.2, §9.1)
# =======================================================================================


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


# =======================================================================================
# Config fields (DSPARK_SPEC.md §9.1, §9.2)
# =======================================================================================

_REQUIRED = object()


@dataclass(frozen=True)
class Field:
    """DSparkConfig attribute ``attr`` ↔ config key ``key`` (``specforge``: its key in that
    layout, default the same; ``a.b`` is key ``b`` of the nested dict ``a``). ``written``:
    exported only when true for the config. ``default``: on import when absent — a value,
    ``callable(values_so_far, raw_config)``, or required."""

    attr: str
    key: str
    specforge: Optional[str] = None
    written: Callable[[DSparkConfig], bool] = lambda d: True
    default: Any = _REQUIRED
    encode: Optional[Callable[[Any], Any]] = None  # attribute value -> config value
    decode: Optional[Callable[[Any], Any]] = None  # config value -> attribute value

    def to_config(self, dcfg: DSparkConfig):
        value = _jsonable(getattr(dcfg, self.attr))
        return self.encode(value) if self.encode else value

    def key_for(self, layout: str) -> str:
        return self.specforge if (layout == "specforge" and self.specforge) else self.key


def _family_bias_default(values, raw):
    return bool(SUPPORTED_FAMILIES.get(values["target_model_type"], (False, False))[1])


def _detect_attention(values, raw) -> str:
    """MLA if the export says so (``draft_attention`` / SpecForge ``attention_mode``), or if it
    carries DeepSeek's latent width (a GQA export never does), else GQA."""
    mode = (raw.get("dflash_config") or {}).get("attention_mode") if isinstance(
        raw.get("dflash_config"), dict) else None
    if mode in ("gqa", "mla"):
        return mode
    return "mla" if raw.get("kv_lora_rank") else "gqa"


def _written_for_mla(d: DSparkConfig) -> bool:
    return d.attention_type == "mla"


def _mla_dim(attr: str) -> Field:
    # top-level DeepSeek key names; q_lora_rank 0 is written as null (DeepSeek: "no q_a_proj")
    if attr == "q_lora_rank":
        return Field(attr, attr, written=_written_for_mla, default=0,
                     encode=lambda v: v or None, decode=lambda v: int(v or 0))
    return Field(attr, attr, written=_written_for_mla, default=0, decode=lambda v: int(v or 0))


# The draft's shape: top level in both layouts, overriding the target's values.
SHAPE_FIELDS = (
    Field("target_model_type", "model_type"),
    Field("hidden_size", "hidden_size"),
    Field("num_layers", "num_hidden_layers"),
    Field("num_attention_heads", "num_attention_heads"),
    # MLA drafts (models/dspark/mla.py): recorded only for them
    Field("attention_type", "draft_attention", written=_written_for_mla, default=_detect_attention),
    *(_mla_dim(attr) for attr in MLA_FLAGS),
    Field("num_query_groups", "num_key_value_heads", default=lambda v, c: v["num_attention_heads"]),
    # MLA: HF DeepseekV3Config.head_dim is the rotary dim
    Field("kv_channels", "head_dim",
          default=lambda v, c: v["qk_rope_head_dim"] if v["attention_type"] == "mla"
          else v["hidden_size"] // v["num_attention_heads"]),
    Field("ffn_hidden_size", "intermediate_size"),
    Field("vocab_size", "vocab_size"),
    Field("rms_norm_eps", "rms_norm_eps", default=1e-6),
    Field("attention_bias", "attention_bias", default=_family_bias_default),
    Field("max_position_embeddings", "max_position_embeddings", default=4096),
)


def _detect_convention(values, raw) -> str:
    if "sample_from_anchor" in raw:
        return "S" if raw["sample_from_anchor"] else "D"
    if raw.get("speculators_model_type") == "dspark" or "DFlashDraftModel" in (raw.get("architectures") or []):
        return "D"
    return "S"


def _has_heads(values) -> bool:
    return values["markov_rank"] > 0 or values["confidence_head"]


# The algorithm. Defaults on import follow DeepSpec (a checkpoint without a Markov head or
# confidence head is a DFlash draft: CE only).
ALGORITHM_FIELDS = (
    Field("num_target_layers", "num_target_layers"),
    Field("target_layer_ids", "target_layer_ids", "dflash_config.target_layer_ids"),
    Field("block_size", "block_size"),
    Field("mask_token_id", "mask_token_id", "dflash_config.mask_token_id"),
    Field("num_anchors", "num_anchors", default=512),
    Field("markov_rank", "markov_rank", "dflash_config.markov_rank", default=0),
    Field("markov_head_type", "markov_head_type", "dflash_config.markov_head_type",
          written=lambda d: d.has_markov, default="vanilla"),
    Field("confidence_head", "enable_confidence_head", "dflash_config.enable_confidence_head", default=False),
    Field("confidence_with_markov", "confidence_head_with_markov",
          "dflash_config.confidence_head_with_markov", written=lambda d: d.confidence_head,
          default=lambda v, c: v["confidence_head"] and v["markov_rank"] > 0),
    Field("convention", "dspark_slot_convention", default=_detect_convention),
    Field("gamma", "loss_decay_gamma", default=lambda v, c: 4.0 if v["convention"] == "S" else 7.0),
    Field("alpha_ce", "ce_loss_alpha", default=lambda v, c: 0.1 if _has_heads(v) else 1.0),
    Field("alpha_l1", "l1_loss_alpha", default=lambda v, c: 0.9 if _has_heads(v) else 0.0),
    Field("alpha_conf", "confidence_loss_alpha", "dflash_config.confidence_head_alpha",
          default=lambda v, c: 1.0 if v["confidence_head"] else 0.0),
    # §9.2 / §10: the VP-drafter objective is recorded (SpecForge keys in dflash_config)
    Field("training_mode", "training_mode", "dflash_config.training_mode",
          written=lambda d: d.training_mode != "standard", default="standard"),
    Field("prefix_weight_base", "prefix_weight_base", "dflash_config.prefix_weight_base",
          written=lambda d: d.training_mode == "vp_drafter", default=0.9),
    # training-only settings, kept so that a re-import reproduces the run's config
    Field("truncate_eval_mask", "megaspark.truncate_eval_mask", default=True),
    Field("attention_backend", "megaspark.attention_backend", default="structured"),
    Field("attention_chunk_blocks", "megaspark.attention_chunk_blocks", default=16),
    Field("loss_chunk_rows", "megaspark.loss_chunk_rows", default=1024),
    Field("init_std", "megaspark.init_std", default=0.02),
)

# =======================================================================================
# Layouts
# =======================================================================================

FAMILY_ARCHITECTURES = {
    "qwen3": "Qwen3DSparkModel",
    "llama": "LlamaDSparkModel",
    "mistral": "MistralDSparkModel",
    "qwen2": "Qwen2DSparkModel",
    "deepseek_v2": "DeepseekV2DSparkModel",
    "deepseek_v3": "DeepseekV3DSparkModel",
}
# Keys of DeepSeek configs that describe MLA; a GQA draft's config must not carry them.
MLA_CONFIG_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                   "qk_head_dim", "rope_interleave")


def _architecture(d: DSparkConfig) -> str:
    """A GQA draft with per-head q/k norms (the default for every target family) is the
    block SGLang and vLLM build: ``Qwen3DSparkModel``. An MLA draft is a DeepSeek-style
    block whatever its target (``DeepseekV2DSparkModel`` for a DeepSeek-V2 target, else
    ``DeepseekV3DSparkModel``). A GQA draft trained with ``--no-qk-norm`` is named after its
    family (``LlamaDSparkModel`` for DeepSeek and Qwen3 targets), names no engine loads."""
    if d.attention_type == "mla":
        return "DeepseekV2DSparkModel" if d.target_model_type == "deepseek_v2" else "DeepseekV3DSparkModel"
    if d.qk_norm:
        return "Qwen3DSparkModel"
    if d.target_model_type in ("deepseek_v2", "deepseek_v3", "qwen3"):
        return "LlamaDSparkModel"
    return FAMILY_ARCHITECTURES[d.target_model_type]


def _is_dflash(d: DSparkConfig) -> bool:
    """A z-lab/SpecForge DFlash draft: no heads *and* Convention D (what DFlash loaders assume).
    DeepSpec's Convention-S DFlash baseline stays a DSpark class with ``markov_rank: 0``."""
    return not d.has_markov and not d.confidence_head and d.convention == "D"


@dataclass(frozen=True)
class Layout:
    name: str
    embeddings_by_default: bool  # ship the frozen embed_tokens / lm_head copies
    constants: tuple  # (config path, value or callable(DSparkConfig)) written after the fields


_COMMON_CONSTANTS = (
    ("tie_word_embeddings", False),
    ("layer_types", lambda d: ["full_attention"] * d.num_layers),
    ("sample_from_anchor", lambda d: d.convention == "S"),
    # SGLang's DSpark loader looks first for these root keys (then dspark_config,
    # dflash_config, text_config, plain root keys): written in both layouts, so that every
    # engine reads the values the native keys hold
    ("dspark_block_size", lambda d: d.block_size),
    ("dspark_markov_rank", lambda d: d.markov_rank),
    ("dspark_markov_head_type", lambda d: d.markov_head_type),
    ("dspark_noise_token_id", lambda d: d.mask_token_id),
    ("dspark_target_layer_ids", lambda d: list(d.target_layer_ids)),
    # megaspark's record of the draft block (read back by read_hf)
    ("dspark_qk_norm", lambda d: bool(d.qk_norm)),
)

LAYOUTS = {
    "deepspec": Layout(
        "deepspec", True,
        (("architectures", lambda d: [_architecture(d)]),) + _COMMON_CONSTANTS,
    ),
    "specforge": Layout(
        "specforge", False,
        (
            ("architectures", lambda d: ["DFlashDraftModel" if _is_dflash(d) else "DSparkDraftModel"]),
            ("auto_map", lambda d: {"AutoModel": "dflash.DFlashDraftModel" if _is_dflash(d)
                                    else "dspark.DSparkDraftModel"}),
            ("dflash_config.projector_type", lambda d: "dflash" if _is_dflash(d) else "dspark"),
            ("dflash_config.attention_mode", lambda d: d.attention_type),
        ) + _COMMON_CONSTANTS,
    ),
}

# Keys of the target's config that describe the target file, not the draft.
_DROPPED_TARGET_KEYS = (
    "_name_or_path", "name_or_path", "_commit_hash", "architectures", "auto_map",
    "quantization_config", "id2label", "label2id", "text_config", "num_speculative_tokens",
    "num_nextn_predict_layers",  # DeepSeek's MTP modules: the draft has none
)


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


def _clean_key(name: str) -> Optional[str]:
    for pattern, replacement in _COMPILED_RULES:
        if pattern.search(name):
            if replacement is None:
                return None
            name = pattern.sub(replacement, name, count=1)
    return name


# ---------------------------------------------------------------------------------------
# nested-path helpers


def _get(cfg: dict, path: str):
    node = cfg
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _set(cfg: dict, path: str, value) -> None:
    parts = path.split(".")
    node = cfg
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _jsonable(value):
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# =======================================================================================
# Export
# =======================================================================================


def _target_dict(target_config) -> dict:
    if hasattr(target_config, "get_text_config"):
        target_config = target_config.get_text_config()
    if hasattr(target_config, "to_diff_dict"):
        target_config = target_config.to_diff_dict()
    elif hasattr(target_config, "to_dict"):
        target_config = target_config.to_dict()
    cfg = json.loads(json.dumps(dict(target_config), default=str))
    if isinstance(cfg.get("text_config"), dict):
        cfg = dict(cfg["text_config"])
    return cfg


def build_hf_config(dcfg: DSparkConfig, target_config, layout: str = "deepspec",
                    target_name: Optional[str] = None, target_fingerprint: Optional[str] = None) -> dict:
    """The ``config.json`` of an export: the target's text config, the draft's shape, the
    DSpark fields of the layout and its constants."""
    if layout not in LAYOUTS:
        raise ExportError(f"unknown layout {layout!r}; choose one of {sorted(LAYOUTS)}")
    spec = LAYOUTS[layout]
    target = _target_dict(target_config)
    for key, attr in (("hidden_size", "hidden_size"), ("vocab_size", "vocab_size"),
                      ("num_hidden_layers", "num_target_layers"), ("model_type", "target_model_type")):
        if key in target and target[key] != getattr(dcfg, attr):
            raise ExportError(
                f"the target config does not belong to this draft: target {key} = {target[key]!r}, "
                f"draft {attr} = {getattr(dcfg, attr)!r} (wrong --target-model?)")
    shape_keys = ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")
    original = {k: target.get(k) for k in shape_keys + MLA_CONFIG_KEYS[:5] if k in shape_keys or k in target}
    cfg = {k: v for k, v in target.items() if k not in _DROPPED_TARGET_KEYS}
    if cfg.get("use_sliding_window"):
        cfg["use_sliding_window"] = False
    for key in MLA_CONFIG_KEYS:  # the draft's own attention decides these (below)
        cfg.pop(key, None)
    for f in SHAPE_FIELDS:
        if f.written(dcfg):
            _set(cfg, f.key, f.to_config(dcfg))
    if dcfg.attention_type == "mla":
        cfg["qk_head_dim"] = dcfg.qk_head_dim
        cfg["rope_interleave"] = True  # DeepSeek's interleaved-pair RoPE (models/dspark/rope.py)
    if "first_k_dense_replace" in cfg:  # DeepSeek targets: every draft layer is dense
        cfg["first_k_dense_replace"] = dcfg.num_layers
    differs = {k: v for k, v in original.items() if v is not None and cfg.get(k) != v}
    if differs:
        cfg["dspark_target_shape"] = original
    for f in ALGORITHM_FIELDS:
        if f.written(dcfg):
            _set(cfg, f.key_for(layout), f.to_config(dcfg))
    for path, value in spec.constants:
        _set(cfg, path, value(dcfg) if callable(value) else value)
    if dcfg.convention == "D" and not (layout == "specforge" and _is_dflash(dcfg)):
        # the tag by which SGLang refuses a Convention-D DSpark-class checkpoint (§9.3); only
        # the z-lab DFlashDraftModel class goes without it (DFlash loaders expect Convention D)
        cfg["speculators_model_type"] = "dspark"
    if target_name is not None:
        cfg["dspark_target"] = str(target_name)
    if target_fingerprint is not None:
        cfg["dspark_target_fingerprint"] = str(target_fingerprint)
    return dict(sorted(cfg.items()))


def _check_tensors(state: dict, dcfg: DSparkConfig, include_embeddings: bool, where: str) -> None:
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


def _write_atomically(out_dir: str, write: Callable[[str], None]) -> None:
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o755)
        write(tmp)
        if os.path.exists(out_dir):
            old = f"{tmp}.old"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def export_hf(state: dict, dcfg: DSparkConfig, target_config, out_dir, layout: str = "deepspec",
              include_embeddings: Optional[bool] = None, target_name: Optional[str] = None,
              target_fingerprint: Optional[str] = None) -> dict:
    """Write ``config.json`` + ``model.safetensors`` for HF-named global tensors ``state``
    (e.g. :func:`~megaspark.models.dspark.state_dict_adapter.hf_state_dict` at TP=1).

    ``target_config``: the target's (text) config, a dict or a transformers config.
    ``include_embeddings``: ship ``embed_tokens``/``lm_head`` (default: yes for
    ``deepspec``, no for ``specforge``). The directory is written to a temporary sibling
    and renamed into place. Returns the config written.
    """
    from safetensors.torch import save_file

    if layout not in LAYOUTS:
        raise ExportError(f"unknown layout {layout!r}; choose one of {sorted(LAYOUTS)}")
    if include_embeddings is None:
        include_embeddings = LAYOUTS[layout].embeddings_by_default
    dcfg.validate()
    tensors = {}
    for name, tensor in state.items():
        clean = _clean_key(name)
        if clean is None or (not include_embeddings and clean in FROZEN_TENSORS):
            continue
        tensors[clean] = tensor.detach().to("cpu").contiguous().clone()
    _check_tensors(tensors, dcfg, include_embeddings, "export")
    config = build_hf_config(dcfg, target_config, layout, target_name, target_fingerprint)
    # the export must read back as the same draft
    mine, back = canonical(dcfg), canonical(config_to_dspark(config, where="export"))
    if back != mine:
        diff = {k: (v, back[k]) for k, v in mine.items() if back[k] != v}
        raise ExportError(f"export would not read back as the same draft (ours, read back): {diff}")
    ordered = {k: tensors[k] for k in hf_tensor_shapes(dcfg, include_embeddings)}

    def write(tmp):
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        save_file(ordered, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        os.chmod(os.path.join(tmp, WEIGHTS_FILE), 0o644)

    _write_atomically(str(out_dir), write)
    return config


# =======================================================================================
# Import
# =======================================================================================


def canonical(dcfg: DSparkConfig) -> dict:
    """The config as a dict with the settings that cannot matter blanked out (the Markov
    head type without a Markov head, the confidence input without a confidence head):
    two drafts with equal canonical dicts are the same draft."""
    d = dcfg.to_dict()
    if not dcfg.has_markov:
        d["markov_head_type"] = None
    if not dcfg.confidence_head:
        d["confidence_with_markov"] = None
    return d


def detect_layout(config: dict) -> str:
    return "specforge" if isinstance(config.get("dflash_config"), dict) else "deepspec"


def config_to_dspark(config: dict, where: str = "config.json") -> DSparkConfig:
    """Rebuild the DSparkConfig of a DeepSpec- or SpecForge-layout ``config.json``."""
    layout = detect_layout(config)
    if isinstance(config.get("text_config"), dict) and "hidden_size" not in config:
        config = {**config["text_config"], **{k: v for k, v in config.items() if k != "text_config"}}
    draft_vocab = config.get("draft_vocab_size")
    if draft_vocab is not None and draft_vocab != config.get("vocab_size"):
        raise ExportError(f"{where}: pruned draft vocabularies (draft_vocab_size {draft_vocab} != "
                          f"vocab_size {config.get('vocab_size')}) are not supported")
    values: dict = {}
    for f in SHAPE_FIELDS + ALGORITHM_FIELDS:
        leaf = f.key.split(".")[-1]
        candidates = list(dict.fromkeys(
            [f.key_for(layout), f.key, f"dflash_config.{leaf}", f"dspark_config.{leaf}"]))
        for path in candidates:
            found, value = _get(config, path)
            if found:
                if f.decode is not None:
                    value = f.decode(value)
                break
        else:
            if f.default is _REQUIRED:
                raise ExportError(
                    f"{where}: missing required field '{f.key_for(layout)}' (DSpark {f.attr}); "
                    f"looked for {candidates}")
            value = f.default(values, config) if callable(f.default) else f.default
        values[f.attr] = value
    if values["target_model_type"] not in SUPPORTED_FAMILIES:
        raise ExportError(f"{where}: model_type {values['target_model_type']!r} is not a supported "
                          f"draft family ({', '.join(sorted(SUPPORTED_FAMILIES))})")
    if values["num_query_groups"] is None:  # written as null by some exporters
        values["num_query_groups"] = values["num_attention_heads"]
    if values["kv_channels"] is None:
        values["kv_channels"] = values["hidden_size"] // values["num_attention_heads"]
    if values["attention_type"] == "mla" and config.get("rope_interleave") is False:
        raise ExportError(f"{where}: an MLA draft with rope_interleave false is not supported (megaspark's "
                          "MLA uses DeepSeek's interleaved-pair RoPE)")
    try:
        theta, factor, yarn = rope_settings(types.SimpleNamespace(**{
            k: config[k] for k in ("rope_theta", "rope_parameters", "rope_scaling", "max_position_embeddings")
            if k in config}))
        values["target_layer_ids"] = [int(i) for i in values["target_layer_ids"]]
        qk_norm = config.get("dspark_qk_norm")
        if qk_norm is None:  # an export that does not say: as the target family's blocks
            qk_norm = SUPPORTED_FAMILIES[values["target_model_type"]][0]
        dcfg = DSparkConfig(
            rope_theta=theta, rope_scaling_factor=factor, rope_yarn=yarn,
            qk_norm=bool(qk_norm) and values["attention_type"] != "mla", **values)
        dcfg.validate()
    except (ConfigError, TypeError, ValueError) as e:
        raise ExportError(f"{where}: not a valid DSpark draft config: {e}") from None
    return dcfg


def _load_tensors(path: str) -> dict:
    from safetensors.torch import load_file

    single = os.path.join(path, WEIGHTS_FILE)
    index = os.path.join(path, WEIGHTS_INDEX_FILE)
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        out = {}
        for name in files:
            out.update(load_file(os.path.join(path, name)))
        return out
    bin_file = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(bin_file):
        return torch.load(bin_file, map_location="cpu", weights_only=True)
    raise ExportError(f"{path}: no {WEIGHTS_FILE}, {WEIGHTS_INDEX_FILE} or pytorch_model.bin")


def read_hf_config(path) -> tuple:
    """(DSparkConfig, raw config dict) of an HF export directory."""
    path = str(path)
    cfg_file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_file):
        raise ExportError(f"{path}: no {CONFIG_FILE} (not an HF draft directory)")
    with open(cfg_file) as f:
        raw = json.load(f)
    return config_to_dspark(raw, where=cfg_file), raw


def read_hf(path) -> tuple:
    """``(DSparkConfig, state)`` of a DeepSpec- or SpecForge-layout draft directory.

    ``state`` holds HF-named (§9.1, no ``model.`` prefix) tensors; ``embed_tokens`` /
    ``lm_head`` only if the export ships them. Rotary buffers are dropped; unknown or
    missing tensors and shapes that do not fit the config are errors.
    """
    dcfg, _ = read_hf_config(path)
    state = {}
    for name, tensor in _load_tensors(str(path)).items():
        clean = _clean_key(name)
        if clean is not None:
            state[clean] = tensor
    present_frozen = [k for k in FROZEN_TENSORS if k in state]
    if present_frozen and len(present_frozen) != len(FROZEN_TENSORS):
        raise ExportError(f"{path}: ships {present_frozen} but not both of {list(FROZEN_TENSORS)}")
    _check_tensors(state, dcfg, bool(present_frozen), f"{path}")
    return dcfg, state


def target_embeddings(target: str) -> tuple:
    """(embed_tokens [V, H], lm_head [V, H]) of a target (``builtin:`` name or HF directory),
    read from its safetensors as stored (the LM head is the embedding when tied)."""
    from megaspark.targets.builtin import resolve_target

    path = resolve_target(target)
    tensors = _load_tensors(path)
    with open(os.path.join(path, CONFIG_FILE)) as f:
        cfg = json.load(f)
    cfg = cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg

    def find(suffix):
        names = sorted((k for k in tensors if k == suffix or k.endswith("." + suffix)), key=len)
        return tensors[names[0]] if names else None

    embed = find("embed_tokens.weight")
    head = None if cfg.get("tie_word_embeddings", False) else find("lm_head.weight")
    if embed is None:
        raise ExportError(f"target {target}: no embed_tokens.weight in its weights")
    return embed, (embed if head is None else head)


# =======================================================================================
# Megatron side: process group, building and loading drafts, checkpoint conversion
# =======================================================================================


def init_single_process_group(seed: int = 1234, device: str = "auto") -> None:
    """A one-rank process group with TP = PP = 1 for tools (idempotent; keeps an existing
    torch.distributed group and only adds the megatron groups if missing). ``device``
    (auto/cpu/cuda) becomes the compute device."""
    import socket

    from megatron.core import parallel_state

    from megaspark.parallel import initialize_distributed

    if torch.distributed.is_initialized():
        if not parallel_state.model_parallel_is_initialized():
            initialize_distributed(1, 1, seed=seed, device=device)
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    initialize_distributed(1, 1, seed=seed, device=device)


def _build_model(dcfg: DSparkConfig, tp: int):
    from megatron.core import parallel_state

    from megaspark.models.dspark.model import DSparkModel

    if not (torch.distributed.is_initialized() and parallel_state.model_parallel_is_initialized()):
        raise RuntimeError("load_draft needs an initialised process group "
                           "(megaspark.parallel.initialize_distributed or init_single_process_group)")
    actual = parallel_state.get_tensor_model_parallel_world_size()
    if actual != tp:
        raise RuntimeError(f"load_draft(tp={tp}) but the process group has TP={actual}")
    if parallel_state.get_virtual_pipeline_model_parallel_world_size():
        raise RuntimeError("load_draft does not build interleaved (virtual) pipeline stages")
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    dcfg.validate(tp)
    tcfg = dcfg.transformer_config(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    return DSparkModel(tcfg, dcfg, pre_process=parallel_state.is_pipeline_first_stage(),
                       post_process=parallel_state.is_pipeline_last_stage())


def _load_checkpoint_weights(model, ckpt: str) -> None:
    """The model part of a megaspark training checkpoint (any TP/PP/DP: keys are global)."""
    from megatron.core import dist_checkpointing

    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, ckpt)
    with torch.no_grad():
        model.load_state_dict(loaded["model"], strict=True)


def _hf_names_of(model, trainable_only: bool) -> list:
    from megaspark.models.dspark.state_dict_adapter import _local_layer_to_global

    names = []
    for name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        mapping, layer = _local_layer_to_global(model, name)
        names.extend(n.replace("{i}", str(layer)) for n in mapping.hf)
    return names


def load_draft(path, tp: int = 1, target_model: Optional[str] = None):
    """``(model, dcfg)``: a DSparkModel holding the weights at ``path`` — an HF export
    directory (``config.json``) or a megaspark checkpoint (a ``--save`` directory with
    ``latest``, or one ``iter_N`` directory).

    Must be called inside an initialised process group whose TP size is ``tp`` (e.g.
    :func:`init_single_process_group` for TP = 1); with PP > 1 this rank's stage is built.
    An HF export without ``embed_tokens``/``lm_head`` takes them from ``target_model``
    (default: the ``dspark_target`` recorded in its config).
    """
    from megaspark.models.dspark.state_dict_adapter import load_hf_state_dict
    from megaspark.training.checkpointing import read_state, resolve_checkpoint

    path = str(path)
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        dcfg, state = read_hf(path)
        if "embed_tokens.weight" not in state:
            _, raw = read_hf_config(path)
            target = target_model or raw.get("dspark_target")
            if target is None:
                raise ExportError(f"{path} does not ship embed_tokens/lm_head and names no target; "
                                  "pass the target model")
            state["embed_tokens.weight"], state["lm_head.weight"] = target_embeddings(target)
        model = _build_model(dcfg, tp)
        load_hf_state_dict(model, state, strict=True)
    else:
        ckpt = resolve_checkpoint(path)
        dcfg = DSparkConfig.from_dict(read_state(ckpt)["dspark_config"])
        model = _build_model(dcfg, tp)
        _load_checkpoint_weights(model, ckpt)
    model.eval()
    return model, dcfg


def load_hf_draft_weights(model_chunks, path, dcfg: Optional[DSparkConfig] = None,
                          target_fingerprint: Optional[str] = None) -> DSparkConfig:
    """Initialise already-built model chunks (any TP/PP/VPP, inside the process group) from
    an HF export, e.g. for ``--load-hf-draft``. Only the trainable tensors are taken: the
    frozen embedding / LM head stay the run's own copies of the target. With ``dcfg``,
    the export must describe the same draft shape (:meth:`DSparkConfig.shape_signature`);
    with ``target_fingerprint``, a different recorded target fingerprint is warned about
    (a draft may legitimately be trained further against another version of its target).
    Call it before the optimizer is built (it copies the parameters it starts from).
    Returns the export's DSparkConfig."""
    import warnings

    from megaspark.models.dspark.state_dict_adapter import load_hf_state_dict

    theirs, state = read_hf(path)
    _, raw = read_hf_config(path)
    recorded = raw.get("dspark_target_fingerprint")
    if target_fingerprint is not None and recorded is not None and recorded != target_fingerprint:
        warnings.warn(f"{path} was trained against target fingerprint {recorded}, this run's target "
                      f"is {target_fingerprint}", stacklevel=2)
    if dcfg is not None:
        a, b = theirs.shape_signature(), dcfg.shape_signature()
        diff = {k: (a[k], b[k]) for k in b if a.get(k) != b[k]}
        if diff:
            detail = ", ".join(f"{k}: export {x} vs run {y}" for k, (x, y) in diff.items())
            hint = ("; q/k norms are on by default: add --no-qk-norm to start from a draft without them"
                    if diff.get("qk_norm") == (False, True) else "")
            raise ExportError(f"{path} is a different draft shape ({detail}){hint}")
    trainable = {k: v for k, v in state.items() if k not in FROZEN_TENSORS}
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    for chunk in chunks:
        chunk = getattr(chunk, "module", chunk)
        used = set(load_hf_state_dict(chunk, trainable, strict=False))
        missing = [n for n in _hf_names_of(chunk, trainable_only=True) if n not in used]
        if missing:
            raise ExportError(f"{path}: no tensors for {missing}")
    return theirs


def export_checkpoint(ckpt_dir, out_dir, layout: str = "deepspec", include_embeddings: Optional[bool] = None,
                      target_model: Optional[str] = None, log=None) -> dict:
    """Convert a megaspark training checkpoint saved at any (TP, PP, DP) to an HF export.

    Runs in one process: starts (or reuses) a one-rank group, builds the draft at TP = 1
    from the checkpoint's DSpark config, loads only the model part of the checkpoint and
    writes :func:`export_hf`. The target's config comes from ``target_model`` or the
    checkpoint's ``--target-model``. Returns a summary dict.
    """
    from megaspark.models.dspark.state_dict_adapter import hf_state_dict
    from megaspark.targets.base import config_fingerprint
    from megaspark.targets.builtin import resolve_target
    from megaspark.targets.hf import load_config_offline
    from megaspark.training.checkpointing import read_state, resolve_checkpoint

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    ckpt = resolve_checkpoint(str(ckpt_dir))
    saved = read_state(ckpt)
    dcfg = DSparkConfig.from_dict(saved["dspark_config"])
    target = target_model or saved.get("args", {}).get("target_model")
    if not target:
        raise ExportError(f"{ckpt} does not record its --target-model; pass the target model")
    target_config = load_config_offline(resolve_target(target)).get_text_config()
    fingerprint = config_fingerprint(target_config.to_dict(), dcfg.target_layer_ids)
    if saved.get("target_fingerprint") not in (None, fingerprint):
        log(f"warning: target {target} has fingerprint {fingerprint}, the checkpoint was trained "
            f"against {saved['target_fingerprint']}")
    init_single_process_group()
    from megatron.core import parallel_state

    if (parallel_state.get_tensor_model_parallel_world_size() != 1
            or parallel_state.get_pipeline_model_parallel_world_size() != 1):
        raise RuntimeError("export_checkpoint runs at TP = PP = 1")
    model, _ = load_draft(ckpt, tp=1)
    state = hf_state_dict(model)
    export_hf(state, dcfg, target_config, out_dir, layout=layout, include_embeddings=include_embeddings,
              target_name=target, target_fingerprint=saved.get("target_fingerprint", fingerprint))
    counts = parameter_counts(dcfg)
    return dict(
        checkpoint=ckpt, output=os.path.abspath(str(out_dir)), layout=layout,
        iteration=saved.get("iteration"), parallel_layout=saved.get("parallel_layout"),
        convention=dcfg.convention, target=target,
        include_embeddings=LAYOUTS[layout].embeddings_by_default if include_embeddings is None
        else include_embeddings,
        trainable_parameters=counts["trainable"], frozen_parameters=counts["frozen"],
    )


# =======================================================================================
# Scoring batches (tools/score_batch.py)
# =======================================================================================

BATCH_TENSORS = ("input_ids", "loss_mask", "target_hidden_states", "target_last_hidden_states",
                 "anchors", "keep")


def save_batch(path, input_ids, loss_mask, target_hidden_states, target_last_hidden_states,
               anchors, keep) -> None:
    """Write a scoring batch: input_ids/loss_mask [b, S], target_hidden_states (the tapped
    layers) [b, S, L·H], target_last_hidden_states [b, S, H], anchors/keep [b, N]."""
    from safetensors.torch import save_file

    tensors = dict(
        input_ids=input_ids.long(), loss_mask=loss_mask.long(),
        target_hidden_states=target_hidden_states.float(),
        target_last_hidden_states=target_last_hidden_states.float(),
        anchors=anchors.long(), keep=keep.bool(),
    )
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def load_batch(path) -> dict:
    from safetensors.torch import load_file

    batch = load_file(str(path))
    missing = [k for k in BATCH_TENSORS if k not in batch]
    if missing:
        raise ExportError(f"{path}: batch lacks {missing} (needs {list(BATCH_TENSORS)})")
    return batch


__all__ = [
    "ExportError", "TENSORS", "SHAPE_FIELDS", "ALGORITHM_FIELDS", "LAYOUTS", "IMPORT_KEY_RULES",
    "FAMILY_ARCHITECTURES", "hf_tensor_shapes", "parameter_counts", "trainable_parameter_count",
    "build_hf_config", "export_hf", "canonical", "detect_layout", "config_to_dspark", "read_hf_config",
    "read_hf",
    "target_embeddings", "init_single_process_group", "load_draft", "load_hf_draft_weights",
    "export_checkpoint", "save_batch", "load_batch",
]
