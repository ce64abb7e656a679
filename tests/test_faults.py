"""Surviving the cluster (issue: preemption, crashes, bad steps, bad files).

``tools/fault_suite.py`` runs once for the whole module (torchrun, 2 CPU ranks, DP=2, gloo):
SIGTERM to one rank at 3 random steps, SIGKILL of one rank at 3 random points (steps and
inside checkpoint writing), "No space left on device" injected into 3 random saves, and 3
random newest checkpoints truncated or corrupted; each case chained in one run restarted by
auto-resume, ending in a final checkpoint bit-identical (model, optimizer, RNG) to an
uninterrupted run's; the same after --exit-duration-in-mins stops a run. Plus a NaN in one micro-batch on one DP rank (every rank skips that
step, or every rank stops in it) and a rank that stops responding (reported within
--distributed-timeout-minutes). The suite prints its table; every row must pass.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def suite(tmp_path_factory, tiny_llama_dir, data_dir):
    root = tmp_path_factory.mktemp("faults")
    data = data_dir
    out = root / "rows.json"
    r = subprocess.run([sys.executable, str(REPO / "tools/fault_suite.py"), "--target-model", tiny_llama_dir,
                        "--data-path", str(data), "--workdir", str(root / "work"), "--json", str(out)],
                       capture_output=True, text=True, timeout=1800, cwd=REPO)
    print(r.stdout)  # the table (pytest -s, or -rA, shows it)
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    return r, rows


@pytest.mark.slow
@pytest.mark.parametrize("case", ["sigterm", "budget", "sigkill", "enospc", "truncate", "nan", "hang"])
def test_fault_case(suite, case):
    r, rows = suite
    mine = [row for row in rows if row[0] == case]
    assert mine, r.stdout[-3000:] + r.stderr[-3000:]
    failed = [row for row in mine if not row[4]]
    assert not failed, "\n".join(map(str, failed)) + "\n" + r.stdout[-4000:]
    if case in ("sigterm", "sigkill", "enospc", "truncate"):
        points = [row for row in mine if row[1] not in ("final", "restart to the end")]
        assert len(points) >= 3, mine  # at least three random points
    if case in ("sigterm", "budget", "sigkill", "enospc", "truncate"):
        assert any(row[1] == "final" and row[3] == "identical" for row in mine), mine
    assert "| result" in r.stdout and "rows passed" in r.stdout  # the printed table
