#!/usr/bin/env python
"""Check an HF DSpark draft directory the way SGLang and vLLM read it (DSPARK_SPEC.md §9.3).

Reads ``config.json`` and the safetensors headers only (no tensor data, no torch, no
megatron), and reports every problem found:

* required config fields (shape, ``block_size``, ``mask_token_id``, ``target_layer_ids``,
  ``markov_rank``/``markov_head_type``, confidence-head flags) and their values —
  ``mask_token_id`` inside the vocabulary, layer ids valid for the target depth;
* where the engine looks for them: vLLM reads the DSpark fields at the top level of the
  config; SGLang also looks in ``dspark_config``/``dflash_config``, needs
  ``markov_rank > 0`` and refuses Convention-D (``speculators_model_type: "dspark"``)
  checkpoints;
* tensor names — exactly the set the config implies (no missing, no stray tensors, no
  ``rotary_emb`` buffers, no ``model.`` prefix), confidence-head weights present iff
  the head is enabled, ``embed_tokens``/``lm_head`` optional;
* tensor shapes against the config (``fc`` ``[H, L·H]`` with ``L = len(target_layer_ids)``,
  attention, MLP, norms, Markov tables ``[V, r]``, confidence ``[1, H(+r)]``, ...);
  an MLA draft (``draft_attention: "mla"`` or a ``kv_lora_rank``) has DeepSeek-V3's attention
  tensors (``q_proj`` or ``q_a_proj``/``q_a_layernorm``/``q_b_proj`` when ``q_lora_rank`` is
  set, ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``).

An Eagle3 draft (``architectures: ["LlamaForCausalLMEagle3"]``, SGLang/vLLM/SpecForge; or
SpecForge's MLA draft ``DeepseekV3ForCausalLMEagle3`` with DeepSeek-V3's attention tensors
and ``kv_lora_rank`` / ``qk_nope_head_dim`` / ``qk_rope_head_dim`` / ``v_head_dim`` /
``q_lora_rank``) is checked for its one-layer shape, ``draft_vocab_size``, the three tapped
layers (``eagle_config.eagle_aux_hidden_state_layer_ids``), the ``midlayer.*`` / ``fc`` /
``lm_head`` tensors and shapes, ``d2t`` (integer offsets) and ``t2d`` (bool).

With ``--load-in-sglang`` (needs sglang) the export is also built with SGLang's own DSpark
draft class and loaded with its own weight loader on the CPU, and draft blocks run by
SGLang (layers, attention over the context KV, Markov drafting loop, confidence head) are
compared with megaspark's inference forward of the same export
(``megaspark.export.sglang_parity.compare_with_sglang``).

This file restates the engines' expectations on purpose instead of importing megaspark's
exporter, so that it checks the exporter rather than repeating it.

Exit status: 0 if no problem was found, 1 otherwise (2 for a bad command line).

    python tools/validate_hf_export.py export/smollm2
    python tools/validate_hf_export.py export/qwen3-specforge --engine sglang
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys

ENGINES = ("sglang", "vllm")
HEAD_TYPES = ("vanilla", "gated", "rnn")
KNOWN_ARCHITECTURES = {
    "Qwen3DSparkModel": "DeepSpec-native Qwen3 draft (vLLM Qwen3DSparkForCausalLM, SGLang)",
    "DSparkDraftModel": "SpecForge-style DSpark draft (SGLang)",
    "LingDSparkModel": "Ling-family DSpark draft (SGLang)",
    "DFlashDraftModel": "SpecForge/z-lab DFlash draft",
    "LlamaDSparkModel": "megaspark draft trained with --no-qk-norm (no q/k norms)",
    "MistralDSparkModel": "megaspark Mistral-family draft trained with --no-qk-norm",
    "Qwen2DSparkModel": "megaspark Qwen2-family draft trained with --no-qk-norm (q/k/v biases)",
    "DeepseekV3DSparkModel": "megaspark draft with DeepSeek-V3 multi-head latent attention (MLA)",
    "DeepseekV2DSparkModel": "megaspark draft with DeepSeek-V2 multi-head latent attention (MLA)",
}
ENGINE_ARCHITECTURES = {"Qwen3DSparkModel", "DSparkDraftModel", "LingDSparkModel", "DFlashDraftModel"}
# SGLang's DSpark draft layers (sglang/srt/models/dflash.py, the base of models/dspark.py)
# always build per-head q/k RMSNorms: a draft without them would be served with weight 1
QK_NORM_ARCHITECTURES = {"Qwen3DSparkModel", "DSparkDraftModel", "LingDSparkModel", "DFlashDraftModel"}
# SGLang's lookup of the DSpark fields (sglang/srt/speculative/dspark_components/
# dspark_config.py::parse_dspark_draft_config): a root key with this name first, then the
# plain key in dspark_config, dflash_config, text_config, the top level
SGLANG_PREFIXED = {"block_size": "dspark_block_size", "markov_rank": "dspark_markov_rank",
                   "markov_head_type": "dspark_markov_head_type",
                   "mask_token_id": "dspark_noise_token_id",
                   "target_layer_ids": "dspark_target_layer_ids"}
SGLANG_PLACES = ["dspark_config", "dflash_config", "text_config", "top level"]
VLLM_HEAD_TYPES = ("vanilla",)  # vLLM's Qwen3DSparkModel builds only the vanilla Markov head
FLOAT_DTYPES = {"F32", "F16", "BF16"}


class Report:
    def __init__(self):
        self.problems: list[str] = []
        self.notes: list[str] = []

    def problem(self, msg: str) -> None:
        self.problems.append(msg)

    def note(self, msg: str) -> None:
        self.notes.append(msg)


# --------------------------------------------------------------------------- safetensors


def read_safetensors_header(path: str) -> dict:
    """name -> (dtype, shape) from a safetensors file's JSON header."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("file too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError(f"implausible header length {n}")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()}


