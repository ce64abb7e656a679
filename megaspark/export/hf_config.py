"""The ``config.json`` of an HF draft export: DSparkConfig ↔ config translation (DSPARK_SPEC.md §9).

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

The tables: :data:`SHAPE_FIELDS` and :data:`ALGORITHM_FIELDS` (DSparkConfig attribute ↔
config key per layout, ``a.b`` = key ``b`` nested in ``a``; default on import); the
per-layout constants (architectures, markers) and which weights a layout ships:
:data:`LAYOUTS`.

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
so that :func:`megaspark.export.files.read_hf` gives back the DSparkConfig that trained it.

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
import types
from dataclasses import dataclass
from typing import Any, Callable, Optional

from megaspark.config import DSPARK_DEFAULTS, MLA_FLAGS, SUPPORTED_FAMILIES, ConfigError, DSparkConfig, rope_settings
from megaspark.export.tensors import ExportError

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
    Field("num_anchors", "num_anchors", default=DSPARK_DEFAULTS["num_anchors"]),
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
          written=lambda d: d.training_mode == "vp_drafter", default=DSPARK_DEFAULTS["prefix_weight_base"]),
    # training-only settings, kept so that a re-import reproduces the run's config
    Field("truncate_eval_mask", "megaspark.truncate_eval_mask", default=True),
    Field("attention_backend", "megaspark.attention_backend", default="structured"),
    Field("attention_chunk_blocks", "megaspark.attention_chunk_blocks",
          default=DSPARK_DEFAULTS["attention_chunk_blocks"]),
    Field("loss_chunk_rows", "megaspark.loss_chunk_rows", default=DSPARK_DEFAULTS["loss_chunk_rows"]),
    Field("init_std", "megaspark.init_std", default=DSPARK_DEFAULTS["init_std"]),
)

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


__all__ = [
    "Field", "SHAPE_FIELDS", "ALGORITHM_FIELDS", "FAMILY_ARCHITECTURES", "MLA_CONFIG_KEYS", "Layout", "LAYOUTS",
    "build_hf_config", "canonical", "detect_layout", "config_to_dspark",
]
