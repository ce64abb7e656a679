"""``--algorithm eagle3`` through pretrain_dspark.py (issue 16): the same training at
(TP, DP) = (1, 1), (2, 1), (1, 2) and (2, 2) — losses within 1e-4 over several steps (one
global token-pooled denominator, the target computed on TP rank 0 and broadcast) — with
evaluation, τ and checkpoints, and an auto-resumed run that continues bit-exactly."""
from __future__ import annotations

import pytest

from tests.launcher import losses, ok, run, tool

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


def flags(target, data, tp, *extra):
    return ["--algorithm", "eagle3", "--target-model", target, "--data-path", data,
            "--target-layer-ids", "1", "2", "4", "--draft-vocab-size", "128", "--ttt-steps", "3",
            "--tensor-model-parallel-size", str(tp), "--seq-length", "64", "--micro-batch-size", "1",
            "--global-batch-size", "4", "--lr", "2e-2", "--lr-warmup-fraction", "0", "--log-interval", "1",
            "--no-progress-bar", "--train-iters", "4", *extra]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, tiny_llama_dir, data_dir):
    root = tmp_path_factory.mktemp("eagle3")
    out = {}
    for tp, dp in LAYOUTS:
        log = root / f"{tp}-{dp}.jsonl"
        extra = ["--eval-interval", "4", "--eval-iters", "1"]
        if (tp, dp) == (2, 1):
            extra += ["--save", str(root / "ckpt"), "--save-interval", "2"]
        r = run(tp * dp, *flags(tiny_llama_dir, data_dir, tp, "--log-jsonl", str(log), *extra), timeout=600)
        ok(r)
        out[(tp, dp)] = (losses(log), losses(log, "eval"), r)
    return root, out


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_eagle3_is_layout_invariant(layouts, layout):
    _, out = layouts
    ref, got = out[(1, 1)][0], out[layout][0]
    assert sorted(got) == [1, 2, 3, 4]
    for it in ref:
        assert got[it] == pytest.approx(ref[it], rel=1e-4, abs=1e-5), (it, ref, got)


def test_eagle3_run_reports_and_checkpoints(layouts, tiny_llama_dir, data_dir):
    root, out = layouts
    train, evals, r = out[(2, 1)]
    assert "eagle3: H 64" in r.stdout and "draft vocabulary 128 of 320, TTT steps 3" in r.stdout
    assert "eval @ 4" in r.stdout and "accept@k" in r.stdout and evals
    assert (root / "ckpt" / "latest").read_text() == "iter_0000004"
    # resume from iteration 2 (a damaged newest checkpoint is skipped): iterations 3, 4 again
    (root / "ckpt" / "iter_0000004" / "rng_rank0.pt").write_bytes(b"x")
    log = root / "resumed.jsonl"
    r2 = run(2, *flags(tiny_llama_dir, data_dir, 2, "--save", str(root / "ckpt"), "--log-jsonl", str(log)),
             timeout=600)
    ok(r2)
    assert "resuming from" in r2.stdout and "iter_0000002" in r2.stdout
    again = losses(log)
    assert sorted(again) == [3, 4] and all(again[it] == train[it] for it in again), (again, train)


def test_eagle3_checkpoint_converts_to_the_engine_format(layouts, tmp_path):
    """convert_checkpoint_to_hf.py on a TP=2 Eagle3 checkpoint: LlamaForCausalLMEagle3, the
    validator accepts it, and its tensors and draft vocabulary are the checkpoint's."""
    import json

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from megaspark.export.eagle3 import read_eagle3
    from megaspark.models.eagle3.model import STATE_DICT_MAP

    root, _ = layouts
    ckpt = root / "ckpt" / "iter_0000002"  # intact (the newest may have been damaged above)
    out = tmp_path / "hf"
    r = tool("convert_checkpoint_to_hf.py", "--load", ckpt, "--output", out)
    assert r.returncode == 0 and "LlamaForCausalLMEagle3" in r.stdout, r.stdout + r.stderr
    assert json.loads((out / "config.json").read_text())["eagle_config"][
        "eagle_aux_hidden_state_layer_ids"] == [1, 2, 4]
    v = tool("validate_hf_export.py", out, timeout=120)
    assert v.returncode == 0, v.stdout
    e, _, vocab, tensors = read_eagle3(out)
    dcp_to_torch_save(str(ckpt), str(tmp_path / "all.pt"))
    model = torch.load(tmp_path / "all.pt", weights_only=False)  # the model keys are top-level
    for name, (hf, _) in STATE_DICT_MAP.items():
        if hf in tensors:
            assert torch.equal(tensors[hf], model[name]), name
    assert torch.equal(vocab.draft_to_target, model["draft_to_target"])
    assert e.draft_vocab_size == 128 and vocab.size == 128


