"""Speculative decoding with a DSpark draft and an HF target (DSPARK_SPEC.md §7, §8).

* :mod:`~megaspark.inference.sampling` — temperature / greedy sampling, speculative
  verification, the confidence-threshold proposal length (pure functions);
* :mod:`~megaspark.inference.scheduler` — the hardware-aware prefix scheduler
  (Algorithm 1) and the App. A counterexample (pure functions);
* :mod:`~megaspark.inference.metrics` — acceptance length, per-position acceptance,
  verify rate, confidence calibration (ECE / Brier / AUROC);
* :mod:`~megaspark.inference.target` — the HF target with its KV cache;
* :mod:`~megaspark.inference.draft` — the draft's context cache and sequential Markov
  sampling;
* :mod:`~megaspark.inference.speculative` — the engine (:class:`SpeculativeDecoder`) and
  the target-only baseline (:class:`TargetDecoder`).

Importing this package does not import megatron; building a draft model does (and needs
an initialised process group).
"""

from megaspark.inference.metrics import SpecStats, auroc, expected_calibration_error
from megaspark.inference.sampling import proposal_length, verify
from megaspark.inference.scheduler import app_a_counterexample, schedule_prefixes
from megaspark.inference.speculative import GenerationOutput, SpeculativeDecoder, TargetDecoder

__all__ = [
    "SpeculativeDecoder", "TargetDecoder", "GenerationOutput", "SpecStats",
    "expected_calibration_error", "auroc", "verify", "proposal_length", "schedule_prefixes",
    "app_a_counterexample",
]
