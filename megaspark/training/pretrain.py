"""``pretrain``: start-up order of a run (the library half of ``pretrain_dspark.py``).

Flags are validated before anything heavy; then the target is resolved, the process groups
made, the draft's config derived from the target's (and checked), the memory plan checked,
the target built where it runs, the data checked against it, the resume point chosen, the
draft, DDP and optimizer built, and the loop run (docs/architecture.md, "Start-up").
"""

from __future__ import annotations

import torch

from megaspark import platform
from megaspark.arguments import parse_args
from megaspark.arguments.configs import run_config, target_spec
from megaspark.training.logging import print_line
from megaspark.training.startup import load_target, log0, open_datasets  # noqa: F401 (load_target: API)


def _attention_summary(dcfg) -> str:
    if getattr(dcfg, "attention_type", "gqa") == "mla":
        return (f"MLA {dcfg.num_attention_heads} heads (q rank {dcfg.q_lora_rank}, kv rank "
                f"{dcfg.kv_lora_rank}, qk {dcfg.qk_nope_head_dim}+{dcfg.qk_rope_head_dim}, v {dcfg.v_head_dim})")
    return f"heads {dcfg.num_attention_heads}/{dcfg.num_query_groups}x{dcfg.kv_channels}"


def check_memory_plan(args, dcfg, hf_config, runs_target: bool) -> None:
    """Print the start-up memory plan of every distinct rank role (rank 0) and refuse, on
    every rank, when one rank's plan exceeds its budget (--memory-budget-gb, else the GPU's
    memory; no limit on the CPU)."""
    from megatron.core import parallel_state

    from megaspark.arguments.configs import plan_settings
    from megaspark.memory_plan import MemoryPlanError, budget_bytes, plan_memory

    plan = plan_memory(plan_settings(args), dcfg, hf_config, tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                       pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
                       dp_size=args.data_parallel_size, computes_target=runs_target,
                       target_tp=args.target_tp_resolved)
    error = None
    try:
        plan.check(budget_bytes(args.memory_budget_gb, platform.compute_device()))
    except MemoryPlanError as e:
        error = str(e)
    rank = torch.distributed.get_rank()
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, (rank, plan.format(), error))
    if rank == 0:
        by_body: dict = {}  # ranks whose plans differ only in their TP rank print once
        for r, text, _ in gathered:
            head, _, body = text.partition("\n")
            by_body.setdefault(body, (head, []))[1].append(r)
        for body, (head, ranks) in by_body.items():
            print_line(f"{head} [ranks {', '.join(map(str, ranks))}]\n{body}")
    failed = [(r, e) for r, _, e in gathered if e is not None]
    if failed:
        r, e = failed[0]
        raise MemoryPlanError(f"rank {r}: {e}")


def draft_config(args, hf_config):
    """The draft's :class:`DSparkConfig` from the target's (text) config and the flags."""
    from megaspark.config import DSparkConfig

    overrides = dict(
        num_layers=args.num_layers, num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups, kv_channels=args.kv_channels,
        ffn_hidden_size=args.ffn_hidden_size, target_layer_ids=args.target_layer_ids,
        num_target_taps=args.num_target_taps, attention_type=args.draft_attention,
        q_lora_rank=args.q_lora_rank, kv_lora_rank=args.kv_lora_rank,
        qk_nope_head_dim=args.qk_nope_head_dim, qk_rope_head_dim=args.qk_rope_head_dim,
        v_head_dim=args.v_head_dim, qk_norm=None if getattr(args, "qk_norm", True) else False,
    )
    algorithm = dict(
        block_size=args.block_size, num_anchors=args.num_anchors, markov_rank=args.markov_rank,
        markov_head_type=args.markov_head_type, confidence_head=args.confidence_head,
        confidence_with_markov=args.confidence_with_markov and args.confidence_head,
        gamma=args.loss_decay_gamma if args.loss_decay_gamma > 0 else None,
        convention=args.slot_convention, truncate_eval_mask=args.truncate_eval_mask,
        alpha_ce=args.ce_loss_alpha, alpha_l1=args.l1_loss_alpha,
        alpha_conf=args.confidence_loss_alpha if args.confidence_head else 0.0,
        attention_backend=args.draft_attention_backend, attention_chunk_blocks=args.attention_chunk_blocks,
        loss_chunk_rows=args.loss_chunk_rows,
        training_mode=args.training_mode, prefix_weight_base=args.prefix_weight_base,
    )
    return DSparkConfig.from_hf_config(hf_config, **overrides, **algorithm)


