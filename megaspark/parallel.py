"""Process groups: torch.distributed start-up and megatron-core model-parallel state.

Everything else in megaspark asks megatron's ``parallel_state`` for groups and ranks;
this module only starts them, the same way on CPU (gloo) and GPU (nccl).
"""

from __future__ import annotations

import datetime
import os
from typing import Optional

import torch

from megaspark import platform


def initialize_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    backend: Optional[str] = None,
    seed: int = 1234,
    timeout_minutes: float = 30,
    device: str = "auto",
) -> None:
    """Initialise torch.distributed (from the torchrun environment) and megatron groups.

    World size must be divisible by TP×PP; DP is what remains. Also seeds the
    model-parallel RNG tracker the way Megatron-LM does (TP ranks get distinct
    streams for TP-local randomness; DP ranks share them). ``device`` (``--device``) becomes
    the run's compute device (:func:`megaspark.platform.compute_device`). A collective that
    waits longer than ``timeout_minutes`` (``--distributed-timeout-minutes``) fails instead of
    hanging (gloo raises; NCCL's watchdog aborts the process).
    """
    compute = platform.resolve_device(device)
    platform.install_cpu_compat(force=compute.type == "cpu")
    platform.set_cpu_threads_from_env()
    platform.set_compute_device(compute)
    backend = backend or ("nccl" if compute.type == "cuda" else "gloo")
    if not torch.distributed.is_initialized():
        rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        torch.distributed.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    world_size = torch.distributed.get_world_size()
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size
    if world_size % model_parallel != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size "
            f"({tensor_model_parallel_size}) x --pipeline-model-parallel-size "
            f"({pipeline_model_parallel_size})"
        )

    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def tp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank()


def tp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


def init_single_process_group(seed: int = 1234, device: str = "auto") -> None:
    """A one-rank process group with TP = PP = 1 for tools (idempotent; keeps an existing
    torch.distributed group and only adds the megatron groups if missing). ``device``
    (auto/cpu/cuda) becomes the compute device."""
    import socket

    from megatron.core import parallel_state

    if torch.distributed.is_initialized():
        if not parallel_state.model_parallel_is_initialized():
            initialize_distributed(1, 1, seed=seed, device=device)
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    initialize_distributed(1, 1, seed=seed, device=device)
