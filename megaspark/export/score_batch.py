"""Scoring batches for ``tools/score_batch.py``: one safetensors file holding a batch's inputs
and its target hidden states, so that a draft can be scored on it outside training."""

from __future__ import annotations

from megaspark.export.tensors import ExportError

BATCH_TENSORS = ("input_ids", "loss_mask", "target_hidden_states", "target_last_hidden_states",
                 "anchors", "keep")


def save_batch(path, input_ids, loss_mask, target_hidden_states, target_last_hidden_states,
               anchors, keep) -> None:
    """Write a scoring batch: input_ids/loss_mask [b, S], target_hidden_states (the tapped
    layers) [b, S, L·H], target_last_hidden_states [b, S, H], anchors/keep [b, N]."""
    from safetensors.torch import save_file

    tensors = dict(
        input_ids=input_ids.long(), loss_mask=loss_mask.long(),
        target_hidden_states=target_hidden_states.float(),
        target_last_hidden_states=target_last_hidden_states.float(),
        anchors=anchors.long(), keep=keep.bool(),
    )
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def load_batch(path) -> dict:
    """The tensors of a scoring batch (:data:`BATCH_TENSORS`, as saved)."""
    from safetensors.torch import load_file

    batch = load_file(str(path))
    missing = [k for k in BATCH_TENSORS if k not in batch]
    if missing:
        raise ExportError(f"{path}: batch lacks {missing} (needs {list(BATCH_TENSORS)})")
    return batch


__all__ = ["BATCH_TENSORS", "save_batch", "load_batch"]
