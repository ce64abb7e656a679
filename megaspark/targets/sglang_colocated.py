"""The co-located SGLang target (``--target-backend sglang``, CPU and GPU).

SGLang's ``ModelRunner`` runs the frozen target *inside* the trainer processes that
compute it, on the compute device and in the target's dtype: by default sharded with
SGLang's tensor parallelism over the tensor-parallel ranks of the first pipeline stage
(``--target-tensor-parallel-size`` = the draft's TP size; each of them gets the whole
features, no broadcast), or whole on TP rank 0 (``--target-tensor-parallel-size 1``, as
the HF provider), which broadcasts the features to its TP peers. Per
micro-batch it does one prefill of the samples without their padding and returns:

* the tapped layers' outputs ``[b, S, L*H]`` (layer id ``k`` = output of decoder layer
  ``k``, SGLang's capture index ``k + 1``; :mod:`megaspark.targets.sglang` has the
  mapping), and
* the post-final-norm last hidden state ``[b, S, H]``,

both captured from the same prefill by a hook on the runner's backbone and returned as
tensors on the compute device in the run's dtype, zero after each sample's end. How the
runner is driven lives in :mod:`megaspark.targets.sglang_runtime`.

Against HF transformers on the CPU in fp32 the features are bit-identical to HF's run of
each sample alone. HF's *padded* batch differs from that by ~1e-4 at samples shorter than
the batch (its masked attention reduces over the padded length), so the provider matches
the HF provider to that precision, and training through either gives the same losses to
1e-5 (``tests/test_sglang_colocated.py``).

The disaggregated alternative, a separate SGLang server reached over HTTP, is
``--target-backend sglang-server`` (:mod:`megaspark.targets.sglang`).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from megaspark.errors import ArgumentError

from .base import TargetOutput, TargetProvider, resolve_layer_ids
from .checkpoint import CheckpointWeights

FLAG = "--target-backend sglang"


class SGLangColocatedProvider(CheckpointWeights, TargetProvider):
    """Frozen target run by SGLang's ``ModelRunner`` in this process.

    Args:
        model_path_or_name: local HF model directory or ``builtin:<name>``.
        layer_ids: tapped layers (megaspark ids); ``None``: the default rule.
        device, dtype: compute device and the target's dtype (the features come out so).
        max_tokens: the most tokens of one prefill (SGLang's KV pool); a micro-batch with
            more is split into several prefills.
        mem_fraction_static: SGLang's share of the GPU for weights + KV (GPU only).
        context_length: the longest sample (default: the model's).
        tp_ranks: consecutive global ranks sharing the target with tensor parallelism (each
            calls :meth:`compute` with the same micro-batch and gets the whole features);
            ``None``: this rank alone.
    """

    last_hidden_is_post_norm = True
    #: given the micro-batch's attention mask, the padding is never computed
    skips_padding = True

    def __init__(self, model_path_or_name: str, layer_ids: Optional[Sequence[int]] = None,
                 device="cpu", dtype: torch.dtype = torch.float32, max_tokens: int = 8192,
                 mem_fraction_static: float = 0.35, context_length: Optional[int] = None,
                 seed: int = 42, tp_ranks: Optional[Sequence[int]] = None):
        from .builtin import resolve_target
        from .hf import load_config_offline, load_tokenizer_offline
        from .sglang_runtime import SGLangModelRunner

        self.name = str(model_path_or_name)
        self.path = resolve_target(model_path_or_name)
        self.hf_config = load_config_offline(self.path).get_text_config()
        self.layer_ids = resolve_layer_ids(layer_ids, self.hf_config.num_hidden_layers)
        self.device, self.dtype = torch.device(device), dtype
        self.max_tokens = int(max_tokens)
        self.tokenizer = load_tokenizer_offline(self.path)
        self.runner = SGLangModelRunner(self.path, self.layer_ids, self.device, dtype,
                                        max_total_tokens=self.max_tokens,
                                        mem_fraction_static=mem_fraction_static,
                                        context_length=context_length, seed=seed, tp_ranks=tp_ranks)

    @torch.no_grad()
    def compute(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> TargetOutput:
        from .sglang import group_requests, strip_padding

        b, S = input_ids.shape
        tokens = strip_padding(input_ids, attention_mask)
        lengths = [len(t) for t in tokens]
        aux = torch.zeros(b, S, self.aux_hidden_size, device=self.device, dtype=self.dtype)
        last = torch.zeros(b, S, self.hidden_size, device=self.device, dtype=self.dtype)
        for group in group_requests(lengths, self.max_tokens):
            a, h = self.runner.prefill([tokens[i] for i in group])
            off = 0
            for i in group:
                n = lengths[i]
                aux[i, :n] = a[off:off + n]
                last[i, :n] = h[off:off + n]
                off += n
        return TargetOutput(aux_hidden_states=aux, last_hidden_states=last)

    def __repr__(self) -> str:
        c = self.hf_config
        return (f"SGLangColocatedProvider({self.name!r}, {c.model_type}, layers={c.num_hidden_layers}, "
                f"layer_ids={self.layer_ids}, device={self.device}, dtype={self.dtype})")


def memory_fraction(hf_config, dtype_bytes: int, max_tokens: int, target_tp: int,
                    total_bytes: int) -> float:
    """SGLang's ``mem_fraction_static`` for a co-located target: its weights shard plus a KV
    pool of ``max_tokens`` tokens (what one prefill needs), with 5% + 2% of the device as
    headroom, as a share of the device's ``total_bytes``. The trainer keeps the rest."""
    from megaspark.memory_plan import target_parameter_count

    t = max(1, int(target_tp))
    weights = target_parameter_count(hf_config) * dtype_bytes / t
    heads = int(hf_config.num_attention_heads)
    head_dim = int(getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads)
    kv_heads = -(-int(getattr(hf_config, "num_key_value_heads", None) or heads) // t)
    kv = int(max_tokens) * int(hf_config.num_hidden_layers) * 2 * kv_heads * head_dim * dtype_bytes
    frac = 1.05 * (weights + kv) / float(total_bytes) + 0.02
    if frac >= 0.95:
        raise ValueError(f"{FLAG}: the target's shard and KV pool need {frac:.0%} of the device's "
                         f"{total_bytes / 2**30:.0f} GiB; shard it (--target-tensor-parallel-size), "
                         f"lower --micro-batch-size x --seq-length, or use --target-backend offline")
    return round(frac, 4)


def resolve_target_tp(hf_config, requested: Optional[int], default: int) -> Tuple[int, Optional[str]]:
    """(tensor-parallel size of the co-located target, a note for the log or None).
    ``requested`` (``--target-tensor-parallel-size``) must divide the target's attention heads;
    the ``default`` (the draft's TP size) falls back to 1, the whole target on TP rank 0, with
    a note when it does not."""
    heads = int(hf_config.num_attention_heads)
    ttp = int(default if requested is None else requested)
    if ttp <= 1 or heads % ttp == 0:
        return ttp, None
    if requested is not None:
        raise ArgumentError(f"--target-tensor-parallel-size {ttp}: the target's {heads} attention heads "
                            f"do not split that way; use 1 (whole target on TP rank 0)")
    return 1, (f"megaspark: the target's {heads} attention heads do not split over TP {ttp}: SGLang runs "
               f"it whole on TP rank 0 (--target-tensor-parallel-size 1)")


def build_colocated_target(spec, device) -> SGLangColocatedProvider:
    """What start-up calls for ``--target-backend sglang`` (a :class:`~.base.TargetSpec`): one
    prefill per micro-batch (``micro_batch_size x context_length`` tokens of KV pool); with a
    tensor-parallel target, sharded over this rank's tensor-parallel group."""
    from .hf import load_config_offline

    tp_ranks = None
    ttp = int(spec.tensor_parallel_size)
    dtype = spec.dtype
    cfg = load_config_offline(spec.path).get_text_config()
    max_tokens = int(spec.micro_batch_size) * int(spec.context_length)
    fraction = spec.mem_fraction_static
    if fraction is None:
        device = torch.device(device)
        total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        fraction = (memory_fraction(cfg, torch.finfo(dtype).bits // 8, max_tokens, ttp, total)
                    if total else 0.35)  # on the CPU the KV pool is max_tokens; this is a ceiling
    if ttp > 1:
        from megatron.core import parallel_state

        resolve_target_tp(cfg, ttp, ttp)  # a resolved size divides the heads
        tp_ranks = torch.distributed.get_process_group_ranks(
            parallel_state.get_tensor_model_parallel_group())
    return SGLangColocatedProvider(
        spec.path, layer_ids=list(spec.layer_ids), device=device, dtype=dtype,
        max_tokens=max_tokens, mem_fraction_static=float(fraction),
        context_length=int(spec.context_length), seed=int(spec.seed), tp_ranks=tp_ranks)


__all__ = ["SGLangColocatedProvider", "build_colocated_target", "memory_fraction", "resolve_target_tp"]
