"""FP8 training flags: validation, TransformerConfig translation and the autocast context
(DESIGN.md §1 decision 7).

Flags (Megatron-LM names)::

    --transformer-impl local|transformer_engine   default: transformer_engine when TE imports
                                                  and a GPU is present, else local
    --fp8-format e4m3|hybrid                      off by default
    --fp8-margin N                                default 0
    --fp8-amax-history-len N                      default 1024
    --fp8-amax-compute-algo max|most_recent       default max

FP8 uses Transformer Engine's *delayed scaling* recipe (megatron's ``fp8_recipe=
"delayed"``) through megatron-core's own ``megatron.core.fp8_utils.get_fp8_context``
(present with the same signature in megatron-core 0.16.1 and 0.19.2), which builds
``TEDelayedScaling(margin=fp8_margin, fp8_format=E4M3|HYBRID, amax_history_len=...,
amax_compute_algo=...)`` and enters ``transformer_engine.pytorch.fp8_autocast(enabled=True,
fp8_recipe=..., fp8_group=<amax reduction group: TP x DP (x CP)>)``.

Where FP8 applies (and where it must not)
-----------------------------------------
Only inside the draft layers: wrap the layer loop of ``DSparkModel.forward`` in
:func:`fp8_context`, exactly like megatron's ``TransformerBlock`` wraps its layers with one
outer context for the delayed recipe::

    attn_inputs = self.attention_inputs(inputs)
    with fp8_context(self.config):
        for layer in self.layers:
            hidden = layer(hidden, attn_inputs)

Inside, only the TE linears (q, kv, proj, fc1, fc2) run FP8 GEMMs; the RMSNorms, RoPE
and the fp32 block attention are plain torch and unaffected. The frozen embedding, the
context projector ``fc``, the final norm, the frozen LM head, the Markov/confidence heads
and every loss (softmax, CE, L1, BCE in fp32) stay outside. ``inference_forward`` /
``forward_cached`` must not be wrapped: a block of B rows is not a multiple of 8 rows,
which FP8 GEMMs require.

The TE linears' FP8 weight cache is refreshed by megatron's pipeline schedules through
``MegatronModule.set_is_first_microbatch()`` (called when ``config.fp8`` is set, on the
first micro-batch of each step), which ``DSparkModel`` inherits.
"""

from __future__ import annotations

import contextlib
import warnings

FP8_FORMATS = ("e4m3", "hybrid")
FP8_AMAX_COMPUTE_ALGOS = ("max", "most_recent")
DEFAULT_FP8_AMAX_HISTORY_LEN = 1024
DEFAULT_FP8_AMAX_COMPUTE_ALGO = "max"
DEFAULT_FP8_MARGIN = 0
FP8_RECIPE = "delayed"
# TE's FP8 GEMM: for inputs and weights, rows (product of all but the last dim) % 8 == 0
# and the last dim % 16 == 0 (transformer_engine.pytorch.utils.assert_dim_for_fp8_exec).
FP8_ROW_MULTIPLE = 8
FP8_COL_MULTIPLE = 16


def _argument_error(message: str):
    from megaspark.arguments import ArgumentError  # lazy: arguments imports this module

    return ArgumentError(message)


def add_fp8_arguments(parser) -> None:
    """Add ``--transformer-impl`` and the FP8 flags (replaces arguments.py's --fp8-format)."""
    from megaspark.models.dspark.te_spec import TRANSFORMER_IMPLS

    g = parser.add_argument_group("Transformer Engine and FP8 (GPU)")
    g.add_argument(
        "--transformer-impl", default=None, choices=list(TRANSFORMER_IMPLS),
        help="draft layer GEMMs: megatron-core's local linears, or Transformer Engine's "
        "(needed for FP8). Default: transformer_engine when TE imports and a GPU is "
        "present, else local. Checkpoints and exports are the same with either.",
    )
    g.add_argument(
        "--fp8-format", default=None, choices=list(FP8_FORMATS),
        help="FP8 training of the draft layers' GEMMs through Transformer Engine (GPU, "
        "--transformer-impl transformer_engine; use with --bf16): e4m3 everywhere, or "
        "hybrid (e4m3 forward, e5m2 gradients)",
    )
    g.add_argument(
        "--fp8-margin", type=int, default=None,
        help=f"FP8 delayed scaling: margin of the scaling factor (default {DEFAULT_FP8_MARGIN}; "
        "needs --fp8-format)",
    )
    g.add_argument(
        "--fp8-amax-history-len", type=int, default=None,
        help=f"FP8 delayed scaling: amax history length (default {DEFAULT_FP8_AMAX_HISTORY_LEN}; "
        "needs --fp8-format)",
    )
    g.add_argument(
        "--fp8-amax-compute-algo", default=None, choices=list(FP8_AMAX_COMPUTE_ALGOS),
        help=f"FP8 delayed scaling: amax of the history to use (default "
        f"{DEFAULT_FP8_AMAX_COMPUTE_ALGO}; needs --fp8-format)",
    )


