"""The target-provider interface (the layer-id rules are :mod:`megaspark.layer_ids`).

A *target provider* runs the frozen target model on a micro-batch of token ids and
returns what the draft trains on (DESIGN.md §3, DSPARK_SPEC.md §1.1–1.2):

* ``aux_hidden_states`` ``[b, S, L*H]``: the raw outputs of the tapped decoder
  layers ``layer_ids``, concatenated along the feature axis in id order. Layer id
  ``k`` is the output of decoder layer ``k`` == HF ``hidden_states[k + 1]``.
* ``last_hidden_states`` ``[b, S, H]``: the target's final hidden state *after* its
  final norm (what its LM head consumes). Every provider returns the post-norm state
  (``last_hidden_is_post_norm``); start-up refuses one that does not (its
  :meth:`TargetProvider.final_norm` would be needed, and the trainer does not apply it).
"""
from __future__ import annotations

import abc
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from torch import Tensor

from megaspark.layer_ids import DEFAULT_NUM_TAPS, default_target_layer_ids, validate_target_layer_ids

# Config keys that do not change what the target computes (paths, bookkeeping,
# runtime choices): left out of the fingerprint so that it is stable across machines.
_VOLATILE_CONFIG_KEYS = frozenset({
    "_name_or_path", "name_or_path", "transformers_version", "_commit_hash",
    "torch_dtype", "dtype", "_attn_implementation", "_attn_implementation_autoset",
    "attn_implementation", "use_cache", "output_hidden_states", "output_attentions",
    "return_dict", "quantization_config", "_experts_implementation",
})



def resolve_layer_ids(layer_ids: Optional[Sequence[int]], num_target_layers: int) -> list[int]:
    """Validated layer ids; ``None`` gives the default rule with ``min(5, N - 3)`` taps."""
    N = int(num_target_layers)
    if layer_ids is None:
        layer_ids = default_target_layer_ids(N, max(1, min(DEFAULT_NUM_TAPS, N - 3)))
    return validate_target_layer_ids(list(layer_ids), N)


@dataclass(frozen=True)
class TargetSpec:
    """The target of a run as the providers need it, resolved once at start-up from the flags
    (:func:`megaspark.arguments.configs.target_spec`)."""

    model: str                              # --target-model: "builtin:…" or an HF directory
    path: str                               # its HF directory (a built-in one converted)
    layer_ids: tuple                        # the tapped layers (resolved)
    dtype: Any                              # torch dtype the target runs in and hands over
    backend: str = "hf"                     # hf | sglang | sglang-server | offline
    tensor_parallel_size: int = 1           # a co-located SGLang target's TP (resolved)
    context_length: int = 512               # --seq-length
    micro_batch_size: int = 1               # one prefill holds micro_batch_size x context_length tokens
    seed: int = 42
    hidden_states_dir: Optional[str] = None  # offline: the cache
    data_path: Optional[str] = None          # offline: the dataset the cache was written for
    mem_fraction_static: Optional[float] = None  # SGLang's weights + KV share (None: planned)
    server: Any = None                       # sglang-server: its SGLangOptions


#: Backends whose target runs in the trainer's processes (its weights and activations count in
#: a rank's memory plan); the others read a cache or ask a server.
IN_PROCESS_BACKENDS = ("hf", "sglang")


class TargetError(RuntimeError):
    """The target could not be built (on this rank or on the rank that runs it)."""


@dataclass
class TargetOutput:
    """Target features for one micro-batch."""

    aux_hidden_states: Tensor   # [b, S, L*H]
    last_hidden_states: Tensor  # [b, S, H], post final norm (unless the provider says otherwise)


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
