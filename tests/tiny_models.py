"""Tiny random HF targets (Llama / Qwen3) with an offline tokenizer, for tests.

``make_tiny_target(tmp_path, family=...)`` writes a complete HF model directory
(config, safetensors weights, generation config, tokenizer with a ChatML chat
template) and returns its path. Everything is built in-process: a byte-level BPE
tokenizer is trained on a fixed corpus with ``tokenizers`` (deterministic), so no
hub access is needed. Calling it again with the same arguments reuses the directory.

The two families mirror the real targets this project cares about:

* ``"llama"`` (like SmolLM2): tied embeddings, tokenizer size == vocab size, a
  SmolLM2-style ChatML template that injects a default system prompt.
* ``"qwen3"`` (like Qwen3): untied LM head, a few spare embedding rows beyond the
  tokenizer (Qwen3's vocab is 151,936 rows for 151,669 tokens), and a Qwen3-style
  template that puts an empty ``<think>`` block before the last assistant answer and
  honours ``enable_thinking=False`` in the generation prompt.
* ``"deepseek_v3"`` (like DeepSeek-V3): multi-head latent attention (q_lora_rank 24 or
  ``None``, kv_lora_rank 32, qk_nope 16, qk_rope 8, v 16 by default, interleaved RoPE),
  YaRN RoPE (factor 4 over 512 original positions, mscale = mscale_all_dim = 1), a dense
  first layer then MoE layers (4 routed experts in 2 groups, top-2, one shared expert),
  untied LM head, the Llama chat template.

Special tokens: ``<|endoftext|>`` (pad / unk), ``<|im_start|>`` (bos),
``<|im_end|>`` (eos = end of turn), plus ``extra_special_tokens``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
END_OF_TURN = EOS_TOKEN

# Jinja sources (raw strings: jinja itself turns the '\n' escapes into newlines).
LLAMA_CHAT_TEMPLATE = (
    r"{%- for message in messages -%}"
    r"{%- if loop.first and message['role'] != 'system' -%}"
    r"{{- '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' -}}"
    r"{%- endif -%}"
    r"{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

QWEN3_CHAT_TEMPLATE = (
    r"{%- set ns = namespace(last_user=-1) -%}"
    r"{%- for message in messages -%}"
    r"{%- if message['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    r"{%- endfor -%}"
    r"{%- for message in messages -%}"
    r"{%- if message['role'] == 'assistant' and loop.index0 > ns.last_user and loop.last -%}"
    r"{{- '<|im_start|>assistant\n<think>\n\n</think>\n\n' + message['content'] + '<|im_end|>\n' -}}"
    r"{%- else -%}"
    r"{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}"
    r"{%- endif -%}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}"
    r"{{- '<|im_start|>assistant\n' -}}"
    r"{%- if enable_thinking is defined and enable_thinking is false -%}"
    r"{{- '<think>\n\n</think>\n\n' -}}"
    r"{%- endif -%}"
    r"{%- endif -%}"
)

_CORPUS = [
    "<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n",
    "<|im_start|>user\nHello, how are you today?<|im_end|>\n",
    "<|im_start|>assistant\n<think>\n\n</think>\n\nI am fine, thank you! How can I help you?<|im_end|>\n",
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris.",
    "Complete the following Python function:\n```python\ndef add(a, b):\n    return a + b\n```",
    "for i in range(10):\n    print(i)\nreturn None\n",
]

_MARKER = "tiny_target.json"

# DeepseekV3Config fields of the tiny DeepSeek-V3 target (make_tiny_target(mla=...) overrides)
DEEPSEEK_V3_MLA = dict(
    q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    moe_intermediate_size=32, n_shared_experts=1, n_routed_experts=4, n_group=2, topk_group=1,
    num_experts_per_tok=2, first_k_dense_replace=1, rope_interleave=True,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                     "original_max_position_embeddings": 512, "beta_fast": 32.0, "beta_slow": 1.0,
                     "mscale": 1.0, "mscale_all_dim": 1.0},
)


def _build_tokenizer(num_tokens: int, chat_template: str, extra_special_tokens: Sequence[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *extra_special_tokens]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if num_tokens < len(alphabet) + len(specials):
        raise ValueError(f"tokenizer needs at least {len(alphabet) + len(specials)} tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=num_tokens, special_tokens=specials, initial_alphabet=alphabet,
        show_progress=False,
    )
    # Repeat the corpus so that merges have clear frequencies (training is deterministic).
    tok.train_from_iterator([line for line in _CORPUS for _ in range(8)], trainer)
    # Training may stop early when no pair is left to merge: pad with inert tokens so
    # the size is exactly `num_tokens` (callers rely on it).
    n = tok.get_vocab_size()
    if n < num_tokens:
        tok.add_tokens([f"<|unused_{i}|>" for i in range(num_tokens - n)])
    assert tok.get_vocab_size() == num_tokens, (tok.get_vocab_size(), num_tokens)

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN, unk_token=PAD_TOKEN,
    )
    if extra_special_tokens:
        hf_tok.add_special_tokens({"additional_special_tokens": list(extra_special_tokens)})
    hf_tok.chat_template = chat_template
    return hf_tok


def make_tiny_target(
    tmp_path,
    family: str = "llama",
    num_layers: int = 6,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 320,
    seed: int = 0,
    *,
    intermediate: int | None = None,
    spare_rows: int | None = None,
    tie_word_embeddings: bool | None = None,
    extra_special_tokens: Sequence[str] = (),
    initializer_range: float = 0.02,
    max_position_embeddings: int = 2048,
    mla: dict | None = None,
) -> str:
    """Build (or reuse) a tiny random causal LM + tokenizer under ``tmp_path``; return its dir.

    ``vocab`` is the model's vocabulary size (embedding rows). The tokenizer has
    ``vocab - spare_rows`` tokens; ``spare_rows`` defaults to 0 for llama and deepseek_v3
    and 8 for qwen3. ``mla`` (deepseek_v3 only) overrides DeepseekV3Config fields (e.g.
    ``q_lora_rank=None``, ``rope_parameters``); ``kv_heads`` is ignored for deepseek_v3.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, Qwen3Config

    if family not in ("llama", "qwen3", "deepseek_v3"):
        raise ValueError(f"unknown family {family!r} (expected 'llama', 'qwen3' or 'deepseek_v3')")
    if spare_rows is None:
        spare_rows = 8 if family == "qwen3" else 0
    if tie_word_embeddings is None:
        tie_word_embeddings = family == "llama"
    if intermediate is None:
        intermediate = 2 * hidden
    if family == "deepseek_v3":
        kv_heads = heads
        mla = dict(DEEPSEEK_V3_MLA, **(mla or {}))
    elif mla:
        raise ValueError("mla= applies to family 'deepseek_v3' only")
    spec = dict(
        family=family, num_layers=num_layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
        vocab=vocab, seed=seed, intermediate=intermediate, spare_rows=spare_rows,
        tie_word_embeddings=tie_word_embeddings, extra_special_tokens=list(extra_special_tokens),
        initializer_range=initializer_range, max_position_embeddings=max_position_embeddings,
    )
    if mla:
        spec["mla"] = mla
    key = "-".join(str(v) for v in (family, num_layers, hidden, heads, kv_heads, vocab, seed))
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    out = Path(tmp_path) / f"tiny-{key}-{digest}"
    marker = out / _MARKER
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return str(out)

    template = QWEN3_CHAT_TEMPLATE if family == "qwen3" else LLAMA_CHAT_TEMPLATE
    tokenizer = _build_tokenizer(vocab - spare_rows, template, extra_special_tokens)
    ids = dict(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    common = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6,
        initializer_range=initializer_range, tie_word_embeddings=tie_word_embeddings, **ids,
    )
    if family == "llama":
        config = LlamaConfig(**common)
    elif family == "deepseek_v3":
        from transformers import DeepseekV3Config

        config = DeepseekV3Config(**common, **mla)
    else:
        config = Qwen3Config(head_dim=hidden // heads, **common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(do_sample=False, **ids)

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    marker.write_text(json.dumps(spec, sort_keys=True))
    return str(out)


__all__ = ["make_tiny_target", "END_OF_TURN", "EOS_TOKEN", "BOS_TOKEN", "PAD_TOKEN"]


def single_thread():
    """Context manager: run torch on one intra-op thread (restored afterwards).

    Tiny models gain nothing from intra-op threads, and on a shared, oversubscribed
    machine OpenMP teams stall badly (a 32x576x1536 matmul going from 0.4 ms to 25 ms).
    """
    import contextlib

    import torch

    @contextlib.contextmanager
    def ctx():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(n)

    return ctx()