def read_tensor_index(path: str, report: Report) -> dict:
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    files = []
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index) as f:
            files = [os.path.join(path, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
    else:
        report.problem("no model.safetensors (or model.safetensors.index.json) in the directory")
        return {}
    tensors = {}
    for file in files:
        try:
            tensors.update(read_safetensors_header(file))
        except (OSError, ValueError, KeyError) as e:
            report.problem(f"{os.path.basename(file)}: cannot read the safetensors header ({e})")
    return tensors


# --------------------------------------------------------------------------- config


def _lookup(cfg: dict, key: str, places):
    """(found, value, where) of ``key`` in the first of ``places`` that has it."""
    for place in places:
        node = cfg if place == "top level" else cfg.get(place)
        if isinstance(node, dict) and key in node:
            return True, node[key], place
    return False, None, None


def sglang_lookup(cfg: dict, key: str):
    """(found, value, where) of a DSpark field as SGLang resolves it."""
    pk = SGLANG_PREFIXED.get(key)
    if pk is not None and cfg.get(pk) is not None:
        return True, cfg[pk], pk
    return _lookup(cfg, key, SGLANG_PLACES)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_config(cfg: dict, engines, report: Report) -> dict:
    """Validate the fields; return the values needed for the tensor checks (or {})."""
    shape = {}
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "vocab_size"):
        if key not in cfg:
            report.problem(f"config: missing top-level '{key}'")
        else:
            shape[key] = cfg[key]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key in shape and not (_is_int(shape[key]) and shape[key] > 0):
            report.problem(f"config: '{key}' must be a positive integer, got {shape[key]!r}")
            shape.pop(key)
    if len(shape) < 6:
        return {}
    H, heads = shape["hidden_size"], shape["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or (H // heads)
    if not (_is_int(kv) and kv > 0 and heads % kv == 0):
        report.problem(f"config: num_key_value_heads {kv!r} must divide num_attention_heads {heads}")
    if "head_dim" not in cfg and H % heads:
        report.problem("config: no 'head_dim' and hidden_size is not a multiple of num_attention_heads")
    if "rms_norm_eps" not in cfg:
        report.note("config: no 'rms_norm_eps'; engines fall back to their class default")

    archs = cfg.get("architectures")
    if not (isinstance(archs, list) and archs and all(isinstance(a, str) for a in archs)):
        report.problem(f"config: 'architectures' must be a non-empty list of names, got {archs!r}")
    else:
        for a in archs:
            if a not in KNOWN_ARCHITECTURES:
                known = ", ".join(sorted(KNOWN_ARCHITECTURES))
                report.problem(f"config: unknown architecture '{a}' (known: {known})")
            elif a not in ENGINE_ARCHITECTURES:
                report.note(f"architecture {a}: {KNOWN_ARCHITECTURES[a]}; SGLang and vLLM serve "
                            "Qwen3-family drafts only")
    if cfg.get("tie_word_embeddings", False):
        report.problem("config: tie_word_embeddings must be false "
                       "(the draft's LM head is a separate frozen copy)")

    # ---- DSpark fields, where each engine looks for them
    nested = [p for p in ("dspark_config", "dflash_config") if isinstance(cfg.get(p), dict)]
    places_any = ["top level"] + nested
    fields = {}
    for key, required in (("block_size", True), ("mask_token_id", True), ("target_layer_ids", True),
                          ("markov_rank", True), ("markov_head_type", False),
                          ("enable_confidence_head", False), ("confidence_head_with_markov", False),
                          ("num_target_layers", False)):
        found, value, where = _lookup(cfg, key, places_any)
        if found:
            fields[key] = value
        elif required:
            report.problem(f"config: missing '{key}' (looked at the top level and in "
                           f"{nested or 'no nested config'})")
        if found and "vllm" in engines and where != "top level" and key != "num_target_layers":
            report.problem(f"vllm: '{key}' is only in {where}; vLLM reads DSpark fields at the top level "
                           "(export with the deepspec layout)")
        if "sglang" in engines and key != "num_target_layers":
            s_found, s_value, s_where = sglang_lookup(cfg, key)
            if found and not s_found:
                report.problem(f"sglang: '{key}' is not where SGLang looks "
                               f"({SGLANG_PREFIXED.get(key, key)}, dspark_config, dflash_config, "
                               "text_config, top level)")
            elif found and s_found and s_value != value:
                report.problem(f"sglang: reads {key} = {s_value!r} from {s_where}, but {where} says "
                               f"{value!r} (the engines would serve different drafts)")

    V = shape["vocab_size"]
    block = fields.get("block_size")
    if block is not None and not (_is_int(block) and block >= 1):
        report.problem(f"config: block_size must be an integer >= 1, got {block!r}")
    mask = fields.get("mask_token_id")
    if mask is not None and not (_is_int(mask) and 0 <= mask < V):
        report.problem(f"config: mask_token_id {mask!r} is outside the target vocabulary [0, {V})")
    ids = fields.get("target_layer_ids")
    n_target = fields.get("num_target_layers")
    if ids is not None:
        if not (isinstance(ids, list) and ids and all(_is_int(i) for i in ids)):
            report.problem(f"config: target_layer_ids must be a non-empty list of integers, got {ids!r}")
            ids = None
        elif any(b <= a for a, b in zip(ids, ids[1:])):
            report.problem(f"config: target_layer_ids must be strictly increasing, got {ids}")
        elif _is_int(n_target) and any(i < 0 or i > n_target - 2 for i in ids):
            report.problem(f"config: target_layer_ids {ids} out of range for a {n_target}-layer target "
                           f"(valid 0..{n_target - 2})")
    if n_target is None:
        report.note("config: no 'num_target_layers'; target layer ids not range-checked")
    rank = fields.get("markov_rank")
    if rank is not None and not (_is_int(rank) and rank >= 0):
        report.problem(f"config: markov_rank must be an integer >= 0, got {rank!r}")
        rank = None
    head_type = fields.get("markov_head_type", "vanilla")
    if rank:
        if "markov_head_type" not in fields:
            report.note("config: no 'markov_head_type'; engines assume 'vanilla'")
        if head_type not in HEAD_TYPES:
            report.problem(f"config: markov_head_type must be one of {HEAD_TYPES}, got {head_type!r}")
    if rank and head_type not in VLLM_HEAD_TYPES and "vllm" in engines:
        report.note(f"warning: vllm: its Qwen3DSparkModel builds only the vanilla Markov head; this "
                    f"draft's '{head_type}' head is served by SGLang only")
    if rank == 0 and "sglang" in engines:
        report.problem("sglang: markov_rank must be > 0 (SGLang serves DSpark drafts only, not plain DFlash)")
    conf = fields.get("enable_confidence_head", False)
    if not isinstance(conf, bool):
        report.problem(f"config: enable_confidence_head must be true or false, got {conf!r}")
        conf = bool(conf)
    with_markov = fields.get("confidence_head_with_markov")
    if conf and with_markov is None:
        report.problem("config: enable_confidence_head is true but 'confidence_head_with_markov' is missing")
    if conf and with_markov and not rank:
        report.problem("config: confidence_head_with_markov needs markov_rank > 0")

    # ---- slot convention
    convention = cfg.get("dspark_slot_convention")
    if convention is None:
        report.note("config: no 'dspark_slot_convention'; engines assume Convention S (anchor-first)")
    elif convention not in ("S", "D"):
        report.problem(f"config: dspark_slot_convention must be 'S' or 'D', got {convention!r}")
    from_anchor = cfg.get("sample_from_anchor")
    if from_anchor is not None and convention in ("S", "D") and from_anchor != (convention == "S"):
        report.problem(f"config: sample_from_anchor {cfg['sample_from_anchor']} contradicts "
                       f"dspark_slot_convention {convention}")
    if cfg.get("speculators_model_type") == "dspark" and "sglang" in engines:
        report.problem("sglang: refuses checkpoints tagged speculators_model_type 'dspark' (Convention D)")
    elif convention == "D" and "sglang" in engines:
        report.problem("sglang: serves Convention S drafts only, this export is Convention D")
    if convention == "D" and "vllm" in engines and "DFlashDraftModel" not in (cfg.get("architectures") or []):
        report.problem("vllm: Qwen3DSparkForCausalLM reads slots as Convention S; this export is "
                       "Convention D (serve it as a DFlash draft, or train with Convention S)")

    mla = None
    if cfg.get("draft_attention") == "mla" or cfg.get("kv_lora_rank"):
        dims = {k: cfg.get(k) for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")}
        bad = [k for k, v in dims.items() if not (_is_int(v) and v >= (0 if k == "qk_nope_head_dim" else 1))]
        q_lora = cfg.get("q_lora_rank")
        if q_lora is not None and not (_is_int(q_lora) and q_lora >= 1):
            bad.append("q_lora_rank (null or a positive integer)")
        if bad:
            report.problem(f"config: MLA draft with missing or invalid {', '.join(bad)}")
        else:
            mla = dict(dims, q_lora_rank=q_lora)
        if cfg.get("rope_interleave") is False:
            report.note("config: rope_interleave is false; DeepSeek engines rotate interleaved pairs")
    # ---- per-head q/k norms
    arch_set = set(archs) if isinstance(archs, list) else set()
    qk_norm = cfg.get("dspark_qk_norm")
    if qk_norm is None:
        qk_norm = shape["model_type"] == "qwen3" or bool(arch_set & QK_NORM_ARCHITECTURES)
    if mla is None and not qk_norm and arch_set & QK_NORM_ARCHITECTURES and \
            ("sglang" in engines or "vllm" in engines):
        report.problem(f"{'/'.join(e for e in engines)}: {sorted(arch_set & QK_NORM_ARCHITECTURES)[0]} "
                       "layers always have per-head q/k norms, this draft has none: it would be "
                       "served with norms of weight 1 (lossless, but acceptance collapses)")
    return dict(
        mla=mla, qk_norm=bool(qk_norm) and mla is None,
        model_type=shape["model_type"], H=H, heads=heads, kv=kv, hd=hd,
        layers=shape["num_hidden_layers"], I=shape["intermediate_size"], V=V,
        taps=len(ids) if ids else None, rank=rank or 0, head_type=head_type,
        conf=conf, with_markov=bool(with_markov),
        bias=bool(cfg.get("attention_bias", shape["model_type"] == "qwen2")),  # Qwen2 has q/k/v biases
    )


def expected_tensors(s: dict) -> dict:
    """name -> shape implied by the config (embed_tokens/lm_head listed separately)."""
    H, V, r, hd = s["H"], s["V"], s["rank"], s["hd"]
    q, kv = s["heads"] * hd, s["kv"] * hd
    out = {"fc.weight": (H, s["taps"] * H) if s["taps"] else None,
           "hidden_norm.weight": (H,), "norm.weight": (H,)}
    mla = s.get("mla")
    for i in range(s["layers"]):
        p = f"layers.{i}."
        out.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "mlp.gate_proj.weight": (s["I"], H), p + "mlp.up_proj.weight": (s["I"], H),
            p + "mlp.down_proj.weight": (H, s["I"]),
        })
        if mla:
            a, n = p + "self_attn.", s["heads"]
            rkv, rq = mla["kv_lora_rank"], mla["q_lora_rank"]
            qk = mla["qk_nope_head_dim"] + mla["qk_rope_head_dim"]
            if rq:
                out.update({a + "q_a_proj.weight": (rq, H), a + "q_a_layernorm.weight": (rq,),
                            a + "q_b_proj.weight": (n * qk, rq)})
            else:
                out[a + "q_proj.weight"] = (n * qk, H)
            out.update({
                a + "kv_a_proj_with_mqa.weight": (rkv + mla["qk_rope_head_dim"], H),
                a + "kv_a_layernorm.weight": (rkv,),
                a + "kv_b_proj.weight": (n * (mla["qk_nope_head_dim"] + mla["v_head_dim"]), rkv),
                a + "o_proj.weight": (H, n * mla["v_head_dim"]),
            })
            continue
        out.update({
            p + "self_attn.q_proj.weight": (q, H), p + "self_attn.k_proj.weight": (kv, H),
            p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, q),
        })
        if s["bias"]:
            out.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                        p + "self_attn.v_proj.bias": (kv,)})
        if s["qk_norm"]:
            out.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
    if r > 0:
        out.update({"markov_head.markov_w1.weight": (V, r), "markov_head.markov_w2.weight": (V, r)})
        if s["head_type"] == "gated":
            out.update({"markov_head.gate_proj.weight": (r, H + r), "markov_head.gate_proj.bias": (r,)})
        elif s["head_type"] == "rnn":
            out.update({"markov_head.joint_proj.weight": (3 * r, 2 * r + H),
                        "markov_head.joint_proj.bias": (3 * r,)})
    if s["conf"]:
        out.update({"confidence_head.proj.weight": (1, H + (r if s["with_markov"] else 0)),
                    "confidence_head.proj.bias": (1,)})
    return out


