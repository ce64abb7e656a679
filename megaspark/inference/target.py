"""The target side of speculative decoding: an HF causal LM with its KV cache.

:class:`CachedTarget` runs the target on new tokens (prefill, or one verification pass
over ``[anchor, d_1 … d_ℓ]``) against its ``DynamicCache`` and returns, for exactly those
positions, the logits and the tapped-layer features the draft consumes (layer id k is
HF ``hidden_states[k + 1]``, concatenated in id order, DSPARK_SPEC.md §1.2). After a
rejection the cache is cropped back to the verified prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class TargetStep:
    logits: torch.Tensor  # [n, V] fp32 (n = 1 for a prefill with last_only)
    features: Optional[torch.Tensor]  # [n_in, L·H] tapped features of every input position


class CachedTarget:
    """Batch-size-1 incremental runner around an HF ``*ForCausalLM``.

    ``model`` may be a transformers model or an :class:`~megaspark.targets.hf.HFTargetProvider`
    (its ``.model`` is used). ``layer_ids`` are the draft's tapped layers; ``None`` (or an
    empty list) skips the hidden states, for target-only decoding.
    """

    def __init__(self, model, layer_ids: Optional[Sequence[int]] = None):
        from megaspark.targets.base import TargetProvider

        if isinstance(model, TargetProvider):
            model = model.model
        self.model = model
        self.layer_ids = list(layer_ids or [])
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.num_layers = int(cfg.num_hidden_layers)
        self.vocab_size = int(cfg.vocab_size)
        bad = [k for k in self.layer_ids if not 0 <= k < self.num_layers]
        if bad:
            raise ValueError(f"tapped layer ids {bad} are out of range for a "
                             f"{self.num_layers}-layer target")
        self.device = next(model.parameters()).device
        self.reset()

    def reset(self) -> None:
        self.cache = None
        self.length = 0  # positions held in the KV cache

    @torch.no_grad()
    def forward(self, ids: Sequence[int], last_only: bool = False,
                need_features: bool = True) -> TargetStep:
        """Run the target on ``ids`` at positions ``length …`` and append them to the cache."""
        if not len(ids):
            raise ValueError("the target needs at least one new token")
        from transformers import DynamicCache

        if self.cache is None:
            self.cache = DynamicCache(config=self.model.config)
        want_features = need_features and bool(self.layer_ids)
        input_ids = torch.as_tensor(list(ids), dtype=torch.long, device=self.device)[None]
        kwargs = dict(input_ids=input_ids, past_key_values=self.cache, use_cache=True,
                      output_hidden_states=want_features, return_dict=True)
        if last_only:
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
        self.cache = out.past_key_values
        self.length += len(ids)
        features = None
        if want_features:
            hs = out.hidden_states
            if len(hs) != self.num_layers + 1:
                raise RuntimeError(f"expected {self.num_layers + 1} hidden states, got {len(hs)}")
            features = torch.cat([hs[k + 1][0] for k in self.layer_ids], dim=-1)
        return TargetStep(logits=out.logits[0].float(), features=features)

    def crop(self, length: int) -> None:
        """Keep only the first ``length`` cached positions (drop rejected drafts)."""
        if length < self.length:
            # a negative argument removes that many trailing tokens in every transformers
            # version (4.x also accepts an absolute length, 5.x no longer does)
            self.cache.crop(-(self.length - length))
            self.length = length


__all__ = ["CachedTarget", "TargetStep"]
