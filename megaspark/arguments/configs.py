"""The validated flags as the typed configs the library takes. Every module below
``megaspark/training`` receives these (or plain values), never the argparse namespace."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch

from megaspark import platform
from megaspark.fp8 import Fp8Settings
from megaspark.memory_plan import PlanSettings
from megaspark.targets.base import TargetSpec
from megaspark.targets.sglang import ENV_LAST_HIDDEN_URL, ENV_URL, SGLangOptions



@dataclass(frozen=True)
class ParallelConfig:
    """The layout: TP x PP (x virtual stages) x DP, and how ranks talk."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    data_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    distributed_backend: Optional[str] = None
    distributed_timeout_minutes: float = 30.0
    device: str = "auto"


@dataclass(frozen=True)
class OptimizationConfig:
    """Batch, schedule, optimizer and precision."""

    train_iters: int = 100
    micro_batch_size: int = 1
    global_batch_size: int = 1
    num_microbatches: int = 1
    lr: float = 6e-4
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"
    lr_warmup_fraction: float = 0.04
    lr_wsd_decay_fraction: float = 0.1
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 42
    bf16: bool = False


@dataclass(frozen=True)
class DataConfig:
    """The prepared dataset and how micro-batches are cut from it."""

    data_path: Optional[str] = None
    seq_length: int = 512
    pad_to_multiple: int = 64
    length_grouped_sampler: bool = False
    data_verify: str = "auto"


@dataclass(frozen=True)
class CheckpointConfig:
    """Where a run saves, what it starts from, and rotation."""

    save: Optional[str] = None
    load: Optional[str] = None
    load_hf_draft: Optional[str] = None
    save_interval: Optional[int] = None
    keep_last: int = 3
    auto_resume: bool = True


@dataclass(frozen=True)
class LoggingConfig:
    """Console, progress bar, TensorBoard, JSONL, and evaluation cadence."""

    log_interval: int = 10
    eval_interval: Optional[int] = None
    eval_iters: int = 10
    tensorboard_dir: Optional[str] = None
    log_jsonl: Optional[str] = None
    progress_bar: bool = True


@dataclass(frozen=True)
class ExitConfig:
    """When a run stops early (docs/reliability.md): signals, a wall-clock budget counted from
    ``start_time``, an iteration interval, and how many non-finite steps it skips."""

    exit_signal_handler: bool = False
    exit_duration_in_mins: Optional[float] = None
    exit_interval: Optional[int] = None
    skip_nonfinite_steps: int = 0
    start_time: float = field(default_factory=time.time)


@dataclass(frozen=True)
class RunConfig:
    """A whole run's settings, one section per concern, built once from the validated flags
    (:func:`run_config`). The draft's own config (``DSparkConfig`` / ``Eagle3Config``) and the
    resolved target (:class:`TargetSpec`) come from start-up, which needs the target."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimizationConfig = field(default_factory=OptimizationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    exit: ExitConfig = field(default_factory=ExitConfig)
    fp8: Fp8Settings = field(default_factory=Fp8Settings)
    algorithm: str = "dspark"
    target: Optional[TargetSpec] = None  # once start-up has resolved it


def _section(cls, args):
    """``cls`` filled from the namespace attributes of the same names (its defaults where the
    namespace lacks one: tools and tests build partial namespaces)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def run_config(args, target: Optional[TargetSpec] = None) -> RunConfig:
    """The validated flags as a :class:`RunConfig`, with ``target``: the :class:`TargetSpec`
    start-up resolved (tools and tests that pass none get it from the namespace once its
    layer ids are resolved)."""
    if target is None and getattr(args, "target_layer_ids_resolved", None):
        target = target_spec(args)
    return RunConfig(
        parallel=_section(ParallelConfig, args),
        optim=_section(OptimizationConfig, args),
        data=_section(DataConfig, args),
        checkpoint=_section(CheckpointConfig, args),
        logging=_section(LoggingConfig, args),
        exit=_section(ExitConfig, args),
        fp8=fp8_settings(args),
        algorithm=getattr(args, "algorithm", None) or "dspark",
        target=target,
    )


