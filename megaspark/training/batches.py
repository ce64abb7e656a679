"""From token batches to draft inputs: anchors, blocks, target hidden states, denominator.

One optimizer step on one data-parallel rank consumes ``num_microbatches`` micro-batches.
:func:`prepare_step` builds all of them up front, because the loss denominator is global
(DESIGN.md decision 3): Σω over every micro-batch of the step on every DP rank, which
depends only on the data and the sampled anchors, so it is known before any forward.

Anchors (and VP-drafter prefix lengths) are sampled per *sample* from a generator seeded
by (seed, the sample's position in the global data stream), so a given sample gets the
same blocks at any parallel layout, micro-batch size or resume point.

VP-drafter mode (§10) samples prefixes for training batches only: evaluation uses the
anchor-only blocks the drafter sees at inference (π = 1, the DFlash objective), so its
loss and τ are comparable with a plain DFlash run.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
import torch

from megaspark.blocks import build_blocks, sample_anchors, sample_prefix_lengths
from megaspark.config import DSparkConfig
from megaspark.models.dspark.model import DraftInputs


def _sample_seed(seed: int, stream_position: int, what: str = "anchors") -> int:
    digest = hashlib.sha256(f"{what}/{seed}/{stream_position}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def sample_anchors_per_sample(loss_mask: torch.Tensor, num_anchors: int, seed: int, stream_positions):
    anchors, keep = [], []
    for row, pos in zip(loss_mask, stream_positions):
        g = torch.Generator().manual_seed(_sample_seed(seed, int(pos)))
        a, k = sample_anchors(row[None], num_anchors, generator=g)
        anchors.append(a)
        keep.append(k)
    return torch.cat(anchors), torch.cat(keep)


def sample_prefix_lengths_per_sample(dcfg: DSparkConfig, seed: int, stream_positions) -> torch.Tensor:
    """VP-drafter prefix lengths π [b, N] (§10.2), one seeded draw per sample like the anchors,
    so they too are independent of the parallel layout."""
    rows = []
    for pos in stream_positions:
        g = torch.Generator().manual_seed(_sample_seed(seed, int(pos), "prefix"))
        rows.append(sample_prefix_lengths((1, dcfg.num_anchors), dcfg.block_size,
                                          dcfg.prefix_weight_base, generator=g))
    return torch.cat(rows)


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [b, S]
    loss_mask: torch.Tensor  # [b, S]
    stream_positions: list  # global data-stream index of each sample


def make_draft_inputs(
    mb: MicroBatch,
    dcfg: DSparkConfig,
    seed: int,
    target=None,
    target_output=None,
    training: bool = True,
) -> DraftInputs:
    """Blocks for one micro-batch plus the target's hidden states (computed here with
    ``target`` unless ``target_output`` is given). ``training=False``: evaluation blocks
    (no VP-drafter prefixes)."""
    anchors, keep = sample_anchors_per_sample(mb.loss_mask, dcfg.num_anchors, seed, mb.stream_positions)
    prefix = None
    if dcfg.training_mode == "vp_drafter" and training:
        prefix = sample_prefix_lengths_per_sample(dcfg, seed, mb.stream_positions)
    blocks = build_blocks(
        mb.input_ids, mb.loss_mask, anchors, keep, block_size=dcfg.block_size,
        mask_token_id=dcfg.mask_token_id, gamma=dcfg.gamma, convention=dcfg.convention,
        truncate_eval_mask=dcfg.truncate_eval_mask, prefix_lengths=prefix,
    )
    if target_output is None and target is not None:
        target_output = target.compute(mb.input_ids)
    aux = last = None
    if target_output is not None:
        aux, last = target_output.aux_hidden_states.float(), target_output.last_hidden_states.float()
    return DraftInputs.from_blocks(blocks, aux, last)


def broadcast_target_output(output, shape_like: MicroBatch, dcfg: DSparkConfig, compute: bool):
    """Share the target's hidden states from TP rank 0 with its tensor-parallel peers
    (the target runs once per TP group)."""
    from megatron.core import parallel_state

    from megaspark.targets.base import TargetOutput

    group = parallel_state.get_tensor_model_parallel_group()
    if torch.distributed.get_world_size(group) == 1:
        return output
    src = parallel_state.get_tensor_model_parallel_src_rank()
    b, S = shape_like.input_ids.shape
    H = dcfg.hidden_size
    if compute:
        aux = output.aux_hidden_states.float().contiguous()
        last = output.last_hidden_states.float().contiguous()
    else:
        aux = torch.empty(b, S, dcfg.context_width)
        last = torch.empty(b, S, H)
    torch.distributed.broadcast(aux, src=src, group=group)
    torch.distributed.broadcast(last, src=src, group=group)
    return TargetOutput(aux_hidden_states=aux, last_hidden_states=last)


def global_denominator(inputs: list, group=None) -> torch.Tensor:
    """Σω over the given micro-batches, summed over ``group`` (the DP group)."""
    device = inputs[0].weights.device if inputs else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)  # nccl needs device tensors
    for x in inputs:
        total += x.weights.double().sum()
    if group is not None and torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(total, group=group)
    return total.float()


def prepare_micro_batches(
    micro_batches: list,
    dcfg: DSparkConfig,
    seed: int,
    target=None,
    dp_group=None,
    training: bool = True,
) -> tuple[list, torch.Tensor]:
    """Draft inputs for every micro-batch of a step and the global denominator."""
    from megatron.core import parallel_state

    compute = parallel_state.get_tensor_model_parallel_rank() == 0
    inputs = []
    for mb in micro_batches:
        out = None
        if compute and target is not None:
            with _borrow_tp_peers_threads():
                out = target.compute(mb.input_ids)
        out = broadcast_target_output(out, mb, dcfg, compute)
        inputs.append(make_draft_inputs(mb, dcfg, seed, target_output=out, training=training).to(_device()))
    return inputs, global_denominator(inputs, dp_group)


def _device():
    from megaspark import platform

    return platform.default_device()


@contextlib.contextmanager
def _borrow_tp_peers_threads():
    """On CPU, while TP rank 0 runs the target its TP peers only wait for the broadcast:
    let the target use their cores too."""
    from megatron.core import parallel_state

    from megaspark import platform

    before = torch.get_num_threads()
    wanted = before * parallel_state.get_tensor_model_parallel_world_size()
    if platform.gpu_available() or wanted == before:
        yield
        return
    torch.set_num_threads(min(os.cpu_count() or wanted, wanted))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def collate_micro_batch(samples: list, seq_length: int, pad_id: int, stream_positions: list) -> MicroBatch:
    from megaspark.data.dataset import collate

    batch = collate(samples, seq_length, pad_id)
    return MicroBatch(batch["input_ids"], batch["loss_mask"], list(stream_positions))
