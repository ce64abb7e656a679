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
import json
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


def missing_message(flag: str, alternative: str = "") -> Optional[str]:
    """None where the sglang package is installed; otherwise the one message, naming
    ``flag``, that says how to install it (``alternative``: what else the user can do)."""
    if importlib.util.find_spec("sglang") is not None:
        return None
    return (f"{flag} needs the sglang package ({SGLANG_VERSION}), which is not installed. "
            f"Install it with `{INSTALL_HINT}` (CPU: the pinned CPU torch is kept), or use "
            f"the GPU image (docker/Dockerfile){alternative}.")


def check_available(device_type: str, flag: str) -> None:
    """Fail fast, naming ``flag``, when SGLang cannot be imported here."""
    missing = missing_message(flag)
    if missing:
        raise RuntimeError(missing)
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


__all__ = ["SGLangModelRunner", "SGLangDraft", "check_draft_in_sglang", "prepare_environment", "check_available", "missing_message", "SGLANG_VERSION", "STAND_INS"]


# ---------------------------------------------------------------------------------------
# A draft export through SGLang's own DSpark draft class and weight loader
# ---------------------------------------------------------------------------------------

#: export tensors SGLang's DSpark loader skips: the draft uses the target's own
_FROM_TARGET = ("embed_tokens.weight", "lm_head.weight")
#: SGLang parameters that fuse several checkpoint tensors (concatenated along dim 0, TP 1)
_FUSED = {".self_attn.qkv_proj.": ("q_proj", "k_proj", "v_proj"), ".mlp.gate_up_proj.": ("gate_proj", "up_proj")}


#: Eagle3 tensors that are no parameter: SGLang reads d2t as its hot-token map, skips t2d
_EAGLE3_MAPS = ("d2t", "t2d")


def _export_name(name: str) -> str:
    """An SGLang parameter name as the export names it (Eagle3: ``model.`` prefix dropped,
    ``layers.0`` is EAGLE-3's ``midlayer``)."""
    if name.startswith("model."):
        name = name[len("model."):]
        if name.startswith("layers.0."):
            name = "midlayer." + name[len("layers.0."):]
    return name


def _sources(name: str) -> list:
    """Checkpoint tensor names an SGLang parameter is loaded from (in concatenation order)."""
    for fused, parts in _FUSED.items():
        if fused in name:
            head, tail = name.split(fused)
            sub = fused.strip(".").split(".")[0]  # self_attn / mlp
            return [_export_name(f"{head}.{sub}.{p}.{tail}") for p in parts]
    return [_export_name(name)]


