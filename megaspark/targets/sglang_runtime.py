"""SGLang's ``ModelRunner`` inside a megaspark process: the one module that knows SGLang's
runtime internals (sglang 0.5.23).

What the co-located provider (:mod:`megaspark.targets.sglang_colocated`) needs from
SGLang is one thing: a prefill of a list of token sequences that returns, as tensors, the
tapped layers' outputs and the post-final-norm last hidden state. This module builds that
from SGLang's own pieces, following ``sglang/benchmark/one_batch.py`` (``ServerArgs`` ->
``ModelRunner`` -> ``ScheduleBatch.init_new`` / ``prepare_for_extend`` ->
``ForwardBatch.init_new`` -> ``ModelRunner.forward``), with no scheduler, tokenizer or
detokenizer process:

* **Capture in one prefill.** The model's own DFlash/Eagle3 capture hook
  (``set_dflash_layers_to_capture``: decoder layer ``k + 1`` records the residual stream
  entering it, i.e. the output of layer ``k``) makes the backbone return
  ``(post-norm last state, aux states)``; a forward hook on the backbone takes both as
  they leave it. Nothing goes through SGLang's response path.
* **Process groups.** SGLang builds its groups assuming that its tensor x pipeline ranks
  are the whole ``torch.distributed`` world. In a trainer the world is the trainer's, and
  only the ranks that compute the target build it (:func:`megaspark.training.batches.
  computes_target`: TP rank 0 of the first pipeline stage, or all its TP ranks for a
  tensor-parallel target). So while SGLang initializes, :func:`_target_world` presents it
  a world made of the target's ranks only: real groups over those ranks, created with
  local synchronization (no other trainer rank takes part).
* **CPU.** SGLang's torch-native CPU path (``SGLANG_USE_CPU_ENGINE=1``,
  ``attention_backend="torch_native"``) with the import-only stand-ins of
  :mod:`megaspark.targets.sglang_stubs`. In fp32 its hidden states equal HF transformers'
  bit for bit (``tests/test_sglang_colocated.py``).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

#: The SGLang release whose internals this module drives.
SGLANG_VERSION = "0.5.23"
_STUBS = Path(__file__).with_name("sglang_stubs")
#: stand-in package -> the directory to put on sys.path for it
STAND_INS = {"sgl_kernel": _STUBS / "kernel", "torchvision": _STUBS / "vision"}
INSTALL_HINT = "bash tools/install.sh --with-sglang"
_RUNNER_BUILT = False


def _importable(name: str) -> bool:
    if importlib.util.find_spec(name) is None:
        return False
    try:
        importlib.import_module(name)
        return True
    except Exception:  # a CUDA-only wheel on a CPU machine fails at import
        for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[mod]
        return False


def prepare_environment(device_type: str) -> list[str]:
    """Make ``import sglang`` work for ``device_type`` in this process and in processes it
    spawns; returns the stand-ins put in place. Idempotent."""
    used = []
    if device_type != "cpu":
        return used
    os.environ["SGLANG_USE_CPU_ENGINE"] = "1"  # else the generic path imports vLLM kernels
    for name, root in STAND_INS.items():
        root_s = str(root)
        if root_s in sys.path:
            used.append(name)
            continue
        if name == "sgl_kernel" or not _importable(name):
            sys.path.insert(0, root_s)
            for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                del sys.modules[mod]
            used.append(name)
    paths = [str(STAND_INS[n]) for n in used]
    old = os.environ.get("PYTHONPATH", "")
    missing = [p for p in paths if p not in old.split(os.pathsep)]
    if missing:
        os.environ["PYTHONPATH"] = os.pathsep.join(missing + ([old] if old else []))
    return used


def check_available(device_type: str, flag: str) -> None:
    """Fail fast, naming ``flag``, when SGLang cannot be imported here."""
    if importlib.util.find_spec("sglang") is None:
        raise RuntimeError(
            f"{flag} needs the sglang package ({SGLANG_VERSION}), which is not installed. "
            f"Install it with `{INSTALL_HINT}` (CPU: the pinned CPU torch is kept), or use "
            f"the GPU image (docker/Dockerfile).")
    prepare_environment(device_type)
    try:
        import sglang  # noqa: F401
        from sglang.srt.model_executor.model_runner import ModelRunner  # noqa: F401
    except Exception as e:
        raise RuntimeError(f"{flag}: `import sglang` failed here ({type(e).__name__}: {e}). "
                           f"Reinstall with `{INSTALL_HINT}`.") from e


@contextlib.contextmanager
def _target_world(ranks: Sequence[int], backend: str, local_rank: int):
    """While SGLang builds its process groups: a world made of ``ranks`` only.

    ``ranks`` are the consecutive global ranks of the target's tensor-parallel group (this
    rank among them). SGLang assumes its ranks are the whole ``torch.distributed`` world;
    in a trainer they are not. So: its world group is created over ``ranks`` before it
    looks, the default world size reads ``len(ranks)`` and its barriers are among ``ranks``
    while it builds, every group is
    created with local synchronization (no rank outside ``ranks`` has to enter
    ``new_group``), and a group that does not start at rank 0 is shifted there by SGLang's
    own ``rank_offset``. SGLang's CPU thread binding is skipped (the trainer places its
    threads). With ``torch.distributed`` uninitialized (a tool, a test) SGLang
    creates a one-rank world itself.
    """
    import torch.distributed as dist

    ranks = [int(r) for r in ranks]
    if not dist.is_initialized():
        if len(ranks) != 1:
            raise RuntimeError("a tensor-parallel SGLang target needs torch.distributed initialized")
        yield
        return
    if dist.get_rank() not in ranks or ranks != list(range(ranks[0], ranks[0] + len(ranks))):
        raise RuntimeError(f"rank {dist.get_rank()}: the target's ranks {ranks} must be consecutive "
                           f"and include this rank")
    from sglang.srt.distributed import bootstrap
    from sglang.srt.distributed import parallel_state as ps

    real_new_group, real_size, real_barrier = dist.new_group, dist.get_world_size, dist.barrier
    real_init_mp, real_bind = bootstrap.initialize_model_parallel, bootstrap._bind_threads_if_cpu

    def new_group(*args, **kwargs):
        kwargs["use_local_synchronization"] = True
        return real_new_group(*args, **kwargs)

    def get_world_size(group=None):
        return len(ranks) if group is None else real_size(group)

    def barrier(group=None, **kwargs):  # SGLang's start-up barriers: among its ranks only
        return real_barrier(group=ps._WORLD.cpu_group if group is None else group, **kwargs)

    def initialize_model_parallel(*args, **kwargs):
        if ranks[0] > 0:
            kwargs["rank_offset"] = ranks[0]
        return real_init_mp(*args, **kwargs)

    dist.new_group, dist.get_world_size, dist.barrier = new_group, get_world_size, barrier
    bootstrap.initialize_model_parallel = initialize_model_parallel
    # the trainer owns thread placement: SGLang's CPU NUMA binding (one rank per NUMA
    # node) is not applied to the trainer's processes
    bootstrap._bind_threads_if_cpu = lambda **_: None
    try:
        if ps._WORLD is None:
            ps._WORLD = ps.init_world_group(ranks=ranks, local_rank=local_rank, backend=backend)
        yield
    finally:
        dist.new_group, dist.get_world_size, dist.barrier = real_new_group, real_size, real_barrier
        bootstrap.initialize_model_parallel, bootstrap._bind_threads_if_cpu = real_init_mp, real_bind


def _server_args(model_path: str, device: torch.device, dtype: torch.dtype, max_total_tokens: int,
                 mem_fraction_static: float, context_length: Optional[int], seed: int, tp_size: int):
    from sglang.srt.server_args import ServerArgs

    kw = dict(
        model_path=str(model_path), tp_size=int(tp_size), dtype={torch.float32: "float32", torch.bfloat16: "bfloat16",
                                                      torch.float16: "float16"}[dtype],
        device=device.type, disable_cuda_graph=True, disable_radix_cache=True,
        chunked_prefill_size=-1, skip_server_warmup=True, sampling_backend="pytorch",
        max_total_tokens=int(max_total_tokens), mem_fraction_static=float(mem_fraction_static),
        random_seed=int(seed), log_level="error",
    )
    if device.type == "cpu":
        kw["attention_backend"] = "torch_native"
    else:
        kw["base_gpu_id"] = int(device.index or 0)
    if context_length:
        kw["context_length"] = int(context_length)
    return ServerArgs(**kw)


class SGLangModelRunner:
    """SGLang's ``ModelRunner`` for one frozen target on this process's device.

    Args:
        model_path: local HF model directory.
        layer_ids: megaspark layer ids to capture (output of decoder layer ``k``).
        device, dtype: where and in what the target runs (SGLang's ``dtype``).
        max_total_tokens: KV-pool size in tokens: the most tokens one :meth:`prefill` takes.
        mem_fraction_static: SGLang's weights + KV share of the GPU (ignored on CPU).
        tp_ranks: the consecutive global ranks that run the target together with tensor
            parallelism (this rank among them; every one of them calls :meth:`prefill` with
            the same tokens and gets the whole features). ``None``: this rank alone.
    """

    def __init__(self, model_path: str, layer_ids: Sequence[int], device, dtype: torch.dtype,
                 max_total_tokens: int, mem_fraction_static: float = 0.35,
                 context_length: Optional[int] = None, seed: int = 42,
                 tp_ranks: Optional[Sequence[int]] = None):
        global _RUNNER_BUILT
        if _RUNNER_BUILT:
            raise RuntimeError("an SGLang ModelRunner was already built in this process: SGLang "
                               "initializes its parallel runtime once per process, so there is "
                               "one co-located target per process")
        self.device = torch.device(device)
        check_available(self.device.type, "--target-backend sglang")
        _RUNNER_BUILT = True
        from sglang.benchmark import one_batch as ob
        from sglang.srt.server_args import PortArgs

        t0 = time.perf_counter()
        self.layer_ids = [int(k) for k in layer_ids]
        self.max_total_tokens = int(max_total_tokens)
        import torch.distributed as dist

        me = dist.get_rank() if dist.is_initialized() else 0
        self.tp_ranks = [int(r) for r in tp_ranks] if tp_ranks else [me]
        tp_rank = self.tp_ranks.index(me) if me in self.tp_ranks else -1
        if tp_rank < 0:
            raise ValueError(f"rank {me} is not among the target's ranks {self.tp_ranks}")
        sa = _server_args(model_path, self.device, dtype, self.max_total_tokens, mem_fraction_static,
                          context_length, seed, len(self.tp_ranks))
        gpu_id = int(self.device.index or 0) if self.device.type != "cpu" else 0
        backend = "gloo" if self.device.type == "cpu" else "nccl"
        with _contained():
            sa.resolve_once()
            # Not ob._set_envs_and_config: it sets the process-wide multiprocessing start
            # method, a SIGQUIT handler and NCCL variables, which belong to the trainer.
            port_args = PortArgs.init_new(sa)
            ob.publish(sa, role="scheduler", ranks=ob.SpawnRanks(
                world_rank=ob.spawn_world_rank(sa, tp_rank=tp_rank, pp_rank=0), gpu_id=gpu_id))
            ob._init_process_global_configs()
            with _target_world(self.tp_ranks, backend, gpu_id):
                runner, _ = ob.load_model(sa, port_args, gpu_id, tp_rank)
        self._bench = runner
        self.runner = runner.torch_runner
        self.model = self.runner.model
        self._ob = ob
        self._install_capture()
        self.load_seconds = time.perf_counter() - t0

    def _install_capture(self) -> None:
        model = self.model
        if hasattr(model, "set_dflash_layers_to_capture"):
            model.set_dflash_layers_to_capture(self.layer_ids)
        elif hasattr(model, "set_eagle3_layers_to_capture"):
            model.set_eagle3_layers_to_capture(self.layer_ids)
        else:
            raise RuntimeError(f"SGLang's {type(model).__name__} has no aux hidden-state capture "
                               f"hook (set_dflash_layers_to_capture): it cannot serve as a "
                               f"co-located target")
        expected = [k + 1 for k in self.layer_ids]
        got = list(getattr(model.model, "layers_to_capture", []))
        if got != expected:
            raise RuntimeError(f"SGLang captures layers {got}, expected {expected}")
        self._captured = None

        def hook(_module, _inputs, output):
            self._captured = output

        model.model.register_forward_hook(hook)

    @torch.no_grad()
    def prefill(self, token_lists: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        """One prefill of ``token_lists``; returns ``(aux [T, L*H], last [T, H])`` with the
        samples' rows concatenated in order (``T = Σ len``)."""
        from array import array

        from sglang.srt.managers.schedule_batch import Req
        from sglang.srt.sampling.sampling_params import SamplingParams

        total = sum(len(t) for t in token_lists)
        if total > self.max_total_tokens:
            raise ValueError(f"{total} tokens in one prefill > the runner's KV pool of "
                             f"{self.max_total_tokens} tokens")
        reqs = []
        for i, t in enumerate(token_lists):
            if len(t) == 0:
                raise ValueError(f"sample {i} has no tokens")
            r = Req(rid=i, origin_input_text="", origin_input_ids=array("q", [int(x) for x in t]),
                    sampling_params=SamplingParams(temperature=0, max_new_tokens=1))
            r.full_untruncated_fill_ids = r.origin_input_ids
            r.logprob_start_len = -1
            r.extend_end = len(r.origin_input_ids)
            reqs.append(r)
        self._captured = None
        try:
            self._bench.extend(reqs)
        finally:
            self._bench.clear()
        out, self._captured = self._captured, None
        if not isinstance(out, tuple) or len(out) != 2:
            raise RuntimeError("SGLang's backbone returned no aux hidden states")
        last, aux = out
        if isinstance(aux, (list, tuple)):
            aux = torch.cat(list(aux), dim=-1)
        if aux.shape[0] != total or last.shape[0] != total:
            raise RuntimeError(f"SGLang returned {aux.shape[0]} aux / {last.shape[0]} last rows "
                               f"for {total} tokens")
        return aux, last


#: Environment variables SGLang's start-up sets for its own communicators; they would
#: change how the trainer's later NCCL groups and CUDA streams behave, so the trainer's
#: values (or their absence) are put back once the runner is built.
_TRAINER_ENV_PREFIXES = ("NCCL_", "CUDA_DEVICE_MAX_CONNECTIONS", "TORCH_NCCL_")


@contextlib.contextmanager
def _contained():
    """SGLang's start-up without its side effects on the trainer: its logging set-up (it
    installs a root handler, and logs every model module it skips on a CPU), the torch
    thread count (its CPU thread binding) and the NCCL/CUDA environment."""
    root = logging.getLogger()
    root_state = (list(root.handlers), root.level)
    names = ["sglang", "sglang.srt", "sglang.srt.models.registry"]
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    env = {k: v for k, v in os.environ.items() if k.startswith(_TRAINER_ENV_PREFIXES)}
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        for k in [k for k in os.environ if k.startswith(_TRAINER_ENV_PREFIXES)]:
            if k not in env:
                del os.environ[k]
        os.environ.update(env)
        root.handlers[:], _ = root_state[0], root.setLevel(root_state[1])
        for n, lvl in levels.items():
            logging.getLogger(n).setLevel(lvl)


__all__ = ["SGLangModelRunner", "prepare_environment", "check_available", "SGLANG_VERSION", "STAND_INS"]


# ---------------------------------------------------------------------------------------
# A draft export through SGLang's own DSpark draft class and weight loader
# ---------------------------------------------------------------------------------------

#: export tensors SGLang's DSpark loader skips: the draft uses the target's own
_FROM_TARGET = ("embed_tokens.weight", "lm_head.weight")
#: SGLang parameters that fuse several checkpoint tensors (concatenated along dim 0, TP 1)
_FUSED = {".self_attn.qkv_proj.": ("q_proj", "k_proj", "v_proj"), ".mlp.gate_up_proj.": ("gate_proj", "up_proj")}


def _sources(name: str) -> list:
    """Checkpoint tensor names an SGLang parameter is loaded from (in concatenation order)."""
    for fused, parts in _FUSED.items():
        if fused in name:
            head, tail = name.split(fused)
            sub = fused.strip(".").split(".")[0]  # self_attn / mlp
            return [f"{head}.{sub}.{p}.{tail}" for p in parts]
    return [name]


def check_draft_in_sglang(path: str) -> dict:
    """Build SGLang's DSpark draft model from the export at ``path`` (its ``architectures``
    class, on the CPU, one rank, fp32), load the export's weights with SGLang's own
    ``load_weights``, and compare every parameter SGLang built with the tensors it should
    have been loaded from. Returns ``{"architecture", "problems", "loaded", "ignored"}``:
    a parameter with no source tensor in the export (SGLang would keep its initial value,
    e.g. q/k norms of weight 1), a tensor no parameter reads (SGLang ignores unknown
    names), and a value that differs after loading are problems. One call per process
    (SGLang's runtime is initialized once)."""
    import json

    from safetensors.torch import load_file

    prepare_environment("cpu")
    from sglang.benchmark import one_batch as ob
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.distributed import bootstrap
    from sglang.srt.server_args import PortArgs, ServerArgs

    with open(os.path.join(path, "config.json")) as f:
        arch = json.load(f)["architectures"][0]
    with _contained():
        sa = ServerArgs(model_path=str(path), device="cpu", attention_backend="torch_native",
                        disable_cuda_graph=True, dtype="float32", skip_tokenizer_init=True, tp_size=1,
                        log_level="error", max_total_tokens=256)
        sa.resolve_once()
        port_args = PortArgs.init_new(sa)
        ob.publish(sa, role="scheduler", ranks=ob.SpawnRanks(
            world_rank=ob.spawn_world_rank(sa, tp_rank=0, pp_rank=0), gpu_id=0))
        ob._init_process_global_configs()
        model_config = ModelConfig.from_server_args(sa)
        with _target_world([0], "gloo", 0):
            bootstrap.init_parallel_runtime(server_args=sa, device="cpu", dist_port=port_args.nccl_port)
        bootstrap.init_layer_runtime(model_config=model_config)
        import sglang.srt.models.dspark as sg_dspark

        cls = getattr(sg_dspark, arch, None)
        if cls is None:
            return {"architecture": arch, "problems": [f"SGLang has no DSpark draft class {arch!r}"],
                    "loaded": 0, "ignored": []}
        model = cls(config=model_config.hf_config)
    tensors = {}
    for file in sorted(os.listdir(path)):
        if file.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(path, file)))
    problems, used = [], set()
    try:
        model.load_weights(list(tensors.items()))
    except (ValueError, KeyError, RuntimeError) as e:  # SGLang refuses some names itself
        problems.append(f"SGLang's loader refused the export: {e}")
    for name, param in model.named_parameters():
        srcs = _sources(name)
        missing = [s for s in srcs if s not in tensors]
        if missing:
            problems.append(f"SGLang parameter {name} has no tensor {missing[0]} in the export: "
                            f"it keeps its initial value")
            continue
        used.update(srcs)
        want = torch.cat([tensors[s].float() for s in srcs], dim=0)
        if tuple(want.shape) != tuple(param.shape) or not torch.equal(want, param.detach().float()):
            problems.append(f"SGLang parameter {name} does not hold the export's {'+'.join(srcs)} "
                            f"after loading")
    # the confidence head is built only in SGLang's dynamic ragged-verify mode
    # (models/dspark.py::build_confidence_head); in the default static mode it is not, and
    # its tensors are rightly unread
    ignored = sorted(k for k in tensors if k not in used and k not in _FROM_TARGET
                     and not (k.startswith("confidence_head.") and getattr(model, "confidence_head", None) is None))
    problems += [f"export tensor {k} is read by no SGLang parameter (ignored)" for k in ignored]
    return {"architecture": arch, "problems": problems, "loaded": len(used), "ignored": ignored}