def check_tensors(tensors: dict, s: dict, report: Report) -> None:
    expected = expected_tensors(s)
    optional = {"embed_tokens.weight": (s["V"], s["H"]), "lm_head.weight": (s["V"], s["H"])}
    for name, (dtype, shape) in sorted(tensors.items()):
        if "rotary_emb" in name:
            report.problem(f"tensor '{name}': rotary embedding buffers must not be saved")
            continue
        if name.startswith("model."):
            report.problem(f"tensor '{name}': names carry no 'model.' prefix (DSPARK_SPEC.md §9.1)")
            continue
        if dtype not in FLOAT_DTYPES:
            report.problem(f"tensor '{name}': dtype {dtype} (expected one of {sorted(FLOAT_DTYPES)})")
        if name in expected:
            want = expected[name]
        elif name in optional:
            want = optional[name]
        else:
            hint = ""
            if name.startswith("confidence_head.") and not s["conf"]:
                hint = " (the confidence head is disabled in the config)"
            elif name.startswith("markov_head."):
                hint = f" (markov_rank {s['rank']}, markov_head_type {s['head_type']!r})"
            report.problem(f"tensor '{name}': not part of this draft{hint}")
            continue
        if want is not None and tuple(shape) != tuple(want):
            report.problem(f"tensor '{name}': shape {list(shape)}, the config implies {list(want)}")
    for name in expected:
        if name not in tensors:
            why = " (the confidence head is enabled)" if name.startswith("confidence_head.") else ""
            report.problem(f"tensor '{name}': missing{why}")
    shipped = [n for n in optional if n in tensors]
    if len(shipped) == 1:
        report.note(f"only {shipped[0]} is shipped; the engine takes the other from the target")
    elif not shipped:
        report.note("embed_tokens/lm_head not shipped: the engine shares the target's")


