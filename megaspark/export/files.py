"""An HF draft export on disk: writing and reading its directory.

``config.json`` (:mod:`megaspark.export.hf_config`) and ``model.safetensors`` (tensors in
:data:`megaspark.export.tensors.TENSORS` order). A directory is written to a temporary
sibling and renamed into place (:func:`write_atomically`); on import a sharded
``model.safetensors.index.json`` or a ``pytorch_model.bin`` is read as well.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Callable, Optional

import torch

from megaspark.config import DSparkConfig
from megaspark.export.hf_config import LAYOUTS, build_hf_config, canonical, config_to_dspark
from megaspark.export.tensors import FROZEN_TENSORS, ExportError, check_tensors, clean_key, hf_tensor_shapes

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"


def write_atomically(out_dir: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` fills a temporary sibling of ``out_dir``, which then replaces ``out_dir``:
    readers see the old directory or the complete new one, never a part."""
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
        clean = clean_key(name)
        if clean is None or (not include_embeddings and clean in FROZEN_TENSORS):
            continue
        tensors[clean] = tensor.detach().to("cpu").contiguous().clone()
    check_tensors(tensors, dcfg, include_embeddings, "export")
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

    write_atomically(str(out_dir), write)
    return config


def load_tensors(path: str) -> dict:
    """Every tensor of an HF directory (an export or a target), names as stored."""
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
    for name, tensor in load_tensors(str(path)).items():
        clean = clean_key(name)
        if clean is not None:
            state[clean] = tensor
    present_frozen = [k for k in FROZEN_TENSORS if k in state]
    if present_frozen and len(present_frozen) != len(FROZEN_TENSORS):
        raise ExportError(f"{path}: ships {present_frozen} but not both of {list(FROZEN_TENSORS)}")
    check_tensors(state, dcfg, bool(present_frozen), f"{path}")
    return dcfg, state


__all__ = [
    "CONFIG_FILE", "WEIGHTS_FILE", "WEIGHTS_INDEX_FILE", "write_atomically", "export_hf", "load_tensors",
    "read_hf_config", "read_hf",
]
