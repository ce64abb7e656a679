"""The co-located SGLang target (``--target-backend sglang``) against real SGLang on the CPU.

SGLang (0.5.23, ``tools/install.sh --with-sglang``, which ``.ci/run`` runs) is driven in
process by megaspark/targets/sglang_runtime.py. These tests skip where sglang is not
installed, unless ``MEGASPARK_REQUIRE_SGLANG=1`` (set by tools/run_tests.sh), which turns
the absence into a failure.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sglang_marks import needs_sglang
from tests.launcher import base_flags, losses, ok, run

REPO = Path(__file__).resolve().parents[1]


def built_lines(stdout: str) -> list:
    """The ranks' "target ... built on" lines, whatever else the ranks printed around them."""
    return sorted(re.findall(r"rank \d+: target \w+ built on \w+ in torch\.[a-z]+\d+", stdout))


def _parity(model, *layer_ids):
    r = subprocess.run([sys.executable, str(REPO / "tests" / "sglang_parity_worker.py"), model,
                        *map(str, layer_ids)], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="2"), cwd=REPO)
    lines = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stdout[-3000:] + r.stderr[-5000:]
    return json.loads(lines[-1][len("RESULT "):])


def _check_parity(res, layer_ids=None):
    if layer_ids is not None:
        assert res["layer_ids"] == list(layer_ids)
    assert res["layer_ids"] == res["hf_layer_ids"]
    assert res["shapes"] == res["ref_shapes"]
    assert res["dtypes"] == ["torch.float32", "torch.float32"]
    assert [s["n"] for s in res["samples"]] == [64, 37, 12, 113]
    for s in res["samples"]:
        # bit for bit against HF's run of the same sample
        assert s["aux_equal_alone"] and s["last_equal_alone"], s
        # the HF provider's padded batch is off HF-alone by its masked attention only; the
        # SGLang features are exactly that far from it, no further
        assert s["aux_vs_batch"] <= s["batch_vs_alone"] and s["last_vs_batch"] <= s["batch_vs_alone"], s
        assert s["batch_vs_alone"] <= 1e-7 * max(1.0, s["scale"]) * 100, s
        assert s["zero_after_end"], s
    # the full-length sample has no padding: identical to the HF provider's batch
    full = res["samples"][0]
    assert full["aux_vs_batch"] == 0.0 and full["last_vs_batch"] == 0.0 and full["equal_unmasked_batch"]
    assert res["nomask_equal"]
    assert "one co-located target per process" in res["second_runner"]


@needs_sglang
@pytest.mark.parametrize("layer_ids", [None, (0, 2, 4)], ids=["default-ids", "custom-ids"])
def test_colocated_matches_hf_tiny_qwen3(tiny_qwen3_dir, layer_ids):
    _check_parity(_parity(tiny_qwen3_dir, *(layer_ids or ())), layer_ids)


@needs_sglang
@pytest.mark.slow
@pytest.mark.parametrize("layer_ids", [None, (3, 11, 28)], ids=["default-ids", "custom-ids"])
def test_colocated_matches_hf_builtin_smollm2(layer_ids):
    res = _parity("builtin:smollm2-135m", *(layer_ids or ()))
    _check_parity(res, layer_ids)
    if layer_ids is None:
        assert res["layer_ids"] == [1, 8, 14, 20, 27]


@needs_sglang
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (2, 2)], ids=["tp1", "tp2", "tp2pp2"])
def test_training_through_sglang_matches_hf(tmp_path, tiny_llama_dir, data_dir, tp, pp):
    """5 iterations, samples of unequal lengths padded to a multiple of 16. At TP 2 the
    target is sharded over the first stage's TP ranks (the default) or whole on TP rank 0;
    with PP 2 the last stage's ranks take no part in SGLang's start-up."""
    runs = {"hf": ["--target-backend", "hf"], "sglang": ["--target-backend", "sglang"]}
    if (tp, pp) == (2, 1):
        runs["sglang-ttp1"] = ["--target-backend", "sglang", "--target-tensor-parallel-size", "1"]
    got = {}
    for name, flags in runs.items():
        log = tmp_path / f"{name}.jsonl"
        r = run(tp * pp, *base_flags(tiny_llama_dir, data_dir, "--tensor-model-parallel-size", str(tp),
                                     "--pipeline-model-parallel-size", str(pp),
                                     "--global-batch-size", "4", "--train-iters", "5",
                                     "--pad-to-multiple", "16", *flags, "--log-jsonl", str(log)),
                timeout=600)
        ok(r)
        got[name] = losses(log)
        built = built_lines(r.stdout)
        kind = "HFTargetProvider" if name == "hf" else "SGLangColocatedProvider"
        ranks = [0, 1] if name == "sglang" and tp == 2 else [0]
        assert built == [f"rank {k}: target {kind} built on cpu in torch.float32" for k in ranks], built
    for name in runs:
        assert sorted(got[name]) == [1, 2, 3, 4, 5], (name, got)
        for it in range(1, 6):
            assert got[name][it] == pytest.approx(got["hf"][it], abs=1e-5), (name, it, got)