def validate(path: str, engines=ENGINES) -> Report:
    report = Report()
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        report.problem(f"{path} is not a directory")
        return report
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        report.problem("no config.json")
        return report
    except json.JSONDecodeError as e:
        report.problem(f"config.json is not valid JSON ({e})")
        return report
    if not isinstance(cfg, dict):
        report.problem("config.json is not a JSON object")
        return report
    if {EAGLE3, EAGLE3_MLA} & set(cfg.get("architectures") or []):
        check_eagle3(cfg, read_tensor_index(path, report), report)
        return report
    shape = check_config(cfg, engines, report)
    tensors = read_tensor_index(path, report)
    if shape and tensors:
        check_tensors(tensors, shape, report)
    return report


# --------------------------------------------------------------------------- Eagle3

#: SGLang (models/llama_eagle3.py), vLLM and SpecForge load Eagle3 drafts under this name
EAGLE3 = "LlamaForCausalLMEagle3"
#: SpecForge's Eagle3 draft with DeepSeek-V3 multi-head latent attention
EAGLE3_MLA = "DeepseekV3ForCausalLMEagle3"


def _eagle3_attention_shapes(cfg: dict, H: int, nh: int, report: Report) -> dict:
    """The attention tensors of an Eagle3 draft's midlayer (GQA, or DeepSeek-V3's MLA)."""
    at = "midlayer.self_attn."
    if EAGLE3_MLA not in (cfg.get("architectures") or []):
        nkv = cfg.get("num_key_value_heads", nh)
        hd = cfg.get("head_dim") or H // nh
        return {at + "q_proj.weight": (nh * hd, 2 * H), at + "k_proj.weight": (nkv * hd, 2 * H),
                at + "v_proj.weight": (nkv * hd, 2 * H), at + "o_proj.weight": (H, nh * hd)}
    dims = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
    bad = [k for k in dims if not _is_int(cfg.get(k))]
    if bad:
        report.problem(f"eagle3: {EAGLE3_MLA} needs integer {', '.join(bad)}")
        return {}
    r, nope, rope, v = (cfg[k] for k in dims)
    q_rank = cfg.get("q_lora_rank") or 0
    qk = nope + rope
    out = ({at + "q_a_proj.weight": (q_rank, 2 * H), at + "q_a_layernorm.weight": (q_rank,),
            at + "q_b_proj.weight": (nh * qk, q_rank)} if q_rank else {at + "q_proj.weight": (nh * qk, 2 * H)})
    out.update({at + "kv_a_proj_with_mqa.weight": (r + rope, 2 * H), at + "kv_a_layernorm.weight": (r,),
                at + "kv_b_proj.weight": (nh * (nope + v), r), at + "o_proj.weight": (H, nh * v)})
    return out


