"""Reshardable, atomic training checkpoints (DESIGN.md decision 6).

Layout of ``--save``::

    iter_0000100/           megatron-core dist_checkpointing (model + optimizer, sharded)
        megaspark_state.pt  iteration, consumed samples, scheduler, args, DSpark config,
                            target fingerprint, best eval tau, loss history
        rng_rank{r}.pt      RNG state of every rank
        checksums.json      size and sha256 of every file above, written last
    latest                  text file: the name of the newest complete checkpoint
    best                    text file: the checkpoint with the best eval tau

A checkpoint is written to ``iter_N.tmp`` and renamed only when complete, then
``latest`` is replaced atomically; a run killed mid-write leaves the previous checkpoint
and pointer intact. A write that fails on any rank (a full disk) is noticed by every rank
in the same save: nothing is renamed, the partial directory is removed and the run stops
naming the checkpoint that stays usable. Resuming from a ``--save`` directory (``--load``
or auto-resume) verifies the newest checkpoint against its ``checksums.json`` and falls
back to the newest intact one, saying why. Rotation keeps ``--keep-last`` checkpoints and
never deletes the ones ``latest`` or ``best`` point to.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

import torch

from megaspark.checkpoint_files import (
    ITER_RE,
    STATE_FILE,
    CheckpointError,
    find_resumable,
    resolve_checkpoint,
    write_manifest,
)
from megaspark.fileio import atomic_write_text
from megaspark.training.logging import print_line
from megaspark.training.resilience import fault


def prestart_checkpoint_writer() -> None:
    """Start dist_checkpointing's result-queue manager now, by fork, before any process
    group exists. Left to itself it spawns a fresh interpreter at the first save
    (~10 s on a small machine); forking after the communicators exist would be unsafe."""
    import multiprocessing as mp

    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:  # layout differs in other megatron-core releases: keep the default
        return
    if getattr(filesystem_async, "_results_queue", "missing") is None:
        from multiprocessing.managers import SyncManager

        manager = SyncManager(ctx=mp.get_context("fork"))
        manager.start(_die_with_parent)  # a killed rank leaves no orphaned manager behind
        filesystem_async._results_queue = manager.Queue()


def _die_with_parent() -> None:
    """In a helper process: be killed when the process that started it dies (Linux
    PR_SET_PDEATHSIG; elsewhere nothing)."""
    import signal

    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def choose_resume(config) -> Optional[str]:
    """The checkpoint this run resumes from, decided on rank 0 and shared with every rank:
    ``--load`` (a checkpoint, or a --save directory: its newest intact checkpoint), else,
    unless ``--no-auto-resume``, the newest intact checkpoint in ``--save``. Corrupt or
    incomplete newer checkpoints are reported; a ``--load`` with nothing intact is an
    error."""
    load, save, auto = config.load, config.save, config.auto_resume
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    result = [None, [], None, None]  # path, problems, error, note
    if rank0:
        try:
            path, problems, note = None, [], None
            if auto and save and os.path.abspath(save) != os.path.abspath(load or ""):
                # a requeued run goes on from its own checkpoints, whatever it started from
                path, problems = find_resumable(save)
                if path and load:
                    note = f"--load {load} skipped: --save holds this run's checkpoints"
            if path is None and load:
                path, more = find_resumable(load)
                problems += more
            elif path is None and auto and save:
                path, problems = find_resumable(save)
            result = [path, problems, None, note]
        except CheckpointError as e:
            result = [None, [], str(e), None]
        except Exception as e:  # noqa: BLE001 - every rank must hear of it, not wait
            result = [None, [], f"checking the checkpoints failed on rank 0: {type(e).__name__}: {e}", None]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(result, src=0)
    path, problems, error, note = result
    if error:
        raise CheckpointError(error)
    for p in problems:
        if rank0:
            print_line(f"megaspark: checkpoint not usable, skipped: {p}")
    if path is None:
        if load:
            raise CheckpointError(f"--load {load}: no intact megaspark checkpoint there"
                                  + (f" ({len(problems)} damaged)" if problems else ""))
        return None
    if rank0:
        if note:
            print_line(f"megaspark: {note}")
        how = "--load" if load and not note else "auto-resume (--no-auto-resume starts afresh)"
        print_line(f"megaspark: {how}: resuming from {path}"
                   + (" (the newest intact checkpoint)" if problems else ""))
    return path


def _torch_optimizers(optimizer):
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        yield opt.optimizer


def _initialise_adam_state(optimizer) -> None:
    """A fresh torch Adam has no state for megatron to load into (and its distributed
    optimizer insists on one shared 'step'): create zero moments and step 0."""
    for opt in _torch_optimizers(optimizer):
        for group in opt.param_groups:
            for p in group["params"]:
                state = opt.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p.data)
                    state["exp_avg_sq"] = torch.zeros_like(p.data)
                if "step" not in state:
                    state["step"] = torch.tensor(0.0)


def _tolerate_missing_step(optimizer) -> None:
    """megatron-core's fully-reshardable loader copies every key of a parameter's torch
    Adam state from the checkpoint, but never stores 'step' there (it restores the step
    from the param groups instead). Hide 'step' while each parameter's state is copied."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        setter = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if setter is None or getattr(setter, "_megaspark_patched", False):
            continue

        def patched(model_param, tensors, _opt=opt, _orig=setter):
            group_index, group_order = _opt.model_param_group_index_map[model_param]
            main_param = _opt.optimizer.param_groups[group_index]["params"][group_order]
            state = _opt.optimizer.state[main_param]
            step = state.pop("step", None) if "step" not in tensors else None
            try:
                _orig(model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step

        patched._megaspark_patched = True
        opt._set_main_param_and_optimizer_states = patched


def _unshare_adam_steps(optimizer) -> None:
    """After a load every parameter may point at one shared 'step' tensor; torch Adam
    increments steps in place, so give each parameter its own copy."""
    for opt in _torch_optimizers(optimizer):
        for state in opt.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


class Checkpointer:
    """Saves, rotates and checks the checkpoints of a run (a :class:`RunConfig`: its
    ``checkpoint`` and ``parallel`` sections). ``flags``: the run's validated flags as a dict,
    recorded in every checkpoint (``state["args"]``; exports read the target from it)."""

    def __init__(self, cfg, dcfg, target_fingerprint: str, flags: Optional[dict] = None):
        self.cfg = cfg
        self.flags = dict(flags or {})
        self.dcfg = dcfg
        self.target_fingerprint = target_fingerprint
        self._best_pending: Optional[int] = None

    def mark_best_pending(self, iteration: int) -> None:
        """The next save at ``iteration`` becomes ``best``."""
        self._best_pending = iteration

    def _sharded(self, trainer, is_loading: bool):
        per_chunk = [chunk.sharded_state_dict() for chunk in trainer.chunks]
        # checkpoint keys are global either way; the nesting only mirrors the chunks
        model_sd = per_chunk[0] if len(per_chunk) == 1 else {
            f"chunk{i}": sd for i, sd in enumerate(per_chunk)}
        return {
            "model": model_sd,
            # fully_reshardable: optimizer state can be loaded at another TP/PP/DP layout
            "optimizer": trainer.optimizer.sharded_state_dict(
                model_sd, is_loading=is_loading,
                metadata={"distrib_optim_sharding_type": "fully_reshardable"},
            ),
        }

    def save(self, trainer) -> str:
        from megatron.core import dist_checkpointing

        root = self.cfg.checkpoint.save
        rank = torch.distributed.get_rank()
        it = trainer.state.iteration
        name = f"iter_{it:07d}"
        final, tmp = os.path.join(root, name), os.path.join(root, name + ".tmp")
        if rank == 0:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        _barrier()
        error = None
        try:
            fault("save-begin", it)
            dist_checkpointing.save(self._sharded(trainer, is_loading=False), tmp)
            fault("save-shards", it)
            torch.save({"cpu": torch.get_rng_state()}, os.path.join(tmp, f"rng_rank{rank}.pt"))
            if rank == 0:
                torch.save(self._state(trainer), os.path.join(tmp, STATE_FILE))
            fault("save-state", it)
        except Exception as e:  # noqa: BLE001 - every rank learns of it below, then all raise
            error = f"{type(e).__name__}: {e}"
        self._raise_if_failed(error, name, tmp)
        if rank == 0:
            try:
                write_manifest(tmp)
                fault("save-manifest", it)
            except Exception as e:  # noqa: BLE001
                error = f"{type(e).__name__}: {e}"
        self._raise_if_failed(error, name, tmp)
        fault("save-rename", it)
        if rank == 0:
            try:
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
                atomic_write_text(os.path.join(root, "latest"), name)
                if self._best_pending == it:
                    atomic_write_text(os.path.join(root, "best"), name)
                self._rotate(root)
                print_line(f"saved checkpoint {final}")
            except Exception as e:  # noqa: BLE001
                error = f"{type(e).__name__}: {e}"
        self._raise_if_failed(error, name, tmp)
        return final

    def _state(self, trainer) -> dict:
        return {
            "iteration": trainer.state.iteration,
            "consumed_samples": trainer.state.consumed_samples,
            "best_eval_tau": trainer.state.best_eval_tau,
            "history": list(trainer.state.history),
            "skipped_nonfinite": trainer.state.skipped_nonfinite,
            "scheduler": trainer.scheduler.state_dict(),
            "args": self.flags,
            "dspark_config": self.dcfg.to_dict(),
            "target_fingerprint": self.target_fingerprint,
            "has_manifest": True,
            "parallel_layout": {
                "tp": self.cfg.parallel.tensor_model_parallel_size,
                "pp": self.cfg.parallel.pipeline_model_parallel_size,
                "dp": self.cfg.parallel.data_parallel_size,
            },
        }

    def _raise_if_failed(self, error: Optional[str], name: str, tmp: str) -> None:
        """Every rank calls this at the same point of a save: if the write failed anywhere,
        the partial directory goes and every rank raises the same error."""
        errors = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(errors, error)
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if not failed:
            return
        if torch.distributed.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        pointer = os.path.join(self.cfg.checkpoint.save, "latest")
        previous = None
        if os.path.isfile(pointer):
            with open(pointer) as f:
                previous = f.read().strip()
        kept = (f"{os.path.join(self.cfg.checkpoint.save, previous)} ('latest') is intact and a restart resumes from it"
                if previous else "no earlier checkpoint exists; a restart begins afresh")
        r, e = failed[0]
        raise CheckpointError(f"saving checkpoint {name} failed on rank {r} ({e}); nothing was "
                              f"renamed or deleted: {kept}")

    def _rotate(self, root: str) -> None:
        protected = set()
        for pointer in ("latest", "best"):
            p = os.path.join(root, pointer)
            if os.path.isfile(p):
                with open(p) as f:
                    protected.add(f.read().strip())
        names = sorted(n for n in os.listdir(root) if ITER_RE.match(n))
        keep = set(names[-self.cfg.checkpoint.keep_last:]) | protected
        for n in names:
            if n not in keep:
                shutil.rmtree(os.path.join(root, n), ignore_errors=True)

    def check_compatible(self, state: dict) -> None:
        """Refuse a checkpoint of another target or draft shape, before loading tensors."""
        if state.get("target_fingerprint") != self.target_fingerprint:
            raise CheckpointError(
                "--load checkpoint was trained against a different target (fingerprint "
                f"{state.get('target_fingerprint')} != {self.target_fingerprint}); check "
                "--target-model and --target-layer-ids"
            )
        saved_dist_opt = bool(state.get("args", {}).get("use_distributed_optimizer", False))
        if saved_dist_opt != bool(self.cfg.parallel.use_distributed_optimizer):
            raise CheckpointError(
                "--load checkpoint was written "
                + ("with" if saved_dist_opt else "without")
                + " --use-distributed-optimizer; resume with the same setting (the parallel "
                "layout itself may change)"
            )
        try:
            theirs = type(self.dcfg).from_dict(state["dspark_config"]).shape_signature()
        except (TypeError, KeyError) as e:
            raise CheckpointError(f"--load checkpoint is of another algorithm or draft family "
                                  f"({type(e).__name__}: {e})") from e
        ours = self.dcfg.shape_signature()
        diff = {k: (theirs[k], ours[k]) for k in ours if theirs.get(k) != ours[k]}
        if diff:
            detail = ", ".join(f"{k}: checkpoint {a} vs run {b}" for k, (a, b) in diff.items())
            hint = ("; drafts have q/k norms by default (as the engines serve them): add "
                    "--no-qk-norm to continue a draft trained without them"
                    if diff.get("qk_norm") == (False, True) else "")
            raise CheckpointError(f"--load checkpoint has a different draft shape ({detail}){hint}")

    def load(self, trainer, path: str) -> None:
        from megatron.core import dist_checkpointing

        ckpt = resolve_checkpoint(path)
        state = torch.load(os.path.join(ckpt, STATE_FILE), weights_only=False)
        self.check_compatible(state)
        _initialise_adam_state(trainer.optimizer)
        _tolerate_missing_step(trainer.optimizer)
        loaded = dist_checkpointing.load(self._sharded(trainer, is_loading=True), ckpt)
        with torch.no_grad():
            if len(trainer.chunks) == 1:
                trainer.chunks[0].load_state_dict(loaded["model"], strict=True)
            else:
                for i, chunk in enumerate(trainer.chunks):
                    chunk.load_state_dict(loaded["model"][f"chunk{i}"], strict=True)
            trainer.optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(trainer.optimizer)
        trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.state.iteration = state["iteration"]
        trainer.state.consumed_samples = state["consumed_samples"]
        trainer.state.best_eval_tau = state["best_eval_tau"]
        trainer.state.history = list(state["history"])
        trainer.state.skipped_nonfinite = int(state.get("skipped_nonfinite", 0))
        rng_file = os.path.join(ckpt, f"rng_rank{torch.distributed.get_rank()}.pt")
        if os.path.isfile(rng_file):
            torch.set_rng_state(torch.load(rng_file, weights_only=False)["cpu"])
        if torch.distributed.get_rank() == 0:
            print_line(f"resumed from {ckpt} at iteration {trainer.state.iteration}")
