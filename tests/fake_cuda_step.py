"""Worker of tests/test_fake_accelerator.py: one whole training step of the real Trainer
(target features, blocks on the device, draft forward, the three losses, backward through
megatron's schedule and DDP, the DP metric reduction) as one rank of a TP=2 × DP=2 job, in
a single process.

    python -m tests.fake_cuda_step TARGET_DIR RANK MODE [INJECT]

* MODE ``fake``: every parameter, input and buffer is a *fake CUDA tensor*
  (``FakeTensorMode`` on this CPU-only torch, :func:`megaspark.platform.emulated_accelerator`
  so nothing maps CUDA back to the CPU). A CPU tensor meeting a CUDA one raises, as on a
  GPU, and so does any read of device data on the host (``.item()``, ``nonzero``...).
  Collectives run on torch's fake process group; every tensor handed to one must be on the
  compute device, NCCL's rule (checked here, since the fake group itself accepts anything).
* MODE ``syncs``: the same step on real CPU tensors under a dispatch mode that records every
  operation that reads device data back to the host, with the line of megaspark/megatron/
  transformers code that asked for it.

``INJECT`` puts a known bug back (a test of the test): ``metrics-cpu`` (the DP metric
reduction builds its buffer on the CPU), ``broadcast-cpu`` (TP peers receive the target's
features into CPU buffers), ``blocks-cpu`` (the blocks' aligned indices stay on the CPU
while the target's last hidden state is on the device).

The host half of the step (sampling the data, building blocks) runs outside fake mode: it is
the data loader's work, on real host tensors, before anything reaches the device. Prints one
JSON line: ``{"ok": bool, "error": str, "syncs": [...], "loss_device": ...}``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

WORLD, TP = 4, 2
#: The emulated accelerator. A CPU-only torch creates fake ``cuda`` tensors but cannot index
#: them (``t[2:5]`` needs a CUDA device guard: "PyTorch is not linked with support for cuda
#: devices"), and megatron's DDP slices its buffers. ``lazy`` is the one non-CPU device type
#: this build has a device guard for; under FakeTensorMode a CPU/``lazy`` mix raises
#: FakeTensorDeviceMismatchError exactly as a CPU/CUDA mix does on a GPU.
EMULATED = "lazy:0"
#: ops that make the host wait for device data
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim",
            "unique_consecutive", "equal", "is_nonzero", "repeat_interleave", "masked_scatter"}
COLLECTIVES = ("all_reduce", "broadcast", "send", "recv", "isend", "irecv", "all_gather_into_tensor",
               "reduce_scatter_tensor", "all_gather", "reduce")


def _flags(target_dir, data_dir):
    return ["--target-model", target_dir, "--data-path", data_dir, "--num-layers", "2",
            "--block-size", "4", "--num-anchors", "6", "--markov-rank", "8", "--markov-head-type", "gated",
            "--seq-length", "64", "--micro-batch-size", "1", "--global-batch-size", "4",
            "--num-target-taps", "2", "--tensor-model-parallel-size", str(TP), "--bf16"]


def _site(stack) -> str:
    for frame in reversed(stack):
        f = frame.filename.replace(os.sep, "/")
        for root in ("/megaspark/", "/megatron/", "/transformers/", "/tests/"):
            if root in f and "fake_cuda_step" not in f and not f.endswith("megaspark/platform.py"):
                return f"{root.strip('/')}/{f.split(root, 1)[1]}:{frame.lineno}:{frame.name}"
    return "?"


def main(target_dir, data_dir, rank, mode, inject=None):
    rank = int(rank)
    import torch
    from torch.testing._internal.distributed.fake_pg import FakeStore

    os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(WORLD))
    torch.distributed.init_process_group("fake", store=FakeStore(), rank=rank, world_size=WORLD)
    from megatron.core import parallel_state, tensor_parallel

    from megaspark import platform

    platform.install_cpu_compat()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP, create_gloo_process_groups=False)
    tensor_parallel.model_parallel_cuda_manual_seed(0)

    import pretrain_dspark
    from megaspark import losses
    from megaspark.arguments import parse_args
    from megaspark.arguments.configs import run_config
    from megaspark.data.dataset import PreparedDataset
    from megaspark.targets.builtin import default_mask_token_id
    from megaspark.targets.checkpoint import TargetInfo
    from megaspark.targets.hf import HFTargetProvider
    from megaspark.training import batches
    from megaspark.training.pretrain import build_model_chunks, draft_config
    from megaspark.training.trainer import Trainer, wrap_ddp

    args = parse_args(_flags(target_dir, data_dir), world_size=WORLD)
    info = TargetInfo(target_dir, None)
    dcfg = draft_config(args, info.hf_config)
    args.target_layer_ids_resolved = list(dcfg.target_layer_ids)
    info = TargetInfo(target_dir, args.target_layer_ids_resolved)
    dcfg.mask_token_id = default_mask_token_id(info.tokenizer, info.hf_config)
    args.target_dtype_resolved = torch.bfloat16
    target = None
    if batches.computes_target():
        target = HFTargetProvider(target_dir, layer_ids=args.target_layer_ids_resolved, dtype=torch.bfloat16)
    cfg = run_config(args)
    chunks, tcfg = build_model_chunks(cfg, dcfg, pretrain_dspark.model_provider)
    for chunk in chunks:
        chunk.load_target_embedding_shards(info)
    train = PreparedDataset(data_dir, "train", vocab_size=dcfg.vocab_size)

    fake = mode == "fake"
    syncs: list = []
    recording = {"on": False}
    host_ctx = _host_context(fake, recording)

    # --- the injected bugs -------------------------------------------------------------
    if inject == "metrics-cpu":
        import megaspark.training.trainer as trainer_mod

        orig_stack = losses.stack_metrics
        trainer_mod.stack_metrics = lambda sums, group=None, device=None: orig_stack(sums, group, torch.device("cpu"))
    elif inject == "broadcast-cpu":
        orig_first = batches._first_stage_features

        def first_stage_features(output, blocks, dcfg, compute, device, dtype, **kw):
            return orig_first(output, blocks, dcfg, compute, device if compute else torch.device("cpu"), dtype,
                              **kw)

        batches._first_stage_features = first_stage_features
    elif inject == "blocks-cpu":
        orig_align = batches.align_to_blocks
        batches.align_to_blocks = lambda last, index: orig_align(last, index.cpu())
    elif inject is not None:
        raise ValueError(f"unknown injection {inject}")

    # --- host work stays on real host tensors ---------------------------------------------
    import megaspark.training.trainer as trainer_mod

    orig_host = batches.build_host_blocks
    batches.build_host_blocks = trainer_mod.build_host_blocks = (
        lambda *a, **k: _call_in(host_ctx, orig_host, *a, **k))
    orig_micro = Trainer._micro_batches
    Trainer._micro_batches = lambda self, *a, **k: _call_in(host_ctx, orig_micro, self, *a, **k)

    # The optimizer step is not part of the checked step (megatron's optimizer also wants
    # gloo groups, which torch's fake process group cannot create): a stand-in for zero_grad.
    import megaspark.training.trainer as trainer_mod

    class _NoOptimizer:
        param_groups = [{"lr": 0.0}]

        def zero_grad(self):
            pass

    trainer_mod.build_optimizer = lambda optim, ddp_chunks, *rest: (_NoOptimizer(), None)

    _check_collective_devices(torch)
    result = {"ok": False, "error": "", "syncs": [], "loss_device": None}
    try:
        if fake:
            from torch._subclasses.fake_tensor import FakeTensorMode

            import types

            torch.lazy = types.ModuleType("lazy")  # torch.utils.checkpoint looks up torch.<device type>
            with platform.emulated_accelerator(EMULATED) as dev, FakeTensorMode(allow_non_fake_inputs=True) as mode:
                for chunk in chunks:
                    _to_fake(chunk, mode, dev)
                if target is not None:
                    _to_fake(target.model, mode, dev)
                    target.device = dev
                reports, keys, buf = _step(cfg, chunks, tcfg, dcfg, target, train, wrap_ddp, Trainer)
                result["loss_device"] = str(buf.device) if buf is not None else None
                assert buf is None or buf.device == dev, buf.device
        else:
            from torch.utils._python_dispatch import TorchDispatchMode

            class Recorder(TorchDispatchMode):
                def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                    name = func._schema.name.split("::")[-1]
                    if recording["on"] and (name in SYNC_OPS or _bool_index(func, args)):
                        syncs.append(f"{name} @ {_site(traceback.extract_stack())}")
                    return func(*args, **(kwargs or {}))

            with Recorder():
                recording["on"] = True
                _step(cfg, chunks, tcfg, dcfg, target, train, wrap_ddp, Trainer)
                recording["on"] = False
        result["ok"] = True
    except Exception as e:  # noqa: BLE001 - reported to the parent test
        result["error"] = f"{type(e).__name__}: {e}"[:2000]
        if os.environ.get("FAKE_STEP_TRACE"):
            traceback.print_exc()
    result["syncs"] = sorted(set(syncs))
    print("RESULT " + json.dumps(result), flush=True)


def _step(cfg, chunks, tcfg, dcfg, target, train, wrap_ddp, Trainer):
    ddp_chunks = wrap_ddp(chunks, tcfg, cfg.parallel.use_distributed_optimizer)
    trainer = Trainer(cfg, chunks, ddp_chunks, tcfg, dcfg, target, train, None,
                      __import__("pretrain_dspark").forward_step, pad_id=train.pad_id)
    micro = trainer._micro_batches(train, 0, cfg.optim.num_microbatches)
    reports = trainer.forward_backward(micro)
    keys, buf = trainer.stack_reports(reports)
    return reports, keys, buf


def _host_context(fake: bool, recording: dict):
    import contextlib

    @contextlib.contextmanager
    def ctx():
        before = recording["on"]
        recording["on"] = False
        try:
            if fake:
                from torch._subclasses.fake_tensor import unset_fake_temporarily

                with unset_fake_temporarily():
                    yield
            else:
                yield
        finally:
            recording["on"] = before

    return ctx


def _call_in(ctx, fn, *a, **k):
    with ctx():
        return fn(*a, **k)


def _bool_index(func, args) -> bool:
    """``x[mask]`` with a boolean mask: its output shape depends on device data."""
    import torch

    if func._schema.name != "aten::index" or len(args) < 2:
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))


def _to_fake(module, mode, device):
    """Replace every parameter and buffer of ``module`` by a fake tensor on ``device``
    (same dtype, shape, requires_grad and megatron's parameter attributes)."""
    import torch

    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            new = torch.nn.Parameter(mode.from_tensor(p.detach()).to(device), requires_grad=p.requires_grad)
            for attr, value in vars(p).items():
                setattr(new, attr, value)
            sub._parameters[name] = new
        for name, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[name] = mode.from_tensor(b).to(device)


def _check_collective_devices(torch):
    """NCCL takes device tensors only: make every collective refuse a tensor that is not on
    the compute device (torch's fake process group itself accepts anything)."""
    from megaspark import platform

    dist = torch.distributed

    def wrap(name):
        orig = getattr(dist, name)

        def checked(tensor, *a, **k):
            tensors = tensor if isinstance(tensor, (list, tuple)) else [tensor]
            tensors += [x for x in a if isinstance(x, torch.Tensor)]
            for t in tensors:
                if isinstance(t, torch.Tensor) and t.device != platform.compute_device():
                    raise RuntimeError(
                        f"torch.distributed.{name} got a tensor on {t.device}; NCCL needs tensors on the "
                        f"compute device {platform.compute_device()}")
            return orig(tensor, *a, **k)

        setattr(dist, name, checked)

    for name in COLLECTIVES:
        wrap(name)

    # c10d's coalesced all-reduce has no fake-tensor implementation: let megatron's DDP issue
    # its bucket all-reduces one by one (each one checked above).
    import contextlib

    from megatron.core.distributed import param_and_grad_buffer

    class _Coalesced:
        def wait(self):
            pass

    @contextlib.contextmanager
    def one_by_one(*_a, **_k):
        yield _Coalesced()

    param_and_grad_buffer._coalescing_manager = one_by_one


if __name__ == "__main__":
    main(*sys.argv[1:5], *(sys.argv[5:6] or [None]))