def check_eagle3(cfg: dict, tensors: dict, report: Report) -> None:
    """An Eagle3 draft as the engines read it: one decoder layer ``midlayer`` whose
    attention input is 2H wide, ``fc`` over the three tapped layers
    (``eagle_config.eagle_aux_hidden_state_layer_ids``), an LM head over ``draft_vocab_size``
    tokens, ``d2t`` (int64 offsets, read by SGLang as its hot-token map) and ``t2d`` (bool
    over the target vocabulary); ``embed_tokens`` optional (engines take the target's)."""
    need = ("hidden_size", "num_attention_heads", "intermediate_size", "vocab_size", "draft_vocab_size")
    missing = [k for k in need if not _is_int(cfg.get(k))]
    if missing:
        report.problem(f"eagle3: config.json needs integer {', '.join(missing)}")
        return
    H, nh, I, V, N = (cfg[k] for k in need)
    mla = EAGLE3_MLA in (cfg.get("architectures") or [])
    nkv = nh if mla else cfg.get("num_key_value_heads", nh)
    hd = cfg.get("head_dim") or H // nh
    if cfg.get("num_hidden_layers", 1) != 1:
        report.problem(f"eagle3: num_hidden_layers {cfg.get('num_hidden_layers')}; the engines' Eagle3 "
                       "draft has one layer (midlayer)")
    if not 0 < N <= V:
        report.problem(f"eagle3: draft_vocab_size {N} must be in [1, vocab_size {V}]")
    ids = (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if ids is None:
        report.note("eagle3: no eagle_config.eagle_aux_hidden_state_layer_ids; engines then tap their "
                    "default layers of the target")
    elif not (isinstance(ids, list) and len(ids) == 3 and all(_is_int(k) and k >= 0 for k in ids)):
        report.problem(f"eagle3: eagle_aux_hidden_state_layer_ids {ids!r} must be 3 layer ids >= 0")
    want = {
        "fc.weight": (H, 3 * H), "midlayer.input_layernorm.weight": (H,), "midlayer.hidden_norm.weight": (H,),
        **_eagle3_attention_shapes(cfg, H, nh, report),
        "midlayer.post_attention_layernorm.weight": (H,), "midlayer.mlp.gate_proj.weight": (I, H),
        "midlayer.mlp.up_proj.weight": (I, H), "midlayer.mlp.down_proj.weight": (H, I),
        "norm.weight": (H,), "lm_head.weight": (N, H), "d2t": (N,), "t2d": (V,),
    }
    optional = {"embed_tokens.weight": (V, H)}
    for name, shape in want.items():
        if name not in tensors:
            if name not in ("d2t", "t2d") or N < V:
                report.problem(f"eagle3: tensor {name} missing")
            continue
        if tensors[name][1] != shape:
            report.problem(f"eagle3: {name} has shape {list(tensors[name][1])}, expected {list(shape)}")
    for name, (dtype, _) in tensors.items():
        if name == "d2t" and dtype not in ("I64", "I32"):
            report.problem(f"eagle3: d2t is {dtype}; the engines read integer offsets (target = draft + d2t)")
        if name == "t2d" and dtype != "BOOL":
            report.problem(f"eagle3: t2d is {dtype}, expected BOOL")
    extra = sorted(set(tensors) - set(want) - set(optional))
    if extra:
        report.problem(f"eagle3: tensors no engine reads: {extra[:5]}")
    if not report.problems:
        report.note(f"eagle3: {EAGLE3_MLA + ' (MLA)' if mla else EAGLE3}, H {H}, {nh}/{nkv} heads x {hd}, "
                    f"draft vocabulary {N} of {V}, taps {ids}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="validate_hf_export.py", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="HF draft directory (config.json + model.safetensors)")
    p.add_argument("--engine", default="all", choices=["sglang", "vllm", "all"],
                   help="which serving engine's expectations to check (default: both)")
    p.add_argument("--quiet", action="store_true", help="print problems only")
    p.add_argument("--load-in-sglang", action="store_true",
                   help="also build SGLang's own DSpark draft class from the export (CPU) and load it "
                        "with SGLang's weight loader: every parameter must hold the export's tensors "
                        "and no tensor may go unread; then draft blocks run by SGLang must give the "
                        "tokens, logits and confidences megaspark's inference forward gives (needs "
                        "sglang: tools/install.sh --with-sglang)")
    p.add_argument("--target", default=None,
                   help="with --load-in-sglang: the target model (HF directory) whose embedding and "
                        "LM head the blocks use, for an export that does not ship them (default: the "
                        "dspark_target its config names)")
    args = p.parse_args(argv)
    engines = ENGINES if args.engine == "all" else (args.engine,)
    report = validate(args.path, engines)
    eagle3 = os.path.isfile(os.path.join(args.path, "config.json")) and any(a in str(
        json.load(open(os.path.join(args.path, "config.json"))).get("architectures")) for a in (EAGLE3, EAGLE3_MLA))
    if args.load_in_sglang and eagle3:
        report.problem("--load-in-sglang builds DSpark drafts only; Eagle3 drafts are checked from their "
                       "config and tensor headers")
    elif args.load_in_sglang and not report.problems:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from megaspark.export.sglang_parity import compare_with_sglang

        served = compare_with_sglang(args.path, target_model=args.target)
        for problem in served["problems"]:
            report.problem(f"sglang: {problem}")
        if not served["problems"]:
            report.note(f"sglang load: {served['architecture']} built by SGLang holds the "
                        f"{served['loaded']} tensors of the export it reads; none went unread")
            b = served["blocks"]
            conf = "" if b["max_confidence_diff"] is None else \
                f", confidences within {b['max_confidence_diff']:.1g}"
            report.note(f"sglang blocks: {len(b['tokens'])} draft blocks run by SGLang give megaspark's "
                        f"tokens, logits within {b['max_logit_diff']:.1g} (scale {b['logit_scale']:.3g}){conf}")
    if not args.quiet:
        for note in report.notes:
            print(f"note: {note}")
    for problem in report.problems:
        print(f"PROBLEM: {problem}")
    verdict = "OK" if not report.problems else f"{len(report.problems)} problem(s)"
    print(f"{args.path}: {verdict} (checked for {', '.join(engines)})")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