class SGLangDraft:
    """An HF draft export as SGLang builds and runs it: SGLang's own DSpark draft class
    (the export's ``architectures``), on the CPU, one rank, fp32, its weights read by
    SGLang's own ``load_weights``. One per process (SGLang's runtime is initialized once).

    :meth:`check` compares every parameter SGLang built with the export's tensors;
    :meth:`propose` runs draft blocks through SGLang's forward and its own drafting loop.
    The confidence head is built (SGLang builds it only in a dynamic ragged-verify mode)
    when the export has one, so that its loading and outputs are checked too."""

    def __init__(self, path: str):
        from safetensors.torch import load_file

        prepare_environment("cpu")
        from sglang.benchmark import one_batch as ob
        from sglang.srt.configs.model_config import ModelConfig
        from sglang.srt.distributed import bootstrap
        from sglang.srt.server_args import PortArgs, ServerArgs

        self.path = str(path)
        with open(os.path.join(self.path, "config.json")) as f:
            self.architecture = json.load(f)["architectures"][0]
        self.tensors = {}
        for file in sorted(os.listdir(self.path)):
            if file.endswith(".safetensors"):
                self.tensors.update(load_file(os.path.join(self.path, file)))
        has_confidence = any(k.startswith("confidence_head.") for k in self.tensors)
        verify_mode = os.environ.get("SGLANG_RAGGED_VERIFY_MODE")
        with _contained():
            sa = ServerArgs(model_path=self.path, device="cpu", attention_backend="torch_native",
                            disable_cuda_graph=True, dtype="float32", skip_tokenizer_init=True,
                            tp_size=1, log_level="error", max_total_tokens=256)
            sa.resolve_once()
            port_args = PortArgs.init_new(sa)
            ob.publish(sa, role="scheduler", ranks=ob.SpawnRanks(
                world_rank=ob.spawn_world_rank(sa, tp_rank=0, pp_rank=0), gpu_id=0))
            ob._init_process_global_configs()
            model_config = ModelConfig.from_server_args(sa)
            with _target_world([0], "gloo", 0):
                bootstrap.init_parallel_runtime(server_args=sa, device="cpu", dist_port=port_args.nccl_port)
            bootstrap.init_layer_runtime(model_config=model_config)
            if self.architecture == "LlamaForCausalLMEagle3":
                from sglang.srt.models import llama_eagle3 as module
            else:
                import sglang.srt.models.dspark as module

            cls = getattr(module, self.architecture, None)
            self.model = None
            if cls is not None:
                if has_confidence:  # models/dspark.py::build_confidence_head
                    os.environ["SGLANG_RAGGED_VERIFY_MODE"] = "cap-accept"
                try:
                    self.model = cls(config=model_config.hf_config).float().eval()
                finally:
                    if verify_mode is None:
                        os.environ.pop("SGLANG_RAGGED_VERIFY_MODE", None)
                    else:
                        os.environ["SGLANG_RAGGED_VERIFY_MODE"] = verify_mode
        self.load_error = None
        if self.model is not None:
            try:
                self.model.load_weights(list(self.tensors.items()))
            except (ValueError, KeyError, RuntimeError) as e:  # SGLang refuses some names itself
                self.load_error = str(e)

    def check(self) -> dict:
        """``{"architecture", "problems", "loaded", "ignored"}``: a parameter with no source
        tensor in the export (SGLang would keep its initial value, e.g. q/k norms of weight
        1), a tensor no parameter reads (SGLang ignores unknown names), a value that differs
        after loading, and a loader error are problems."""
        if self.model is None:
            return {"architecture": self.architecture, "loaded": 0, "ignored": [],
                    "problems": [f"SGLang has no DSpark draft class {self.architecture!r}"]}
        tensors = self.tensors
        problems, used = [], set()
        if self.load_error is not None:
            problems.append(f"SGLang's loader refused the export: {self.load_error}")
        for name, param in self.model.named_parameters():
            srcs = _sources(name)
            if srcs[0] in _FROM_TARGET:  # an Eagle3 draft's own embedding: the target's
                continue
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
        if "d2t" in tensors:  # Eagle3: SGLang's hot-token map must be the draft vocabulary
            hot = getattr(self.model, "hot_token_id", None)
            want = tensors["d2t"].long() + torch.arange(tensors["d2t"].numel())
            if hot is None or not torch.equal(torch.as_tensor(hot).long().cpu(), want):
                problems.append("SGLang's hot-token map (from d2t) is not the export's draft vocabulary")
            else:
                used.add("d2t")
        # without a confidence head in the export SGLang builds none here, and nothing of
        # it is read
        ignored = sorted(k for k in tensors if k not in used and k not in _FROM_TARGET
                         and k not in _EAGLE3_MAPS
                         and not (k.startswith("confidence_head.")
                                  and getattr(self.model, "confidence_head", None) is None))
        problems += [f"export tensor {k} is read by no SGLang parameter (ignored)" for k in ignored]
        return {"architecture": self.architecture, "problems": problems, "loaded": len(used),
                "ignored": ignored}

    def attach_target(self, embed_weight: Tensor, lm_head_weight: Tensor) -> None:
        """The target's embedding and LM head, as SGLang's worker attaches them
        (``attach_shared_modules``), built as SGLang's vocab-parallel modules."""
        from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

        vocab, hidden = lm_head_weight.shape
        embed = VocabParallelEmbedding(vocab, hidden).float()
        head = ParallelLMHead(vocab, hidden).float()
        for module, w in ((embed, embed_weight), (head, lm_head_weight)):
            loader = getattr(module.weight, "weight_loader")
            loader(module.weight, w.float())
        self.model.attach_shared_modules(embed_tokens=embed, lm_head=head)

    @torch.no_grad()
    def propose(self, context_features: Sequence[Tensor], anchors: Sequence[int]) -> dict:
        """Greedy draft blocks for a batch of sequences, as SGLang's DSpark worker drafts
        (``dspark_components/dspark_draft.py``): sequence i's context features
        ``[N_i, L·H]`` (positions 0…N_i−1) are projected and written to the draft KV pool
        (``write_target_hidden_kv``), the block ``[anchor, mask…]`` at positions N_i… runs
        through the draft layers (``forward``: attention over the context KV and the whole
        block), then ``compute_base_logits``, the Markov loop ``draft_markov_block`` and
        ``compute_confidence``. Returns ``tokens [n, γ]``, ``logits [n, γ, V]`` (the
        corrected step logits), ``base_logits``, ``hidden [n, γ, H]`` and ``confidence
        [n, γ]`` (None without a confidence head).

        The attention kernel is SGLang's torch-native backend (its CPU backend) run as one
        extend over the cached context; the GPU kernels and the target-verify batch
        plumbing of a served decode step do not run here."""
        from types import SimpleNamespace

        from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
        from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
        from sglang.srt.model_executor.forward_context import ForwardContext, forward_context
        from sglang.srt.runtime_context import get_parallel
        from sglang.srt.speculative.dspark_components.dspark_draft import DraftNoise, draft_markov_block
        from sglang.srt.speculative.spec_tp_sync import SpecTpSync

        model = self.model
        if model.lm_head is None:
            raise RuntimeError("SGLangDraft.propose needs the target's embedding and LM head "
                               "(attach_target)")
        n, gamma = len(anchors), int(model.gamma)
        lens = [int(f.shape[0]) for f in context_features]
        attn = model.layers[0].self_attn
        total = sum(lens) + n * gamma
        pool = MHATokenToKVPool(size=total + 1, page_size=1, dtype=torch.float32,
                                head_num=attn.num_kv_heads, head_dim=attn.head_dim,
                                layer_num=len(model.layers), device="cpu", enable_memory_saver=False)
        req_to_token = torch.zeros(n, max(lens) + gamma, dtype=torch.int32)
        slot = 1  # slot 0 is SGLang's padding slot
        ctx_loc, blk_loc, ctx_pos, blk_pos = [], [], [], []
        for i, length in enumerate(lens):
            slots = torch.arange(slot, slot + length + gamma)
            req_to_token[i, :length + gamma] = slots.int()
            ctx_loc.append(slots[:length])
            blk_loc.append(slots[length:])
            ctx_pos.append(torch.arange(length))
            blk_pos.append(torch.arange(length, length + gamma))
            slot += length + gamma
        model.write_target_hidden_kv(target_hidden=torch.cat(list(context_features)).float(), pool=pool,
                                     positions=torch.cat(ctx_pos), cache_loc=torch.cat(ctx_loc))
        ids = torch.full((n, gamma), int(model.draft_config.mask_token_id), dtype=torch.long)
        ids[:, 0] = torch.as_tensor([int(a) for a in anchors])
        backend = TorchNativeAttnBackend(SimpleNamespace(
            device=torch.device("cpu"), token_to_kv_pool=pool,
            req_to_token_pool=SimpleNamespace(req_to_token=req_to_token)))
        seq_lens = torch.as_tensor([length + gamma for length in lens])
        batch = ForwardBatch(
            forward_mode=ForwardMode.EXTEND, batch_size=n, input_ids=ids.flatten(),
            req_pool_indices=torch.arange(n), seq_lens=seq_lens, out_cache_loc=torch.cat(blk_loc),
            seq_lens_sum=int(seq_lens.sum()), seq_lens_cpu=seq_lens, positions=torch.cat(blk_pos),
            extend_prefix_lens=torch.as_tensor(lens), extend_seq_lens=torch.full((n,), gamma),
            extend_num_tokens=n * gamma)
        with forward_context(ForwardContext(attn_backend=backend)):
            backend.init_forward_metadata(batch)
            hidden = model.forward(ids.flatten(), batch.positions, batch).hidden_states
        base, features = model.compute_base_logits(hidden)
        base = base.view(n, gamma, -1)
        tokens, logits = draft_markov_block(
            markov_head=model.markov_head, base_logits=base, anchor_tokens=ids[:, 0],
            draft_hidden=hidden.view(n, gamma, -1), step_temperatures=torch.zeros(n),
            noise=DraftNoise(key=0, offset=torch.zeros(1, dtype=torch.int64)),
            tp_sync=SpecTpSync(get_parallel().tp_group), greedy_draft=False)
        confidence = None
        if model.confidence_head is not None:
            confidence, _ = model.compute_confidence(anchor_tokens=ids[:, 0], draft_tokens=tokens,
                                                     confidence_features=features)
        return {"tokens": tokens, "logits": logits, "base_logits": base,
                "hidden": hidden.view(n, gamma, -1), "confidence": confidence}


def check_draft_in_sglang(path: str) -> dict:
    """:meth:`SGLangDraft.check` of the export at ``path`` (one call per process)."""
    return SGLangDraft(path).check()
