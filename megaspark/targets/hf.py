"""The embedded HF-transformers target provider (CPU and GPU).

Runs the frozen target's decoder backbone once with ``output_hidden_states=True``
and gathers the tapped layers: layer id ``k`` is ``hidden_states[k + 1]`` (entry 0
is the embedding output, entry ``k`` the input of layer ``k``). The last hidden state
is the backbone's ``last_hidden_state``, i.e. after the final norm — exactly what the
LM head consumes (DESIGN.md §6). The LM head itself is not run: the draft's losses
apply the frozen head to these states themselves, and the ``[b, S, V]`` logits
would be the largest tensor of the step.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from .base import TargetOutput, TargetProvider, resolve_layer_ids
from .builtin import resolve_target


def load_config_offline(path: str):
    """AutoConfig of a local directory; refuses anything that is not a causal LM."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(
            f"the target at '{path}' has model_type '{config.model_type}', which is not a causal "
            f"language model known to transformers (AutoModelForCausalLM); the target must be a "
            f"decoder-only LM"
        )
    return config


def load_tokenizer_offline(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


class HFTargetProvider(TargetProvider):
    """Frozen HF causal LM as the target.

    Args:
        model_path_or_name: local HF model directory or ``builtin:<name>``.
        layer_ids: tapped decoder layers (validated, DESIGN.md decision 2). ``None`` uses
            the default rule with ``min(5, N - 3)`` taps.
        dtype: parameter dtype of the target; the features come out in this dtype.
        device: where the target runs; inputs are moved there and outputs stay there.
    """

    def __init__(
        self,
        model_path_or_name: str,
        layer_ids: Optional[Sequence[int]] = None,
        dtype: torch.dtype = torch.float32,
        device="cpu",
        attn_implementation: Optional[str] = "sdpa",
    ):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForCausalLM

        self.name = str(model_path_or_name)
        self.path = resolve_target(model_path_or_name)
        full_config = load_config_offline(self.path)
        self.hf_config = full_config.get_text_config()
        self.layer_ids = resolve_layer_ids(layer_ids, self.hf_config.num_hidden_layers)
        self.device = torch.device(device)
        self.dtype = dtype

        kwargs = dict(dtype=dtype, local_files_only=True)
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        model = AutoModelForCausalLM.from_pretrained(self.path, **kwargs)
        model.requires_grad_(False)
        model.eval()
        self.model = model.to(self.device)
        self.backbone = model.get_decoder()
        self.tokenizer = load_tokenizer_offline(self.path)

    @torch.no_grad()
    def compute(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> TargetOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        out = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask,
            output_hidden_states=True, use_cache=False, return_dict=True,
        )
        hs = out.hidden_states
        if len(hs) != self.num_layers + 1:
            raise RuntimeError(
                f"expected {self.num_layers + 1} hidden states from the target, got {len(hs)}")
        aux = torch.cat([hs[k + 1] for k in self.layer_ids], dim=-1)
        return TargetOutput(aux_hidden_states=aux, last_hidden_states=out.last_hidden_state)

    @torch.no_grad()
    def logits(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """The target's full logits (for checks and evaluation, not for training)."""
        return self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask,
                          use_cache=False).logits

    def embedding_weight(self) -> Tensor:
        return self.model.get_input_embeddings().weight.detach().float().cpu().clone()

    def lm_head_weight(self) -> Tensor:
        head = self.model.get_output_embeddings()
        if head is None:
            return self.embedding_weight()
        return head.weight.detach().float().cpu().clone()

    @property
    def tied_embeddings(self) -> bool:
        head = self.model.get_output_embeddings()
        return head is None or head.weight is self.model.get_input_embeddings().weight

    def final_norm(self):
        return None  # last_hidden_states are already post-norm

    def __repr__(self) -> str:
        c = self.hf_config
        return (f"HFTargetProvider({self.name!r}, {c.model_type}, layers={c.num_hidden_layers}, "
                f"hidden={c.hidden_size}, vocab={c.vocab_size}, layer_ids={self.layer_ids})")


__all__ = ["HFTargetProvider", "load_config_offline", "load_tokenizer_offline"]
