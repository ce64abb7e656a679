"""The one launcher for every multi-process test (gloo on CPU), in two forms.

In-process workers: ``run_distributed(fn, world_size, *args)`` starts ``world_size`` ranks
with the torchrun-style environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT, OMP_NUM_THREADS=1),
calls ``fn(rank, world_size, *args)`` in each and returns the list of per-rank return
values. An exception in any rank fails the caller with that rank's traceback. ``fn`` must be
a module-level function (the ranks import it by name).

End-to-end runs: ``run(nproc, *flags)`` runs ``pretrain_dspark.py`` on ``nproc`` ranks and
``launch(script, *args)`` any script (a tool: one plain process); ``base_flags`` are the tiny
draft's flags, ``ok`` / ``fails`` check the outcome, ``losses`` reads a ``--log-jsonl`` file
and ``chat_file`` writes the small chat dataset the ``data_dir`` fixture (tests/conftest.py)
prepares.

Ranks are forked from one warm process per session (tests/zygote.py), which has imported
torch, megatron-core and transformers once: a rank's ~8 s of imports is most of a tiny run,
so this is what keeps the suite's wall time down. ``MEGASPARK_TEST_LAUNCHER=torchrun`` runs
every launch under real torchrun instead (``run_distributed`` keeps the warm process);
tests/test_launcher.py checks that both give the same run.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call_in_rank(req: dict, rank: int) -> int:
    """In a rank forked by tests/zygote.py for :func:`run_distributed`: call the function with
    the pickled arguments, save its result (or the traceback) for the parent; the exit code."""
    import importlib

    torch.set_num_threads(1)
    results = Path(req["results"])
    try:
        module, name = req["call"].split(":")
        fn = getattr(importlib.import_module(module), name)
        args = torch.load(results / "args.pt", weights_only=False)
        result = fn(rank, int(req["nproc"]), *args)
        torch.save(result, results / f"{rank}.tmp")
        os.replace(results / f"{rank}.tmp", results / f"{rank}.pt")
        return 0
    except BaseException:  # noqa: BLE001 - report everything to the parent
        (results / f"{rank}.err").write_text(traceback.format_exc())
        return 1
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0):
    """``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks (forked from the warm
    tests/zygote.py); the list of their return values. A failing rank fails the caller with
    its traceback."""
    with tempfile.TemporaryDirectory() as d:
        results = Path(d)
        torch.save(args, results / "args.pt")
        full_env = dict(os.environ, OMP_NUM_THREADS="1")
        rc = _ZYGOTE.launch("", (), world_size, full_env, timeout, str(results / "stdout"),
                            str(results / "stderr"), call=f"{fn.__module__}:{fn.__qualname__}",
                            results=str(results))
        errors = [f"--- rank {r} failed ---\n{(results / f'{r}.err').read_text()}"
                  for r in range(world_size) if (results / f"{r}.err").exists()]
        if rc is None:
            errors.append(f"timed out after {timeout} s")
        if errors or rc != 0:
            tail = (results / "stderr").read_text(errors="replace")[-3000:] if (results / "stderr").exists() else ""
            raise RuntimeError("distributed test failed:\n" + "\n".join(errors) + f"\n--- stderr ---\n{tail}")
        return [torch.load(results / f"{r}.pt", weights_only=False) for r in range(world_size)]


# ============================================================ pretrain_dspark.py under torchrun
def prepare_tiny_data(chats: Path, target: str, out: Path, valid_fraction: float = 0.15,
                      min_supervised: int = 4) -> str:
    """``tools/prepare_data.py`` on a chat file for a tiny target (64-token samples); returns
    the dataset directory."""
    tool("prepare_data.py", "--input", chats, "--target-model", target, "--output", out, "--max-length", "64",
         "--valid-fraction", valid_fraction, "--min-supervised-tokens", min_supervised, "--quiet", check=True)
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


class _Zygote:
    """The client of tests/zygote.py: one warm process per test session that forks launches."""

    def __init__(self):
        self.proc = None

    def _start(self):
        import queue
        import threading

        from tests.zygote import ANSWER

        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "zygote.py")], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1, cwd=REPO,
            env=dict(os.environ, OMP_NUM_THREADS="1"))
        self.lines = queue.Queue()

        def pump(stream, lines):
            for line in stream:
                lines.put(line)
            lines.put(None)  # the process closed its stdout

        threading.Thread(target=pump, args=(self.proc.stdout, self.lines), daemon=True).start()
        self._read(ANSWER, timeout=300)

    def _read(self, prefix: str, timeout: float) -> dict:
        import queue

        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            if line.startswith(prefix):
                return json.loads(line[len(prefix):])
        self.close()
        raise RuntimeError("the tests' launcher process (tests/zygote.py) stopped answering")

    def launch(self, script: str, argv, nproc: int, env: dict, timeout: float, stdout: str, stderr: str,
               **extra):
        """(exit code, or None after the time-out) of ``script argv`` on ``nproc`` ranks
        (0: one plain process, no distributed environment); ``extra``: the request's other
        fields (``call``, ``results``: :func:`run_distributed`)."""
        from tests.zygote import ANSWER

        if self.proc is None or self.proc.poll() is not None:
            self._start()
        req = dict(script=str(script), argv=list(argv), nproc=nproc, env=env, timeout=timeout,
                   stdout=stdout, stderr=stderr, cwd=str(REPO), port=free_port() if nproc else 0, **extra)
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read(ANSWER, timeout=timeout + 120)["returncode"]

    def close(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


class _ZygotePool:
    """Warm launcher processes for the session: one per launch in flight (tests that start two
    runs from threads get a second process, started once and then reused)."""

    def __init__(self):
        import threading

        self.lock = threading.Lock()
        self.idle, self.all = [], []

    def launch(self, *args, **kwargs):
        with self.lock:
            zygote = self.idle.pop() if self.idle else None
            if zygote is None:
                zygote = _Zygote()
                self.all.append(zygote)
        try:
            return zygote.launch(*args, **kwargs)
        finally:
            with self.lock:
                self.idle.append(zygote)

    def close(self):
        for zygote in self.all:
            zygote.close()


_ZYGOTE = _ZygotePool()
atexit.register(_ZYGOTE.close)


def use_torchrun() -> bool:
    """``MEGASPARK_TEST_LAUNCHER=torchrun``: launch through real torchrun, not tests/zygote.py."""
    return os.environ.get("MEGASPARK_TEST_LAUNCHER", "zygote") == "torchrun"


def launch(script, *args, nproc: int = 0, env=None, timeout=300, torchrun=None, check=False):
    """``script *args`` as ``nproc`` torchrun ranks (0: one plain ``python script`` process),
    forked from the warm tests/zygote.py unless ``torchrun`` (default: ``use_torchrun()``);
    the CompletedProcess (``check``: raise ``subprocess.CalledProcessError`` unless it exits 0).
    A launch past ``timeout`` raises ``subprocess.TimeoutExpired``."""
    args = [str(a) for a in args]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(free_port()), str(script), *args]
    else:
        cmd = [sys.executable, str(script), *args]
    # Output goes to files, not pipes: a rank killed mid-save can orphan megatron's
    # checkpoint helper process, which would hold a pipe open forever.
    with tempfile.TemporaryDirectory() as d:
        out, err = os.path.join(d, "stdout"), os.path.join(d, "stderr")
        if use_torchrun() if torchrun is None else torchrun:
            with open(out, "w") as fo, open(err, "w") as fe:
                rc = subprocess.run(cmd, stdout=fo, stderr=fe, text=True, timeout=timeout,
                                    env=full_env, cwd=REPO).returncode
        else:
            rc = _ZYGOTE.launch(script, args, nproc, full_env, timeout, out, err)
            if rc is None:
                raise subprocess.TimeoutExpired(cmd, timeout)
        with open(out, errors="replace") as fo, open(err, errors="replace") as fe:
            done = subprocess.CompletedProcess(cmd, rc, fo.read(), fe.read())
    if check:
        done.check_returncode()
    return done


def tool(name, *args, env=None, timeout=300, check=False):
    """``tools/<name> *args`` as one plain process (see :func:`launch`)."""
    return launch(REPO / "tools" / name, *args, env=env, timeout=timeout, check=check)


def run(nproc: int, *flags: str, env=None, timeout=300, torchrun=None):
    """``pretrain_dspark.py *flags`` on ``nproc`` ranks (see :func:`launch`); the CompletedProcess."""
    return launch(REPO / "pretrain_dspark.py", *flags, nproc=nproc, env=env, timeout=timeout, torchrun=torchrun)


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