def test_eval_speculative_decodes_with_the_eagle3_checkpoint(layouts, tiny_llama_dir, data_dir):
    """tools/eval_speculative.py with an Eagle3 training checkpoint: chain drafting against
    the real (tiny) target, greedy output identical to the target's, τ reported beside the
    checkpoint's analytic τ."""
    import json


    root, _ = layouts
    out = root / "eval.json"
    r = tool("eval_speculative.py", "--draft", root / "ckpt" / "iter_0000002", "--data-path", data_dir,
             "--num-prompts", "3", "--max-new-tokens", "12", "--num-speculative-tokens", "3", "--no-progress",
             "--json", out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["draft"]["algorithm"] == "eagle3" and report["draft"]["taps"] == [1, 2, 4]
    assert report["greedy_identical"] == {"identical": 3, "prompts": 3}
    assert report["speculative"]["acceptance_length"] >= 1.0


@pytest.fixture(scope="module")
def variants(tmp_path_factory, tiny_llama_dir, data_dir):
    """The MLA draft at TP 1 and TP 2 (checkpointed), the GQA draft at DP 2 with the
    distributed optimizer, and at TP 2 with sequence parallelism."""
    root = tmp_path_factory.mktemp("eagle3_variants")
    runs = {"mla-1": (1, 1, ["--draft-attention", "mla"]),
            "mla-2": (2, 1, ["--draft-attention", "mla", "--save", str(root / "mla"), "--save-interval", "4"]),
            "dist-opt": (1, 2, ["--use-distributed-optimizer"]),
            "sp": (2, 1, ["--sequence-parallel"])}
    out = {}
    for name, (tp, dp, extra) in runs.items():
        log = root / f"{name}.jsonl"
        r = run(tp * dp, *flags(tiny_llama_dir, data_dir, tp, "--log-jsonl", str(log), *extra), timeout=600)
        ok(r)
        out[name] = (losses(log), r)
    return root, out


def test_eagle3_mla_draft_trains_layout_invariant_and_converts(variants, layouts, tmp_path):
    """--draft-attention mla: DeepSeek-V3 latent attention in the Eagle3 layer (the shape of
    a GQA target's MLA draft), the same losses at TP 1 and TP 2, and the TP-2
    checkpoint converts to DeepseekV3ForCausalLMEagle3, which the validator accepts."""
    import json


    root, out = variants
    (one, r1), (two, r2) = out["mla-1"], out["mla-2"]
    assert "eagle3: H 64, MLA 4 heads, latent" in r1.stdout, r1.stdout[-2000:]
    assert sorted(two) == [1, 2, 3, 4]
    for it in one:
        assert two[it] == pytest.approx(one[it], rel=1e-4, abs=1e-5), (it, one, two)
    gqa = layouts[1][(1, 1)][0]
    assert one[1] != pytest.approx(gqa[1], rel=1e-3)  # a different draft, not the GQA one
    hf = tmp_path / "hf"
    c = tool("convert_checkpoint_to_hf.py", "--load", root / "mla", "--output", hf)
    assert c.returncode == 0 and "DeepseekV3ForCausalLMEagle3" in c.stdout, c.stdout + c.stderr
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["kv_lora_rank"] > 0
    v = tool("validate_hf_export.py", hf, timeout=120)
    assert v.returncode == 0 and "(MLA)" in v.stdout, v.stdout


def test_eagle3_with_the_distributed_optimizer_matches(variants, layouts):
    """DP 2 with --use-distributed-optimizer (optimizer state sharded over DP) trains the same
    as one rank."""
    ref = layouts[1][(1, 1)][0]
    got, r = variants[1]["dist-opt"]
    assert sorted(got) == [1, 2, 3, 4]
    for it in ref:
        assert got[it] == pytest.approx(ref[it], rel=1e-4, abs=1e-5), (it, ref, got)


def test_eagle3_with_sequence_parallelism_matches(variants, layouts, tiny_llama_dir, data_dir):
    """TP 2 with --sequence-parallel (S/tp positions per rank between the TP regions, the
    norms' gradients summed by megatron's finalize_model_grads) trains the same as one rank;
    impossible combinations are refused before anything loads."""
    from megaspark.arguments import ArgumentError, parse_args

    ref = layouts[1][(1, 1)][0]
    got, r = variants[1]["sp"]
    assert sorted(got) == [1, 2, 3, 4]
    for it in ref:
        assert got[it] == pytest.approx(ref[it], rel=1e-4, abs=1e-5), (it, ref, got)
    base = ["--target-model", tiny_llama_dir, "--data-path", data_dir, "--sequence-parallel"]
    for extra, needle in ((["--algorithm", "eagle3"], "needs --tensor-model-parallel-size > 1"),
                          (["--tensor-model-parallel-size", "2"], "--algorithm eagle3 only"),
                          (["--algorithm", "eagle3", "--tensor-model-parallel-size", "2", "--seq-length", "63"],
                           "--seq-length 63 and --pad-to-multiple 64 must be divisible by 2")):
        with pytest.raises(ArgumentError, match=needle):
            parse_args(base + extra, world_size=2)


@pytest.mark.parametrize("extra, needle", [
    (["--pipeline-model-parallel-size", "2", "--num-layers", "2"], "the draft is one layer"),
    (["--target-layer-ids", "1", "2"], "taps 3 target layers, got --target-layer-ids \\[1, 2\\]"),
    (["--transformer-impl", "transformer_engine"], "local layers: drop --fp8-format"),
])
def test_eagle3_flags_refused_before_anything_loads(tmp_path, extra, needle):
    from megaspark.arguments import ArgumentError, parse_args

    with pytest.raises(ArgumentError, match=needle):
        parse_args(["--algorithm", "eagle3", "--data-path", str(tmp_path), *extra], world_size=2)
