"""``--algorithm eagle3`` on the training loop: the draft, its step inputs and its
loss, plugged into :class:`megaspark.training.trainer.Trainer`.

One step: every micro-batch's target features are computed (on the ranks that run the
target, then broadcast to their tensor-parallel peers), the soft labels and step masks
derived from the target's last hidden state (:meth:`Eagle3Draft.labels`), and the global
denominator Σ_t 0.8^t Σ_p m_t all-reduced over data parallelism before the first forward,
exactly as DSpark's shared denominator (each micro-batch's loss is ``num / D_global · M ·
DP``). Tensor and data parallelism; one pipeline stage (the draft is one layer).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
import torch

from megaspark.models.eagle3.model import Eagle3Config, Eagle3Draft
from megaspark.training.trainer import Trainer


def default_layer_ids(num_target_layers: int) -> list:
    """Eagle3's taps: a low, a middle and a high layer (output of layer k), as EAGLE-3 and
    SpecForge pick them: ``[1, N/2 − 1, N − 4]``."""
    N = int(num_target_layers)
    ids = [1, N // 2 - 1, N - 4]
    if N < 6 or len(set(ids)) != 3:
        raise ValueError(f"a target with {N} layers is too shallow for Eagle3's three taps; give "
                         "--target-layer-ids explicitly")
    return ids


def eagle3_config(args, hf_config, d) -> Eagle3Config:
    """The draft's shape from the target's config and the flags, derived exactly as the
    DSpark draft's attention (:meth:`megaspark.config.DSparkConfig.from_hf_config`): the
    target's hidden size and heads (a TP-friendly head shape of the same width when the
    target's head counts are odd, e.g. SmolLM2's 9/3), ``--draft-attention mla`` (the
    default for DeepSeek targets) with DeepSeek-V3's latent-attention dims and YaRN, the
    target's FFN (a DeepSeek target's dense one) unless overridden. ``d``: the
    :class:`~megaspark.config.DSparkConfig` the flags give (``pretrain.draft_config``)."""
    H = int(hf_config.hidden_size)
    V = int(hf_config.vocab_size)
    mla = {}
    if d.is_mla:
        mla = dict(attention_type="mla", q_lora_rank=d.q_lora_rank, kv_lora_rank=d.kv_lora_rank,
                   qk_nope_head_dim=d.qk_nope_head_dim, qk_rope_head_dim=d.qk_rope_head_dim,
                   v_head_dim=d.v_head_dim, rope_yarn=d.rope_yarn)
    return Eagle3Config(
        **mla, hidden_size=H, num_attention_heads=d.num_attention_heads,
        num_query_groups=d.num_attention_heads if d.is_mla else d.num_query_groups,
        kv_channels=d.qk_rope_head_dim if d.is_mla else d.kv_channels,
        ffn_hidden_size=d.ffn_hidden_size, vocab_size=V, draft_vocab_size=min(int(args.draft_vocab_size), V),
        rms_norm_eps=d.rms_norm_eps, rope_theta=d.rope_theta, ttt_steps=int(args.ttt_steps),
    ).validate(args.tensor_model_parallel_size)


def build_draft(args, e: Eagle3Config, draft_to_target, target_info) -> Eagle3Draft:
    from megaspark import platform

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = Eagle3Draft(e.transformer_config(args.tensor_model_parallel_size, params_dtype=dtype,
                                             sequence_parallel=args.sequence_parallel), e,
                        draft_to_target, seed=args.seed)
    model.load_target_weights(target_info)
    return model.to(platform.compute_device())


@dataclass
class Eagle3Batch:
    input_ids: torch.Tensor  # [b, S]
    loss_mask: torch.Tensor  # [b, S]
    aux: torch.Tensor  # [S, b, 3H]
    labels: dict
    global_denominator: torch.Tensor
    loss_scale: float
    sample_ids: list


class Eagle3Step:
    """The step's micro-batches with their target features, labels and the global
    denominator (see the module docstring)."""

    def __init__(self, micro, model: Eagle3Draft, target, dp_group, device, dtype, loss_scale: float):
        from megatron.core import parallel_state

        from megaspark.training.batches import computes_target

        tp = parallel_state.get_tensor_model_parallel_world_size()
        tp_group = parallel_state.get_tensor_model_parallel_group()
        src = parallel_state.get_tensor_model_parallel_src_rank()
        runs = computes_target(1)
        H = model.eagle3_config.hidden_size
        self.batches = []
        den = torch.zeros((), dtype=torch.float32, device=device)
        for mb in micro:
            b, S = mb.input_ids.shape
            if runs:
                out = target.compute(mb.input_ids)
                aux = out.aux_hidden_states.to(device=device, dtype=dtype)
                last = out.last_hidden_states.to(device=device, dtype=dtype)
            else:
                aux = torch.empty(b, S, 3 * H, device=device, dtype=dtype)
                last = torch.empty(b, S, H, device=device, dtype=dtype)
            if tp > 1:
                torch.distributed.broadcast(aux, src=src, group=tp_group)
                torch.distributed.broadcast(last, src=src, group=tp_group)
            ids, mask = mb.input_ids.to(device), mb.loss_mask.to(device)
            labels = model.labels(last.transpose(0, 1).contiguous())
            den += model.denominator(mask, labels)
            self.batches.append(Eagle3Batch(ids, mask, aux.transpose(0, 1).contiguous(), labels, den,
                                            loss_scale, list(mb.stream_positions)))
        if dp_group is not None and torch.distributed.get_world_size(dp_group) > 1:
            torch.distributed.all_reduce(den, group=dp_group)
        for batch in self.batches:
            batch.global_denominator = den

    def __len__(self) -> int:
        return len(self.batches)

    def iterator(self):
        return iter(self.batches)


def _loss(batch: Eagle3Batch, model: Eagle3Draft, logits):
    sums = model.loss_sums(logits, batch.input_ids, batch.loss_mask, labels=batch.labels)
    loss = sums["num"] / batch.global_denominator * batch.loss_scale
    metrics = {"eagle3_ce": (sums["num"].detach(), sums["den"].detach()),
               "tau": (sums["positions"] + sums["chain"], sums["positions"].to(torch.float64))}
    for t in range(len(logits)):
        metrics[f"accept_rate@{t}"] = (sums["correct"][t], sums["count"][t])
    return loss, {"metrics": metrics}


def forward_step(data_iterator, model):
    """Megatron's ``forward_step_func`` for Eagle3 (one micro-batch)."""
    batch = next(data_iterator)
    unwrapped = model.module if hasattr(model, "module") else model
    logits = model(batch.input_ids, batch.aux)
    return logits, partial(_loss, batch, unwrapped)