def build_model_chunks(cfg, dcfg, model_provider):
    """This rank's model chunks (``model_provider(cfg, dcfg, ...)`` with a :class:`RunConfig`):
    one per virtual pipeline stage (one without interleaving). Only the very first chunk of
    the pipeline embeds, only the very last one has the heads."""
    from megatron.core import parallel_state

    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    chunks, tcfg = [], None
    for vp_stage in range(vpp or 1):
        stage = None if vpp is None else vp_stage
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        chunk, tcfg = model_provider(cfg, dcfg, pre_process=pre, post_process=post, vp_stage=stage)
        device = platform.compute_device()
        if device.type != "cpu":  # weights are initialised on the CPU (layout-independent)
            chunk.to(device)
        chunks.append(chunk)
    return chunks, tcfg


def pretrain(model_provider, forward_step, argv=None):
    from megaspark.parallel import initialize_distributed
    from megaspark.targets.hf import load_config_offline
    from megaspark.targets.builtin import default_mask_token_id, is_builtin, resolve_target
    from megaspark.checkpoint_files import read_state
    from megaspark.training.checkpointing import Checkpointer, choose_resume, prestart_checkpoint_writer
    from megaspark.training.trainer import Trainer, wrap_ddp

    import time

    started = time.time()
    args = parse_args(argv)
    args.start_time = started  # --exit-duration-in-mins counts from here
    from megaspark.training.resilience import install_early

    install_early(args.exit_signal_handler)  # an exit signal during start-up is kept for the first step

    # --- the target is resolved once: a local directory now (a cheap check of its config.json),
    # a built-in one converted on rank 0 once the process group exists ---
    target_path = None if is_builtin(args.target_model) else resolve_target(args.target_model)

    if args.save:
        prestart_checkpoint_writer()
    initialize_distributed(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        backend=args.distributed_backend,
        seed=args.seed,
        device=args.device,
        timeout_minutes=args.distributed_timeout_minutes,
    )
    torch.manual_seed(args.seed)
    if target_path is None:
        if torch.distributed.get_rank() == 0:
            resolve_target(args.target_model)  # converts the GGUF on first use
        torch.distributed.barrier()
        target_path = resolve_target(args.target_model)
    args.target_path = target_path
    hf_config = load_config_offline(target_path).get_text_config()

    dcfg = draft_config(args, hf_config)
    if args.algorithm == "eagle3":  # its attention shape is derived as the DSpark draft's
        from megaspark.training.eagle3 import run

        return run(args, hf_config, dcfg)
    if not dcfg.qk_norm and dcfg.attention_type == "gqa" and torch.distributed.get_rank() == 0:
        print_line("megaspark: warning: --no-qk-norm: the draft layers have no per-head q/k norms. "
                   "SGLang and vLLM build DSpark drafts with them and would serve this draft with norms "
                   "of weight 1 (still lossless, but proposing other tokens than trained: acceptance "
                   "collapses); its export gets a *DSparkModel name the engines do not load.")
    args.target_layer_ids_resolved = list(dcfg.target_layer_ids)
    if args.mask_token_id is not None:
        dcfg.mask_token_id = args.mask_token_id
    dcfg.validate(args.tensor_model_parallel_size)  # before any weights are loaded
    if dcfg.attention_type == "mla":  # e.g. a DeepSeek target without --draft-attention
        from megaspark.models.dspark.te_spec import LOCAL, check_attention_supported

        if not args.transformer_impl_explicit and args.fp8_format is None:
            args.transformer_impl = LOCAL
        check_attention_supported(args.transformer_impl, dcfg.attention_type)

    from megaspark.training.batches import computes_target

    args.target_dtype_resolved = platform.target_dtype(args.target_dtype, args.bf16, platform.compute_device())
    if args.target_backend == "sglang":
        from megaspark.targets.sglang_colocated import resolve_target_tp

        args.target_tp_resolved, note = resolve_target_tp(hf_config, args.target_tensor_parallel_size,
                                                          args.target_tp_resolved)
        if note and torch.distributed.get_rank() == 0:
            print_line(note)
    runs_target = computes_target(args.target_tp_resolved)
    from megaspark.targets.base import IN_PROCESS_BACKENDS

    check_memory_plan(args, dcfg, hf_config,  # before any weights
                      runs_target and args.target_backend in IN_PROCESS_BACKENDS)
    spec = target_spec(args)  # the target, resolved once
    target_info, target = load_target(spec, build=runs_target)
    if args.mask_token_id is None:
        dcfg.mask_token_id = default_mask_token_id(target_info.tokenizer, hf_config)
    else:
        dcfg.mask_token_id = args.mask_token_id
    dcfg.validate(args.tensor_model_parallel_size)

    meta, train_data, valid_data = open_datasets(args, target_info, hf_config, dcfg.vocab_size)
    cfg = run_config(args, target=spec)  # every flag resolved: the typed configs from here on
    checkpointer = Checkpointer(cfg, dcfg, target_info.fingerprint(), flags=vars(args))
    resume = choose_resume(cfg.checkpoint)
    if resume:
        checkpointer.check_compatible(read_state(resume))
        if args.load_hf_draft:  # a requeued run that began from an HF draft goes on from --save
            log0(f"megaspark: {args.load_hf_draft} is not loaded: the run resumes from {resume}")

    chunks, tcfg = build_model_chunks(cfg, dcfg, model_provider)
    for chunk in chunks:
        chunk.load_target_embedding_shards(target_info)
    if args.load_hf_draft and not resume:
        # before DDP/optimizer: they copy the parameters
        from megaspark.export.loading import load_hf_draft_weights

        load_hf_draft_weights(chunks, args.load_hf_draft, dcfg, target_fingerprint=target_info.fingerprint())
        log0(f"initialised the draft from {args.load_hf_draft}")
    ddp_chunks = wrap_ddp(chunks, tcfg, cfg.parallel.use_distributed_optimizer)
    trainer = Trainer(cfg, chunks, ddp_chunks, tcfg, dcfg, target, train_data, valid_data,
                      forward_step, pad_id=train_data.pad_id)
    if resume:
        checkpointer.load(trainer, resume)

    n_train = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
    log0(
        f"megaspark: target {args.target_model} ({hf_config.model_type}, {dcfg.num_target_layers} "
        f"layers, taps {dcfg.target_layer_ids}) | {args.algorithm}"
        f"{' (vp_drafter)' if dcfg.training_mode == 'vp_drafter' else ''}, convention "
        f"{dcfg.convention}: draft {dcfg.num_layers} layers, {_attention_summary(dcfg)}, block "
        f"{dcfg.block_size}, anchors {dcfg.num_anchors}, markov {dcfg.markov_rank}"
        f"{' ' + dcfg.markov_head_type if dcfg.has_markov else ''}, confidence "
        f"{'on' if dcfg.confidence_head else 'off'}, mask token {dcfg.mask_token_id} | TP {args.tensor_model_parallel_size} "
        f"PP {args.pipeline_model_parallel_size} DP {args.data_parallel_size}, "
        f"{args.num_microbatches} micro-batches/step | trainable params on this rank {n_train:,} | "
        f"data {len(train_data)} train / {len(valid_data) if valid_data else 0} valid "
        f"({meta.get('target', '?')})"
    )
    state = trainer.train(checkpointer if args.save else None)
    if state.exit_reason is None:
        log0(f"done: {state.iteration} iterations, best eval tau {state.best_eval_tau}")
    return trainer
