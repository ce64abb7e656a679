"""FP8 training of the draft layers: the settings, their TransformerConfig translation, the
autocast context and the shape rules of TE's FP8 GEMMs (DESIGN.md §1 decision 7). The flags
are defined and validated in :mod:`megaspark.arguments`.

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
from dataclasses import dataclass
from typing import Optional

from megaspark.errors import ArgumentError

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


@dataclass(frozen=True)
class Fp8Settings:
    """The draft layers' GEMM implementation and FP8 recipe of a run (validated flags:
    ``--transformer-impl``, ``--fp8-format``, ``--fp8-margin``, ``--fp8-amax-history-len``,
    ``--fp8-amax-compute-algo``). ``transformer_impl`` None: resolved here by
    :func:`~megaspark.models.dspark.te_spec.resolve_transformer_impl`."""

    transformer_impl: Optional[str] = None
    fp8_format: Optional[str] = None
    fp8_margin: int = DEFAULT_FP8_MARGIN
    fp8_amax_history_len: int = DEFAULT_FP8_AMAX_HISTORY_LEN
    fp8_amax_compute_algo: str = DEFAULT_FP8_AMAX_COMPUTE_ALGO


def fp8_transformer_config_kwargs(settings: Fp8Settings) -> dict:
    """TransformerConfig fields: ``transformer_impl`` always, and with an FP8 format also
    ``fp8``, ``fp8_recipe``, ``fp8_margin``, ``fp8_amax_history_len`` and
    ``fp8_amax_compute_algo``."""
    from megaspark.models.dspark import te_spec

    kwargs = {"transformer_impl": te_spec.resolve_transformer_impl(settings.transformer_impl)}
    if settings.fp8_format is None:
        return kwargs
    kwargs.update(
        fp8=settings.fp8_format,
        fp8_recipe=FP8_RECIPE,
        fp8_margin=settings.fp8_margin,
        fp8_amax_history_len=settings.fp8_amax_history_len,
        fp8_amax_compute_algo=settings.fp8_amax_compute_algo,
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
        raise ArgumentError(
            "--fp8-format: Transformer Engine FP8 GEMMs need row counts that are multiples of "
            f"{FP8_ROW_MULTIPLE} and widths that are multiples of {FP8_COL_MULTIPLE}; "
            + "; ".join(problems)
        )