def validate_fp8_args(args) -> None:
    """Check ``--transformer-impl`` and the FP8 flags; resolve their defaults in ``args``.

    Refused (message names the flags): FP8 tuning flags without ``--fp8-format``; an
    amax history < 1 or a negative margin; ``--fp8-format`` with ``--transformer-impl
    local``; ``--fp8-format`` or ``--transformer-impl transformer_engine`` without a GPU
    (``platform.require_gpu``, RuntimeError) or without an importable Transformer Engine
    (``TransformerEngineUnavailableError``). FP8 without ``--bf16`` is allowed with a
    warning (bf16 parameters are the recommended companion)."""
    from megaspark import platform
    from megaspark.models.dspark import te_spec

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise _argument_error(message)

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


def fp8_transformer_config_kwargs(args) -> dict:
    """TransformerConfig fields for ``args``: ``transformer_impl`` always, and with
    ``--fp8-format`` also ``fp8``, ``fp8_recipe``, ``fp8_margin``, ``fp8_amax_history_len``
    and ``fp8_amax_compute_algo`` (unset tuning flags get this module's defaults)."""
    from megaspark.models.dspark import te_spec

    kwargs = {"transformer_impl": te_spec.resolve_transformer_impl(
        getattr(args, "transformer_impl", None))}
    fmt = getattr(args, "fp8_format", None)
    if fmt is None:
        return kwargs

    def value(name, default):
        v = getattr(args, name, None)
        return default if v is None else v

    kwargs.update(
        fp8=fmt,
        fp8_recipe=FP8_RECIPE,
        fp8_margin=value("fp8_margin", DEFAULT_FP8_MARGIN),
        fp8_amax_history_len=value("fp8_amax_history_len", DEFAULT_FP8_AMAX_HISTORY_LEN),
        fp8_amax_compute_algo=value("fp8_amax_compute_algo", DEFAULT_FP8_AMAX_COMPUTE_ALGO),
    )
    return kwargs


def fp8_context(config):
    """megatron's FP8 autocast context for the draft layers (``nullcontext`` when
    ``config.fp8`` is unset). Wrap only the layer loop — see the module docstring.

    megatron's ``get_fp8_context`` silently returns ``nullcontext`` when TE is missing;
    this refuses instead, so a run configured for FP8 never trains in bf16 unnoticed."""
    if not getattr(config, "fp8", None):
        return contextlib.nullcontext()
    from megaspark.models.dspark import te_spec

    te_spec.require_transformer_engine("--fp8-format")
    from megatron.core import fp8_utils

    return fp8_utils.get_fp8_context(config)


def fp8_shape_problems(dcfg, seq_length: int, micro_batch_size: int,
                       tensor_model_parallel_size: int = 1) -> list:
    """Why the draft's FP8 GEMMs would be refused by Transformer Engine at this shape
    (empty list: fine). Rows per micro-batch are fixed: ``N·B`` block rows for q, proj and
    the MLP, ``S + N·B`` for kv (``S`` = --seq-length, ``N`` = --num-anchors, ``B`` =
    --block-size); weight dims are per TP rank."""
    tp = tensor_model_parallel_size
    N, B, S, b = dcfg.num_anchors, dcfg.block_size, seq_length, micro_batch_size
    H = dcfg.hidden_size
    q = dcfg.num_attention_heads * dcfg.kv_channels // tp
    kv2 = 2 * dcfg.num_query_groups * dcfg.kv_channels // tp
    ffn = dcfg.ffn_hidden_size // tp
    problems = []
    rows = {
        "block rows (--micro-batch-size x --num-anchors x --block-size)": b * N * B,
        "context+block rows (--micro-batch-size x (--seq-length + --num-anchors x --block-size))":
            b * (S + N * B),
    }
    for what, n in rows.items():
        if n % FP8_ROW_MULTIPLE:
            problems.append(f"{what} = {n} is not a multiple of {FP8_ROW_MULTIPLE}")
    # (size, required multiple, description): GEMM input widths need 16, weight rows 8
    dims = [
        (H, FP8_COL_MULTIPLE, "hidden size"),
        (q, FP8_COL_MULTIPLE, "attention width per TP rank (heads x head dim / TP)"),
        (kv2, FP8_ROW_MULTIPLE, "[k; v] width per TP rank (2 x KV heads x head dim / TP)"),
        (ffn, FP8_COL_MULTIPLE, "FFN width per TP rank (--ffn-hidden-size / TP)"),
    ]
    for size, multiple, what in dims:
        if size % multiple:
            problems.append(f"{what} = {size} is not a multiple of {multiple}")
    return problems


def validate_fp8_shapes(dcfg, seq_length: int, micro_batch_size: int,
                        tensor_model_parallel_size: int = 1) -> None:
    """Raise (naming the flags) when :func:`fp8_shape_problems` finds any; call once the
    draft shape is known (after ``DSparkConfig.from_hf_config``), only with --fp8-format."""
    problems = fp8_shape_problems(dcfg, seq_length, micro_batch_size, tensor_model_parallel_size)
    if problems:
        raise _argument_error(
            "--fp8-format: Transformer Engine FP8 GEMMs need row counts that are multiples of "
            f"{FP8_ROW_MULTIPLE} and widths that are multiples of {FP8_COL_MULTIPLE}; "
            + "; ".join(problems)
        )
