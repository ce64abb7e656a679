"""A warm launcher for the tests' multi-process runs (tests only; never used by the package).

Starting a rank of ``pretrain_dspark.py`` costs ~8 s of imports (torch, torch._dynamo through
megatron's ``@torch.compile`` fusers, megatron-core, transformers) and its training steps a
fraction of a second, so the suite's wall time is mostly imports. This process imports those
third-party packages once, then serves launches: for each request it forks ``nproc`` ranks
that set torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT, ...), send
their output to the request's files, and run the script as ``__main__`` in a fresh module
namespace (or call a test module's function: ``run_distributed``), exiting as a
``python -u script`` process would (atexit handlers, exit code).

megaspark itself is never imported here, so every rank imports it fresh under its own
environment (fault-injection variables included). Like torchrun, a rank that exits non-zero
gets the others a SIGTERM, then a SIGKILL after a grace period, and the launch's exit code is
1; a launch past its time-out is killed. ``tests/launcher.py`` talks to this process (one JSON
line per request and per answer on stdin/stdout); ``MEGASPARK_TEST_LAUNCHER=torchrun`` makes
it use real torchrun instead, and ``tests/test_launcher.py`` checks that both give the same run.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time
import warnings

PRELOAD = (
    "torch", "torch.distributed", "torch._dynamo", "torch.distributed.checkpoint",
    "megatron.core", "megatron.core.tensor_parallel", "megatron.core.transformer",
    "megatron.core.models.gpt", "megatron.core.optimizer", "megatron.core.distributed",
    "megatron.core.pipeline_parallel", "megatron.core.dist_checkpointing",
    "transformers", "transformers.models.llama.modeling_llama", "transformers.models.qwen3.modeling_qwen3",
    "safetensors.torch", "numpy",
)
ANSWER = "@@zygote "  # prefix of the protocol lines (imports may print to stdout too)
GRACE_S = 30.0  # SIGTERM -> SIGKILL, as torchrun's workers get when a sibling fails


def _preload() -> None:
    import importlib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in PRELOAD:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - an optional package: the ranks import it themselves
                pass
        try:  # what the ranks get from transformers' lazy module
            transformers = importlib.import_module("transformers")
            for name in ("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"):
                getattr(transformers, name)
        except Exception:  # noqa: BLE001
            pass


def _rank_env(req: dict, rank: int) -> dict:
    n = int(req["nproc"])
    env = dict(req["env"])
    if n:
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                   GROUP_RANK="0", ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(n), ROLE_NAME="default",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(req["port"]), TORCHELASTIC_RESTART_COUNT="0",
                   TORCHELASTIC_MAX_RESTARTS="0", TORCHELASTIC_RUN_ID="none")
    return env


def _become_rank(req: dict, rank: int) -> None:
    """In the forked child: the process a torchrun worker would be, minus the imports."""
    os.setpgid(0, 0)
    os.environ.clear()
    os.environ.update(_rank_env(req, rank))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(f, fd)
        os.close(f)
    os.close(null)
    # python -u: unbuffered binary layer, text written through at once
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True, errors="backslashreplace")
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and "torch" in sys.modules:  # the library read this one at import
        sys.modules["torch"].set_num_threads(int(threads))
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(req["cwd"])
    if req.get("call"):  # a test function: the repository importable, as under pytest
        sys.argv = [req["call"]]
        sys.path[0] = req["cwd"]
        return
    script = os.path.abspath(req["script"])
    sys.argv = [script, *req["argv"]]
    sys.path[0] = os.path.dirname(script)


def _launch(req: dict):
    """Fork the ranks and wait for them; in a child, returns the request and its rank."""
    pids = {}
    sys.stdout.flush()
    sys.stderr.flush()
    for rank in range(max(1, int(req["nproc"]))):
        pid = os.fork()
        if pid == 0:
            return req, rank
        try:
            os.setpgid(pid, pid)  # as the child does: its group exists before any kill
        except OSError:  # the child got there first (or has exited)
            pass
        pids[pid] = rank
    deadline = time.monotonic() + float(req["timeout"])
    codes, failed_at, timed_out = {}, None, False
    while len(codes) < len(pids):
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            now = time.monotonic()
            if now > deadline:
                timed_out = True
                for p in pids:
                    if p not in codes:
                        _kill(p, signal.SIGKILL)
                deadline = float("inf")
            elif failed_at is not None and now > failed_at + GRACE_S:
                for p in pids:
                    if p not in codes:
                        _kill(p, signal.SIGKILL)
            time.sleep(0.02)
            continue
        if pid not in pids:
            continue
        codes[pid] = os.waitstatus_to_exitcode(status)
        if codes[pid] != 0 and failed_at is None:
            failed_at = time.monotonic()
            for p in pids:  # torchrun stops the other workers of a failed group
                if p not in codes:
                    _kill(p, signal.SIGTERM)
    rc = 0 if all(c == 0 for c in codes.values()) else 1
    if int(req["nproc"]) == 0:  # a plain script: its own exit code
        rc = next(iter(codes.values()))
    _answer({"returncode": None if timed_out else rc, "timed_out": timed_out,
             "codes": {str(pids[p]): c for p, c in codes.items()}})
    return None


def _kill(pid: int, sig) -> None:
    try:
        os.killpg(pid, sig)  # the rank and whatever it started
    except ProcessLookupError:
        pass


def _answer(obj: dict) -> None:
    sys.__stdout__.write(ANSWER + json.dumps(obj) + "\n")
    sys.__stdout__.flush()


def serve():
    """Answer launches until stdin closes; in a forked rank, return ``(request, rank)``."""
    _preload()
    _answer({"ready": True, "pid": os.getpid()})
    for line in sys.stdin:
        if not line.strip():
            continue
        child = _launch(json.loads(line))
        if child is not None:
            return child
    return None


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # pytest's Ctrl-C is for pytest
    launched = serve()
    if launched is None:
        sys.exit(0)
    request, rank = launched
    _become_rank(request, rank)
    if request.get("call"):
        from tests.launcher import call_in_rank

        sys.exit(call_in_rank(request, rank))
    del launched, request, rank
    import runpy

    runpy.run_path(sys.argv[0], run_name="__main__")
