"""DSpark speculative decoding with an HF target (DSPARK_SPEC.md §7), and the plain
target-only decoder it is compared with.

One generation, batch size 1::

    prefill: target(prompt) → logits, tapped features of every prompt position
    x_s ~ p(· | prompt)                                   # the first anchor, s = |prompt|
    repeat:
        h = draft(pending features, [x_s, M, …, M] at s … s+B−1)   # one pass, cached context
        d_1 … d_ℓ, q = sequential Markov sampling + confidence policy
        target([x_s, d_1 … d_ℓ]) → p_0 … p_ℓ                       # one verify pass
        accept a prefix of n drafts, then a correction / bonus token x'
        crop the target cache to s + n + 1; pending = features of s … s+n
        emit d_1 … d_n, x'; stop at a stop token or max_new_tokens; x_s ← x', s ← s+n+1

The output distribution is exactly the target's at any temperature (greedy: exactly the
target's greedy continuation) whatever the draft weights, because every proposal length
policy here depends only on tokens before the slot it truncates (non-anticipating).

The engine needs the draft model inside an initialised process group (TP = 1); the
target is an HF causal LM (or an :class:`~megaspark.targets.hf.HFTargetProvider`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch

from megaspark.inference.draft import DraftProposer
from megaspark.inference.metrics import RoundRecord, SpecStats
from megaspark.inference.sampling import probabilities, sample_logits, verify
from megaspark.inference.target import CachedTarget


@dataclass
class GenerationOutput:
    tokens: list  # new tokens (prompt excluded), truncated after a stop token
    stats: SpecStats
    finished_by_stop: bool = False
    verify_widths: list = field(default_factory=list)  # ℓ+1 per round (target input length)

    @property
    def seconds(self) -> float:
        return self.stats.seconds


def _inference_mode():
    """no_grad, and without megaspark's CPU-compatibility torch-function mode (it only
    redirects CUDA requests of megatron's training code, none of which run here, and it
    costs a Python call per torch op — a third of the time of a small model)."""
    from megaspark import platform

    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    if platform.cpu_compat_active():
        stack.enter_context(torch._C.DisableTorchFunction())
    return stack


def _generator(seed_or_gen) -> Optional[torch.Generator]:
    if seed_or_gen is None or isinstance(seed_or_gen, torch.Generator):
        return seed_or_gen
    g = torch.Generator()
    g.manual_seed(int(seed_or_gen))
    return g


class _Emitter:
    """Collects emitted tokens, honouring stop tokens and max_new_tokens."""

    def __init__(self, max_new_tokens: int, stop_ids: set):
        self.tokens: list = []
        self.max_new = max_new_tokens
        self.stop_ids = stop_ids
        self.done = max_new_tokens <= 0
        self.stopped = False

    def push(self, tokens: Iterable[int]) -> None:
        for t in tokens:
            if self.done:
                return
            self.tokens.append(int(t))
            if int(t) in self.stop_ids:
                self.done = self.stopped = True
            elif len(self.tokens) >= self.max_new:
                self.done = True


class SpeculativeDecoder:
    """DSpark draft + HF target. ``generate`` runs one prompt; stats accumulate per call.

    Args:
        draft_model: a single-stage :class:`~megaspark.models.dspark.model.DSparkModel`
            (TP = 1) with the target's embedding / LM head loaded.
        target: an HF ``*ForCausalLM`` or an HFTargetProvider; its tapped layers are the
            draft's ``target_layer_ids``.
        stop_token_ids: tokens that end a generation (kept in the output).
    """

    def __init__(self, draft_model, target, stop_token_ids: Sequence[int] = ()):
        self.draft = DraftProposer(draft_model)
        self.config = draft_model.dspark_config
        self.target = CachedTarget(target, layer_ids=self.config.target_layer_ids)
        if self.target.vocab_size != self.config.vocab_size:
            raise ValueError(f"draft vocabulary {self.config.vocab_size} != target vocabulary "
                             f"{self.target.vocab_size}")
        self.stop_token_ids = set(int(t) for t in stop_token_ids)

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        confidence_threshold: float = 0.0,
        generator=None,
        stop_token_ids: Optional[Sequence[int]] = None,
        sps=None,
        collect_calibration: Optional[bool] = None,
    ) -> GenerationOutput:
        """Generate up to ``max_new_tokens`` after ``prompt_ids``.

        ``confidence_threshold`` > 0 truncates each proposal at the first slot whose
        confidence is below it (§7 step 6); ``sps`` (a throughput curve, see
        :mod:`megaspark.inference.scheduler`) selects the hardware-aware scheduler instead.
        ``generator`` is a ``torch.Generator`` or a seed. Calibration pairs are collected
        when every round proposes the full block (threshold 0 and no scheduler) unless
        ``collect_calibration`` says otherwise.
        """
        with _inference_mode():
            return self._generate(prompt_ids, max_new_tokens, temperature, confidence_threshold,
                                  generator, stop_token_ids, sps, collect_calibration)

    def _generate(self, prompt_ids, max_new_tokens, temperature, confidence_threshold,
                  generator, stop_token_ids, sps, collect_calibration) -> GenerationOutput:
        if len(prompt_ids) == 0:
            raise ValueError("the prompt must contain at least one token")
        gen = _generator(generator)
        stops = self.stop_token_ids if stop_token_ids is None else set(int(t) for t in stop_token_ids)
        if collect_calibration is None:
            collect_calibration = confidence_threshold <= 0 and sps is None
        stats = SpecStats(max_drafts=self.draft.max_drafts)
        emit = _Emitter(max_new_tokens, stops)
        widths = []
        t0 = time.perf_counter()

        self.target.reset()
        self.draft.reset()
        step = self.target.forward(list(prompt_ids), last_only=True)
        pending = step.features
        position = len(prompt_ids)
        anchor = sample_logits(step.logits[-1], temperature, gen)
        emit.push([anchor])
        while not emit.done:
            prop = self.draft.propose(anchor, position, pending, temperature=temperature,
                                      threshold=confidence_threshold, generator=gen, sps=sps)
            ell = len(prop.tokens)
            widths.append(ell + 1)
            step = self.target.forward([anchor] + prop.tokens)
            p = probabilities(step.logits, temperature)
            q = None if prop.q is None else prop.q.to(p.device)
            result = verify(prop.tokens, q, p, temperature, gen)
            n = result.accepted
            self.target.crop(position + n + 1)
            pending = step.features[: n + 1]
            emitted = result.emitted(prop.tokens)

            calib = 0
            if collect_calibration and prop.confidences:
                calib = ell
                for i, tok in enumerate(prop.tokens[:n]):  # stop at an accepted stop token
                    if tok in stops:
                        calib = i + 1
                        break
            stats.add_round(RoundRecord(proposed=ell, accepted=n,
                                        confidences=list(prop.confidences[:ell]),
                                        calibration_slots=calib))
            emit.push(emitted)
            position += n + 1
            anchor = result.next_token

        stats.seconds = time.perf_counter() - t0
        stats.new_tokens = len(emit.tokens)
        return GenerationOutput(tokens=emit.tokens, stats=stats, finished_by_stop=emit.stopped,
                                verify_widths=widths)


class TargetDecoder:
    """Plain autoregressive decoding of the target with its KV cache (the baseline):
    same sampling rules (temperature, greedy below 1e-5, stop tokens)."""

    def __init__(self, target, stop_token_ids: Sequence[int] = ()):
        self.target = CachedTarget(target, layer_ids=None)
        self.stop_token_ids = set(int(t) for t in stop_token_ids)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, *,
                 temperature: float = 0.0, generator=None,
                 stop_token_ids: Optional[Sequence[int]] = None) -> GenerationOutput:
        with _inference_mode():
            return self._generate(prompt_ids, max_new_tokens, temperature, generator, stop_token_ids)

    def _generate(self, prompt_ids, max_new_tokens, temperature, generator,
                  stop_token_ids) -> GenerationOutput:
        if len(prompt_ids) == 0:
            raise ValueError("the prompt must contain at least one token")
        gen = _generator(generator)
        stops = self.stop_token_ids if stop_token_ids is None else set(int(t) for t in stop_token_ids)
        stats = SpecStats(max_drafts=0)
        emit = _Emitter(max_new_tokens, stops)
        t0 = time.perf_counter()
        self.target.reset()
        step = self.target.forward(list(prompt_ids), last_only=True, need_features=False)
        token = sample_logits(step.logits[-1], temperature, gen)
        emit.push([token])
        while not emit.done:
            step = self.target.forward([token], need_features=False)
            token = sample_logits(step.logits[-1], temperature, gen)
            emit.push([token])
        stats.seconds = time.perf_counter() - t0
        stats.new_tokens = len(emit.tokens)
        return GenerationOutput(tokens=emit.tokens, stats=stats, finished_by_stop=emit.stopped)


__all__ = ["SpeculativeDecoder", "TargetDecoder", "GenerationOutput"]
