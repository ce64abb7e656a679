"""End-to-end `pretrain_dspark.py` runs under torchrun against a tiny random HF target:
TP=1 and TP=2, learning, exact resume, crash during a checkpoint write, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launcher import REPO, base_flags, chat_file, fails, losses, ok, run, tool
from tests.sglang_marks import needs_sglang
from tests.tiny_models import make_tiny_target

@pytest.mark.parametrize("tp", [1, 2])
def test_trains_and_checkpoints(tmp_path, tiny_llama_dir, data_dir, tp):
    log = tmp_path / "m.jsonl"
    r = run(2, *base_flags(tiny_llama_dir, data_dir, "--tensor-model-parallel-size", str(tp),
                           "--global-batch-size", "4", "--train-iters", "4", "--eval-interval", "2",
                           "--eval-iters", "1", "--save", str(tmp_path / "ckpt"), "--save-interval", "2",
                           "--log-jsonl", str(log), "--tensorboard-dir", str(tmp_path / "tb")))
    ok(r)
    assert "iter      4/4" in r.stdout and "eval @ 4" in r.stdout
    train = losses(log)
    assert sorted(train) == [1, 2, 3, 4] and all(v == v for v in train.values())
    assert (tmp_path / "ckpt" / "latest").read_text() == "iter_0000004"
    assert (tmp_path / "ckpt" / "best").exists()
    assert any((tmp_path / "tb").iterdir())


def test_loss_decreases_on_a_fixed_batch(tmp_path, tiny_llama_dir, data_dir):
    # one fixed sample set: global batch = 4 samples of a 4-sample dataset
    small = tmp_path / "small"
    small.mkdir()
    lines = Path(data_dir, "train.jsonl").read_text().splitlines()[:4]
    (small / "train.jsonl").write_text("\n".join(lines) + "\n")
    (small / "meta.json").write_text(Path(data_dir, "meta.json").read_text())
    log = tmp_path / "m.jsonl"
    r = run(1, *base_flags(tiny_llama_dir, str(small), "--global-batch-size", "4", "--train-iters", "12",
                           "--lr", "1e-2", "--lr-decay-style", "constant", "--log-jsonl", str(log)))
    ok(r)
    train = losses(log)
    assert train[12] < 0.8 * train[1], train


def test_resume_reproduces_uninterrupted_run(tmp_path, tiny_llama_dir, data_dir):
    common = base_flags(tiny_llama_dir, data_dir, "--tensor-model-parallel-size", "2",
                        "--global-batch-size", "4", "--train-iters", "6")
    full = tmp_path / "full.jsonl"
    ok(run(2, *common, "--log-jsonl", str(full)))
    ckpt = tmp_path / "ckpt"
    part = tmp_path / "part.jsonl"
    ok(run(2, *common, "--save", str(ckpt), "--save-interval", "3", "--exit-interval", "3",
           "--log-jsonl", str(part)))
    assert sorted(losses(part)) == [1, 2, 3]
    ok(run(2, *common, "--load", str(ckpt), "--save", str(ckpt), "--log-jsonl", str(part)))
    a, b = losses(full), losses(part)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for it in range(1, 7):
        assert b[it] == pytest.approx(a[it], rel=1e-5, abs=1e-6), (it, a, b)


def test_padding_to_the_longest_sample_gives_the_same_losses(tmp_path, tiny_llama_dir, data_dir):
    """Micro-batches padded to their longest sample (rounded up to 16) train exactly like
    micro-batches padded to --seq-length (96, longer than every sample)."""
    common = base_flags(tiny_llama_dir, data_dir, "--global-batch-size", "4", "--train-iters", "3",
                        "--eval-interval", "3", "--eval-iters", "1")
    common[common.index("--seq-length") + 1] = "96"
    out = {}
    for multiple in ("0", "16"):
        log = tmp_path / f"pad{multiple}.jsonl"
        ok(run(1, *common, "--pad-to-multiple", multiple, "--log-jsonl", str(log)))
        out[multiple] = (losses(log), losses(log, "eval"))
    (train0, eval0), (train16, eval16) = out["0"], out["16"]
    assert sorted(train16) == [1, 2, 3] and eval16
    for it in train0:
        assert train16[it] == pytest.approx(train0[it], rel=1e-6, abs=1e-7), (train0, train16)
    for it in eval0:
        assert eval16[it] == pytest.approx(eval0[it], rel=1e-6, abs=1e-7), (eval0, eval16)


def test_length_grouped_sampler_is_layout_independent(tmp_path, tiny_llama_dir, data_dir):
    """--length-grouped-sampler gives the same training at DP=1 (accumulating 4 micro-batches)
    and DP=2 (tests/test_dataset_scale.py shows it pads less than the plain order)."""
    common = base_flags(tiny_llama_dir, data_dir, "--global-batch-size", "4", "--micro-batch-size", "1",
                        "--train-iters", "3", "--length-grouped-sampler")
    common[common.index("--seq-length") + 1] = "96"
    got = {}
    for nproc in (1, 2):
        log = tmp_path / f"dp{nproc}.jsonl"
        ok(run(nproc, *common, "--pad-to-multiple", "16", "--log-jsonl", str(log)))
        got[nproc] = losses(log)
    assert sorted(got[2]) == [1, 2, 3]
    for it in got[1]:
        assert got[2][it] == pytest.approx(got[1][it], rel=1e-5, abs=1e-6), got


def test_bad_input_is_refused_clearly(tmp_path, tiny_llama_dir, tiny_qwen3_dir, data_dir):
    flags = base_flags(tiny_llama_dir, data_dir, "--train-iters", "1")
    # a dataset tokenized for another target; one changed after preparation (same size)
    fails(run(1, *base_flags(tiny_qwen3_dir, data_dir, "--train-iters", "1")),
          "meta.json was prepared for another tokenizer", "tokenizer_vocab_size")
    changed = tmp_path / "changed"
    shutil.copytree(data_dir, changed)
    blob = bytearray((changed / "train.bin").read_bytes())
    blob[7] ^= 1
    (changed / "train.bin").write_bytes(bytes(blob))
    fails(run(1, *base_flags(tiny_llama_dir, str(changed), "--train-iters", "1")), "train.bin", "sha256 mismatch")
    fails(run(1, *flags, "--global-batch-size", "3"), "--global-batch-size")
    fails(run(2, *flags, "--tensor-model-parallel-size", "2", "--num-query-groups", "1"),
          "--num-query-groups", "--tensor-model-parallel-size")
    fails(run(1, *flags, "--target-layer-ids", "1", "5"), "--target-layer-ids")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "meta.json").write_text(Path(data_dir, "meta.json").read_text())
    (bad / "train.jsonl").write_text('{"input_ids": [1, 2, 3], "loss_mask": [0, 1]}\n')
    fails(run(1, *base_flags(tiny_llama_dir, str(bad), "--train-iters", "1")), "train.jsonl:1: 'input_ids' has 3 entries but 'loss_mask' has 2")
    ckpt = tmp_path / "ckpt"
    ok(run(1, *flags, "--global-batch-size", "2", "--save", str(ckpt)))
    other = base_flags(tiny_llama_dir, data_dir, "--train-iters", "2")
    other[other.index("--num-layers") + 1] = "1"
    fails(run(1, *other, "--load", str(ckpt)), "different draft shape", "num_layers")
    # a checkpoint of another target (same shapes, different weights/config) is refused
    other_target = make_tiny_target(tmp_path / "other", family="llama", seed=1, num_layers=7)
    fails(run(1, *base_flags(other_target, data_dir, "--train-iters", "2"), "--load", str(ckpt)),
          "different target")


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    """The README job in small: data rendered with SmolLM2's chat template, TP=2 training
    of its default (TP-friendly) draft shape, checkpoint written."""
    tmp_path = tmp_path_factory.mktemp("smollm2")
    out = tmp_path / "data"
    tool("prepare_data.py", "--input", chat_file(tmp_path / "c.jsonl", 16), "--target-model", "builtin:smollm2-135m",
         "--output", out, "--max-length", "96", "--valid-fraction", "0.25", "--min-supervised-tokens", "4", "--quiet",
         check=True, timeout=600)
    log = tmp_path / "m.jsonl"
    r = run(2, "--target-model", "builtin:smollm2-135m", "--data-path", str(out),
            "--tensor-model-parallel-size", "2", "--num-layers", "1", "--num-anchors", "16",
            "--markov-rank", "32", "--seq-length", "96", "--micro-batch-size", "1",
            "--global-batch-size", "2", "--train-iters", "3", "--log-interval", "1",
            "--eval-interval", "3", "--eval-iters", "1", "--no-progress-bar",
            "--save", str(tmp_path / "ckpt"), "--log-jsonl", str(log), timeout=900)
    return tmp_path, r, log


@pytest.mark.slow
def test_short_run_against_real_smollm2(smollm2_run):
    """The embedded default target end to end."""
    tmp_path, r, log = smollm2_run
    ok(r)
    assert "heads 8/4x72" in r.stdout  # 9/3 heads of SmolLM2 do not split over TP=2
    train = losses(log)
    assert sorted(train) == [1, 2, 3] and all(v == v and v > 0 for v in train.values())
    assert losses(log, "eval")
    assert (tmp_path / "ckpt" / "latest").read_text() == "iter_0000003"


@pytest.mark.slow
@needs_sglang
def test_real_smollm2_draft_is_served_by_sglang(smollm2_run):
    """The README job's draft for the Llama-family SmolLM2 exports as Qwen3DSparkModel with
    q/k norms, passes the validator for SGLang, and real SGLang builds it, loads every
    tensor and drafts the same blocks as megaspark (with SmolLM2's own embedding and LM
    head: the export does not ship them, the validator takes them from the target)."""
    tmp_path, r, _ = smollm2_run
    ok(r)
    hf = tmp_path / "hf"
    tool("convert_checkpoint_to_hf.py", "--load", tmp_path / "ckpt", "--output", hf, check=True, timeout=600)
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["Qwen3DSparkModel"] and config["dspark_qk_norm"] is True
    v = subprocess.run([sys.executable, str(REPO / "tools/validate_hf_export.py"), str(hf), "--engine",
                        "sglang", "--load-in-sglang"], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert v.returncode == 0, v.stdout[-3000:] + v.stderr[-3000:]
    assert "none went unread" in v.stdout and "give megaspark's tokens" in v.stdout, v.stdout


def test_load_hf_draft_continues_from_exported_weights(tmp_path, tiny_llama_dir, data_dir):
    """train → export to HF → --load-hf-draft: the held-out loss of the exported weights
    is reproduced exactly (lr 0 keeps them unchanged for the evaluation)."""
    ckpt, hf, log_a, log_b = tmp_path / "ckpt", tmp_path / "hf", tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    common = base_flags(tiny_llama_dir, data_dir, "--global-batch-size", "2", "--eval-iters", "2")
    ok(run(1, *common, "--train-iters", "2", "--eval-interval", "2", "--save", str(ckpt),
           "--log-jsonl", str(log_a)))
    tool("convert_checkpoint_to_hf.py", "--load", ckpt, "--output", hf, check=True)
    flags = list(common)
    flags[flags.index("--lr") + 1] = "0"
    ok(run(2, *flags, "--tensor-model-parallel-size", "2", "--train-iters", "1", "--eval-interval", "1",
           "--load-hf-draft", str(hf), "--log-jsonl", str(log_b)))
    a, b = losses(log_a, "eval"), losses(log_b, "eval")
    assert b[1] == pytest.approx(a[2], rel=1e-5), (a, b)