class Eagle3Trainer(Trainer):
    """The shared loop with Eagle3's step inputs and loss."""

    def _prepare(self, micro, training: bool):
        chunk = self.chunks[0]
        return Eagle3Step(micro, chunk, self.target, self.dp_group, self.device,
                          self.cfg.target.dtype, loss_scale=float(len(micro) * self.dp_size))

    def _schedule_seq_length(self, step) -> int:
        return max(b.input_ids.shape[1] for b in step.batches)

    def _combined_loss(self, metrics: dict) -> float:
        return metrics.get("eagle3_ce", float("nan"))


def run(args, hf_config, dcfg):
    """``pretrain`` for ``--algorithm eagle3``, after the process groups exist: target,
    draft vocabulary (rank 0 counts the training split's supervised tokens), draft, data,
    resume, loop."""
    from megaspark import platform
    from megaspark.arguments.configs import run_config, target_spec
    from megaspark.checkpoint_files import read_state
    from megaspark.data.draft_vocab import select_draft_vocab, supervised_token_counts
    from megaspark.training.batches import computes_target
    from megaspark.training.checkpointing import Checkpointer, choose_resume
    from megaspark.training.startup import load_target, log0, open_datasets
    from megaspark.training.trainer import wrap_ddp

    e = eagle3_config(args, hf_config, dcfg)
    args.target_layer_ids_resolved = list(args.target_layer_ids or default_layer_ids(hf_config.num_hidden_layers))
    args.target_dtype_resolved = platform.target_dtype(args.target_dtype, args.bf16, platform.compute_device())
    args.target_tp_resolved = 1
    spec = target_spec(args)  # the target, resolved once
    target_info, target = load_target(spec, build=computes_target(1))
    meta, train_data, valid_data = open_datasets(args, target_info, hf_config, e.vocab_size)
    ids = [None, None]
    if torch.distributed.get_rank() == 0:
        try:
            counts = supervised_token_counts(args.data_path, e.vocab_size)
            ids = [select_draft_vocab(counts, e.draft_vocab_size).draft_to_target, None]
        except Exception as err:  # noqa: BLE001 - every rank must hear of it, not wait
            ids = [None, f"choosing the draft vocabulary from {args.data_path} failed: {err}"]
    torch.distributed.broadcast_object_list(ids, src=0)
    if ids[1] is not None:
        raise ValueError(ids[1])
    model = build_draft(args, e, ids[0], target_info)
    cfg = run_config(args, target=spec)  # every flag resolved: the typed configs from here on
    checkpointer = Checkpointer(cfg, e, target_info.fingerprint(), flags=vars(args))
    resume = choose_resume(cfg.checkpoint)
    if resume:
        checkpointer.check_compatible(read_state(resume))
    tcfg = model.config
    ddp = wrap_ddp([model], tcfg, cfg.parallel.use_distributed_optimizer)
    trainer = Eagle3Trainer(cfg, [model], ddp, tcfg, e, target, train_data, valid_data, forward_step,
                            pad_id=train_data.pad_id)
    if resume:
        checkpointer.load(trainer, resume)
        model.set_draft_vocab(model.draft_to_target)  # the checkpoint's vocabulary rules
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log0(f"megaspark: target {args.target_model} ({hf_config.model_type}, {hf_config.num_hidden_layers} layers, "
          f"taps {args.target_layer_ids_resolved}) | eagle3: H {e.hidden_size}, "
          + (f"MLA {e.num_attention_heads} heads, latent {e.kv_lora_rank}, nope/rope/v {e.qk_nope_head_dim}/"
             f"{e.qk_rope_head_dim}/{e.v_head_dim}" if e.is_mla else
             f"heads {e.num_attention_heads}/{e.num_query_groups}x{e.kv_channels}")
          + f", FFN {e.ffn_hidden_size}, draft vocabulary {e.draft_vocab_size} "
          f"of {e.vocab_size}, TTT steps {e.ttt_steps} | TP {args.tensor_model_parallel_size} DP "
          f"{args.data_parallel_size}, {args.num_microbatches} micro-batches/step | trainable params on "
          f"this rank {n_train:,} | data {len(train_data)} train / {len(valid_data) if valid_data else 0} "
          f"valid ({meta.get('target', '?')})")
    state = trainer.train(checkpointer if args.save else None)
    if state.exit_reason is None:
        log0(f"done: {state.iteration} iterations, best eval tau {state.best_eval_tau}")
    return trainer


__all__ = ["default_layer_ids", "eagle3_config", "build_draft", "Eagle3Step", "Eagle3Trainer", "forward_step"]
