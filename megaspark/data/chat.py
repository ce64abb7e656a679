"""Conversations → token ids + loss mask (DSPARK_SPEC.md §1.4).

A conversation is rendered with the target tokenizer's own chat template. For every
assistant turn the supervised span runs from just after the assistant header (the
text the template emits for ``add_generation_prompt=True``, so e.g. an empty
``<think></think>`` block that the generation prompt already contains is excluded)
through the end-of-turn marker, inclusive. Spans are found on the rendered *text*
(by rendering prefixes of the conversation) and mapped to tokens with the fast
tokenizer's character offsets, so no assumption is made about how the template
tokenises.

Two input forms are accepted (one JSON object per line):

* OpenAI: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}``
* ShareGPT: ``{"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}]}``
"""
from __future__ import annotations

from typing import Any, Optional, Sequence


class DataError(ValueError):
    """Malformed input data; ``line_no`` (1-based) tells where, when known."""

    def __init__(self, message: str, line_no: Optional[int] = None, source: Optional[str] = None):
        self.line_no = line_no
        self.source = source
        self.reason = message
        where = ""
        if source is not None and line_no is not None:
            where = f"{source}:{line_no}: "
        elif line_no is not None:
            where = f"line {line_no}: "
        super().__init__(where + message)


_SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
    "system": "system",
}
_OPENAI_ROLES = {"system", "user", "assistant"}


def normalize_conversation(obj: Any, line_no: Optional[int] = None, *,
                           require_assistant: bool = True, source: Optional[str] = None) -> list[dict]:
    """Validate one record and return OpenAI-style ``[{"role", "content"}]`` messages.

    Raises :class:`DataError` (with ``line_no``) for anything malformed: not an object,
    neither/both of ``messages``/``conversations``, an empty list, missing keys, unknown
    roles, non-string content, a system message after the first turn, or (when
    ``require_assistant``) no assistant turn with non-empty content.
    """
    def fail(msg):
        raise DataError(msg, line_no, source)

    if not isinstance(obj, dict):
        fail(f"expected a JSON object, got {type(obj).__name__}")
    has_m, has_c = "messages" in obj, "conversations" in obj
    if has_m == has_c:
        fail("expected exactly one of the keys 'messages' (OpenAI form) or 'conversations' "
             "(ShareGPT form)" + (" (got both)" if has_m else ""))
    turns = obj["messages"] if has_m else obj["conversations"]
    key = "messages" if has_m else "conversations"
    if not isinstance(turns, list):
        fail(f"'{key}' must be a list, got {type(turns).__name__}")
    if not turns:
        fail(f"'{key}' is empty")

    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            fail(f"{key}[{i}] must be an object, got {type(turn).__name__}")
        if has_m:
            for k in ("role", "content"):
                if k not in turn:
                    fail(f"messages[{i}] has no '{k}' key")
            role, content = turn["role"], turn["content"]
            if role not in _OPENAI_ROLES:
                fail(f"messages[{i}] has unknown role {role!r} (expected one of "
                     f"{sorted(_OPENAI_ROLES)})")
        else:
            for k in ("from", "value"):
                if k not in turn:
                    fail(f"conversations[{i}] has no '{k}' key")
            frm, content = turn["from"], turn["value"]
            if not isinstance(frm, str) or frm.lower() not in _SHAREGPT_ROLES:
                fail(f"conversations[{i}] has unknown speaker {frm!r} (expected human, gpt "
                     f"or system)")
            role = _SHAREGPT_ROLES[frm.lower()]
        if not isinstance(content, str):
            fail(f"{key}[{i}] content must be a string, got {type(content).__name__}")
        if role == "system" and i != 0:
            fail(f"{key}[{i}] is a system message; only the first message may be one")
        messages.append({"role": role, "content": content})

    if all(m["role"] == "system" for m in messages):
        fail("the conversation has no user or assistant turn")
    first = next(m for m in messages if m["role"] != "system")
    if first["role"] != "user":
        fail("the first non-system turn must be a user turn")
    if require_assistant:
        if not any(m["role"] == "assistant" for m in messages):
            fail("the conversation has no assistant turn (nothing to supervise)")
        for i, m in enumerate(messages):
            if m["role"] == "assistant" and not m["content"].strip():
                fail(f"{key}[{i}] is an assistant turn with empty content")
    return messages


def _render(tokenizer, messages, add_generation_prompt, template_kwargs) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the target tokenizer has no chat template; conversations cannot be "
                         "rendered")
    try:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt,
            **template_kwargs)
    except Exception as e:  # jinja2 TemplateError and friends: the template refused the input
        if type(e).__module__.startswith("jinja2"):
            raise DataError(f"the chat template refused this conversation: {e}") from e
        raise


