"""Every rule about the flags of a run, checked once, before anything heavy (no weights, no
process groups). Each message names the flags. Rules that also hold for configs that do not
come from flags (a draft read from an export) live with those configs and are called from
here (:func:`megaspark.config.check_algorithm`, :func:`~megaspark.config.check_attention_flags`,
:func:`megaspark.models.dspark.te_spec.check_attention_supported`)."""

from __future__ import annotations

import os
import warnings

from megaspark import platform
from megaspark.algorithms import ALGORITHMS, DEFAULT_ALGORITHM, Algorithm
from megaspark.config import DSPARK_DEFAULTS, MLA_FLAGS, ConfigError, check_algorithm, check_attention_flags
from megaspark.errors import ArgumentError
from megaspark.fp8 import (DEFAULT_FP8_AMAX_COMPUTE_ALGO, DEFAULT_FP8_AMAX_HISTORY_LEN, DEFAULT_FP8_MARGIN,
                           FP8_AMAX_COMPUTE_ALGOS, FP8_FORMATS)
from megaspark.models.dspark import te_spec
from megaspark.targets.sglang_runtime import missing_message


def need(ok: bool, message: str) -> None:
    if not ok:
        raise ArgumentError(message)


def rules(check, *values) -> None:
    """Run a config rule on flag values; its :class:`ConfigError` becomes an ArgumentError."""
    try:
        check(*values)
    except ConfigError as e:
        raise ArgumentError(str(e)) from None


