"""Reading tensors of a target's HF safetensors checkpoint without building the model.

Every rank needs the target's frozen embedding and LM head (its vocabulary shard of them),
its config and tokenizer, but only the ranks that run the target build it
(:mod:`megaspark.training.batches`). :class:`TargetCheckpoint` reads single tensors (or row
ranges of them) straight from ``model.safetensors`` or a sharded index, and
:class:`TargetInfo` is what every rank knows of a target without running it.
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional, Sequence

import torch
from torch import Tensor

from .base import config_fingerprint, resolve_layer_ids

WHICH = ("embedding", "lm_head")


class TargetCheckpoint:
    """Lazy access to the tensors of a safetensors HF checkpoint directory."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                self.where = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
        else:
            single = os.path.join(path, "model.safetensors")
            if not os.path.isfile(single):
                raise FileNotFoundError(f"no safetensors weights in {path} (model.safetensors or its index)")
            from safetensors import safe_open

            with safe_open(single, framework="pt") as f:
                self.where = {k: single for k in f.keys()}

    def keys(self):
        return self.where.keys()

    def get(self, names: Sequence[str]) -> dict:
        from safetensors import safe_open

        by_file: dict = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        out = {}
        for fname, ns in by_file.items():
            with safe_open(fname, framework="pt") as f:
                for n in ns:
                    out[n] = f.get_tensor(n)
        return out

    def get_rows(self, name: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of a 2-D tensor, read without loading the rest."""
        from safetensors import safe_open

        with safe_open(self.where[name], framework="pt") as f:
            return f.get_slice(name)[start:stop]

    def find(self, suffix: str) -> Optional[str]:
        """The shortest key equal to ``suffix`` or ending in ``.suffix``."""
        keys = sorted((k for k in self.where if k == suffix or k.endswith("." + suffix)), key=len)
        return keys[0] if keys else None

    def prefix_of_layers(self, num_layers: int) -> str:
        """The key prefix in front of ``layers.<i>.`` and ``norm.weight`` (e.g. ``model.``)."""
        pat = re.compile(rf"^(.*?)layers\.{num_layers - 1}\.")
        for k in self.keys():
            m = pat.match(k)
            if m and (m.group(1) + "norm.weight") in self.where:
                return m.group(1)
        raise KeyError(f"cannot find layer {num_layers - 1} and the final norm in the checkpoint {self.path}")

    def weight_key(self, which: str, hf_config, full_config=None) -> str:
        """The key of the target's ``"embedding"`` or ``"lm_head"`` (a tied head is the embedding)."""
        if which not in WHICH:
            raise ValueError(f"which must be 'embedding' or 'lm_head', got {which!r}")
        key = None
        if which == "lm_head":
            tied = getattr(hf_config, "tie_word_embeddings", None)
            if tied is None and full_config is not None:
                tied = getattr(full_config, "tie_word_embeddings", None)
            key = None if tied else self.find("lm_head.weight")
        if key is None:
            key = self.find("embed_tokens.weight")
            if key is None:
                raise KeyError(f"no embed_tokens.weight in the checkpoint at {self.path}")
        return key

    def weight(self, which: str, hf_config, full_config=None, rows: Optional[tuple] = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
        """The ``[V, H]`` embedding or LM head (or only ``rows = (start, stop)`` of it)."""
        key = self.weight_key(which, hf_config, full_config)
        t = self.get([key])[key] if rows is None else self.get_rows(key, *rows)
        return t.to(dtype).contiguous()


class TargetInfo:
    """What every rank knows of the target without running it: config, layer ids,
    fingerprint, tokenizer, and its frozen embedding / LM head read from the checkpoint.

    Its :meth:`fingerprint` equals the one of any provider of the same target and layer ids.
    """

    def __init__(self, model_path_or_name: str, layer_ids: Optional[Sequence[int]] = None,
                 with_tokenizer: bool = True):
        from .builtin import resolve_target
        from .hf import load_config_offline, load_tokenizer_offline

        self.name = str(model_path_or_name)
        self.path = resolve_target(model_path_or_name)
        self.full_config = load_config_offline(self.path)
        self.hf_config = self.full_config.get_text_config()
        self.layer_ids = resolve_layer_ids(layer_ids, self.hf_config.num_hidden_layers)
        self.tokenizer = load_tokenizer_offline(self.path) if with_tokenizer else None
        self._ckpt: Optional[TargetCheckpoint] = None

    def fingerprint(self) -> str:
        return config_fingerprint(self.hf_config.to_dict(), self.layer_ids)

    def checkpoint(self) -> TargetCheckpoint:
        if self._ckpt is None:
            self._ckpt = TargetCheckpoint(self.path)
        return self._ckpt

    def weight_rows(self, which: str, start: int, stop: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """Rows ``start:stop`` (a vocabulary shard) of the embedding or LM head."""
        return self.checkpoint().weight(which, self.hf_config, self.full_config, rows=(start, stop), dtype=dtype)

    def embedding_weight(self) -> Tensor:
        return self.checkpoint().weight("embedding", self.hf_config, self.full_config)

    def lm_head_weight(self) -> Tensor:
        return self.checkpoint().weight("lm_head", self.hf_config, self.full_config)


class CheckpointWeights:
    """Mixin for providers that do not hold the target as a torch model (SGLang): the
    frozen embedding and LM head read from the safetensors at ``self.path``."""

    path: str
    hf_config = None
    _ckpt: Optional[TargetCheckpoint] = None

    def _checkpoint(self) -> TargetCheckpoint:
        if self._ckpt is None:
            self._ckpt = TargetCheckpoint(self.path)
        return self._ckpt

    def embedding_weight(self) -> Tensor:
        return self._checkpoint().weight("embedding", self.hf_config)

    def lm_head_weight(self) -> Tensor:
        return self._checkpoint().weight("lm_head", self.hf_config)


__all__ = ["TargetCheckpoint", "TargetInfo", "CheckpointWeights", "WHICH"]
