"""Smoke test of tools/bench_pipeline.py at --quick sizes: it runs (PP=1 in one process,
PP=2 on two gloo processes), both compute the same loss, and it prints the ratio lines
(their values are not checked: tiny sizes on a shared CPU measure overhead)."""
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "bench_pipeline.py")
NUM = r"\d+\.\d+"


@pytest.mark.slow  # three fresh processes importing torch + megatron: ~20-60 s
def test_bench_pipeline_quick(tmp_path):
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, TOOL, "--quick", "--micro-batches", "1,2", "--repeats", "1",
         "--json", str(out_json)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for m in (1, 2):
        pattern = rf"^m={m}  efficiency {NUM}  ideal {NUM}  measured/ideal {NUM}$"
        assert re.search(pattern, proc.stdout, re.M), (pattern, proc.stdout)
    assert re.search(r"^m=1  .*ideal 0\.50  ", proc.stdout, re.M), proc.stdout
    assert re.search(r"^m=2  .*ideal 0\.67  ", proc.stdout, re.M), proc.stdout
    assert "efficiency     T_pp1 / (2 * T_pp2)" in proc.stdout  # the header explains the terms
    results = json.loads(out_json.read_text())
    assert results["same_result"] is True
    assert [r["m"] for r in results["results"]] == [1, 2]
    for r in results["results"]:
        assert r["t_pp1_s"] > 0 and r["t_ppp_s"] > 0
        assert r["efficiency"] == pytest.approx(r["t_pp1_s"] / (2 * r["t_ppp_s"]))
    assert len(results["stage_alone_s"]) == 2


def test_bench_pipeline_rejects_bad_options():
    proc = subprocess.run([sys.executable, TOOL, "--layers", "3"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--layers (3) must be divisible by --pp (2)" in proc.stderr
