"""From token batches to draft inputs: anchors, blocks, target hidden states, denominator.

One optimizer step on one data-parallel rank consumes ``num_microbatches`` micro-batches.
Their blocks are built on the host up front (:func:`build_host_blocks`), because the loss
denominator is global (DESIGN.md decision 3): Σω over every micro-batch of the step on every
DP rank, which depends only on the data and the sampled anchors, so it is known before any
forward. The device inputs, target features included, are built per micro-batch when the
schedule asks for them (:class:`StepInputs`).

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
    attention_mask: Optional[torch.Tensor] = None  # [b, S], 1 on real tokens (right padding)


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


def computes_target(target_tp: int = 1) -> bool:
    """Whether this rank runs the target: TP rank 0 of the first pipeline stage, once per
    model replica, whose TP peers receive the features by broadcast; or, with a
    tensor-parallel target (``target_tp`` = the TP size, ``--target-tensor-parallel-size``),
    every TP rank of the first stage, each of which gets the whole features. The last stage
    receives the aligned last hidden state from the first (:func:`prepare_micro_batches`)."""
    from megatron.core import parallel_state

    return (parallel_state.is_pipeline_first_stage(ignore_virtual=True)
            and (target_tp > 1 or parallel_state.get_tensor_model_parallel_rank() == 0))


def _first_stage_features(output, blocks, dcfg: DSparkConfig, compute: bool, device, dtype,
                          broadcast: bool = True):
    """On the first pipeline stage: (aux [b, S, L·H], aligned last hidden [b, N, B, H]) on
    ``device`` in ``dtype``, computed on TP rank 0 and broadcast to its TP peers (the target
    runs once per TP group), or computed on every TP rank (``broadcast=False``)."""
    from megatron.core import parallel_state

    aligned_index = blocks.aligned_index.to(device, non_blocking=True)
    if compute:
        aux = output.aux_hidden_states.to(device=device, dtype=dtype).contiguous()
        last = output.last_hidden_states.to(device=device, dtype=dtype)
        aligned = align_to_blocks(last, aligned_index).contiguous()
    group = parallel_state.get_tensor_model_parallel_group()
    if not broadcast or torch.distributed.get_world_size(group) == 1:
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


def global_denominator(inputs: list, group=None) -> torch.Tensor:
    """Σω over the given micro-batches (DraftInputs), summed over ``group`` (the DP group)."""
    device = inputs[0].weights.device if inputs else torch.device("cpu")
    return _all_reduce_sum(sum((x.weights.double().sum() for x in inputs),
                               torch.zeros((), dtype=torch.float64, device=device)), group)


def host_denominator(host_blocks: list, group=None, device=None) -> torch.Tensor:
    """Σω over a step's micro-batches from their host blocks (exactly the same sum as
    :func:`global_denominator`), moved to ``device`` and summed over ``group``."""
    total = torch.zeros((), dtype=torch.float64)
    for hb in host_blocks:
        total += hb.blocks.weights.double().sum()
    return _all_reduce_sum(total.to(device) if device is not None else total, group)


def _all_reduce_sum(total: torch.Tensor, group) -> torch.Tensor:
    if group is not None and torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(total, group=group)  # nccl needs a device tensor: it is one
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
    """Every micro-batch's draft inputs at once, and the global denominator (tools and tests;
    the trainer streams them with :class:`StepInputs`)."""
    step = StepInputs(build_host_blocks(micro_batches, dcfg, seed, training), dcfg, target, dp_group,
                      device=device, feature_dtype=feature_dtype, expect_features=expect_features)
    it = step.iterator()
    return [next(it) for _ in range(len(step))], step.denominator


class StepInputs:
    """One step's micro-batches, turned into device inputs one at a time.

    The host half (blocks of every micro-batch) is done up front, and so is the global
    denominator Σω (DESIGN.md decision 3), which needs only the blocks. The target then runs
    per micro-batch, when the schedule asks for it (``get_batch``), so a rank holds the
    features of the micro-batches in flight rather than of the whole step:

    * first pipeline stage: TP rank 0 runs the target; its TP peers receive the tapped
      features ``[b, S, L·H]`` and the aligned last hidden state ``[b, N, B, H]`` by
      broadcast (the target runs once per TP group); every TP rank then sends the aligned
      state to its peer on the last stage with a non-blocking send on the group of the
      first and last stages (a communicator of its own, apart from the schedule's);
    * last stage: receives the aligned state, the receive for the next micro-batch posted
      as soon as the current one is taken;
    * middle stages: blocks only.

    On a GPU the next micro-batch's features are computed ahead on a side stream while the
    draft works on the current one (one micro-batch of prefetch). Several model chunks of a
    rank (interleaved pipelining) share the inputs of a micro-batch: the first chunk to ask
    builds them. Nothing here reads device data back to the host.
    """

    def __init__(self, host_blocks: list, dcfg: DSparkConfig, target=None, dp_group=None, *,
                 device=None, feature_dtype: torch.dtype = torch.float32,
                 expect_features: Optional[bool] = None, chunks: int = 1, annotate: Optional[dict] = None,
                 target_tp: int = 1):
        from megatron.core import parallel_state

        from megaspark import platform

        self.host = host_blocks
        self.dcfg = dcfg
        self.target = target
        self.device = torch.device(device) if device is not None else platform.compute_device()
        self.dtype = feature_dtype
        self.features = target is not None if expect_features is None else expect_features
        self.first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
        self.last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        self.compute = computes_target(target_tp)
        self.shared_target = target_tp > 1  # every TP rank runs the (sharded) target
        if self.features and self.compute and target is None:
            raise ValueError("this rank computes the target's features but was given no target")
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        self.pipe_group = parallel_state.get_embedding_group() if (self.features and pp > 1) else None
        if self.pipe_group is not None:
            self.first_rank = parallel_state.get_pipeline_model_parallel_first_rank()
            self.last_rank = parallel_state.get_pipeline_model_parallel_last_rank()
        self.chunks = chunks
        self.denominator = host_denominator(host_blocks, dp_group, self.device)
        # set on every micro-batch's inputs (what loss_func reads besides the tensors)
        self.annotate = dict(annotate or {}, global_denominator=self.denominator)
        self._built: dict = {}  # micro-batch -> [inputs, chunks that have not taken it yet]
        self._sends: list = []
        self._recvs: dict = {}
        # a tensor-parallel target runs its own collectives: on a side stream they could
        # interleave with the draft's TP collectives differently on different ranks (a
        # deadlock), so it computes on the current stream
        self._side = (torch.cuda.Stream(self.device) if self.device.type == "cuda" and self.first
                      and self.features and not self.shared_target else None)
        self._ahead: dict = {}  # micro-batch -> (aux, aligned) computed on the side stream
        if self.last and self.pipe_group is not None and not self.first:
            self._post_recv(0)

    def __len__(self) -> int:
        return len(self.host)

    def iterator(self):
        """An iterator over the micro-batches, one per model chunk of this rank."""
        for i in range(len(self.host)):
            yield self.take(i)

    def take(self, i: int):
        if i not in self._built:
            self._built[i] = [self._build(i), self.chunks]
        entry = self._built[i]
        entry[1] -= 1
        if entry[1] == 0:
            del self._built[i]
        if i == len(self.host) - 1 and not self._built:
            self.finish()
        return entry[0]

    def finish(self) -> None:
        """Wait for the last sends of the step (their buffers must outlive them)."""
        for work in self._sends:
            work.wait()
        self._sends.clear()

    # ------------------------------------------------------------------ per micro-batch
    def _build(self, i: int):
        hb = self.host[i]
        aux = aligned = None
        if self.features and self.first:
            aux, aligned = self._ahead.pop(i) if i in self._ahead else self._first_stage(i)
            if self._side is not None:
                torch.cuda.current_stream(self.device).wait_stream(self._side)
                for t in (aux, aligned):
                    t.record_stream(torch.cuda.current_stream(self.device))
                if i + 1 < len(self.host):  # one micro-batch of prefetch, on the side stream
                    with torch.cuda.stream(self._side):
                        self._ahead[i + 1] = self._first_stage(i + 1)
            if self.pipe_group is not None and not self.last:
                self._sends.append(torch.distributed.isend(aligned, dst=self.last_rank, group=self.pipe_group))
        if self.features and self.last and not self.first:
            aligned, work = self._recvs.pop(i)
            work.wait()
            if i + 1 < len(self.host):
                self._post_recv(i + 1)
        if not self.last:
            aligned = None
        inputs = DraftInputs.from_blocks(hb.blocks, aux, device=self.device, target_hidden=aligned,
                                         host_facts=hb.facts)
        for name, value in self.annotate.items():
            setattr(inputs, name, value)
        return inputs

    def _first_stage(self, i: int):
        hb = self.host[i]
        out = None
        if self.compute:
            mb = hb.micro_batch
            # a target that packs samples (SGLang) skips the padding; HF computes the padded
            # batch unmasked (right padding is invisible to causal attention)
            mask = mb.attention_mask if getattr(self.target, "skips_padding", False) else None
            with contextlib.nullcontext() if self.shared_target else _borrow_tp_peers_threads():
                out = self.target.compute(mb.input_ids) if mask is None else self.target.compute(mb.input_ids, mask)
        return _first_stage_features(out, hb.blocks, self.dcfg, self.compute, self.device, self.dtype,
                                     broadcast=not self.shared_target)

    def _post_recv(self, i: int) -> None:
        blocks = self.host[i].blocks
        buf = torch.empty(blocks.batch_size, blocks.num_anchors, blocks.block_size, self.dcfg.hidden_size,
                          device=self.device, dtype=self.dtype)
        self._recvs[i] = (buf, torch.distributed.irecv(buf, src=self.first_rank, group=self.pipe_group))


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


def padded_length(lengths, seq_length: int, multiple: int) -> int:
    """Length a micro-batch is padded to: its longest sample (at most ``seq_length``) rounded
    up to ``multiple`` and capped at ``seq_length``; ``multiple = 0``: ``seq_length``."""
    if not multiple:
        return int(seq_length)
    longest = min(max(int(n) for n in lengths), int(seq_length))
    return min(int(seq_length), -(-longest // multiple) * multiple)


def collate_micro_batch(samples: list, seq_length: int, pad_id: int, stream_positions: list,
                        pad_multiple: int = 0) -> MicroBatch:
    """Truncate to ``seq_length`` and pad to :func:`padded_length` (no padding waste: the
    blocks, the target and the draft see only the micro-batch's own length)."""
    from megaspark.data.dataset import collate

    S = padded_length([len(s["input_ids"]) for s in samples], seq_length, pad_multiple)
    batch = collate(samples, S, pad_id)
    return MicroBatch(batch["input_ids"], batch["loss_mask"], list(stream_positions),
                      batch["attention_mask"])
