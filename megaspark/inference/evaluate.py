"""Evaluation of a draft by real speculative decoding: prompts in, a report out.

Used by ``tools/eval_speculative.py``. Prompts come from a JSONL file or from the valid
split of a prepared dataset (the tokens before the first supervised token, i.e. the
prompt of the first assistant turn). Every prompt is decoded twice with the same
sampling settings — speculatively and with the plain target — alternating, so both
see the same machine conditions; tokens/s of the two and their ratio are reported
next to the acceptance metrics.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

from megaspark.inference.metrics import SpecStats
from megaspark.inference.sampling import is_greedy


# ----------------------------------------------------------------------------- prompts
def _first_user_turns(messages: list) -> list:
    """The messages before the first assistant turn (the prompt of that turn)."""
    out = []
    for m in messages:
        if m["role"] == "assistant":
            break
        out.append(m)
    return out


def prompt_ids_from_record(obj, tokenizer, raw: bool = False, where: str = "") -> list:
    """One JSONL record → prompt token ids. Accepted forms:

    * ``{"input_ids": [...]}`` — used as is;
    * ``{"messages": [...]}`` / ``{"conversations": [...]}`` — the turns before the first
      assistant turn, rendered with the chat template and the generation prompt;
    * ``{"prompt": "..."}`` — one user turn through the chat template (plain text with
      ``raw`` or when the tokenizer has no template);
    * ``{"text": "..."}`` — plain text, no template.
    """
    from megaspark.data.chat import normalize_conversation

    if not isinstance(obj, dict):
        raise ValueError(f"{where}expected a JSON object")
    if "input_ids" in obj:
        ids = obj["input_ids"]
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise ValueError(f"{where}'input_ids' must be a list of ints")
        return list(ids)
    if "text" in obj:
        return tokenizer(obj["text"], add_special_tokens=False)["input_ids"]
    if "messages" in obj or "conversations" in obj:
        messages = _first_user_turns(normalize_conversation(obj, require_assistant=False))
    elif "prompt" in obj:
        if raw or not getattr(tokenizer, "chat_template", None):
            return tokenizer(obj["prompt"], add_special_tokens=False)["input_ids"]
        messages = [{"role": "user", "content": obj["prompt"]}]
    else:
        raise ValueError(f"{where}expected one of 'input_ids', 'messages', 'conversations', "
                         "'prompt' or 'text'")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def load_prompts_jsonl(path, tokenizer, limit: Optional[int] = None, raw: bool = False) -> list:
    prompts = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
            ids = prompt_ids_from_record(obj, tokenizer, raw, where=f"{path}:{line_no}: ")
            if ids:
                prompts.append(ids)
            if limit is not None and len(prompts) >= limit:
                break
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def load_prompts_prepared(data_dir, split: str = "valid", limit: Optional[int] = None) -> list:
    """Prompts of a prepared dataset: each sample's tokens before its first supervised
    token (samples without one, or supervised from the first token, are skipped)."""
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is '{data_dir}' a prepared dataset "
                                "(tools/prepare_data.py)?")
    prompts = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            rec = json.loads(line)
            mask = rec["loss_mask"]
            first = next((i for i, m in enumerate(mask) if m), None)
            if first:
                prompts.append(list(rec["input_ids"][:first]))
            if limit is not None and len(prompts) >= limit:
                break
    if not prompts:
        raise ValueError(f"{path}: no sample has a prompt followed by supervised tokens")
    return prompts


# ----------------------------------------------------------------------------- evaluation
def evaluate(spec, plain, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, confidence_threshold: float = 0.0, seed: int = 0,
             stop_token_ids: Sequence[int] = (), progress: bool = True, warmup: bool = True) -> dict:
    """Decode every prompt speculatively (and with ``plain`` unless it is None); return
    the report (see :func:`format_report`)."""
    from tqdm import tqdm

    spec_stats = SpecStats(max_drafts=spec.draft.max_drafts)
    plain_stats = SpecStats(max_drafts=0)
    identical = 0
    samples = []
    if warmup and prompts:  # first-call costs (allocations, lazy imports) off the clock
        spec.generate(prompts[0], 4, temperature=temperature, generator=0)
        if plain is not None:
            plain.generate(prompts[0], 4, temperature=temperature, generator=0)
    bar = tqdm(total=len(prompts), desc="speculative decoding", unit="prompt", disable=not progress,
               dynamic_ncols=True)
    for i, prompt in enumerate(prompts):
        out = spec.generate(prompt, max_new_tokens, temperature=temperature,
                            confidence_threshold=confidence_threshold, generator=seed + i,
                            stop_token_ids=stop_token_ids)
        spec_stats.merge(out.stats)
        sample = {"prompt_tokens": len(prompt), "new_tokens": len(out.tokens),
                  "rounds": out.stats.num_rounds, "tau": out.stats.acceptance_length()}
        if plain is not None:
            ref = plain.generate(prompt, max_new_tokens, temperature=temperature, generator=seed + i,
                                 stop_token_ids=stop_token_ids)
            plain_stats.merge(ref.stats)
            same = out.tokens == ref.tokens
            identical += same
            sample["identical_to_target"] = same
        samples.append(sample)
        bar.set_postfix(tau=f"{spec_stats.acceptance_length():.2f}")
        bar.update(1)
    bar.close()

    report = {
        "settings": {"num_prompts": len(prompts), "max_new_tokens": max_new_tokens,
                     "temperature": temperature, "confidence_threshold": confidence_threshold,
                     "seed": seed, "max_drafts_per_round": spec.draft.max_drafts,
                     "convention": getattr(spec.config, "convention", None),
                     "block_size": getattr(spec.config, "block_size", None)},
        "speculative": spec_stats.summary(),
        "samples": samples,
    }
    if plain is not None:
        report["plain"] = {"new_tokens": plain_stats.new_tokens, "seconds": plain_stats.seconds,
                           "tokens_per_second": plain_stats.tokens_per_second()}
        s, p = spec_stats.tokens_per_second(), plain_stats.tokens_per_second()
        report["speedup"] = s / p if p and math.isfinite(p) and p > 0 else float("nan")
        if is_greedy(temperature):
            report["greedy_identical"] = {"identical": identical, "prompts": len(prompts)}
    return report


def _fmt(x, spec="{:.3f}") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return spec.format(x)


def format_report(report: dict) -> str:
    s = report["speculative"]
    st = report["settings"]
    lines = [
        f"prompts {st['num_prompts']}, max new tokens {st['max_new_tokens']}, temperature "
        f"{st['temperature']}, confidence threshold {st['confidence_threshold']}, convention "
        f"{st['convention']} (block {st['block_size']}, up to {st['max_drafts_per_round']} drafts/round)",
        "",
        f"{'metric':<34}{'value':>12}",
        f"{'-' * 46}",
        f"{'acceptance length tau (measured)':<34}{_fmt(s['acceptance_length']):>12}",
    ]
    if report.get("checkpoint_best_eval_tau") is not None:
        lines.append(f"{'tau (analytic, best ckpt eval)':<34}"
                     f"{_fmt(report['checkpoint_best_eval_tau']):>12}")
    if report.get("metrics_jsonl_tau") is not None:
        lines.append(f"{'tau (analytic, last logged eval)':<34}{_fmt(report['metrics_jsonl_tau']):>12}")
    lines += [
        f"{'mean drafts proposed / round':<34}{_fmt(s['mean_proposed']):>12}",
        f"{'verify rate':<34}{_fmt(s['verify_rate']):>12}",
        f"{'verification rounds':<34}{s['rounds']:>12}",
        f"{'new tokens (speculative)':<34}{s['new_tokens']:>12}",
        f"{'tokens/s speculative':<34}{_fmt(s['tokens_per_second'], '{:.2f}'):>12}",
    ]
    if "plain" in report:
        lines += [
            f"{'tokens/s target only':<34}{_fmt(report['plain']['tokens_per_second'], '{:.2f}'):>12}",
            f"{'speed-up (spec / target only)':<34}{_fmt(report['speedup'], '{:.3f}x'):>12}",
        ]
    if "greedy_identical" in report:
        g = report["greedy_identical"]
        lines.append(f"{'greedy output == target greedy':<34}{g['identical']:>8} / {g['prompts']}")
    cal = s.get("calibration")
    if cal:
        lines += [
            f"{'confidence ECE (20 bins)':<34}{_fmt(cal['ece'], '{:.4f}'):>12}",
            f"{'confidence Brier':<34}{_fmt(cal['brier'], '{:.4f}'):>12}",
            f"{'confidence AUROC':<34}{_fmt(cal['auroc'], '{:.4f}'):>12}",
            f"{'mean predicted / observed':<34}{_fmt(cal['mean_predicted'])+' / '+_fmt(cal['mean_observed']):>12}",
        ]
    else:
        why = ("needs --confidence-threshold 0" if st["confidence_threshold"] > 0
               else "the draft has no confidence head")
        lines.append(f"{'confidence ECE (20 bins)':<34}{'n/a':>12}  ({why})")
    lines += ["", "per-position acceptance (rounds with >= k+1 accepted / rounds proposing >= k+1)",
              f"{'k':>4}{'rate':>10}{'rounds':>10}"]
    for row in s["per_position_acceptance"]:
        lines.append(f"{row['position']:>4}{_fmt(row['rate']):>10}{row['rounds']:>10}")
    return "\n".join(lines)


__all__ = ["prompt_ids_from_record", "load_prompts_jsonl", "load_prompts_prepared", "evaluate",
           "format_report"]
