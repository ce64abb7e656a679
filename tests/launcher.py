"""The one launcher for every multi-process test (gloo on CPU), in two forms.

In-process workers: ``run_distributed(fn, world_size, *args)`` spawns ``world_size``
processes, sets the torchrun-style environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT,
OMP_NUM_THREADS=1), calls ``fn(rank, world_size, *args)`` in each and returns the list of
per-rank return values. An exception in any rank fails the caller with that rank's
traceback. ``fn`` must be a module-level function (it is pickled by reference).
Process start-up (importing torch and megatron) dominates, so tests should run many
checks in one launch and return tensors for the parent to compare.

End-to-end runs: ``run(nproc, *flags)`` runs ``pretrain_dspark.py`` under torchrun and
returns the completed process; ``base_flags`` are the tiny draft's flags, ``ok`` / ``fails``
check the outcome, ``losses`` reads a ``--log-jsonl`` file and ``chat_file`` writes the
small chat dataset the ``data_dir`` fixture (tests/conftest.py) prepares.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank, world_size, port, fn, args, queue):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        result = fn(rank, world_size, *args)
        # Serialise here: torch's queue would share tensor storage through file
        # descriptors that vanish when this process exits.
        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(rank, world_size, port, fn, args, queue), daemon=False)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, ok, payload = queue.get(timeout=timeout)
            if ok:
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"--- rank {rank} failed ---\n{payload}")
                break  # the other ranks are probably stuck in a collective
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.terminate()
                p.join()
    if errors:
        raise RuntimeError("distributed test failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]


# ============================================================ pretrain_dspark.py under torchrun
def prepare_tiny_data(chats: Path, target: str, out: Path, valid_fraction: float = 0.15,
                      min_supervised: int = 4) -> str:
    """``tools/prepare_data.py`` on a chat file for a tiny target (64-token samples); returns
    the dataset directory."""
    subprocess.run(
        [sys.executable, str(REPO / "tools/prepare_data.py"), "--input", str(chats), "--target-model", target,
         "--output", str(out), "--max-length", "64", "--valid-fraction", str(valid_fraction),
         "--min-supervised-tokens", str(min_supervised), "--quiet"],
        check=True, capture_output=True, text=True,
    )
    return str(out)


def chat_file(path: Path, n: int = 48) -> Path:
    """``n`` random two-turn chats (JSONL, ``messages`` form) written to ``path``."""
    import random

    rng = random.Random(0)
    words = "the cat sat on a mat and then it ran to see the dog who was very happy today".split()
    with open(path, "w") as f:
        for _ in range(n):
            q = " ".join(rng.choices(words, k=6))
            a = " ".join(rng.choices(words, k=30))
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")
    return path


def run(nproc: int, *flags: str, env=None, timeout=300):
    """``pretrain_dspark.py *flags`` on ``nproc`` torchrun ranks; the CompletedProcess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), str(REPO / "pretrain_dspark.py"), *flags]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    # Output goes to files, not pipes: a rank killed mid-save can orphan megatron's
    # checkpoint helper process, which would hold a pipe open forever.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.run(cmd, stdout=out, stderr=err, text=True, timeout=timeout,
                              env=full_env, cwd=REPO)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


def base_flags(target, data, *extra):
    return [
        "--target-model", target, "--data-path", data, "--num-layers", "2", "--block-size", "4",
        "--num-anchors", "6", "--markov-rank", "8", "--seq-length", "64", "--micro-batch-size", "2",
        "--num-target-taps", "2", "--lr", "2e-3", "--lr-warmup-fraction", "0", "--log-interval", "1",
        "--no-progress-bar", *extra,
    ]


def losses(jsonl: Path, kind: str = "train") -> dict:
    """{iteration: loss} of the ``kind`` records ("train" or "eval") of a --log-jsonl file."""
    out = {}
    for line in jsonl.read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == kind:
            out[rec["iteration"]] = rec["loss"]
    return out


def ok(r):
    """The run succeeded (else: the tails of its output)."""
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]


def fails(r, *needles):
    """The run was refused cleanly: a non-zero exit, pretrain_dspark.py's own error line (no
    traceback from our code) containing every needle."""
    assert r.returncode != 0
    err = r.stderr
    # torchrun reports a failed worker with its own traceback; ours must not have one
    assert f'File "{REPO}' not in err, err[-3000:]
    assert "pretrain_dspark.py: error:" in err, err[-3000:]
    for n in needles:
        assert n in err, err[-3000:]
