"""Surviving the cluster (docs/reliability.md): preemption signals, wall-clock budgets,
non-finite steps, collective time-outs, and the fault injection its tests use.

Every decision that changes what a rank does next — skip this step, stop, save and exit —
is taken from one small all-reduce (MAX over the whole world) per training step, after
the backward and before the optimizer: ``[non-finite here, signal received here, wall
clock spent here]``. All ranks therefore skip, stop or save in the same step; no rank goes
on alone. Its cost per step: that all-reduce, one host read-back of its three values, and
one norm over the gradients (the non-finite check).
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass
from typing import Optional

import torch

from megaspark.training.logging import print_line

#: signals that ask a run to save and exit (Slurm: ``--signal=USR1@<seconds>``)
EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class NonFiniteStepError(RuntimeError):
    """A non-finite loss or gradient beyond ``--skip-nonfinite-steps``."""


class CollectiveTimeoutError(RuntimeError):
    """A collective that waited longer than ``--distributed-timeout-minutes``."""


@dataclass
class Decision:
    nonfinite: bool = False
    exit_reason: Optional[str] = None  # "signal SIGTERM" / "--exit-duration-in-mins 30"


#: a signal that arrived before the training loop took over (see :func:`install_early`)
_EARLY_SIGNAL: Optional[int] = None


def _early_handler(signum, _frame) -> None:
    global _EARLY_SIGNAL
    _EARLY_SIGNAL = signum


def install_early(exit_signal_handler: bool) -> None:
    """With ``--exit-signal-handler``, from the start of the job: an exit signal during
    start-up is remembered (the run then saves and exits after its first step) instead of
    killing the rank."""
    if exit_signal_handler:
        for sig in EXIT_SIGNALS:
            signal.signal(sig, _early_handler)


class StepControl:
    """The per-step decision of every rank (see the module docstring), for a run's
    :class:`~megaspark.arguments.configs.ExitConfig`."""

    def __init__(self, config, device: torch.device):
        self.device = device
        self.received: Optional[int] = _EARLY_SIGNAL
        self.exit_minutes = config.exit_duration_in_mins
        # the budget counts from the start of the job's process (start-up included), as a
        # scheduler's time limit does
        self.started = config.start_time
        self._wanted = bool(config.exit_signal_handler)
        self._previous = {}

    def install(self) -> None:
        """With ``--exit-signal-handler``: catch the exit signals (until :meth:`restore`)."""
        if self._wanted and not self._previous:
            for sig in EXIT_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        first = self.received is None
        self.received = signum  # first: nothing below may keep the flag from being set
        if first:  # os.write: a print here could re-enter a print the main thread is in
            os.write(1, f"rank {_rank()}: received {signal.Signals(signum).name}: finishing this "
                        f"step, then saving and exiting\n".encode())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def decide(self, nonfinite_here: torch.Tensor) -> Decision:
        """``nonfinite_here``: a bool tensor on the device (no host sync before the
        all-reduce)."""
        over_time = (self.exit_minutes is not None
                     and time.time() - self.started >= 60.0 * self.exit_minutes)
        here = nonfinite_here.to(torch.float32).reshape(())
        # new_full: host scalars written on the device without a host-to-device copy
        flags = torch.stack([here, here.new_full((), float(self.received or 0)),
                             here.new_full((), float(over_time))])
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        nonfinite, sig, late = flags.tolist()
        reason = None
        if sig:
            reason = f"signal {signal.Signals(int(sig)).name}"
        elif late:
            reason = f"--exit-duration-in-mins {self.exit_minutes:g} reached"
        return Decision(nonfinite=bool(nonfinite), exit_reason=reason)


def nonfinite_flags(reports: list) -> Optional[torch.Tensor]:
    """Per micro-batch: does its loss have a non-finite term? (bool [M] on the device;
    None where this rank computes no loss)."""
    flags = []
    for r in reports or []:
        terms = [v for pair in r["metrics"].values() for v in pair if isinstance(v, torch.Tensor)]
        if terms:
            flags.append(~torch.stack([torch.isfinite(t).all() for t in terms]).all())
    return torch.stack(flags) if flags else None


def grads_nonfinite(ddp_chunks, device: torch.device) -> torch.Tensor:
    """Is any gradient of this rank non-finite? (a bool tensor on the device)."""
    grads = [p.main_grad for c in ddp_chunks for p in c.parameters()
             if p.requires_grad and getattr(p, "main_grad", None) is not None]
    if not grads:
        return torch.zeros((), dtype=torch.bool, device=device)
    norms = torch._foreach_norm(grads)
    return ~torch.isfinite(torch.stack(norms).sum())


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


_TIMEOUT_WORDS = ("timed out", "timeout", "time out")


@contextlib.contextmanager
def collective_phase(name: str, timeout_minutes: Optional[float]):
    """Name the operation in flight: a collective that times out inside it (gloo raises;
    NCCL's watchdog aborts the process and names the collective itself) becomes a
    :class:`CollectiveTimeoutError` naming this rank, ``name`` and the time-out."""
    try:
        yield
    except RuntimeError as e:
        text = str(e).lower()
        # only torch.distributed's own errors (gloo raises a plain RuntimeError): megaspark's
        # errors (a target server's time-out, ...) are not about another rank
        torch_error = type(e) is RuntimeError or isinstance(e, getattr(torch.distributed, "DistError", ()))
        if not torch_error or not any(w in text for w in _TIMEOUT_WORDS):
            raise
        limit = "" if timeout_minutes is None else f" after --distributed-timeout-minutes {timeout_minutes:g}"
        raise CollectiveTimeoutError(
            f"rank {_rank()}: {name} timed out{limit}: another rank stopped responding or died "
            f"({str(e).splitlines()[0][:300]})") from e


# ---------------------------------------------------------------------------------------
# fault injection (tests and tools/fault_suite.py only)
# ---------------------------------------------------------------------------------------

#: ``MEGASPARK_FAULT="ACTION:POINT:ITERATION[:RANK],..."``; ACTION is ``kill`` (SIGKILL this
#: process and its helpers), ``enospc`` (raise "No space left on device"), ``hang`` (sleep,
#: responding to nothing) or ``nan`` (POINT ``loss``: a NaN in micro-batch 0's features);
#: POINT is ``step`` (after the backward) or a point of a checkpoint save (``save-begin``,
#: ``save-shards``, ``save-state``, ``save-manifest``, ``save-rename``).
FAULT_ENV = "MEGASPARK_FAULT"


def fault(point: str, iteration: int) -> None:
    """Trigger the injected fault when ``point`` and ``iteration`` (and this rank) match."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for one in spec.split(","):
        parts = one.split(":")
        if len(parts) < 3:
            continue
        action, where, when = parts[0], parts[1], int(parts[2])
        rank = int(parts[3]) if len(parts) > 3 else None
        if where != point or when != iteration or (rank is not None and rank != _rank()):
            continue
        if action == "kill":
            import multiprocessing as mp

            for child in mp.active_children():
                child.kill()
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"(injected at {point})")
        if action == "hang":
            print_line(f"rank {_rank()}: injected hang at {point} of iteration {iteration} "
                       f"(t={time.time():.3f})")
            while True:
                time.sleep(3600)


def poisoned(inputs, iteration: int):
    """``nan:loss:ITERATION[:RANK]``: a NaN in the target features of micro-batch 0 of that
    iteration on that rank (a bad batch as it would arrive); other micro-batches pass."""
    spec = [one.split(":") for one in os.environ.get(FAULT_ENV, "").split(",") if one]
    hit = any(p[0] == "nan" and int(p[2]) == iteration and (len(p) < 4 or int(p[3]) == _rank())
              for p in spec if len(p) >= 3)
    for k, item in enumerate(inputs):
        if hit and k == 0:
            for name in ("context_features", "target_hidden", "aux"):
                t = getattr(item, name, None)
                if t is not None:
                    t = t.clone()
                    t.view(-1)[0] = float("nan")
                    setattr(item, name, t)
        yield item
