"""From token batches to draft inputs: anchors, blocks, target hidden states, denominator.

One optimizer step on one data-parallel rank consumes ``num_microbatches`` micro-batches.
:func:`prepare_micro_batches` builds all of them up front, because the loss denominator is global
(DESIGN.md decision 3): Σω over every micro-batch of the step on every DP rank, which
depends only on the data and the sampled anchors, so it is known before any forward.

Blocks are built on the host (they need only token ids and seeded generators) and moved
once to the compute device. The target runs on one rank per model replica, TP rank 0 of the
first pipeline stage (:func:`computes_target`), in the target's dtype on the compute
device; its TP peers receive the tapped features by broadcast, and the last pipeline stage
receives only the last hidden state already gathered at the slots' aligned indices
``[b, N, B, H]`` (§3.6). Middle stages receive nothing.

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
from typing import Optional

import torch

from megaspark.blocks import align_to_blocks, build_blocks, sample_anchors, sample_prefix_lengths
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


def make_blocks(mb: MicroBatch, dcfg: DSparkConfig, seed: int, training: bool = True):
    """The blocks of one micro-batch, built on the host (like a data loader's output) from
    per-sample seeded anchors (and VP-drafter prefixes for training batches)."""
    anchors, keep = sample_anchors_per_sample(mb.loss_mask, dcfg.num_anchors, seed, mb.stream_positions)
    prefix = None
    if dcfg.training_mode == "vp_drafter" and training:
        prefix = sample_prefix_lengths_per_sample(dcfg, seed, mb.stream_positions)
    return build_blocks(
        mb.input_ids, mb.loss_mask, anchors, keep, block_size=dcfg.block_size,
        mask_token_id=dcfg.mask_token_id, gamma=dcfg.gamma, convention=dcfg.convention,
        truncate_eval_mask=dcfg.truncate_eval_mask, prefix_lengths=prefix,
    )


def make_draft_inputs(
    mb: MicroBatch,
    dcfg: DSparkConfig,
    seed: int,
    target=None,
    target_output=None,
    training: bool = True,
    device=None,
) -> DraftInputs:
    """Blocks for one micro-batch plus the target's hidden states (computed here with
    ``target`` unless ``target_output`` is given), on ``device`` (default: where the
    features are). ``training=False``: evaluation blocks (no VP-drafter prefixes)."""
    blocks = make_blocks(mb, dcfg, seed, training)
    if target_output is None and target is not None:
        target_output = target.compute(mb.input_ids)
    aux = last = None
    if target_output is not None:
        aux, last = target_output.aux_hidden_states, target_output.last_hidden_states
    return DraftInputs.from_blocks(blocks, aux, last, device=device)


def computes_target() -> bool:
    """Whether this rank runs the target: TP rank 0 of the first pipeline stage, once per
    model replica. Its TP peers receive the features by broadcast; the last stage receives
    the aligned last hidden state from the first (:func:`prepare_micro_batches`)."""
    from megatron.core import parallel_state

    return (parallel_state.is_pipeline_first_stage(ignore_virtual=True)
            and parallel_state.get_tensor_model_parallel_rank() == 0)


def _first_stage_features(output, blocks, dcfg: DSparkConfig, compute: bool, device, dtype):
    """On the first pipeline stage: (aux [b, S, L·H], aligned last hidden [b, N, B, H]) on
    ``device`` in ``dtype``, computed on TP rank 0 and broadcast to its TP peers (the target
    runs once per TP group)."""
    from megatron.core import parallel_state

    aligned_index = blocks.aligned_index.to(device, non_blocking=True)
    if compute:
        aux = output.aux_hidden_states.to(device=device, dtype=dtype).contiguous()
        last = output.last_hidden_states.to(device=device, dtype=dtype)
        aligned = align_to_blocks(last, aligned_index).contiguous()
    group = parallel_state.get_tensor_model_parallel_group()
    if torch.distributed.get_world_size(group) == 1:
        return aux, aligned
    if not compute:
        b, S = blocks.batch_size, blocks.seq_len
        N, B = blocks.num_anchors, blocks.block_size
        aux = torch.empty(b, S, dcfg.context_width, device=device, dtype=dtype)
        aligned = torch.empty(b, N, B, dcfg.hidden_size, device=device, dtype=dtype)
    src = parallel_state.get_tensor_model_parallel_src_rank()
    torch.distributed.broadcast(aux, src=src, group=group)
    torch.distributed.broadcast(aligned, src=src, group=group)
    return aux, aligned


def _first_to_last_stage(aligned, blocks, dcfg: DSparkConfig, device, dtype):
    """Send the aligned last hidden state [b, N, B, H] from the first pipeline stage to the
    last (same TP rank); middle stages take no part. Returns it on the last stage."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return aligned
    group = parallel_state.get_pipeline_model_parallel_group()
    if parallel_state.is_pipeline_first_stage(ignore_virtual=True):
        torch.distributed.send(aligned, dst=parallel_state.get_pipeline_model_parallel_last_rank(),
                               group=group)
        return None
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        b = blocks.batch_size
        buf = torch.empty(b, blocks.num_anchors, blocks.block_size, dcfg.hidden_size,
                          device=device, dtype=dtype)
        torch.distributed.recv(buf, src=parallel_state.get_pipeline_model_parallel_first_rank(),
                               group=group)
        return buf
    return None


