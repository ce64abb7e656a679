"""Console lines, progress bar, TensorBoard scalars and a JSONL metrics log.

Only one rank logs (last pipeline stage, TP rank 0, DP rank 0); metrics arriving here
are already reduced over micro-batches and data-parallel ranks.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

_CONSOLE_KEYS = (
    ("loss", "loss", "{:.4f}"),
    ("ce_loss", "ce", "{:.4f}"),
    ("l1_loss", "l1", "{:.4f}"),
    ("confidence_loss", "conf", "{:.4f}"),
    ("tau", "tau", "{:.3f}"),
    ("lr", "lr", "{:.3e}"),
    ("grad_norm", "grad-norm", "{:.3f}"),
    ("tokens_per_sec", "tok/s", "{:.0f}"),
)


def print_line(text: str, file=None) -> None:
    """Print one line with a single ``write`` and flush it. Lines printed by several ranks
    into one pipe then never interleave mid-line (``print`` writes the text and the newline
    separately, which an unbuffered stream passes on as two writes)."""
    file = file or sys.stdout
    file.write(text + "\n")
    file.flush()


def _fmt_eta(seconds: float) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


class MetricsLogger:
    """Console lines, the tqdm bar, TensorBoard and JSONL of a run (a :class:`LoggingConfig`);
    ``enabled`` on the one rank that logs."""

    def __init__(self, config, enabled: bool, train_iters: int):
        self.enabled = enabled
        self.config = config
        self.train_iters = train_iters
        self.bar = None
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        if config.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=config.tensorboard_dir)
        if config.log_jsonl:
            os.makedirs(os.path.dirname(os.path.abspath(config.log_jsonl)), exist_ok=True)
            self.jsonl = open(config.log_jsonl, "a", buffering=1)

    def start(self, total: int, initial: int) -> None:
        if not self.enabled or not self.config.progress_bar:
            return
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc="train", unit="it", dynamic_ncols=True,
                        file=sys.stderr, leave=False)

    def progress(self, metrics: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
            loss = metrics.get("loss")
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", tau=f"{metrics.get('tau', float('nan')):.3f}")

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print_line(line)

    def log_train(self, iteration: int, metrics: dict) -> None:
        if not self.enabled:
            return
        parts = [f"iter {iteration:>6d}/{self.train_iters}"]
        for key, label, fmt in _CONSOLE_KEYS:
            if key in metrics and metrics[key] is not None:
                parts.append(f"{label} {fmt.format(metrics[key])}")
        parts.append(f"eta {_fmt_eta(metrics.get('eta_sec'))}")
        if metrics.get("skipped"):
            parts.append("(step skipped)")
        self._print(" | ".join(parts))
        self._write("train", iteration, metrics)

    def log_eval(self, iteration: int, metrics: dict) -> None:
        if not self.enabled or not metrics:
            return
        accept = [metrics[k] for k in sorted(metrics, key=_slot_key) if k.startswith("accept_rate@")]
        line = (
            f"eval @ {iteration}: loss {metrics.get('loss', float('nan')):.4f} | "
            f"tau {metrics.get('tau', float('nan')):.3f} | accept@k "
            + " ".join(f"{a:.2f}" for a in accept)
        )
        self._print(line)
        self._write("eval", iteration, metrics)

    def _write(self, kind: str, iteration: int, metrics: dict) -> None:
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()
                 if isinstance(v, (int, float, bool))}
        if self.writer is not None:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self.writer.add_scalar(f"{kind}/{k}", v, iteration)
            self.writer.flush()
        if self.jsonl is not None:
            record = {"kind": kind, "iteration": iteration, "time": time.time()}
            record.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                           for k, v in clean.items()})
            self.jsonl.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None


def _slot_key(name: str):
    if "@" in name:
        return (name.split("@")[0], int(name.split("@")[1]))
    return (name, -1)
