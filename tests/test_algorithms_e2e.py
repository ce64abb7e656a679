"""Every algorithm of the DFlash family trained end to end through ``pretrain_dspark.py``
at TP = 1 (DP = 2), TP = 2 and PP = 2 with the same losses, then exported in its HF layout
and run by real speculative decoding (``tools/eval_speculative.py``)."""

from __future__ import annotations

import json

import pytest

from tests.launcher import losses, ok, run, tool

pytestmark = pytest.mark.slow

ITERS = 4
MODES = {
    "dflash": ("--algorithm", "dflash"),
    "dflash-original": ("--algorithm", "dflash-original", "--block-size", "6"),
    "vp_drafter": ("--training-mode", "vp_drafter", "--block-size", "6", "--prefix-weight-base", "0.8"),
    # DeepSeek-V3 latent attention as the draft's attention (tiny llama target: 4 heads x 16)
    "mla": ("--draft-attention", "mla", "--q-lora-rank", "16", "--kv-lora-rank", "24",
            "--no-confidence-head", "--markov-rank", "8"),
}
LAYOUTS = {"tp1": ("--tensor-model-parallel-size", "1"), "tp2": ("--tensor-model-parallel-size", "2"),
           "pp2": ("--pipeline-model-parallel-size", "2")}


def _flags(target, data, *extra):
    return ["--target-model", target, "--data-path", data, "--num-layers", "2", "--num-anchors", "6",
            "--seq-length", "64", "--micro-batch-size", "1", "--global-batch-size", "2",
            "--num-target-taps", "2", "--lr", "3e-3", "--lr-warmup-fraction", "0", "--log-interval", "1",
            "--train-iters", str(ITERS), "--eval-interval", str(ITERS), "--eval-iters", "2",
            "--no-progress-bar", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir, data_dir):
    root = tmp_path_factory.mktemp("algorithms")
    out = {}
    for mode, mode_flags in MODES.items():
        for layout, layout_flags in LAYOUTS.items():
            log = root / f"{mode}-{layout}.jsonl"
            save = ["--save", str(root / f"{mode}-ckpt")] if layout == "tp2" else []
            r = run(2, *_flags(tiny_llama_dir, data_dir, *mode_flags, *layout_flags, "--log-jsonl", str(log),
                               *save))
            ok(r)
            out[(mode, layout)] = dict(train=losses(log), eval=losses(log, "eval"), stdout=r.stdout)
        out[mode] = root / f"{mode}-ckpt"
    out["root"] = root
    return out


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_gives_the_same_losses_at_every_layout(trained, mode):
    ref = trained[(mode, "tp1")]["train"]
    assert sorted(ref) == list(range(1, ITERS + 1))
    assert ref[ITERS] < ref[1], ref  # it trains
    for layout in ("tp2", "pp2"):
        got = trained[(mode, layout)]["train"]
        for it in ref:
            assert got[it] == pytest.approx(ref[it], rel=1e-4), (mode, layout, it, ref, got)
    # evaluation reads eval-iters x micro-batch x DP samples: compare the two DP = 1 layouts
    assert trained[(mode, "pp2")]["eval"][ITERS] == pytest.approx(trained[(mode, "tp2")]["eval"][ITERS],
                                                                  rel=1e-4)


def test_the_run_says_what_it_trains(trained):
    assert "| dflash, convention S:" in trained[("dflash", "tp2")]["stdout"]
    assert "markov 0, confidence off" in trained[("dflash", "tp2")]["stdout"]
    assert "| dflash-original, convention D:" in trained[("dflash-original", "tp2")]["stdout"]
    assert "| dflash-original (vp_drafter), convention D:" in trained[("vp_drafter", "tp2")]["stdout"]
    assert "MLA 4 heads (q rank 16, kv rank 24, qk 16+8, v 16)" in trained[("mla", "tp2")]["stdout"]
    # the objectives differ: the same data and seed give different losses (near ln V at init)
    assert trained[("vp_drafter", "tp1")]["train"][1] != pytest.approx(
        trained[("dflash-original", "tp1")]["train"][1], rel=1e-5, abs=0)


def _convert(ckpt, out, *flags):
    r = tool("convert_checkpoint_to_hf.py", "--load", ckpt, "--output", out, *flags)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads((out / "config.json").read_text())


def test_exports_record_the_algorithm(trained):
    from megaspark.export.files import read_hf

    root = trained["root"]
    flash = _convert(trained["dflash-original"], root / "hf-dflash", "--layout", "specforge")
    assert flash["architectures"] == ["DFlashDraftModel"]
    assert flash["dflash_config"]["projector_type"] == "dflash"
    assert flash["sample_from_anchor"] is False and flash["dspark_slot_convention"] == "D"
    assert "speculators_model_type" not in flash and flash["block_size"] == 6
    baseline = _convert(trained["dflash"], root / "hf-baseline")
    assert baseline["markov_rank"] == 0 and baseline["enable_confidence_head"] is False
    assert baseline["sample_from_anchor"] is True  # DeepSpec's DFlash baseline is Convention S
    # ... and never the z-lab DFlash class, whose loaders read Convention D
    baseline_sf = _convert(trained["dflash"], root / "hf-baseline-sf", "--layout", "specforge")
    assert baseline_sf["architectures"] == ["DSparkDraftModel"]
    assert baseline_sf["dflash_config"]["projector_type"] == "dspark"
    flash_ds = _convert(trained["dflash-original"], root / "hf-dflash-ds")
    assert flash_ds["speculators_model_type"] == "dspark"  # DSpark class + Convention D: tagged
    vp = _convert(trained["vp_drafter"], root / "hf-vp", "--layout", "specforge")
    assert vp["dflash_config"]["training_mode"] == "vp_drafter"
    assert vp["dflash_config"]["prefix_weight_base"] == 0.8
    dcfg = read_hf(root / "hf-vp")[0]
    assert (dcfg.training_mode, dcfg.prefix_weight_base, dcfg.convention) == ("vp_drafter", 0.8, "D")
    vp_deepspec = _convert(trained["vp_drafter"], root / "hf-vp-ds")
    assert vp_deepspec["training_mode"] == "vp_drafter"
    mla = _convert(trained["mla"], root / "hf-mla")
    assert mla["draft_attention"] == "mla" and (mla["q_lora_rank"], mla["kv_lora_rank"]) == (16, 24)
    assert read_hf(root / "hf-mla")[0].attention_type == "mla"


@pytest.mark.parametrize("mode", ["dflash", "dflash-original", "mla"])
def test_speculative_decoding_with_dflash_drafts(trained, tiny_llama_dir, data_dir, tmp_path, mode):
    report = tmp_path / "report.json"
    r = tool("eval_speculative.py", "--draft", trained[mode], "--target-model", tiny_llama_dir,
             "--data-path", data_dir, "--num-prompts", "2", "--max-new-tokens", "12", "--temperature", "0",
             "--json", report, "--no-progress", "--threads", "1", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(report.read_text())
    assert rep["greedy_identical"] == {"identical": 2, "prompts": 2}  # lossless
    drafts = 5 if mode == "dflash-original" else 7  # Convention S (B = 7): B drafts; D (B = 6): B - 1
    assert len(rep["speculative"]["per_position_acceptance"]) == drafts
    assert 1.0 <= rep["speculative"]["acceptance_length"] <= drafts + 1
