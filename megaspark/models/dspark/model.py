"""The DSpark draft model on megatron-core (DSPARK_SPEC.md §2; DESIGN.md §2).

Stage layout (``pre_process`` = first pipeline stage, ``post_process`` = last):

* first stage: frozen vocab-parallel embedding of the block input ids, the context
  projector ``C = RMSNorm(F · W_fcᵀ)`` (row-parallel fc), and the stage's hidden tensor
  ``[C; X⁰]`` of shape ``[S + N·B, b, H]``;
* every stage: its slice of the draft layers (global layer numbers, so checkpoints and
  exports do not depend on the pipeline split);
* last stage: final norm, frozen column-parallel LM head, Markov and confidence heads and
  the vocab-parallel losses (:mod:`megaspark.losses`).

Initialisation is layout-independent: every submodule is initialised from a CPU RNG seeded
by (seed, its global name), and megatron splits full master weights (with stride 2 for the
fused ``[k; v]`` and ``[gate; up]`` projections), so any (TP, PP) layout starts from the
same global weights. (The MLA draft's replicated latent projections draw from the same
seeded RNG, identically on every TP rank.)

The draft layers' attention is GQA or MLA (``DSparkConfig.attention_type``); RoPE covers the
whole head (GQA) or the ``qk_rope_head_dim`` part (MLA), with linear or YaRN scaling
(:meth:`DSparkModel.rope`).
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from megaspark.blocks import Blocks, align_to_blocks, dense_attention_mask
from megaspark.config import DSparkConfig
from megaspark.losses import LossSums, dspark_loss_sums
from megaspark.vocab_parallel_loss import RowGroups
from megaspark.models.dspark.attention import AttentionInputs
from megaspark.models.dspark.heads import ConfidenceHead, MarkovHead
from megaspark.models.dspark.layer import DSparkLayer
from megaspark.models.dspark.norms import RMSNorm
from megaspark.models.dspark.layer_specs import get_local_layer_spec
from megaspark.models.dspark.rope import rope_cos_sin


@contextlib.contextmanager
def seeded_init(seed: int, name: str):
    """Run module construction with the CPU RNG seeded from (seed, name); restore after."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(int.from_bytes(digest[:7], "little"))
    try:
        yield
    finally:
        torch.set_rng_state(state)


