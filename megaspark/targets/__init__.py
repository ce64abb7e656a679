"""Target providers: the frozen target model that the draft learns to imitate.

* :mod:`.base` — the provider interface and the target-layer-id rules;
* :mod:`.hf` — the embedded HF-transformers provider (CPU and GPU);
* :mod:`.builtin` — ``builtin:<name>`` targets (SmolLM2-135M) and the mask-token default.
"""
from .base import (
    TargetOutput,
    TargetProvider,
    config_fingerprint,
    default_target_layer_ids,
    validate_target_layer_ids,
)
from .builtin import BUILTIN_TARGETS, default_mask_token_id, resolve_target

__all__ = [
    "TargetOutput", "TargetProvider", "config_fingerprint", "default_target_layer_ids",
    "validate_target_layer_ids", "BUILTIN_TARGETS", "default_mask_token_id", "resolve_target",
    "HFTargetProvider",
]


def __getattr__(name):  # keep `import megaspark.targets` free of the transformers import
    if name == "HFTargetProvider":
        from .hf import HFTargetProvider
        return HFTargetProvider
    raise AttributeError(name)