def _common_prefix_len(a: str, b: str) -> int:
    if b.startswith(a):
        return len(a)
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def assistant_char_spans(tokenizer, messages: Sequence[dict], template_kwargs: Optional[dict] = None,
                         final_turn_complete: bool = True) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages``; return the text and the supervised ``[start, end)`` char spans.

    ``final_turn_complete=False`` (an answer cut off by the generation budget): the text is
    cut right after the last assistant content, with no end-of-turn marker, so the sample
    is a genuine prefix of a longer answer.
    """
    kw = dict(template_kwargs or {})
    full = _render(tokenizer, messages, False, kw)
    spans = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], True, kw)
        # Normally the generation prompt is a prefix of the full text; some templates
        # (Qwen3) render earlier assistant turns differently, then the common prefix stops
        # right after the header.
        start = max(_common_prefix_len(prompt, full), cursor)
        content = m["content"]
        pos = full.find(content, start) if content else start
        if pos < 0 and content.strip():
            content = content.strip()
            pos = full.find(content, start)
        if pos < 0:
            raise DataError(f"assistant turn {i}: its content was not found in the rendered chat "
                            f"template output; the template rewrites assistant text in a way "
                            f"this renderer does not support")
        content_end = pos + len(content)
        last = i == len(messages) - 1
        if last and not final_turn_complete:
            spans.append((start, content_end))
            return full[:content_end], spans
        # The end-of-turn marker is what the template appends after the content when this
        # turn is the last message, minus trailing whitespace ("<|im_end|>\n" -> "<|im_end|>").
        alone = _render(tokenizer, messages[: i + 1], False, kw)
        tail_at = alone.rfind(content)
        marker = alone[tail_at + len(content):].rstrip() if tail_at >= 0 else ""
        if marker and not full.startswith(marker, content_end):
            # e.g. templates that only emit the marker at the very end; fall back to the
            # longest leading part of the marker present here (usually the whole of it).
            k = _common_prefix_len(marker, full[content_end:])
            marker = marker[:k]
        end = content_end + len(marker)
        spans.append((start, end))
        cursor = end
    return full, spans


def render_and_mask(tokenizer, messages: Sequence[dict], max_length: Optional[int] = None, *,
                    template_kwargs: Optional[dict] = None,
                    final_turn_complete: bool = True) -> tuple[list[int], list[int]]:
    """Render a conversation with the chat template; return ``(input_ids, loss_mask)``.

    ``loss_mask[t] = 1`` for tokens of assistant turns, from just after the assistant
    header through the end-of-turn marker inclusive; 0 elsewhere. The result is truncated
    to ``max_length`` tokens. ``messages`` are OpenAI-style dicts (see
    :func:`normalize_conversation`). ``template_kwargs`` go to ``apply_chat_template``
    (e.g. ``{"enable_thinking": False}`` for Qwen3).
    """
    text, spans = assistant_char_spans(tokenizer, messages, template_kwargs, final_turn_complete)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        starts = [s for s, _ in enc["offset_mapping"]]
        mask = [0] * len(ids)
        for a, b in spans:
            for t, s in enumerate(starts):
                if a <= s < b:
                    mask[t] = 1
    else:
        ids, mask = _mask_by_prefix_tokenisation(tokenizer, text, spans)
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    return ids, mask


def _mask_by_prefix_tokenisation(tokenizer, text, spans):
    """Slow-tokenizer fallback: token boundaries from tokenising text prefixes."""
    def encode(s):
        return tokenizer(s, add_special_tokens=False)["input_ids"]

    ids = list(encode(text))
    mask = [0] * len(ids)
    for a, b in spans:
        ta, tb = len(encode(text[:a])), len(encode(text[:b]))
        if encode(text[:b]) != ids[:tb]:
            raise DataError("the tokenizer does not tokenise this conversation prefix-stably; "
                            "use a fast tokenizer")
        for t in range(ta, min(tb, len(ids))):
            mask[t] = 1
    return ids, mask


def supervised_text(tokenizer, input_ids: Sequence[int], loss_mask: Sequence[int]) -> list[str]:
    """Decode each contiguous supervised run (for inspection and tests)."""
    runs, cur = [], []
    for t, m in zip(input_ids, loss_mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tokenizer.decode(r, skip_special_tokens=False) for r in runs]


__all__ = ["DataError", "normalize_conversation", "render_and_mask", "assistant_char_spans",
           "supervised_text"]