def validate_args(args, world_size: int) -> None:
    """Check every flag combination that can be checked without loading anything; fill in the
    derived values (DP size, micro-batches, the algorithm preset, FP8 defaults, target TP)."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    need(tp >= 1, "--tensor-model-parallel-size must be >= 1")
    need(pp >= 1, "--pipeline-model-parallel-size must be >= 1")
    need(
        world_size % (tp * pp) == 0,
        f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
        f"--pipeline-model-parallel-size {pp}",
    )
    dp = world_size // (tp * pp)
    args.data_parallel_size = dp
    need(args.micro_batch_size >= 1, "--micro-batch-size must be >= 1")
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    need(
        args.global_batch_size % (args.micro_batch_size * dp) == 0,
        f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
        f"{args.micro_batch_size} x data-parallel size {dp}",
    )
    args.num_microbatches = args.global_batch_size // (args.micro_batch_size * dp)
    need(args.seq_length >= 2, "--seq-length must be >= 2")
    need(args.pad_to_multiple >= 0, "--pad-to-multiple must be >= 0")
    if args.sequence_parallel:
        need(args.algorithm == "eagle3", "--sequence-parallel is built for --algorithm eagle3 only "
             "(the DSpark draft's layers are not sequence-parallel)")
        need(tp > 1, "--sequence-parallel needs --tensor-model-parallel-size > 1")
        need(args.seq_length % tp == 0 and args.pad_to_multiple % tp == 0,
             f"--sequence-parallel splits every micro-batch's sequence over {tp} TP ranks: --seq-length "
             f"{args.seq_length} and --pad-to-multiple {args.pad_to_multiple} must be divisible by {tp}")
    need(args.train_iters >= 1, "--train-iters must be >= 1")
    need(args.lr >= 0 and args.min_lr >= 0, "--lr and --min-lr must be >= 0")
    need(args.min_lr <= args.lr, f"--min-lr {args.min_lr} exceeds --lr {args.lr}")
    need(0 <= args.lr_warmup_fraction < 1, "--lr-warmup-fraction must be in [0, 1)")
    need(0 < args.lr_wsd_decay_fraction <= 1, "--lr-wsd-decay-fraction must be in (0, 1]")
    need(args.clip_grad >= 0, "--clip-grad must be >= 0 (0 disables clipping)")
    need(args.weight_decay >= 0, "--weight-decay must be >= 0")
    need(args.log_interval >= 1, "--log-interval must be >= 1")
    need(args.eval_iters >= 1, "--eval-iters must be >= 1")
    need(args.keep_last >= 1, "--keep-last must be >= 1")
    for flag in ("save_interval", "eval_interval", "exit_interval"):
        value = getattr(args, flag)
        need(value is None or value >= 1, f"--{flag.replace('_', '-')} must be >= 1")
    need(args.save_interval is None or args.save is not None,
         "--save-interval needs --save (a checkpoint directory)")
    need(args.exit_duration_in_mins is None or args.exit_duration_in_mins > 0,
         "--exit-duration-in-mins must be > 0")
    need(args.skip_nonfinite_steps >= 0, "--skip-nonfinite-steps must be >= 0")
    need(args.ttt_steps >= 1, "--ttt-steps must be >= 1")
    need(args.draft_vocab_size >= 1, "--draft-vocab-size must be >= 1")
    need(args.distributed_timeout_minutes > 0, "--distributed-timeout-minutes must be > 0")
    need(args.data_path is not None, "--data-path is required (run tools/prepare_data.py first)")
    need(os.path.isdir(args.data_path),
         f"--data-path {args.data_path} is not a directory (run tools/prepare_data.py first)")
    need(args.load is None or os.path.isdir(args.load),
         f"--load {args.load} is not a directory")
    need(args.load_hf_draft is None or os.path.isfile(os.path.join(args.load_hf_draft, "config.json")),
         f"--load-hf-draft {args.load_hf_draft} is not an HF draft directory (no config.json)")
    need(not (args.load and args.load_hf_draft),
         "--load (resume a run) and --load-hf-draft (start from exported weights) exclude each other")
    if args.target_layer_ids is not None:
        ids = args.target_layer_ids
        need(all(b > a for a, b in zip(ids, ids[1:])),
             f"--target-layer-ids must be strictly increasing, got {ids}")
    need(args.num_target_taps >= 1, "--num-target-taps must be >= 1")
    need(args.num_layers % pp == 0,
         f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size {pp}")
    need(args.num_layers >= pp,
         f"--pipeline-model-parallel-size {pp} exceeds --num-layers {args.num_layers}")
    args.virtual_pipeline_model_parallel_size = None
    vl = args.num_layers_per_virtual_pipeline_stage
    if vl is not None:
        need(pp > 1, "--num-layers-per-virtual-pipeline-stage needs "
             "--pipeline-model-parallel-size > 1")
        need(vl >= 1 and args.num_layers % (vl * pp) == 0,
             f"--num-layers {args.num_layers} is not divisible by "
             f"--num-layers-per-virtual-pipeline-stage {vl} x --pipeline-model-parallel-size {pp}")
        args.virtual_pipeline_model_parallel_size = args.num_layers // (vl * pp)
        if args.virtual_pipeline_model_parallel_size == 1:
            args.virtual_pipeline_model_parallel_size = None  # plain 1F1B
        else:
            need(args.num_microbatches % pp == 0,
                 f"the interleaved schedule needs the number of micro-batches per step "
                 f"({args.num_microbatches}) to be a multiple of --pipeline-model-parallel-size {pp}")
    conf_alpha_given = args.confidence_loss_alpha
    resolve_algorithm(args)
    if args.algorithm == "eagle3":
        need(pp == 1, "--algorithm eagle3: the draft is one layer; use --pipeline-model-parallel-size 1")
        need(args.target_layer_ids is None or len(args.target_layer_ids) == 3,
             f"--algorithm eagle3 taps 3 target layers, got --target-layer-ids {args.target_layer_ids}")
        need(args.fp8_format is None and args.transformer_impl != "transformer_engine",
             "--algorithm eagle3 is built from megatron-core's local layers: drop --fp8-format / "
             "--transformer-impl transformer_engine")
    need(args.confidence_head or not conf_alpha_given,
         f"--confidence-loss-alpha {conf_alpha_given} has no effect without a confidence head "
         f"(--algorithm {args.algorithm}{' / --no-confidence-head' if args.algorithm == 'dspark' else ''})")
    need(args.training_mode == "vp_drafter" or args.prefix_weight_base is None,
         "--prefix-weight-base only applies to --training-mode vp_drafter")
    if args.prefix_weight_base is None:
        args.prefix_weight_base = DSPARK_DEFAULTS["prefix_weight_base"]
    mla_given = {f: getattr(args, f) for f in MLA_FLAGS}
    rules(check_attention_flags, args.draft_attention, mla_given, args.num_query_groups, args.kv_channels)
    rules(check_algorithm, args.block_size, args.num_anchors, args.markov_rank, args.confidence_head,
          args.confidence_with_markov, args.slot_convention, args.training_mode, args.prefix_weight_base)
    args.transformer_impl_explicit = args.transformer_impl is not None
    if args.draft_attention == "mla":
        rules(te_spec.check_attention_supported, args.transformer_impl or te_spec.LOCAL, "mla")
        need(args.fp8_format is None, "--draft-attention mla is implemented for --transformer-impl local "
             "only, which has no FP8 GEMMs: drop --fp8-format")
        args.transformer_impl = te_spec.LOCAL
    validate_fp8_args(args)
    if args.device == "cuda":
        platform.require_gpu("--device cuda", "a CUDA device")
    need(args.memory_budget_gb is None or args.memory_budget_gb > 0, "--memory-budget-gb must be > 0")
    if args.target_backend == "sglang-server":
        platform.require_gpu("--target-backend sglang-server", "an SGLang server")
    need(args.target_tensor_parallel_size is None or args.target_backend == "sglang",
         "--target-tensor-parallel-size is read with --target-backend sglang only")
    ttp = args.target_tensor_parallel_size
    need(ttp is None or ttp in (1, tp),
         f"--target-tensor-parallel-size {ttp}: the co-located target runs either whole on TP rank 0 "
         f"(1) or sharded over the draft's tensor-parallel ranks ({tp})")
    # default: the target shares the draft's tensor-parallel ranks
    args.target_tp_resolved = (tp if ttp is None else ttp) if args.target_backend == "sglang" else 1
    if args.target_backend == "sglang":
        missing = missing_message("--target-backend sglang", "; or use --target-backend hf")
        need(missing is None, missing)
    need(args.target_backend != "offline" or args.hidden_states_dir is not None,
         "--target-backend offline needs --hidden-states-dir DIR (run tools/precompute_hidden_states.py)")
    need(args.hidden_states_dir is None or args.target_backend == "offline",
         "--hidden-states-dir is only read with --target-backend offline")
    need(args.hidden_states_dir is None
         or os.path.isfile(os.path.join(args.hidden_states_dir, "manifest.json")),
         f"--hidden-states-dir {args.hidden_states_dir} has no manifest.json: not a complete cache "
         "(run or finish tools/precompute_hidden_states.py)")
    if args.distributed_backend == "nccl":
        platform.require_gpu("--distributed-backend nccl", "NCCL")


def validate_fp8_args(args) -> None:
    """Check ``--transformer-impl`` and the FP8 flags; resolve their defaults in ``args``.

    Refused (message names the flags): FP8 tuning flags without ``--fp8-format``; an
    amax history < 1 or a negative margin; ``--fp8-format`` with ``--transformer-impl
    local``; ``--fp8-format`` or ``--transformer-impl transformer_engine`` without a GPU
    (``platform.require_gpu``, RuntimeError) or without an importable Transformer Engine
    (``TransformerEngineUnavailableError``). FP8 without ``--bf16`` is allowed with a
    warning (bf16 parameters are the recommended companion)."""
    fmt = getattr(args, "fp8_format", None)
    requested = getattr(args, "transformer_impl", None)
    margin = getattr(args, "fp8_margin", None)
    history = getattr(args, "fp8_amax_history_len", None)
    algo = getattr(args, "fp8_amax_compute_algo", None)

    need(requested is None or requested in te_spec.TRANSFORMER_IMPLS,
         f"--transformer-impl must be one of {', '.join(te_spec.TRANSFORMER_IMPLS)}, got {requested!r}")
    need(fmt is None or fmt in FP8_FORMATS,
         f"--fp8-format must be one of {', '.join(FP8_FORMATS)}, got {fmt!r}")
    if fmt is None:
        for flag, value in (("--fp8-margin", margin), ("--fp8-amax-history-len", history),
                            ("--fp8-amax-compute-algo", algo)):
            need(value is None, f"{flag} only applies to FP8 training: add --fp8-format "
                 "e4m3|hybrid or drop it")
    else:
        need(history is None or history >= 1,
             f"--fp8-amax-history-len must be >= 1, got {history}")
        need(margin is None or margin >= 0, f"--fp8-margin must be >= 0, got {margin}")
        need(algo is None or algo in FP8_AMAX_COMPUTE_ALGOS,
             f"--fp8-amax-compute-algo must be one of {', '.join(FP8_AMAX_COMPUTE_ALGOS)}, "
             f"got {algo!r}")
        need(requested != te_spec.LOCAL,
             f"--fp8-format {fmt} needs --transformer-impl transformer_engine: the local "
             "implementation (--transformer-impl local) has no FP8 GEMMs")
        platform.require_gpu("--fp8-format", "Transformer Engine FP8 GEMMs")
        te_spec.require_transformer_engine("--fp8-format")
        if not getattr(args, "bf16", False):
            warnings.warn(
                f"--fp8-format {fmt} without --bf16: FP8 GEMMs work, but everything outside "
                "them runs in fp32; --bf16 (bf16 parameters, fp32 master weights) is the "
                "recommended companion of FP8",
                UserWarning, stacklevel=2,
            )
        args.fp8_margin = DEFAULT_FP8_MARGIN if margin is None else margin
        args.fp8_amax_history_len = DEFAULT_FP8_AMAX_HISTORY_LEN if history is None else history
        args.fp8_amax_compute_algo = DEFAULT_FP8_AMAX_COMPUTE_ALGO if algo is None else algo
        requested = te_spec.TRANSFORMER_ENGINE

    if requested == te_spec.TRANSFORMER_ENGINE:
        te_spec.check_transformer_impl_usable(requested)
    args.transformer_impl = te_spec.resolve_transformer_impl(requested)


def resolve_algorithm(args) -> Algorithm:
    """Fill the preset's defaults into ``args`` (flags left at None) and check the pinned
    ones. Returns the algorithm; raises ArgumentError naming the flags on a contradiction."""
    name = args.algorithm
    if name is None:
        name = "dflash-original" if getattr(args, "training_mode", "standard") == "vp_drafter" \
            else DEFAULT_ALGORITHM
    if name not in ALGORITHMS:
        raise ArgumentError(f"--algorithm must be one of {sorted(ALGORITHMS)}, got {name!r}")
    algo = ALGORITHMS[name]
    for dest, (value, flag, why) in algo.pinned.items():
        given = getattr(args, dest)
        if given is not None and given != value:
            shown = flag if isinstance(given, bool) else f"{flag} {given}"
            other = "dflash" if dest == "slot_convention" else "dspark"
            raise ArgumentError(f"--algorithm {name}: {why}; drop {shown} (or use --algorithm {other})")
    for dest, value in algo.defaults.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    args.algorithm = name
    return algo
