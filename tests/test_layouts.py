"""3D parallelism: the same training at every (TP, PP, DP) layout, interleaved pipelining,
resharding resume, and layouts that cannot work refused before any work.

Four gloo processes at most; gradient accumulation is on wherever DP < 4 (global batch 4,
micro-batch 1). Micro-batches are padded to their own longest sample, so pipeline stages
exchange activations of varying lengths."""

from __future__ import annotations

import pytest

from tests.launcher import base_flags, fails, losses, ok, run

pytestmark = pytest.mark.slow

LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (2, 1, 2), (1, 2, 2)]
ITERS = 4


def _flags(target, data, tp, pp, *extra):
    flags = base_flags(target, data, "--tensor-model-parallel-size", str(tp),
                       "--pipeline-model-parallel-size", str(pp), "--micro-batch-size", "1",
                       "--global-batch-size", "4", "--use-distributed-optimizer", *extra)
    flags[flags.index("--num-layers") + 1] = "4"
    # samples are at most 64 tokens: micro-batches get their own lengths (16..64), which the
    # pipeline stages exchange before each activation
    flags[flags.index("--seq-length") + 1] = "96"
    return flags + ["--pad-to-multiple", "16"]


@pytest.fixture(scope="module")
def layout_losses(tmp_path_factory, tiny_llama_dir, data_dir):
    out = {}
    root = tmp_path_factory.mktemp("layouts")
    for tp, pp, dp in LAYOUTS + [("vpp", 2, 1)]:
        extra = ["--num-layers-per-virtual-pipeline-stage", "1"] if tp == "vpp" else []
        tp_n = 1 if tp == "vpp" else tp
        log = root / f"{tp}-{pp}-{dp}.jsonl"
        r = run(tp_n * pp * dp, *_flags(tiny_llama_dir, data_dir, tp_n, pp, "--train-iters", str(ITERS),
                                        "--log-jsonl", str(log), *extra))
        ok(r)
        out[(tp, pp, dp)] = losses(log)
    return out


@pytest.mark.parametrize("layout", LAYOUTS[1:] + [("vpp", 2, 1)])
def test_layout_gives_the_same_losses(layout_losses, layout):
    ref, got = layout_losses[(1, 1, 1)], layout_losses[layout]
    assert sorted(got) == list(range(1, ITERS + 1))
    for it in ref:
        assert got[it] == pytest.approx(ref[it], rel=1e-4), (layout, it, ref, got)
    assert ref[ITERS] < ref[1]  # and it is actually training


def test_resharding_resume(tmp_path, tiny_llama_dir, data_dir, layout_losses):
    reference = layout_losses[(1, 1, 1)]
    ckpt = tmp_path / "ckpt"
    ok(run(4, *_flags(tiny_llama_dir, data_dir, 2, 2, "--train-iters", str(ITERS), "--save", str(ckpt),
                      "--save-interval", "2", "--exit-interval", "2")))
    for tp, pp, dp in [(1, 1, 1), (1, 1, 4)]:
        log = tmp_path / f"resume-{tp}{pp}{dp}.jsonl"
        ok(run(tp * pp * dp, *_flags(tiny_llama_dir, data_dir, tp, pp, "--train-iters", str(ITERS),
                                     "--load", str(ckpt), "--log-jsonl", str(log))))
        got = losses(log)
        assert sorted(got) == [3, 4]
        for it in (3, 4):
            assert got[it] == pytest.approx(reference[it], rel=1e-4), ((tp, pp, dp), it, reference, got)


def test_impossible_layouts_are_refused(tiny_llama_dir, data_dir):
    flags = base_flags(tiny_llama_dir, data_dir, "--train-iters", "1")
    fails(run(3, *flags, "--tensor-model-parallel-size", "2"), "world size 3", "--tensor-model-parallel-size")
    fails(run(4, *flags, "--pipeline-model-parallel-size", "4"), "--pipeline-model-parallel-size 4",
          "--num-layers")
    fails(run(2, *flags, "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"),
          "--num-layers-per-virtual-pipeline-stage")
