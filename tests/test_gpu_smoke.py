"""``tools/gpu_smoke.sh``: the one-command smoke test for a bare GPU machine, run here with
``DEVICE=cpu`` (it has never run on a GPU; see docs/production.md).

* the whole pipeline passes on CPU: install check, tiny Qwen3 target, data, bf16 training,
  resume, export, validation, speculative decoding identical to greedy (slow);
* a failing stage prints ``FAIL <stage>: <reason>`` with its log and the script exits
  non-zero: a bad training flag (slow), a missing wheel directory (fast);
* the script passes shellcheck (tests/test_slurm.py does not glob tools/*.sh).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "gpu_smoke.sh"
STAGES = ("install", "target", "data", "train", "resume", "export", "validate", "eval_speculative")


def _smoke(work: Path, timeout: int = 900, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items()
            if k not in ("WHEELS", "EXTRA_TRAIN_ARGS", "TRAIN_ITERS", "RESUME_ITERS", "BF16")}
    full.update(DEVICE="cpu", NPROC="1", OMP_NUM_THREADS="1", PYTHON=sys.executable,
                WORK=str(work), **env)
    return subprocess.run(["bash", str(SCRIPT)], env=full, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def _verdicts(stdout: str) -> dict:
    """stage -> the text of its PASS/FAIL line; each stage must have exactly one."""
    out = {}
    for line in stdout.splitlines():
        m = re.match(r"^(PASS|FAIL) ([a-z_]+)(: .*)?$", line)
        if m:
            assert m.group(2) not in out, f"two lines for stage {m.group(2)}:\n{stdout}"
            out[m.group(2)] = line
    assert tuple(out) == STAGES, stdout
    return out


def _explain(r) -> str:
    return f"exit {r.returncode}\n--- stdout\n{r.stdout[-6000:]}\n--- stderr\n{r.stderr[-6000:]}"


def test_shellcheck():
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
    r = subprocess.run(["shellcheck", "-x", str(SCRIPT)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert os.access(SCRIPT, os.X_OK)
    assert SCRIPT.read_text().startswith("#!/usr/bin/env bash")


def test_print_requirements_leaves_torch_out():
    r = subprocess.run(["bash", str(SCRIPT), "--print-requirements"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHON=sys.executable), timeout=60)
    assert r.returncode == 0, r.stderr
    reqs = r.stdout.split()
    assert any(x.startswith("megatron-core") for x in reqs) and "numpy" in reqs
    assert not any(re.match(r"torch([<>=!~ ]|$)", x) for x in reqs), reqs


def test_missing_wheel_dir_fails_every_stage_fast(tmp_path):
    r = _smoke(tmp_path / "work", timeout=120, WHEELS=str(tmp_path / "no-such-dir"))
    assert r.returncode != 0, _explain(r)
    v = _verdicts(r.stdout)
    assert v["install"].startswith("FAIL install: WHEELS=") and "is not a directory" in v["install"]
    for stage in STAGES[1:]:
        assert v[stage].startswith(f"FAIL {stage}: not run ("), v[stage]
    assert r.stdout.rstrip().splitlines()[-1] == "gpu_smoke: 0 passed, 8 failed"


@pytest.mark.slow
def test_cpu_run_passes_every_stage(tmp_path):
    work = tmp_path / "work"
    r = _smoke(work)
    assert r.returncode == 0, _explain(r)
    v = _verdicts(r.stdout)
    assert all(line == f"PASS {stage}" for stage, line in v.items()), v
    lines = r.stdout.rstrip().splitlines()
    assert lines[-1] == "gpu_smoke: 8 passed, 0 failed"
    assert re.search(r"^mean step time: \d+\.\d ms over 29 iterations", r.stdout, re.M), r.stdout
    assert "peak GPU memory: n/a on cpu" in lines
    assert "4/4 prompts identical to greedy" in r.stdout
    # the runs it made: bf16 by default, resumed to iteration 35, logs kept in WORK
    assert "--bf16" in (work / "logs" / "train.log").read_text()
    assert (work / "ckpt" / "latest").read_text() == "iter_0000035"
    assert (work / "hf-draft" / "config.json").exists()
    for stage in STAGES:
        assert (work / "logs" / f"{stage}.log").exists(), stage


@pytest.mark.slow
def test_failing_train_stage_prints_fail_and_exits_nonzero(tmp_path):
    work = tmp_path / "work"
    r = _smoke(work, EXTRA_TRAIN_ARGS="--no-such-flag 3")
    assert r.returncode != 0, _explain(r)
    v = _verdicts(r.stdout)
    assert [v[s] for s in ("install", "target", "data")] == ["PASS install", "PASS target", "PASS data"]
    log = work / "logs" / "train.log"
    assert v["train"].startswith("FAIL train: "), v["train"]
    assert "unrecognized arguments: --no-such-flag" in v["train"], v["train"]
    assert f"(log: {log})" in v["train"] and log.exists()
    for stage in ("resume", "export", "validate", "eval_speculative"):
        assert v[stage].startswith(f"FAIL {stage}: not run"), v[stage]
    assert r.stdout.rstrip().splitlines()[-1] == "gpu_smoke: 3 passed, 5 failed"
    assert "mean step time: n/a" in r.stdout