@dataclass
class DraftInputs:
    """One micro-batch as the draft consumes it (batch-first). Fields a stage does not
    need may be None: context_features/noise_ids on non-first stages, the label fields
    on non-last stages."""

    position_ids: torch.Tensor  # [b, S+N·B]
    context_lengths: torch.Tensor  # [b, N]
    keep: torch.Tensor  # [b, N]
    anchors: torch.Tensor  # [b, N]
    seq_len: int
    block_size: int
    context_features: Optional[torch.Tensor] = None  # [b, S, L·H]
    noise_ids: Optional[torch.Tensor] = None  # [b, N·B]
    labels: Optional[torch.Tensor] = None  # [b, N, B]
    prev_ids: Optional[torch.Tensor] = None
    weights: Optional[torch.Tensor] = None
    eval_mask: Optional[torch.Tensor] = None
    target_hidden: Optional[torch.Tensor] = None  # [b, N, B, H] aligned post-norm target state
    block_context_max: Optional[tuple] = None  # N host ints: max over the batch of a_j
    loss_rows: Optional[torch.Tensor] = None  # flat indices of the supervised slots (host-made)
    loss_groups: Optional[RowGroups] = None  # loss_rows sorted by target position, grouped

    def to(self, device) -> "DraftInputs":
        """Move every tensor field to ``device`` (tensors already there stay put)."""
        for name, value in vars(self).items():
            if isinstance(value, (torch.Tensor, RowGroups)):
                setattr(self, name, value.to(device, non_blocking=True))
        return self

    @staticmethod
    def host_facts(blocks: Blocks):
        """What the draft needs to know on the host, read from blocks that are still on the
        CPU: (``block_context_max``, ``loss_rows``, ``loss_groups``) — so that no shape in the
        step depends on device data. The rows come sorted by (sample, target position), the
        key of the target's distribution and of the previous token."""
        from megaspark.blocks import context_lengths
        from megaspark.losses import supervised_rows
        from megaspark.vocab_parallel_loss import group_rows

        lengths = context_lengths(blocks.anchors, blocks.keep)
        b = blocks.aligned_index.shape[0]
        keys = blocks.aligned_index + blocks.seq_len * torch.arange(b)[:, None, None]
        rows, groups = group_rows(supervised_rows(blocks.eval_mask), keys, blocks.prev_ids)
        return (tuple(lengths.amax(0).tolist()) if lengths.numel() else ()), rows, groups

    @classmethod
    def from_blocks(cls, blocks: Blocks, context_features=None, target_last_hidden=None, device=None,
                    target_hidden=None, host_facts=None):
        """Assemble inputs from block construction and the target's hidden states.
        ``target_last_hidden`` [b, S, H] is gathered at the aligned indices (§3.6);
        ``target_hidden`` [b, N, B, H] is that gather, already done elsewhere (e.g. on the
        first pipeline stage). ``device``: move the blocks there first (default: where the
        target's features are, else where the blocks are). ``host_facts``: see
        :meth:`host_facts` (read here from blocks still on the CPU when not given)."""
        from megaspark.blocks import context_lengths

        lengths = context_lengths(blocks.anchors, blocks.keep)
        block_max = rows = groups = None
        if host_facts is not None:
            block_max, rows, groups = host_facts
        elif lengths.device.type == "cpu":  # read before anything moves to the device
            block_max, rows, groups = cls.host_facts(blocks)
        if device is None:
            for t in (context_features, target_last_hidden, target_hidden):
                if t is not None:
                    device = t.device
                    break
        if device is not None and torch.device(device) != blocks.anchors.device:
            blocks = blocks.to(device)
            lengths = lengths.to(device, non_blocking=True)
            rows = None if rows is None else rows.to(device, non_blocking=True)
            groups = None if groups is None else groups.to(device, non_blocking=True)
        if target_last_hidden is not None:
            target_hidden = align_to_blocks(target_last_hidden, blocks.aligned_index)

        return cls(
            position_ids=blocks.position_ids,
            context_lengths=lengths,
            keep=blocks.keep,
            anchors=blocks.anchors,
            seq_len=blocks.seq_len,
            block_size=blocks.block_size,
            context_features=context_features,
            noise_ids=blocks.noise_ids,
            labels=blocks.labels,
            prev_ids=blocks.prev_ids,
            weights=blocks.weights,
            eval_mask=blocks.eval_mask,
            target_hidden=target_hidden,
            block_context_max=block_max,
            loss_rows=rows,
            loss_groups=groups,
        )


