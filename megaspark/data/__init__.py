"""Data: chat rendering with loss masks, built-in prompt sources, prepared datasets,
batching and the seekable data-parallel sampler."""
from .chat import DataError, normalize_conversation, render_and_mask, supervised_text
from .dataset import BatchSampler, PreparedDataset, collate, load_meta
from .sources import builtin_prompt_conversations, chatterbot_conversations, humaneval_prompts

__all__ = [
    "DataError", "normalize_conversation", "render_and_mask", "supervised_text",
    "BatchSampler", "PreparedDataset", "collate", "load_meta",
    "builtin_prompt_conversations", "chatterbot_conversations", "humaneval_prompts",
]
