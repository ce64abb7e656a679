"""Eagle3 drafts in the format SGLang, vLLM and SpecForge load.

A directory with ``config.json`` and ``model.safetensors``:

* ``architectures: ["LlamaForCausalLMEagle3"]``, ``model_type: "llama"``, one hidden layer
  (``num_hidden_layers: 1``), the draft's shape (``hidden_size``, heads, ``head_dim``,
  ``intermediate_size``, ``rms_norm_eps``, ``rope_theta``), ``vocab_size`` (the target's)
  and ``draft_vocab_size``; ``eagle_config.eagle_aux_hidden_state_layer_ids``: the tapped
  target layers (id k = output of decoder layer k, SGLang's and megaspark's convention);
  megaspark's TTT settings under ``megaspark_eagle3``;
* tensors named as EAGLE-3 / SpecForge name them (``fc.weight``, ``midlayer.*``,
  ``norm.weight``, ``lm_head.weight``), plus ``d2t`` (int64 offsets: target = draft +
  d2t[draft]) and ``t2d`` (bool over the target vocabulary); ``embed_tokens.weight`` only
  with ``include_embeddings`` (engines take the target's).

SGLang (``models/llama_eagle3.py``) renames ``midlayer`` to ``layers.0``, fuses q/k/v and
gate/up, reads ``d2t`` as its hot-token map and skips ``t2d``.

An MLA draft (``--draft-attention mla``) exports as SpecForge's
``DeepseekV3ForCausalLMEagle3`` (``model_type: "deepseek_v3"``): the same tensors except the
attention's, which are DeepSeek-V3's (``q_proj`` or ``q_a_proj`` / ``q_a_layernorm`` /
``q_b_proj``, ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``), and the
config's ``q_lora_rank`` (null for none), ``kv_lora_rank``, ``qk_nope_head_dim``,
``qk_rope_head_dim`` (= ``head_dim``), ``v_head_dim`` and, under YaRN, ``rope_scaling``.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from megaspark.checkpoint_files import read_state, resolve_checkpoint
from megaspark.data.draft_vocab import DraftVocab
from megaspark.export.files import CONFIG_FILE, WEIGHTS_FILE, write_atomically
from megaspark.export.tensors import ExportError
from megaspark.models.eagle3.model import Eagle3Config, state_dict_map

ARCHITECTURE = "LlamaForCausalLMEagle3"
MLA_ARCHITECTURE = "DeepseekV3ForCausalLMEagle3"
ARCHITECTURES = (ARCHITECTURE, MLA_ARCHITECTURE)
EMBEDDING = "embed_tokens.weight"
_MLA_DIMS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def architecture(e: Eagle3Config) -> str:
    return MLA_ARCHITECTURE if e.is_mla else ARCHITECTURE


def _attention_shapes(e: Eagle3Config) -> dict:
    H, nh, at = e.hidden_size, e.num_attention_heads, "midlayer.self_attn."
    if not e.is_mla:
        q, kv = nh * e.kv_channels, e.num_query_groups * e.kv_channels
        return {at + "q_proj.weight": (q, 2 * H), at + "k_proj.weight": (kv, 2 * H),
                at + "v_proj.weight": (kv, 2 * H), at + "o_proj.weight": (H, q)}
    qk = e.qk_nope_head_dim + e.qk_rope_head_dim
    out = ({at + "q_a_proj.weight": (e.q_lora_rank, 2 * H), at + "q_a_layernorm.weight": (e.q_lora_rank,),
            at + "q_b_proj.weight": (nh * qk, e.q_lora_rank)} if e.q_lora_rank > 0
           else {at + "q_proj.weight": (nh * qk, 2 * H)})
    out.update({at + "kv_a_proj_with_mqa.weight": (e.kv_lora_rank + e.qk_rope_head_dim, 2 * H),
                at + "kv_a_layernorm.weight": (e.kv_lora_rank,),
                at + "kv_b_proj.weight": (nh * (e.qk_nope_head_dim + e.v_head_dim), e.kv_lora_rank),
                at + "o_proj.weight": (H, nh * e.v_head_dim)})
    return out


def tensor_shapes(e: Eagle3Config, include_embeddings: bool = False) -> dict:
    """Every tensor of an export and its shape."""
    H, V, N, I = e.hidden_size, e.vocab_size, e.draft_vocab_size, e.ffn_hidden_size
    shapes = {
        "fc.weight": (H, 3 * H),
        "midlayer.input_layernorm.weight": (H,), "midlayer.hidden_norm.weight": (H,),
        **_attention_shapes(e),
        "midlayer.post_attention_layernorm.weight": (H,),
        "midlayer.mlp.gate_proj.weight": (I, H), "midlayer.mlp.up_proj.weight": (I, H),
        "midlayer.mlp.down_proj.weight": (H, I),
        "norm.weight": (H,), "lm_head.weight": (N, H), "d2t": (N,), "t2d": (V,),
    }
    if include_embeddings:
        shapes[EMBEDDING] = (V, H)
    return shapes


def build_config(e: Eagle3Config, layer_ids, target_config: Optional[dict] = None,
                 max_position_embeddings: int = 4096) -> dict:
    t = dict(target_config or {})
    mla = {}
    if e.is_mla:
        mla = {k: getattr(e, k) for k in _MLA_DIMS}
        mla["q_lora_rank"] = e.q_lora_rank or None  # DeepseekV3Config: None = no query compression
        if e.rope_yarn:
            mla["rope_scaling"] = dict({k: v for k, v in e.rope_yarn.items() if v is not None}, rope_type="yarn",
                                       type="yarn")
    return {
        "architectures": [architecture(e)], "model_type": "deepseek_v3" if e.is_mla else "llama",
        "num_hidden_layers": 1, **mla,
        "hidden_size": e.hidden_size, "num_attention_heads": e.num_attention_heads,
        "num_key_value_heads": e.num_query_groups, "head_dim": e.kv_channels,
        "intermediate_size": e.ffn_hidden_size, "hidden_act": "silu", "rms_norm_eps": e.rms_norm_eps,
        "rope_theta": e.rope_theta, "max_position_embeddings": int(t.get("max_position_embeddings",
                                                                           max_position_embeddings)),
        "vocab_size": e.vocab_size, "draft_vocab_size": e.draft_vocab_size, "tie_word_embeddings": False,
        "attention_bias": False, "torch_dtype": "float32",
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": [int(k) for k in layer_ids],
                         "use_aux_hidden_state": True},
        "megaspark_eagle3": {"ttt_steps": e.ttt_steps, "step_decay": e.step_decay},
    }


def export_eagle3(tensors: dict, e: Eagle3Config, vocab: DraftVocab, layer_ids, out_dir,
                  target_config: Optional[dict] = None, include_embeddings: bool = False) -> dict:
    """Write HF-named global Eagle3 tensors (``STATE_DICT_MAP``'s names) and the draft
    vocabulary as an engine-loadable directory (written to a temporary sibling, renamed into
    place). Returns the config."""
    from safetensors.torch import save_file

    e.validate()
    if vocab.size != e.draft_vocab_size or vocab.target_size != e.vocab_size:
        raise ExportError(f"draft vocabulary {vocab.size} of {vocab.target_size} does not match the "
                          f"draft ({e.draft_vocab_size} of {e.vocab_size})")
    if len(layer_ids) != 3:
        raise ExportError(f"an Eagle3 draft reads 3 target layers, got {list(layer_ids)}")
    out = {"d2t": vocab.d2t, "t2d": vocab.t2d}
    for name, shape in tensor_shapes(e, include_embeddings).items():
        if name in out:
            continue
        if name not in tensors:
            raise ExportError(f"export: tensor {name} missing")
        if tuple(tensors[name].shape) != shape:
            raise ExportError(f"export: {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
        out[name] = tensors[name].detach().to("cpu").contiguous().clone()
    config = build_config(e, layer_ids, target_config)

    def write(tmp):
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        save_file(out, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})

    write_atomically(str(out_dir), write)
    return config


def config_to_eagle3(cfg: dict, where: str = CONFIG_FILE) -> tuple:
    """``(Eagle3Config, tapped layer ids or None)`` of an Eagle3 config.json (ours or
    SpecForge's: the TTT settings default to Eagle3's, 7 steps and 0.8)."""
    archs = cfg.get("architectures") or []
    if not set(archs) & set(ARCHITECTURES):
        raise ExportError(f"{where}: not an Eagle3 draft (architectures {archs}, expected one of "
                          f"{list(ARCHITECTURES)})")
    is_mla = MLA_ARCHITECTURE in archs
    if int(cfg.get("num_hidden_layers", 1)) != 1:
        raise ExportError(f"{where}: num_hidden_layers {cfg['num_hidden_layers']}; megaspark's Eagle3 "
                          "draft has one decoder layer")
    try:
        H, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        ttt = cfg.get("megaspark_eagle3", {})
        mla = {}
        if is_mla:
            from megaspark.config import yarn_parameters

            mla = {k: int(cfg.get(k) or 0) for k in _MLA_DIMS}
            mla["attention_type"] = "mla"
            scaling = cfg.get("rope_scaling") or {}
            if (scaling.get("rope_type") or scaling.get("type")) == "yarn":
                mla["rope_yarn"] = yarn_parameters(scaling, int(cfg.get("max_position_embeddings", 4096)))
        e = Eagle3Config(
            **mla,
            hidden_size=H, num_attention_heads=heads,
            # MLA: every head its own KV head, kv_channels the rope dims (DeepseekV3's head_dim)
            num_query_groups=heads if is_mla else int(cfg.get("num_key_value_heads", heads)),
            kv_channels=mla["qk_rope_head_dim"] if is_mla else int(cfg.get("head_dim") or H // heads),
            ffn_hidden_size=int(cfg["intermediate_size"]), vocab_size=int(cfg["vocab_size"]),
            draft_vocab_size=int(cfg.get("draft_vocab_size") or cfg["vocab_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=float(cfg.get("rope_theta", 10000.0)),
            ttt_steps=int(ttt.get("ttt_steps", 7)), step_decay=float(ttt.get("step_decay", 0.8)),
        ).validate()
    except (KeyError, TypeError, ValueError) as err:
        raise ExportError(f"{where}: {err}") from err
    layer_ids = (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    return e, (None if layer_ids is None else [int(k) for k in layer_ids])


def read_eagle3(path) -> tuple:
    """``(Eagle3Config, layer ids or None, DraftVocab, HF-named tensors)`` of an Eagle3
    directory (a megaspark export or a SpecForge checkpoint: ``model.`` prefixes dropped,
    ``d2t`` required when the draft vocabulary is smaller than the target's)."""
    from safetensors.torch import load_file

    path = str(path)
    where = os.path.join(path, CONFIG_FILE)
    try:
        with open(where) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as err:
        raise ExportError(f"{where}: unreadable ({err})") from err
    e, layer_ids = config_to_eagle3(cfg, where)
    tensors = {}
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ExportError(f"{path}: no .safetensors file")
    for f in files:
        for k, v in load_file(os.path.join(path, f)).items():
            tensors[k[len("model."):] if k.startswith("model.") else k] = v
    if "d2t" in tensors:
        try:
            vocab = DraftVocab.from_d2t(tensors.pop("d2t"), e.vocab_size)
        except ValueError as err:
            raise ExportError(f"{path}: d2t: {err}") from err
    elif e.draft_vocab_size == e.vocab_size:
        vocab = DraftVocab(torch.arange(e.vocab_size), e.vocab_size)
    else:
        raise ExportError(f"{path}: no d2t for a draft vocabulary of {e.draft_vocab_size} < {e.vocab_size}")
    t2d = tensors.pop("t2d", None)
    if t2d is not None and not torch.equal(t2d.bool(), vocab.t2d):
        raise ExportError(f"{path}: t2d and d2t describe different draft vocabularies")
    shapes = tensor_shapes(e, include_embeddings=EMBEDDING in tensors)
    for name, shape in shapes.items():
        if name in ("d2t", "t2d"):
            continue
        if name not in tensors:
            raise ExportError(f"{path}: tensor {name} missing")
        if tuple(tensors[name].shape) != shape:
            raise ExportError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        raise ExportError(f"{path}: unknown tensors {extra[:5]}")
    return e, layer_ids, vocab, tensors


def gather_hf_tensors(model) -> dict:
    """The HF-named global tensors of a (TP-sharded) :class:`~megaspark.models.eagle3.model.
    Eagle3Draft`, gathered over TP (every rank gets them)."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    params = dict(model.named_parameters())
    out = {}
    for name, (hf, dim) in state_dict_map(model.eagle3_config).items():
        p = params[name].detach()
        if dim is not None and tp > 1:
            parts = [torch.empty_like(p) for _ in range(tp)]
            torch.distributed.all_gather(parts, p.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            p = torch.cat(parts, dim=dim)
        out[hf] = p.cpu()
    return out


def is_eagle3(path) -> bool:
    """An Eagle3 export directory or an ``--algorithm eagle3`` checkpoint?"""
    cfg = os.path.join(str(path), CONFIG_FILE)
    if os.path.isfile(cfg):
        with open(cfg) as f:
            return bool(set(json.load(f).get("architectures") or []) & set(ARCHITECTURES))
    try:
        return is_eagle3_checkpoint(path)
    except Exception:  # noqa: BLE001 - not a checkpoint either: the caller's loader says why
        return False


def load_eagle3(path, embedding: torch.Tensor, lm_head: Optional[torch.Tensor] = None) -> tuple:
    """``(Eagle3Draft at TP = 1, Eagle3Config, tapped layer ids)`` from an export directory
    or a training checkpoint, inside an initialised one-rank group. ``embedding`` (and,
    for training, ``lm_head``): the target's, which exports do not ship."""
    from megatron.core import dist_checkpointing

    from megaspark.models.eagle3.model import Eagle3Draft, load_hf_tensors

    if os.path.isfile(os.path.join(str(path), CONFIG_FILE)):
        e, layer_ids, vocab, tensors = read_eagle3(path)
        model = Eagle3Draft(e.transformer_config(1), e, vocab.draft_to_target)
        load_hf_tensors(model, dict(tensors, **{EMBEDDING: embedding}), target_lm_head=lm_head)
        return model.eval(), e, layer_ids
    ckpt = resolve_checkpoint(str(path))
    saved = read_state(ckpt)
    e = Eagle3Config.from_dict(saved["dspark_config"])
    model = Eagle3Draft(e.transformer_config(1), e, torch.arange(e.draft_vocab_size))
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, ckpt)
    with torch.no_grad():
        model.load_state_dict(loaded["model"], strict=True)
    model.set_draft_vocab(model.draft_to_target)
    return model.eval(), e, (saved.get("args") or {}).get("target_layer_ids_resolved")


def is_eagle3_checkpoint(ckpt_dir) -> bool:
    return "draft_vocab_size" in read_state(str(ckpt_dir)).get("dspark_config", {})


def export_eagle3_checkpoint(ckpt_dir, out_dir, include_embeddings: bool = False,
                             target_model: Optional[str] = None) -> dict:
    """Convert an ``--algorithm eagle3`` training checkpoint (any TP/DP layout) to an
    engine-format directory, in this process at TP = 1. Returns a summary dict."""
    from megatron.core import parallel_state

    from megaspark.parallel import init_single_process_group
    from megaspark.targets.builtin import resolve_target
    from megaspark.targets.hf import load_config_offline

    ckpt = resolve_checkpoint(str(ckpt_dir))
    saved = read_state(ckpt)
    args = saved.get("args", {})
    target = target_model or args.get("target_model")
    target_config = load_config_offline(resolve_target(target)).get_text_config().to_dict() if target else None
    init_single_process_group()
    if parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise ExportError("export_eagle3_checkpoint runs at TP = 1")
    model, e, layer_ids = load_eagle3(ckpt, embedding=None)
    tensors = gather_hf_tensors(model)
    vocab = DraftVocab(model.draft_to_target.cpu().clone(), e.vocab_size)
    export_eagle3(tensors, e, vocab, layer_ids, out_dir, target_config, include_embeddings=include_embeddings)
    return dict(checkpoint=ckpt, output=os.path.abspath(str(out_dir)), layout="eagle3",
                iteration=saved.get("iteration"), parallel_layout=saved.get("parallel_layout"),
                target=target, include_embeddings=include_embeddings, architecture=architecture(e))


__all__ = ["export_eagle3", "export_eagle3_checkpoint", "is_eagle3_checkpoint", "is_eagle3", "load_eagle3", "read_eagle3", "config_to_eagle3", "build_config", "tensor_shapes",
           "gather_hf_tensors", "ARCHITECTURE", "MLA_ARCHITECTURE", "ARCHITECTURES", "architecture"]