class DSparkModel(MegatronModule):
    def __init__(
        self,
        config,
        dspark_config: DSparkConfig,
        pre_process: bool = True,
        post_process: bool = True,
        layer_spec=None,
        seed: int = 1234,
        vp_stage: Optional[int] = None,
        initialize_frozen: bool = True,
    ):
        """``initialize_frozen=False``: the frozen embedding and LM head (copies of the
        target's, loaded right after) are allocated zero-filled instead of randomly
        initialised — at a 150k vocabulary that initialisation is most of start-up."""
        super().__init__(config=config)
        d = dspark_config
        self.dspark_config = d
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process = pre_process
        self.post_process = post_process
        self.share_embeddings_and_output_weights = False
        self.input_tensor = None
        self.layer_spec = layer_spec or get_local_layer_spec(d.qk_norm, d.attention_type)
        H, V = config.hidden_size, d.vocab_size

        frozen_config = config
        if not initialize_frozen:
            import dataclasses

            frozen_config = dataclasses.replace(config, perform_initialization=False)
        if pre_process:
            with seeded_init(seed, "embedding"):
                self.embedding = tensor_parallel.VocabParallelEmbedding(
                    V, H, init_method=config.init_method, config=frozen_config
                )
            with seeded_init(seed, "fc"):
                # Row-parallel: the replicated L·H input is split over TP, outputs summed.
                self.fc = tensor_parallel.RowParallelLinear(
                    d.context_width, H, config=config, init_method=config.init_method,
                    bias=False, input_is_parallel=False, skip_bias_add=False,
                )
            self.hidden_norm = RMSNorm(config, H, d.rms_norm_eps)

        first, count = self._layer_range(vp_stage)
        self.layer_offset = first
        layers = []
        for i in range(first, first + count):
            with seeded_init(seed, f"layers.{i}"):
                layers.append(DSparkLayer(config, d, self.layer_spec, layer_number=i))
        self.layers = torch.nn.ModuleList(layers)

        if post_process:
            self.final_layernorm = RMSNorm(config, H, d.rms_norm_eps)
            with seeded_init(seed, "output_layer"):
                self.output_layer = tensor_parallel.ColumnParallelLinear(
                    H, V, config=frozen_config, init_method=config.init_method, bias=False,
                    gather_output=False, skip_bias_add=False,
                )
            if d.has_markov:
                with seeded_init(seed, "markov_head"):
                    self.markov_head = MarkovHead(config, d)
            if d.confidence_head:
                with seeded_init(seed, "confidence_head"):
                    self.confidence_head = ConfidenceHead(config, d)
        # The target's embedding and LM head are frozen copies (DESIGN.md decision 5).
        for name in ("embedding", "output_layer"):
            module = getattr(self, name, None)
            if module is not None:
                module.weight.requires_grad_(False)
                if not initialize_frozen:
                    with torch.no_grad():
                        module.weight.zero_()

    # ------------------------------------------------------------------ layout
    def _layer_range(self, vp_stage: Optional[int]):
        n = self.dspark_config.num_layers
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        rank = parallel_state.get_pipeline_model_parallel_rank()
        vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1
        chunks = pp * vpp
        if n % chunks != 0:
            raise ValueError(
                f"--num-layers {n} is not divisible by the {chunks} pipeline model chunks "
                f"(--pipeline-model-parallel-size {pp} x virtual stages {vpp})"
            )
        per_chunk = n // chunks
        chunk = (vp_stage or 0) * pp + rank
        return chunk * per_chunk, per_chunk

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Layers are keyed by their *global* number, so a checkpoint written with one
        pipeline split loads with another (DESIGN.md decision 6)."""
        from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            sharded_state_dict_default,
        )

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        tp_group = parallel_state.get_tensor_model_parallel_group()
        sharded = {}
        for name, module in self.named_children():
            if name == "layers":
                for local, layer in enumerate(module):
                    # dict keys stay local (what load_state_dict expects); checkpoint keys
                    # use the global layer number
                    local_prefix = f"{prefix}layers.{local}."
                    layer_sd = layer.sharded_state_dict(local_prefix, sharded_offsets, metadata)
                    replace_prefix_for_sharding(
                        layer_sd, local_prefix, f"{prefix}layers.{layer.layer_number}.")
                    sharded.update(layer_sd)
            else:
                sharded.update(sharded_state_dict_default(
                    module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=tp_group))
        return sharded

    def set_input_tensor(self, input_tensor):
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    @property
    def vocab_start(self) -> int:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        return tp_rank * (self.dspark_config.vocab_size // tp)

    # ------------------------------------------------------------------ target weights
    @torch.no_grad()
    def load_target_embeddings(self, embedding: torch.Tensor, lm_head: torch.Tensor) -> None:
        """Copy this rank's vocab shard of the target's embedding / LM head ([V, H] each)."""
        d = self.dspark_config
        for name, full in (("embedding", embedding), ("output_layer", lm_head)):
            module = getattr(self, name, None)
            if module is None:
                continue
            if tuple(full.shape) != (d.vocab_size, self.config.hidden_size):
                raise ValueError(
                    f"target {name} has shape {tuple(full.shape)}, expected "
                    f"({d.vocab_size}, {self.config.hidden_size})"
                )
            rows = module.weight.shape[0]
            module.weight.copy_(full[self.vocab_start: self.vocab_start + rows].to(module.weight.dtype))

    @torch.no_grad()
    def load_target_embedding_shards(self, source) -> None:
        """Copy this rank's vocab shard of the target's embedding / LM head, reading only
        those rows: ``source.weight_rows(which, start, stop)`` (a
        :class:`megaspark.targets.checkpoint.TargetInfo`)."""
        d = self.dspark_config
        for name, which in (("embedding", "embedding"), ("output_layer", "lm_head")):
            module = getattr(self, name, None)
            if module is None:
                continue
            rows = module.weight.shape[0]
            shard = source.weight_rows(which, self.vocab_start, self.vocab_start + rows)
            if tuple(shard.shape) != (rows, self.config.hidden_size) or d.vocab_size != rows * (
                    d.vocab_size // rows):
                raise ValueError(
                    f"target {which} rows {self.vocab_start}:{self.vocab_start + rows} have shape "
                    f"{tuple(shard.shape)}, expected ({rows}, {self.config.hidden_size})")
            module.weight.copy_(shard.to(device=module.weight.device, dtype=module.weight.dtype))

    # ------------------------------------------------------------------ forward
    def rope(self, position_ids: torch.Tensor):
        """(cos, sin) [b, T, rotary dim] at ``position_ids``: the whole head (GQA) or the
        ``qk_rope_head_dim`` rope part (MLA), with linear or YaRN scaling."""
        d = self.dspark_config
        return rope_cos_sin(position_ids, d.rope_head_dim, d.rope_theta, d.rope_scaling_factor,
                            yarn=d.rope_yarn)

    def attention_inputs(self, inputs: DraftInputs) -> AttentionInputs:
        d = self.dspark_config
        cos, sin = self.rope(inputs.position_ids)
        dense = None
        if d.attention_backend == "dense":
            dense = dense_attention_mask(inputs.anchors, inputs.keep, inputs.seq_len, inputs.block_size)
        return AttentionInputs(
            cos=cos, sin=sin, context_lengths=inputs.context_lengths, keep=inputs.keep.bool(),
            seq_len=inputs.seq_len, block_size=inputs.block_size, dense_mask=dense,
            block_context_max=inputs.block_context_max,
        )

    def embed(self, inputs: DraftInputs) -> torch.Tensor:
        """First stage: [C; X⁰] as [S + N·B, b, H]."""
        features = inputs.context_features.transpose(0, 1).to(self.fc.weight.dtype)  # [S, b, L·H]
        context, _ = self.fc(features)
        context = self.hidden_norm(context)
        x0 = self.embedding(inputs.noise_ids).transpose(0, 1).to(context.dtype)  # [N·B, b, H]
        return torch.cat([context, x0], dim=0)

    def forward(self, inputs: DraftInputs):
        """Non-last stage: the hidden tensor for the next stage. Last stage: the draft hidden
        states h [b, N, B, H] if no labels were given, else the :class:`LossSums`."""
        from megaspark.fp8 import fp8_context

        hidden = self.embed(inputs) if self.pre_process else self.input_tensor
        attn_inputs = self.attention_inputs(inputs)
        with fp8_context(self.config):  # only the draft layers; heads and losses stay out
            for layer in self.layers:
                hidden = layer(hidden, attn_inputs)
        if not self.post_process:
            return hidden
        h = self.final_hidden(hidden, inputs)
        if inputs.labels is None:
            return h
        return self.loss_sums(h, inputs)

    @torch.no_grad()
    def inference_forward(self, context_features, context_positions, block_ids, block_positions,
                          cache: list) -> torch.Tensor:
        """One draft pass at inference (DSPARK_SPEC.md §7 step 2) on a single-stage model.

        context_features [b, Tn, L·H] of the positions verified since the last call (None
        or Tn = 0 if none) at ``context_positions`` [b, Tn]; block_ids/block_positions
        [b, B] (anchor then mask tokens at a…a+B−1). ``cache`` is a list with one dict per
        layer, updated in place (context K/V only — for MLA the compressed latent and rotated
        rope key; block K/V are never kept).
        Returns the draft hidden states h [b, B, H] after the final norm.
        """
        if not (self.pre_process and self.post_process):
            raise RuntimeError("inference_forward needs the whole draft on one stage (PP=1)")
        while len(cache) < len(self.layers):
            cache.append({})
        context = None
        rope = {}
        if context_features is not None and context_features.shape[1] > 0:
            feats = context_features.transpose(0, 1).to(self.fc.weight.dtype)
            context, _ = self.fc(feats)
            context = self.hidden_norm(context)
            rope["ctx_cos"], rope["ctx_sin"] = self.rope(context_positions)
        else:
            rope["ctx_cos"] = rope["ctx_sin"] = None
        rope["blk_cos"], rope["blk_sin"] = self.rope(block_positions)
        x = self.embedding(block_ids).transpose(0, 1).to(self.fc.weight.dtype)  # [B, b, H]
        for layer, layer_cache in zip(self.layers, cache):
            x = layer.forward_cached(context, x, rope, layer_cache)
        return self.final_layernorm(x).transpose(0, 1)

    @staticmethod
    def crop_cache(cache: list, length: int) -> None:
        """Drop cached context beyond ``length`` positions (e.g. after a rejection). Every
        cached tensor (GQA ``k``/``v``, MLA ``latent``/``k_pe``) has the sequence on dim 2."""
        for layer_cache in cache:
            for key, value in list(layer_cache.items()):
                layer_cache[key] = value[:, :, :length]

    def final_hidden(self, hidden: torch.Tensor, inputs: DraftInputs) -> torch.Tensor:
        x = self.final_layernorm(hidden[inputs.seq_len:])  # [N·B, b, H]
        b = x.shape[1]
        return x.transpose(0, 1).reshape(b, -1, inputs.block_size, x.shape[-1])

    def heads(self, h: torch.Tensor, prev_ids: torch.Tensor):
        """(Markov features f, W1[prev] e, confidence logits) for block-shaped h."""
        d = self.dspark_config
        feat = e = conf = None
        if d.has_markov:
            feat, e = self.markov_head.features(h, prev_ids)
        if d.confidence_head:
            conf = self.confidence_head(h, e)
        return feat, e, conf

    def loss_sums(self, h: torch.Tensor, inputs: DraftInputs) -> LossSums:
        d = self.dspark_config
        feat, _, conf = self.heads(h, inputs.prev_ids)
        needs_target = d.alpha_l1 > 0 or d.confidence_head
        if needs_target and inputs.target_hidden is None:
            raise ValueError(
                "the L1 and confidence losses need the target's last hidden state "
                "(DraftInputs.target_hidden)"
            )
        return dspark_loss_sums(
            h,
            inputs.labels,
            inputs.weights,
            inputs.eval_mask,
            inputs.keep,
            self.output_layer.weight,
            feat=feat,
            w2=self.markov_head.w2_local() if d.has_markov else None,
            target_hidden=inputs.target_hidden,
            confidence_logits=conf,
            vocab_start=self.vocab_start,
            group=parallel_state.get_tensor_model_parallel_group(),
            chunk_rows=d.loss_chunk_rows,
            first_slot=0 if d.convention == "S" else 1,
            rows=inputs.loss_rows,
            # L1 and the target's logits only where the objective or an evaluation uses them
            need_l1=inputs.target_hidden is not None and (
                d.alpha_l1 > 0 or d.confidence_head or not torch.is_grad_enabled()),
            alphas=(d.alpha_ce, d.alpha_l1),
            groups=inputs.loss_groups,
            feat_by_prev=d.markov_head_type == "vanilla",
        )
