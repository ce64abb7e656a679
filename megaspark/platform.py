"""Device/backend selection and the CPU compatibility layer for megatron-core.

megatron-core assumes CUDA in a handful of places even when every tensor lives on the
CPU (DESIGN.md §4): communication buffers allocated on ``torch.cuda.current_device()``,
the model-parallel RNG tracker reading and writing CUDA RNG state, ``device="cuda"``
factory calls in the pipeline schedules and the optimizer, ``param.type() ==
'torch.cuda.FloatTensor'`` checks, and stream/synchronize calls in DDP and p2p.

:func:`install_cpu_compat` makes those calls harmless on a CUDA-less torch:

* ``torch.cuda.current_device/synchronize/current_stream/default_stream/stream/
  empty_cache/get_rng_state/set_rng_state`` get CPU stand-ins;
* the RNG tracker of ``megatron.core.tensor_parallel.random`` forks the CPU generator;
* a :class:`torch.overrides.TorchFunctionMode` maps CUDA device requests of factory
  functions, ``Tensor.cuda()`` and ``Tensor.to("cuda")`` to the CPU, and reports CPU
  tensors' ``type()`` with the ``torch.cuda.`` prefix megatron's optimizer checks for.

This is the only module of megaspark that knows about any of this. On a machine with
CUDA it does nothing. It is installed once per process, before megatron is used.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False
_MODE: Optional[TorchFunctionMode] = None


def gpu_available() -> bool:
    return torch.cuda.is_available()


def default_backend() -> str:
    return "nccl" if gpu_available() else "gloo"


def default_device() -> torch.device:
    if gpu_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# The run's compute device and dtype: every tensor a step creates lives there (blocks, target
# features, collectives' buffers, metrics, inference caches). Set once at start-up.
_COMPUTE_DEVICE: Optional[torch.device] = None


def resolve_device(choice: str = "auto") -> torch.device:
    """``--device``: ``auto`` is this rank's GPU (``LOCAL_RANK``) when there is one, else CPU."""
    if choice == "cpu" or (choice == "auto" and not gpu_available()):
        return torch.device("cpu")
    require_gpu("--device cuda", "a CUDA device")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def set_compute_device(device) -> torch.device:
    """Make ``device`` the run's compute device (``None``: back to the default)."""
    global _COMPUTE_DEVICE
    _COMPUTE_DEVICE = None if device is None else torch.device(device)
    if _COMPUTE_DEVICE is not None and _COMPUTE_DEVICE.type == "cuda" and gpu_available():
        torch.cuda.set_device(_COMPUTE_DEVICE)
    return compute_device()


def compute_device() -> torch.device:
    """Where this rank computes: set by :func:`set_compute_device`, else the default."""
    return _COMPUTE_DEVICE if _COMPUTE_DEVICE is not None else default_device()


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def run_dtype(bf16: bool) -> torch.dtype:
    """Parameters and activations of the draft: bf16 with ``--bf16``, else fp32."""
    return torch.bfloat16 if bf16 else torch.float32


def target_dtype(choice: str, bf16: bool, device: torch.device) -> torch.dtype:
    """``--target-dtype``: ``auto`` is bf16 for a bf16 run or on a GPU, fp32 otherwise."""
    if choice != "auto":
        return DTYPES[choice]
    return torch.bfloat16 if (bf16 or torch.device(device).type == "cuda") else torch.float32


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


_CPU = torch.device("cpu")


class _CudaRequestsToCpu(TorchFunctionMode):
    """Redirect CUDA device requests to the CPU (see module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device=_CPU)
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            if name.startswith("torch.") and not name.startswith("torch.cuda."):
                return "torch.cuda." + name[len("torch."):]
            return name
        return func(*args, **kwargs)


class _NullStream:
    """Stand-in for a CUDA stream: every operation is already synchronous on the CPU."""

    def wait_stream(self, *_a, **_k):
        pass

    def wait_event(self, *_a, **_k):
        pass

    def record_event(self, *_a, **_k):
        return None

    def synchronize(self):
        pass

    def query(self):
        return True


_NULL_STREAM = _NullStream()


def install_cpu_compat(force: bool = False) -> bool:
    """Install the CPU compatibility layer if there is no CUDA (or ``force``: a CPU run on a
    machine that has one). Idempotent.

    Returns True when the layer is active (CPU machine), False on a CUDA machine.
    """
    global _INSTALLED, _MODE
    if gpu_available() and not force:
        return False
    if _INSTALLED:
        return True

    cuda = torch.cuda
    # A CPU device, not an index: torch function modes are inactive inside autograd
    # backward functions, where megatron allocates with device=current_device().
    cuda.current_device = lambda: _CPU
    cuda.synchronize = lambda *a, **k: None
    cuda.current_stream = lambda *a, **k: _NULL_STREAM
    cuda.default_stream = lambda *a, **k: _NULL_STREAM
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.empty_cache = lambda: None
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator
    # directly, and make the "all devices" variant a no-op (there are no devices).
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    # The tracker's "GPU" generator is the CPU one here, so its check that the CPU RNG
    # was left untouched inside fork() would warn on every fork.
    logging.getLogger(mcore_random.__name__).setLevel(logging.ERROR)

    _MODE = _CudaRequestsToCpu()
    _MODE.__enter__()
    _INSTALLED = True
    return True


@contextlib.contextmanager
def emulated_accelerator(device="cuda:0"):
    """For device checks on a CPU-only torch (fake tensors, ``FakeTensorMode``): inside,
    ``device`` is the compute device and ``torch.cuda.current_device()``, and the
    compatibility layer stops mapping CUDA requests to the CPU, so a CPU tensor that meets
    the emulated device is a device mix, exactly as on a GPU. Tests only."""
    global _COMPUTE_DEVICE
    dev = torch.device(device)
    saved_current, saved_compute = torch.cuda.current_device, _COMPUTE_DEVICE
    redirecting = _MODE is not None
    if redirecting:
        _MODE.__exit__(None, None, None)
    torch.cuda.current_device = lambda: dev
    _COMPUTE_DEVICE = dev
    try:
        yield dev
    finally:
        torch.cuda.current_device = saved_current
        _COMPUTE_DEVICE = saved_compute
        if redirecting:
            _MODE.__enter__()


def cpu_compat_active() -> bool:
    return _INSTALLED


def require_gpu(flag: str, what: str) -> None:
    """Fail fast, naming the flag, when a GPU-only feature is requested without a GPU."""
    if not gpu_available():
        raise RuntimeError(
            f"{flag} needs {what}, which requires a CUDA GPU; none is available on this "
            f"machine. Drop {flag} (or choose its CPU alternative) to run here."
        )


def set_cpu_threads_from_env() -> None:
    """Honour OMP_NUM_THREADS for torch's intra-op pool (torchrun sets it to 1 per rank)."""
    n = os.environ.get("OMP_NUM_THREADS")
    if n and n.isdigit() and int(n) > 0:
        torch.set_num_threads(int(n))