@needs_sglang
def test_target_tensor_parallel_size_checked(tiny_llama_dir, data_dir):
    flags = base_flags(tiny_llama_dir, data_dir, "--train-iters", "1")
    r = run(1, *flags, "--target-backend", "sglang", "--target-tensor-parallel-size", "2")
    assert r.returncode != 0
    assert "--target-tensor-parallel-size 2: the co-located target runs either whole" in r.stdout + r.stderr
    r = run(1, *flags, "--target-tensor-parallel-size", "1")
    assert r.returncode != 0
    assert "--target-tensor-parallel-size is read with --target-backend sglang only" in r.stdout + r.stderr


def test_stand_ins_import_but_refuse_calls(tmp_path):
    """The stand-in packages import anything SGLang imports from them and raise, naming
    themselves, if something calls it; they go on sys.path only on a CPU."""
    code = (
        "import os, sys\n"
        "from megaspark.targets.sglang_runtime import prepare_environment, STAND_INS\n"
        "assert prepare_environment('cuda') == []\n"
        "used = prepare_environment('cpu')\n"
        "assert 'sgl_kernel' in used, used\n"
        "assert prepare_environment('cpu') == used\n"
        "assert os.environ['SGLANG_USE_CPU_ENGINE'] == '1'\n"
        "assert str(STAND_INS['sgl_kernel']) in os.environ['PYTHONPATH'].split(os.pathsep)\n"
        "from sgl_kernel import copy_all_layer_kv_cache_cpu as f\n"
        "from torchvision.transforms import InterpolationMode\n"
        "import torchvision.transforms.functional\n"
        "class X(f): pass\n"
        "print(InterpolationMode.BICUBIC)\n"
        "try:\n"
        "    f(1)\n"
        "except RuntimeError as e:\n"
        "    print('REFUSED', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SGLANG_USE_CPU_ENGINE")})
    assert r.returncode == 0, r.stderr
    assert "megaspark stand-in torchvision.transforms.InterpolationMode.BICUBIC" in r.stdout
    assert "REFUSED sgl_kernel.copy_all_layer_kv_cache_cpu was called" in r.stdout


def test_resolve_target_tp_rule():
    """The one rule for the co-located target's TP size (start-up and the provider use it)."""
    from types import SimpleNamespace

    from megaspark.errors import ArgumentError
    from megaspark.targets.sglang_colocated import resolve_target_tp

    six_heads = SimpleNamespace(num_attention_heads=6)
    assert resolve_target_tp(six_heads, None, 2) == (2, None)  # default: the draft's TP
    assert resolve_target_tp(six_heads, 1, 2) == (1, None)
    ttp, note = resolve_target_tp(six_heads, None, 4)  # 6 heads over 4: whole on TP rank 0
    assert ttp == 1 and "do not split over TP 4: SGLang runs it whole on TP rank 0" in note
    with pytest.raises(ArgumentError, match="--target-tensor-parallel-size 4: the target's 6 attention"):
        resolve_target_tp(six_heads, 4, 4)  # asked for explicitly: refused


@needs_sglang
def test_target_whose_heads_do_not_split_runs_on_tp_rank_0(tmp_path):
    """A 6-head target at TP 4 (SmolLM2 has 9 heads): the default target TP falls back to 1
    with a message; asking for it explicitly is refused before any weights are loaded."""
    from tests.launcher import chat_file
    from tests.tiny_models import make_tiny_target

    target = make_tiny_target(tmp_path / "t", family="llama", hidden=48, heads=6, kv_heads=2)
    data = tmp_path / "data"
    subprocess.run([sys.executable, str(REPO / "tools/prepare_data.py"), "--input",
                    str(chat_file(tmp_path / "c.jsonl")), "--target-model", target, "--output", str(data),
                    "--max-length", "64", "--valid-fraction", "0.15", "--min-supervised-tokens", "4",
                    "--quiet"], check=True, capture_output=True, text=True)
    flags = base_flags(target, str(data), "--tensor-model-parallel-size", "4", "--global-batch-size", "2",
                       "--micro-batch-size", "1", "--train-iters", "1", "--target-backend", "sglang",
                       "--num-attention-heads", "4", "--num-query-groups", "4")
    r = run(4, *flags)
    ok(r)
    assert "attention heads do not split over TP 4: SGLang runs it whole on TP rank 0" in r.stdout
    built = built_lines(r.stdout)
    assert built == ["rank 0: target SGLangColocatedProvider built on cpu in torch.float32"], built
    r = run(4, *flags, "--target-tensor-parallel-size", "4")
    assert r.returncode != 0
    assert "--target-tensor-parallel-size 4: the target's 6 attention heads do not split" in r.stdout + r.stderr
    assert "built on" not in r.stdout
