"""Transformer Engine layer spec of the DSpark draft, and the choice between it and the
local spec (``--transformer-impl local|transformer_engine``; DESIGN.md §1 decision 7).

What the TE spec changes, and what it deliberately does not
-----------------------------------------------------------
Only the five GEMMs of a draft layer move to Transformer Engine: ``linear_q``,
``linear_kv``, ``linear_proj`` of the dual-source attention and ``linear_fc1`` /
``linear_fc2`` of the MLP, as megatron-core's plain :class:`TEColumnParallelLinear` /
:class:`TERowParallelLinear` wrappers. These are the modules FP8 autocast quantises.

Kept exactly as in the local spec, so that checkpoints and HF exports do not depend on
the implementation:

* **Parameter names.** The plain TE linears own ``weight`` (and ``bias`` only when one is
  requested, exactly like megatron's linears), so a layer has the same
  ``...self_attention.linear_q.weight``, ``...mlp.linear_fc1.weight`` … names under both
  specs. The *fused* ``TELayerNormColumnParallelLinear`` is not used: it would move the
  norm weight into ``linear_q.layer_norm_weight`` and change the names.
* **Norms.** ``input_layernorm``, ``pre_mlp_layernorm`` and the per-head q/k norms stay
  megaspark's fp32 :class:`RMSNorm` / :class:`HeadRMSNorm` (``TENorm`` would build a
  ``te.pytorch.RMSNorm`` with different numerics, and the q/k norm has megaspark's own
  TP gradient handling).
* **Core attention.** The block-structured dual-source attention stays megaspark's own
  fp32 einsum kernel (``TEDotProductAttention`` has no notion of the per-block context
  prefix without a dense ``[N·B, S+N·B]`` mask, and FP8 attention is not wanted).
* **The fused ``[k; v]`` layout.** megatron-core's ``TEColumnParallelLinear`` takes
  ``stride`` (checked in megatron-core 0.16.1 and in the newest release, 0.19.2): it sets
  ``partition_stride`` on the weight/bias and, under ``use_cpu_initialization`` (the
  megaspark default), initialises through the same ``_initialize_affine_weight_cpu(...,
  stride=stride)`` as the local ``ColumnParallelLinear``. So ``linear_kv`` is built with
  the same ``stride=2`` in both specs, each rank's shard is ``[its k heads; its v heads]``,
  and :meth:`DualSourceAttention.sharded_state_dict` saves it as two separately sharded
  halves (megatron's SwiGLU factory) in both — the checkpoint is TP-size independent. If a
  future megatron-core dropped ``stride``, :func:`get_te_layer_spec` refuses to build
  (see :func:`_check_stride_support`) rather than silently producing a TP-dependent
  layout; the fallback would be a spec slot with two separate linears.
* **Checkpoint content.** Every megatron linear has an ``_extra_state`` entry: TE's holds
  the FP8 scaling state (scales, amax history), and megatron's *local* linears define
  ``get_extra_state() -> None`` / an ignoring ``set_extra_state`` precisely for
  compatibility with TE state dicts. So both specs produce the same sharded-state-dict
  keys; a TE checkpoint loads into the local spec (the FP8 state is ignored) and a local
  one into the TE spec (TE's ``set_extra_state(None)`` keeps fresh FP8 state). HF exports
  go through ``named_parameters`` only.

Everything else a layer sees — the ``(output, bias)`` return convention, ``gather_output=
False``, ``input_is_parallel=True``, ``skip_bias_add``, ``is_expert`` — is megatron's
convention, which its TE wrappers follow; TE-only keyword arguments
(``tp_comm_buffer_name``, ``skip_weight_param_allocation``, ``tp_group``, ``name``) keep
their defaults.

MLA (``--draft-attention mla``) is not covered: the TE spec builds the GQA draft only, and
:func:`select_layer_spec` / :func:`get_te_layer_spec` refuse an MLA draft with
``--transformer-impl transformer_engine`` (a clear ``ConfigError`` naming both flags); an
unset ``--transformer-impl`` resolves to ``local`` for MLA. (A layer given the TE spec
with an MLA config refuses the same way, :func:`megaspark.models.dspark.layer.mla_submodules`.)

Availability
------------
Transformer Engine needs CUDA and cannot be installed on a CPU machine (DESIGN.md §4); on
such a machine megatron-core still imports its TE extension, but with ``MagicMock``
stand-ins for every TE class. This module therefore never touches the TE classes unless
:func:`te_available` says TE really imports, and imports megatron lazily so that flag
validation stays cheap.
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional

from megaspark import platform

LOCAL = "local"
TRANSFORMER_ENGINE = "transformer_engine"
TRANSFORMER_IMPLS = (LOCAL, TRANSFORMER_ENGINE)


class TransformerEngineUnavailableError(RuntimeError):
    """Transformer Engine layers were requested but TE does not import here."""


# ---------------------------------------------------------------------------- probing
@functools.lru_cache(maxsize=None)
def _probe_te() -> Optional[str]:
    """None when TE and megatron's TE extension import for real, else the reason."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # noqa: BLE001 - the meta-package raises all kinds on CPU
        return f"{type(e).__name__}: {e}"
    try:
        from megatron.core.extensions import transformer_engine as mcore_te
    except Exception as e:  # noqa: BLE001
        return f"megatron.core.extensions.transformer_engine failed to import ({type(e).__name__}: {e})"
    if not getattr(mcore_te, "HAVE_TE", False):
        return "megatron-core could not import Transformer Engine (HAVE_TE is False)"
    return None


def te_unavailable_reason() -> Optional[str]:
    return _probe_te()


