"""Smoke test of tools/bench_loss.py at --quick sizes: it runs, the fused (ungrouped and
grouped) and the previous (checkpointed) loss agree with the naive one and structured attention with dense, and it
prints the ratio lines (their values are not checked: tiny sizes measure overhead)."""
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "bench_loss.py")
RATIO_LINES = [
    "loss  peak memory  fused/naive",
    "loss  peak memory  grouped/naive",
    "loss  peak memory  chunked/naive",
    "loss  peak memory  fused/chunked",
    "loss  peak RSS  fused/naive",
    "loss  time  fused/naive",
    "loss  time  chunked/naive",
    "loss  time  fused/chunked",
    "loss  CPU time  fused/naive",
    "attention  time  structured/dense",
    "attention  peak memory  structured/dense",
]


@pytest.mark.slow  # five fresh worker processes importing torch + megatron: ~30-60 s
def test_bench_loss_quick(tmp_path):
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, TOOL, "--quick", "--json", str(out_json)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for line in RATIO_LINES:
        assert re.search(rf"^{re.escape(line)} = \d+\.\d+", proc.stdout, re.M), (line, proc.stdout)
    for form in ("fused", "grouped", "chunked"):
        assert re.search(rf"^loss  check {form} vs naive .*-> EQUAL", proc.stdout, re.M), proc.stdout
    assert re.search(r"^loss  peak memory  fused/naive = \d+\.\d+  \(aim <= 0\.1: (met|NOT met)\)",
                     proc.stdout, re.M), proc.stdout
    assert re.search(r"^attention  check .*-> EQUAL", proc.stdout, re.M), proc.stdout
    results = json.loads(out_json.read_text())
    assert results["outputs_equal"] is True
    assert set(results["loss"]["ratios"]) == {"fused/naive", "grouped/naive", "chunked/naive", "fused/chunked"}
    for ratios in results["loss"]["ratios"].values():
        assert set(ratios) == {"peak_memory", "peak_rss", "time", "cpu_time"}
    assert set(results["attention"]["ratios"]) == {"peak_memory", "peak_rss", "time", "cpu_time"}
    for form in ("naive", "fused", "grouped", "chunked"):
        assert results["loss"][form]["peak_bytes"] > 0
    assert results["config"]["loss_rows"] == 64


def test_bench_loss_help():
    proc = subprocess.run([sys.executable, TOOL, "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for opt in ("--quick", "--vocab", "--hidden", "--loss-rows", "--num-anchors", "--block-size",
                "--seq-len", "--chunk-rows", "--repeats", "--json", "--skip-chunked"):
        assert opt in proc.stdout
