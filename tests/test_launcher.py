"""tests/launcher.py and tests/zygote.py: ranks forked from the warm launcher behave as
torchrun's (same losses, same console, same refusals), failures and time-outs come back to
the test, and a plain script keeps its exit code."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.launcher import base_flags, fails, launch, losses, ok, run, run_distributed


def test_zygote_run_equals_torchrun(tmp_path, tiny_llama_dir, data_dir):
    got, outs = {}, {}
    for name, torchrun in (("zygote", False), ("torchrun", True)):
        log = tmp_path / f"{name}.jsonl"
        r = run(2, *base_flags(tiny_llama_dir, data_dir, "--global-batch-size", "4", "--train-iters", "3",
                               "--log-jsonl", str(log)), torchrun=torchrun)
        ok(r)
        got[name] = losses(log)
        outs[name] = sorted(l for l in r.stdout.splitlines() if l.startswith(("iter ", "rank ", "done:")))
        bad = run(2, *base_flags(tiny_llama_dir, data_dir, "--global-batch-size", "3"), torchrun=torchrun)
        fails(bad, "--global-batch-size 3 is not divisible by --micro-batch-size 2 x data-parallel size 2")
    assert len(got["zygote"]) == 3 and got["zygote"] == got["torchrun"]
    strip = [[l.split(" | tok/s")[0] for l in outs[k]] for k in ("zygote", "torchrun")]  # timings differ
    assert strip[0] == strip[1] and any(l.startswith("rank 1: target") for l in strip[0]), strip


def _worker(rank, world_size, fail_rank):
    torch.distributed.init_process_group("gloo")
    t = torch.full((2,), float(rank + 1))
    torch.distributed.all_reduce(t)
    if rank == fail_rank:
        raise ValueError(f"rank {rank} gives up")
    torch.distributed.barrier()  # the other rank waits here until the launcher stops it
    return t


def test_run_distributed_returns_results_and_reports_a_failing_rank():
    a, b = run_distributed(_worker, 2, None)
    assert torch.equal(a, torch.full((2,), 3.0)) and torch.equal(b, a)
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 failed.*ValueError: rank 1 gives up"):
        run_distributed(_worker, 2, 1, timeout=120)


def test_plain_script_exit_code_output_and_time_out(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("import sys, time\nprint('out', sys.argv[1:])\nprint('err', file=sys.stderr)\n"
                      "if sys.argv[1] == 'sleep':\n    time.sleep(60)\nsys.exit(int(sys.argv[1]))\n")
    r = launch(script, "3")
    assert (r.returncode, r.stdout, r.stderr) == (3, "out ['3']\n", "err\n")
    assert launch(script, "0").returncode == 0
    with pytest.raises(subprocess.TimeoutExpired):
        launch(script, "sleep", timeout=3)
    with ThreadPoolExecutor(3) as pool:  # launches in flight together (each its own process)
        codes = list(pool.map(lambda c: launch(script, str(c)).returncode, [5, 6, 7]))
    assert codes == [5, 6, 7]
    assert launch(script, "4").returncode == 4  # the launcher still serves after a time-out
