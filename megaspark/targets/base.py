"""The target-provider interface and the target-layer-id rules.

A *target provider* runs the frozen target model on a micro-batch of token ids and
returns what the draft trains on (DESIGN.md §3, DSPARK_SPEC.md §1.1–1.2):

* ``aux_hidden_states`` ``[b, S, L*H]``: the raw outputs of the tapped decoder
  layers ``layer_ids``, concatenated along the feature axis in id order. Layer id
  ``k`` is the output of decoder layer ``k`` == HF ``hidden_states[k + 1]``.
* ``last_hidden_states`` ``[b, S, H]``: the target's final hidden state *after* its
  final norm (what its LM head consumes). A provider that can only produce the
  pre-norm state sets ``last_hidden_is_post_norm = False`` and returns the norm from
  :meth:`TargetProvider.final_norm`, which the trainer then applies.
"""
from __future__ import annotations

import abc
import hashlib
import json
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from torch import Tensor

# Config keys that do not change what the target computes (paths, bookkeeping,
# runtime choices): left out of the fingerprint so that it is stable across machines.
_VOLATILE_CONFIG_KEYS = frozenset({
    "_name_or_path", "name_or_path", "transformers_version", "_commit_hash",
    "torch_dtype", "dtype", "_attn_implementation", "_attn_implementation_autoset",
    "attn_implementation", "use_cache", "output_hidden_states", "output_attentions",
    "return_dict", "quantization_config", "_experts_implementation",
})


DEFAULT_NUM_TAPS = 5


def resolve_layer_ids(layer_ids: Optional[Sequence[int]], num_target_layers: int) -> list[int]:
    """Validated layer ids; ``None`` gives the default rule with ``min(5, N - 3)`` taps."""
    N = int(num_target_layers)
    if layer_ids is None:
        layer_ids = default_target_layer_ids(N, max(1, min(DEFAULT_NUM_TAPS, N - 3)))
    return validate_target_layer_ids(list(layer_ids), N)


class TargetError(RuntimeError):
    """The target could not be built (on this rank or on the rank that runs it)."""


@dataclass
class TargetOutput:
    """Target features for one micro-batch."""

    aux_hidden_states: Tensor   # [b, S, L*H]
    last_hidden_states: Tensor  # [b, S, H], post final norm (unless the provider says otherwise)


