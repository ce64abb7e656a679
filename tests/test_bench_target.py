"""Smoke test of tools/bench_target.py on a tiny target: all three backends (HF, the
co-located SGLang runner, the SGLang engine client) run on real SGLang, agree on the
features, and the tool reports every number it promises. Speed is not asserted here
(docs/results.md has the measured ratios)."""
import json
import os
import subprocess
import sys

import pytest

from tests.sglang_marks import needs_sglang

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "bench_target.py")


@needs_sglang
def test_bench_target_all_backends(tiny_llama_dir):
    r = subprocess.run([sys.executable, TOOL, "--target-model", tiny_llama_dir, "--num-samples", "6",
                        "--min-len", "16", "--max-len", "48", "--micro-batch-size", "3", "--repeats", "1",
                        "--threads", "1", "--json"],
                       cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    res = json.loads([l for l in r.stdout.splitlines() if l.startswith("{")][-1])
    assert res["samples"] == 6 and 6 * 16 <= res["tokens"] <= 6 * 48
    by = {x["backend"]: x for x in res["results"]}
    assert list(by) == ["hf", "sglang", "sglang-server"]
    for name, x in by.items():
        assert x["tokens_per_s"] > 0 and x["ms_per_sample"] > 0 and x["startup_s"] > 0, x
        assert x["speed_vs_hf"] == pytest.approx(x["tokens_per_s"] / by["hf"]["tokens_per_s"], rel=1e-2)
    # the same features from every backend (fp32 CPU; the server client's last state is
    # recomputed locally from layer N-2: last-ulp differences)
    assert by["sglang"]["max_abs_diff_vs_hf"] < 1e-5
    assert by["sglang-server"]["max_abs_diff_vs_hf"] < 1e-5
    assert by["sglang-server"]["json_roundtrip_s"] > 0
    assert by["sglang-server"]["http_ms_per_sample"] > by["sglang-server"]["ms_per_sample"]