def te_available() -> bool:
    """True when ``transformer_engine.pytorch`` and megatron's TE extension import."""
    return te_unavailable_reason() is None


def require_transformer_engine(flag: str = "--transformer-impl transformer_engine") -> None:
    """Fail, naming ``flag`` and ``--transformer-impl``, when TE does not import."""
    if te_available():
        return
    reason = te_unavailable_reason() or "not importable"
    hint = (
        "use --transformer-impl local"
        if flag.startswith("--transformer-impl")
        else "drop it, or use a GPU image with Transformer Engine installed"
    )
    raise TransformerEngineUnavailableError(
        f"{flag} needs NVIDIA Transformer Engine (--transformer-impl transformer_engine), "
        f"which does not import here ({reason}). Install transformer-engine[pytorch] on a "
        f"CUDA machine, or {hint}."
    )


# ---------------------------------------------------------------------------- choice
def resolve_transformer_impl(requested: Optional[str]) -> str:
    """The ``--transformer-impl`` to use. ``None`` (flag not given) means
    ``transformer_engine`` when TE imports *and* a GPU is present, else ``local``.
    An explicit value is only checked for spelling; :func:`select_layer_spec` checks
    that it can run here."""
    if requested is None:
        return TRANSFORMER_ENGINE if (platform.gpu_available() and te_available()) else LOCAL
    if requested not in TRANSFORMER_IMPLS:
        raise ValueError(
            f"--transformer-impl must be one of {', '.join(TRANSFORMER_IMPLS)}, got {requested!r}"
        )
    return requested


def check_transformer_impl_usable(transformer_impl: str) -> None:
    """Raise (naming ``--transformer-impl``) if ``transformer_impl`` cannot run here."""
    if transformer_impl == TRANSFORMER_ENGINE:
        platform.require_gpu("--transformer-impl transformer_engine", "Transformer Engine layers")
        require_transformer_engine("--transformer-impl transformer_engine")


def check_attention_supported(transformer_impl: str, attention_type: str = "gqa") -> None:
    """The TE spec covers the GQA draft only: ``--draft-attention mla`` needs the local spec
    (its latent down-projections and norms are megaspark modules, not TE's). Raises
    :class:`megaspark.config.ConfigError` naming both flags."""
    if attention_type == "mla" and transformer_impl == TRANSFORMER_ENGINE:
        from megaspark.config import MLA_NEEDS_LOCAL_SPEC, ConfigError

        raise ConfigError(MLA_NEEDS_LOCAL_SPEC)


def select_layer_spec(transformer_impl: Optional[str], qk_norm: bool, attention_type: str = "gqa"):
    """The draft layer spec of ``--transformer-impl`` (None: :func:`resolve_transformer_impl`).
    An MLA draft (``attention_type="mla"``) resolves an unset ``--transformer-impl`` to
    ``local``; an explicit ``transformer_engine`` is refused (:func:`check_attention_supported`)."""
    if attention_type == "mla" and transformer_impl is None:
        transformer_impl = LOCAL
    impl = resolve_transformer_impl(transformer_impl)
    check_attention_supported(impl, attention_type)
    if impl == LOCAL:
        from megaspark.models.dspark.layer_specs import get_local_layer_spec

        return get_local_layer_spec(qk_norm, attention_type)
    check_transformer_impl_usable(impl)
    return get_te_layer_spec(qk_norm)


# ---------------------------------------------------------------------------- TE spec
def _te_extension():
    """megatron-core's TE extension module (tests substitute a fake one)."""
    from megatron.core.extensions import transformer_engine as mcore_te

    return mcore_te


def _check_stride_support(column_cls: type) -> None:
    if "stride" not in inspect.signature(column_cls.__init__).parameters:
        raise TransformerEngineUnavailableError(
            f"this megatron-core's {column_cls.__name__} has no 'stride' argument, which the "
            "fused [k; v] projection needs for a TP-size independent layout; use "
            "--transformer-impl local or megatron-core >= 0.16"
        )


def te_linear_classes() -> tuple[type, type]:
    """(column-parallel, row-parallel) TE linear classes used by the TE spec."""
    mod = _te_extension()
    column, row = mod.TEColumnParallelLinear, mod.TERowParallelLinear
    _check_stride_support(column)
    return column, row


def get_te_layer_spec(qk_norm: bool, attention_type: str = "gqa"):
    """Draft layer spec with Transformer Engine GEMMs (see the module docstring).

    Raises :class:`TransformerEngineUnavailableError` (naming ``--transformer-impl``) when
    TE does not import, and :class:`megaspark.config.ConfigError` for an MLA draft. The GPU
    check is :func:`select_layer_spec`'s."""
    check_attention_supported(TRANSFORMER_ENGINE, attention_type)
    require_transformer_engine("--transformer-impl transformer_engine")
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megaspark.models.dspark.attention import DualSourceAttentionSubmodules
    from megaspark.models.dspark.layer import DSparkLayerSubmodules
    from megaspark.models.dspark.norms import HeadRMSNorm, RMSNorm

    column, row = te_linear_classes()
    return DSparkLayerSubmodules(
        input_layernorm=RMSNorm,
        self_attention=DualSourceAttentionSubmodules(
            linear_q=column,
            linear_kv=column,  # built with stride=2 by DualSourceAttention
            linear_proj=row,
            q_layernorm=HeadRMSNorm if qk_norm else None,
            k_layernorm=HeadRMSNorm if qk_norm else None,
        ),
        pre_mlp_layernorm=RMSNorm,
        mlp=ModuleSpec(
            module=MLP,
            submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row),
        ),
    )