def target_dtype(args) -> torch.dtype:
    """The target's dtype: what start-up resolved for its device (``target_dtype_resolved``),
    else ``--target-dtype`` by :func:`megaspark.platform.target_dtype` on this process's
    compute device."""
    value = getattr(args, "target_dtype_resolved", None)
    if isinstance(value, torch.dtype):
        return value
    return platform.target_dtype(args.target_dtype, args.bf16, platform.compute_device())


def fp8_settings(args) -> Fp8Settings:
    """``--transformer-impl`` and the FP8 flags (defaults filled in by the validator)."""
    def value(name, default):
        v = getattr(args, name, None)
        return default if v is None else v

    base = Fp8Settings()
    return Fp8Settings(
        transformer_impl=getattr(args, "transformer_impl", None),
        fp8_format=getattr(args, "fp8_format", None),
        fp8_margin=value("fp8_margin", base.fp8_margin),
        fp8_amax_history_len=value("fp8_amax_history_len", base.fp8_amax_history_len),
        fp8_amax_compute_algo=value("fp8_amax_compute_algo", base.fp8_amax_compute_algo),
    )


def plan_settings(args) -> PlanSettings:
    """What the start-up memory plan needs of the layout, batch and precision flags."""
    return PlanSettings(
        tensor_model_parallel_size=int(args.tensor_model_parallel_size),
        pipeline_model_parallel_size=int(args.pipeline_model_parallel_size),
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        micro_batch_size=int(args.micro_batch_size),
        seq_length=int(args.seq_length),
        num_microbatches=int(getattr(args, "num_microbatches", None) or 1),
        bf16=bool(args.bf16),
        use_distributed_optimizer=bool(args.use_distributed_optimizer),
        target_dtype=target_dtype(args),
        memory_budget_gb=args.memory_budget_gb,
    )


def sglang_options(args, env: Optional[Mapping[str, str]] = None) -> SGLangOptions:
    """The ``--sglang-*`` flags (``--seq-length`` as the engine's context length, ``--seed`` as
    its seed); the server URLs may also come from ``MEGASPARK_SGLANG_URL`` /
    ``MEGASPARK_SGLANG_LAST_HIDDEN_URL`` (what the Slurm launcher sets). Flags a caller's
    parser lacks take the defaults."""
    env = os.environ if env is None else env

    def get(name, default):
        value = getattr(args, name, None)
        return default if value is None else value

    o = SGLangOptions(
        url=get("sglang_url", None) or env.get(ENV_URL) or None,
        tp_size=int(get("sglang_tp_size", 1)),
        dp_size=int(get("sglang_dp_size", 1)),
        base_gpu_id=get("sglang_base_gpu_id", None),
        mem_fraction_static=float(get("sglang_mem_fraction_static", 0.35)),
        dtype=str(get("sglang_dtype", "bfloat16")),
        context_length=get("sglang_context_length", None) or get("seq_length", None),
        max_tokens_per_request=int(get("sglang_max_tokens_per_request", 65536)),
        last_hidden=str(get("sglang_last_hidden", "tail")),
        last_hidden_url=get("sglang_last_hidden_url", None) or env.get(ENV_LAST_HIDDEN_URL) or None,
        random_seed=int(get("seed", 42)),
    )
    o.validate()
    return o


def target_spec(args) -> TargetSpec:
    """The run's target once start-up has resolved its layer ids, dtype and TP."""
    return TargetSpec(
        model=args.target_model,
        path=getattr(args, "target_path", None) or args.target_model,
        layer_ids=tuple(args.target_layer_ids_resolved),
        dtype=target_dtype(args),
        backend=getattr(args, "target_backend", "hf"),
        tensor_parallel_size=int(getattr(args, "target_tp_resolved", 1)),
        context_length=int(args.seq_length),
        micro_batch_size=int(args.micro_batch_size),
        seed=int(args.seed),
        hidden_states_dir=getattr(args, "hidden_states_dir", None),
        data_path=args.data_path,
        mem_fraction_static=getattr(args, "sglang_mem_fraction_static", None),
        server=sglang_options(args) if getattr(args, "target_backend", "hf") == "sglang-server" else None,
    )
