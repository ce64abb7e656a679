"""bf16 training on the CPU (gloo), the same code path a GPU run takes with --bf16: bf16
parameters and activations, megatron-core's fp32-master-weight optimizer, fp32 softmaxes
and losses (DESIGN.md decision 7).

* At (TP, PP, DP) = (1,1,1), (2,1,1), (1,2,1), (1,1,2) and (2,2,1), every iteration's loss
  tracks the fp32 run of the same seed within 3% relative over 10 iterations.
* A bf16 checkpoint resumes bit-exactly: the resumed run's losses equal the uninterrupted
  run's exactly.
* The target is built once per model replica (TP rank 0 of the first pipeline stage) and in
  the run's dtype: one construction at TP=2, PP=2, bf16 with --bf16.
"""

from __future__ import annotations

import re

import pytest

from tests.launcher import base_flags, losses, ok, run

pytestmark = pytest.mark.slow

ITERS = 10
LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1)]
RESUMED = [(2, 1, 1), (1, 2, 1)]
BUILT = re.compile(r"rank (\d+): target (\w+) built on (\S+) in (\S+)")


def _flags(target, data, tp, pp, *extra):
    flags = base_flags(target, data, "--tensor-model-parallel-size", str(tp),
                       "--pipeline-model-parallel-size", str(pp), "--micro-batch-size", "1",
                       "--global-batch-size", "4", "--lr-decay-style", "constant", *extra)
    flags[flags.index("--num-layers") + 1] = "4"
    return flags


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir, data_dir):
    root = tmp_path_factory.mktemp("bf16")
    out = {}
    log = root / "fp32.jsonl"
    r = run(1, *_flags(tiny_llama_dir, data_dir, 1, 1, "--train-iters", str(ITERS), "--log-jsonl", str(log)))
    ok(r)
    out["fp32"] = (losses(log), r)
    for tp, pp, dp in LAYOUTS:
        name = f"{tp}-{pp}-{dp}"
        log = root / f"bf16-{name}.jsonl"
        r = run(tp * pp * dp, *_flags(tiny_llama_dir, data_dir, tp, pp, "--bf16", "--train-iters", str(ITERS),
                                      "--save", str(root / f"ckpt-{name}"), "--save-interval", "5",
                                      "--log-jsonl", str(log)))
        ok(r)
        out[(tp, pp, dp)] = (losses(log), r)
    for tp, pp, dp in RESUMED:
        name = f"{tp}-{pp}-{dp}"
        log = root / f"resumed-{name}.jsonl"
        r = run(tp * pp * dp, *_flags(tiny_llama_dir, data_dir, tp, pp, "--bf16", "--train-iters", str(ITERS),
                                      "--load", str(root / f"ckpt-{name}" / "iter_0000005"),
                                      "--log-jsonl", str(log)))
        ok(r)
        out[("resumed", tp, pp, dp)] = (losses(log), r)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bf16_tracks_fp32(runs, layout):
    ref, got = runs["fp32"][0], runs[layout][0]
    assert sorted(got) == list(range(1, ITERS + 1))
    for it in range(1, ITERS + 1):
        assert got[it] == pytest.approx(ref[it], rel=0.03), (it, ref, got)
    # bf16 really ran in bf16: not bit-identical to fp32
    assert any(got[it] != ref[it] for it in got)


@pytest.mark.parametrize("layout", RESUMED)
def test_bf16_checkpoint_resumes_bit_exactly(runs, layout):
    full, resumed = runs[layout][0], runs[("resumed", *layout)][0]
    assert sorted(resumed) == list(range(6, ITERS + 1))
    for it in range(6, ITERS + 1):
        assert resumed[it] == full[it], (it, full, resumed)


def test_target_built_once_per_replica_in_the_run_dtype(runs):
    built = BUILT.findall(runs[(2, 2, 1)][1].stdout)
    assert [(rank, kind, dtype) for rank, kind, _, dtype in built] == [("0", "HFTargetProvider", "torch.bfloat16")]
    fp32 = BUILT.findall(runs["fp32"][1].stdout)
    assert [(rank, dtype) for rank, _, _, dtype in fp32] == [("0", "torch.float32")]
    # DP=2: one target per model replica, on global ranks 0 and 1 (TP=PP=1)
    dp2 = BUILT.findall(runs[(1, 1, 2)][1].stdout)
    assert sorted(rank for rank, *_ in dp2) == ["0", "1"]