def default_target_layer_ids(num_target_layers: int, n: int) -> list[int]:
    """DFlash default taps (DSPARK_SPEC.md §1.2) for a target with ``num_target_layers`` layers.

    ``n == 1`` gives ``[N // 2]``; otherwise ``round(1 + i * (N - 4) / (n - 1))`` for
    ``i = 0 … n-1`` (Python ``round``, ties to even), i.e. evenly spaced from layer 1 to
    layer ``N - 3``. Example: ``(36, 5) -> [1, 9, 17, 25, 33]``.

    Raises ``ValueError`` when the rule cannot give ``n`` distinct valid ids (a shallow
    target asked for too many taps: at most ``N - 3`` for ``n >= 2``).
    """
    N = int(num_target_layers)
    if n < 1:
        raise ValueError(f"number of target layers to tap must be >= 1, got {n}")
    if N < 1:
        raise ValueError(f"target must have at least one decoder layer, got {N}")
    if n == 1:
        ids = [N // 2]
    else:
        ids = [round(1 + i * (N - 4) / (n - 1)) for i in range(n)]
    try:
        validate_target_layer_ids(ids, N)
    except ValueError as e:
        max_taps = max(N - 3, 1)
        raise ValueError(
            f"the default layer-id rule gives {ids} for a {N}-layer target and {n} taps, "
            f"which is not a valid selection ({e}). Ask for at most {max_taps} taps or pass "
            f"explicit layer ids."
        ) from None
    return ids


def validate_target_layer_ids(ids: Sequence[int], num_target_layers: int) -> list[int]:
    """Check a layer-id list (DESIGN.md decision 2); return it as a list of ints.

    Valid ids are non-empty, strictly increasing, each in ``[0, N - 2]``.
    """
    N = int(num_target_layers)
    ids = list(ids)
    if not ids:
        raise ValueError("target layer ids must be a non-empty list")
    for k in ids:
        if isinstance(k, bool) or not isinstance(k, int):
            raise ValueError(f"target layer ids must be integers, got {ids!r}")
    if any(b <= a for a, b in zip(ids, ids[1:])):
        raise ValueError(f"target layer ids must be strictly increasing, got {ids}")
    for k in ids:
        if k == -1:
            raise ValueError(
                f"target layer id -1 (the embedding output) is not supported in {ids}: serving "
                f"engines capture aux hidden states at decoder-layer outputs only, so a draft "
                f"trained on the embedding output could not be served"
            )
        if k == N - 1:
            raise ValueError(
                f"target layer id {k} is the last decoder layer of this {N}-layer target: its raw "
                f"output is not exposed (HF's last hidden state and serving engines' last state "
                f"are post-final-norm), so training on it would silently mismatch serving. "
                f"Valid ids are 0..{N - 2}"
            )
        if not 0 <= k <= N - 2:
            raise ValueError(
                f"target layer id {k} is out of range for a {N}-layer target: valid ids are "
                f"0..{N - 2} (id k = output of decoder layer k = HF hidden_states[k+1]; the "
                f"embedding (-1) and the last layer ({N - 1}) cannot be captured by serving engines)"
            )
    return ids


def config_fingerprint(config_dict: dict, layer_ids: Sequence[int], extra: Optional[dict] = None) -> str:
    """Stable short hash of a target config (minus volatile keys) and the layer ids."""
    def clean(d):
        if isinstance(d, dict):
            return {k: clean(v) for k, v in sorted(d.items()) if k not in _VOLATILE_CONFIG_KEYS}
        if isinstance(d, (list, tuple)):
            return [clean(v) for v in d]
        return d if isinstance(d, (str, int, float, bool, type(None))) else str(d)

    payload = {"config": clean(config_dict), "layer_ids": [int(k) for k in layer_ids]}
    if extra:
        payload["extra"] = clean(extra)
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class TargetProvider(abc.ABC):
    """Produces target features for the draft. Subclasses set ``hf_config`` and ``layer_ids``."""

    hf_config = None                 # transformers PretrainedConfig (text config)
    layer_ids: list[int] = []
    last_hidden_is_post_norm: bool = True

    @abc.abstractmethod
    def compute(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> TargetOutput:
        """Run the frozen target on ``input_ids`` ``[b, S]`` (no grad) and return its features."""

    def embedding_weight(self) -> Tensor:
        """``[V, H]`` copy of the target's input embedding, fp32."""
        raise NotImplementedError(f"{type(self).__name__} does not expose the embedding")

    def lm_head_weight(self) -> Tensor:
        """``[V, H]`` copy of the target's LM head, fp32 (equals the embedding when tied)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose the LM head")

    def final_norm(self) -> Optional[Callable[[Tensor], Tensor]]:
        """The target's final norm if ``last_hidden_states`` are pre-norm, else ``None``."""
        return None

    # Shape helpers derived from the config.
    @property
    def num_layers(self) -> int:
        return int(self.hf_config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.hf_config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)

    @property
    def aux_hidden_size(self) -> int:
        return len(self.layer_ids) * self.hidden_size

    def fingerprint(self) -> str:
        """Stable hash of the target config and the layer ids (for checkpoints and caches)."""
        return config_fingerprint(self.hf_config.to_dict(), self.layer_ids)


__all__ = [
    "DEFAULT_NUM_TAPS", "resolve_layer_ids", "TargetError", "TargetOutput", "TargetProvider", "default_target_layer_ids", "validate_target_layer_ids",
    "config_fingerprint",
]