def global_denominator(inputs: list, group=None) -> torch.Tensor:
    """Σω over the given micro-batches, summed over ``group`` (the DP group)."""
    device = inputs[0].weights.device if inputs else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)  # nccl needs device tensors
    for x in inputs:
        total += x.weights.double().sum()
    if group is not None and torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(total, group=group)
    return total.float()


@dataclass
class HostBlocks:
    """One micro-batch after the host half of its preparation: token ids, blocks, and the
    facts the draft needs on the host (:meth:`DraftInputs.host_facts`)."""

    micro_batch: MicroBatch
    blocks: object  # megaspark.blocks.Blocks (CPU)
    facts: tuple


def build_host_blocks(micro_batches: list, dcfg: DSparkConfig, seed: int, training: bool = True) -> list:
    """The host half of a step's preparation (no device work): blocks of every micro-batch."""
    out = []
    for mb in micro_batches:
        blocks = make_blocks(mb, dcfg, seed, training)
        out.append(HostBlocks(mb, blocks, DraftInputs.host_facts(blocks)))
    return out


def prepare_micro_batches(
    micro_batches: list,
    dcfg: DSparkConfig,
    seed: int,
    target=None,
    dp_group=None,
    training: bool = True,
    *,
    device=None,
    feature_dtype: torch.dtype = torch.float32,
    expect_features: Optional[bool] = None,
) -> tuple[list, torch.Tensor]:
    """Draft inputs for every micro-batch of a step, on ``device`` (default: the compute
    device), and the global denominator: :func:`build_host_blocks` then
    :func:`device_inputs`."""
    host = build_host_blocks(micro_batches, dcfg, seed, training)
    return device_inputs(host, dcfg, target, dp_group, device=device, feature_dtype=feature_dtype,
                         expect_features=expect_features)


def device_inputs(
    host_blocks: list,
    dcfg: DSparkConfig,
    target=None,
    dp_group=None,
    *,
    device=None,
    feature_dtype: torch.dtype = torch.float32,
    expect_features: Optional[bool] = None,
) -> tuple[list, torch.Tensor]:
    """The device half: target features, blocks moved once to ``device``, the denominator.

    Only the rank that :func:`computes_target` is handed ``target``; the features travel
    in ``feature_dtype`` (the target's dtype). ``expect_features`` (default: whether a
    target was given) must be the same on every rank of a model replica. Nothing here reads
    device data back to the host."""
    from megatron.core import parallel_state

    from megaspark import platform

    device = torch.device(device) if device is not None else platform.compute_device()
    if expect_features is None:
        expect_features = target is not None
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    compute = computes_target()
    if expect_features and compute and target is None:
        raise ValueError("this rank computes the target's features but was given no target")
    inputs = []
    for hb in host_blocks:
        aux = aligned = None
        if expect_features and first:
            out = None
            if compute:
                with _borrow_tp_peers_threads():
                    out = target.compute(hb.micro_batch.input_ids)
            aux, aligned = _first_stage_features(out, hb.blocks, dcfg, compute, device, feature_dtype)
        if expect_features and (first or last):
            aligned = _first_to_last_stage(aligned, hb.blocks, dcfg, device, feature_dtype)
        if not last:
            aligned = None
        inputs.append(DraftInputs.from_blocks(hb.blocks, aux, device=device, target_hidden=aligned,
                                              host_facts=hb.facts))
    return inputs, global_denominator(inputs, dp_group)


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
