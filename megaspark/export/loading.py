"""A DSpark draft model built from an HF export or a megaspark checkpoint, and checkpoint → export.

:func:`load_draft` builds a :class:`~megaspark.models.dspark.model.DSparkModel` inside an
initialised process group and fills it from either source; :func:`load_hf_draft_weights`
fills already-built training chunks (``--load-hf-draft``); :func:`export_checkpoint`
converts a training checkpoint saved at any (TP, PP, DP) to an export in one process.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

import torch

from megaspark.checkpoint_files import read_state, resolve_checkpoint
from megaspark.config import DSparkConfig
from megaspark.export.files import CONFIG_FILE, export_hf, load_tensors, read_hf, read_hf_config
from megaspark.export.hf_config import LAYOUTS
from megaspark.export.tensors import FROZEN_TENSORS, ExportError, parameter_counts
from megaspark.parallel import init_single_process_group


def target_embeddings(target: str) -> tuple:
    """(embed_tokens [V, H], lm_head [V, H]) of a target (``builtin:`` name or HF directory),
    read from its safetensors as stored (the LM head is the embedding when tied)."""
    from megaspark.targets.builtin import resolve_target

    path = resolve_target(target)
    tensors = load_tensors(path)
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


def build_model(dcfg: DSparkConfig, tp: int):
    """An untrained DSparkModel of ``dcfg`` (this rank's pipeline stage) in the initialised
    process group, whose TP size must be ``tp``."""
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
    from megaspark.models.dspark.state_dict_adapter import local_layer_to_global

    names = []
    for name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        mapping, layer = local_layer_to_global(model, name)
        names.extend(n.replace("{i}", str(layer)) for n in mapping.hf)
    return names


def load_draft(path, tp: int = 1, target_model: Optional[str] = None):
    """``(model, dcfg)``: a DSparkModel holding the weights at ``path`` — an HF export
    directory (``config.json``) or a megaspark checkpoint (a ``--save`` directory with
    ``latest``, or one ``iter_N`` directory).

    Must be called inside an initialised process group whose TP size is ``tp`` (e.g.
    :func:`megaspark.parallel.init_single_process_group` for TP = 1); with PP > 1 this
    rank's stage is built. An HF export without ``embed_tokens``/``lm_head`` takes them from ``target_model``
    (default: the ``dspark_target`` recorded in its config).
    """
    from megaspark.models.dspark.state_dict_adapter import load_hf_state_dict

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
        model = build_model(dcfg, tp)
        load_hf_state_dict(model, state, strict=True)
    else:
        ckpt = resolve_checkpoint(path)
        dcfg = DSparkConfig.from_dict(read_state(ckpt)["dspark_config"])
        model = build_model(dcfg, tp)
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


__all__ = ["target_embeddings", "build_model", "load_draft", "load_hf_draft_weights", "export_checkpoint"]
