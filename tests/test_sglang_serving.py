"""Exports served by real SGLang (0.5.23, CPU) exactly as megaspark trained them.

SGLang's own DSpark draft class is built from the export's config, its own
``load_weights`` reads the export, and every parameter it built must hold the export's
tensors (fused q/k/v and gate/up included) with no tensor left unread. Then the same draft
blocks run through SGLang (its layers, context-KV write, torch-native attention, target
LM head, Markov drafting loop and confidence head) and through megaspark's inference
forward: logits and confidences within 1e-5, the same tokens, for the vanilla, gated and
RNN heads (:func:`megaspark.export.sglang_parity.compare_with_sglang`).

Tests of the test: a q/k-norm weight or a Markov table under another name (SGLang keeps
its initial value and ignores the tensor, silently), and a draft without q/k norms claimed
as an engine class, must fail, both in the load check and in the drafted blocks."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from megaspark.config import DSparkConfig
from megaspark.export.files import export_hf
from tests import dspark_cases as dc
from tests import reference
from tests.sglang_marks import needs_sglang
from tests.test_export import export_case, fake_target_config

REPO = Path(__file__).resolve().parents[1]


def sglang_load(path, *extra) -> dict:
    r = subprocess.run([sys.executable, str(REPO / "tests" / "sglang_loader_worker.py"), str(path), *map(str, extra)],
                       capture_output=True, text=True, timeout=300, cwd=REPO,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
    lines = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def served_export(out: Path, head: str, confidence: bool = True, seed: int = 3, **overrides) -> DSparkConfig:
    """A Convention-S draft with q/k norms (as every new draft is) whose weights are large
    enough for every tensor to move the drafted tokens: linear weights N(0, 0.2), norms
    1 + N(0, 0.5)."""
    fields = dict(dc.BASE, qk_norm=True, markov_head_type=head, confidence_head=confidence, **overrides)
    d = DSparkConfig(**fields).validate()
    w = reference.random_weights(dc.reference_cfg(d), seed, L=len(d.target_layer_ids))
    w = {k: (1 + 5 * (v - 1)) if "norm" in k else 10 * v for k, v in w.items()}
    export_hf(w, d, fake_target_config(d), out, layout="deepspec", target_name="fake")
    return d


def edited(src: Path, dst: Path, rename=None, config=None) -> Path:
    shutil.copytree(src, dst)
    if rename:
        t = load_file(dst / "model.safetensors")
        t = {rename.get(k, k): v for k, v in t.items()}
        save_file(t, dst / "model.safetensors")
    if config:
        c = json.loads((dst / "config.json").read_text())
        c.update(config)
        (dst / "config.json").write_text(json.dumps(c))
    return dst


def assert_same_blocks(res: dict) -> None:
    b = res["blocks"]
    assert b is not None, res
    assert b["logit_scale"] > 1.0, b  # logits that discriminate between tokens
    assert b["max_logit_diff"] <= 1e-5 * b["logit_scale"], b
    assert b["tokens"] == b["sglang_tokens"], b
    assert len(b["tokens"]) == 3 and all(len(t) == 4 for t in b["tokens"]), b
    assert len({t for blk in b["tokens"] for t in blk}) > 3, b  # not one token everywhere


@needs_sglang
@pytest.mark.parametrize("head,confidence,with_markov", [
    ("vanilla", False, True), ("gated", True, False), ("rnn", True, True)])
def test_sglang_serves_the_blocks_megaspark_drafts(tmp_path, head, confidence, with_markov):
    d = served_export(tmp_path / "x", head, confidence, confidence_with_markov=with_markov)
    config = json.loads((tmp_path / "x" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3DSparkModel"] and config["dspark_markov_head_type"] == head
    res = sglang_load(tmp_path / "x", "--blocks")
    assert res["architecture"] == "Qwen3DSparkModel"
    assert res["problems"] == [] and res["ignored"] == [], res
    assert res["loaded"] >= 9 * d.num_layers + 3  # every layer's tensors (q, k, v fused), fc, norms, Markov
    assert_same_blocks(res)
    conf = res["blocks"]["max_confidence_diff"]
    assert (conf is not None) == confidence, res
    if confidence:
        assert conf <= 1e-5, res


@needs_sglang
@pytest.mark.parametrize("renamed", [
    {"layers.0.self_attn.q_norm.weight": "layers.0.self_attn.query_norm.weight"},
    {"markov_head.markov_w2.weight": "markov_w2.weight"},  # read as a backbone name, unknown
])
def test_a_renamed_key_makes_sglang_draft_other_blocks(tmp_path, renamed):
    served_export(tmp_path / "x", "rnn")
    bad = edited(tmp_path / "x", tmp_path / "renamed", rename=renamed)
    res = sglang_load(tmp_path / "x", "--blocks", bad)
    (old, new), = renamed.items()
    assert any(old in p and "initial value" in p for p in res["problems"]), res
    assert res["ignored"] == [new], res
    b = res["blocks"]
    assert b["max_logit_diff"] > 1e-2 * b["logit_scale"], b
    assert any("logits differ" in p for p in res["problems"]), res


@needs_sglang
def test_draft_without_qk_norm_is_not_served_as_an_engine_class(tmp_path):
    d, _, _, config = export_case("S_vanilla_conf", tmp_path / "x")  # a --no-qk-norm draft
    assert not d.qk_norm and config["architectures"] == ["LlamaDSparkModel"]
    assert sglang_load(tmp_path / "x")["problems"] == ["SGLang has no DSpark draft class 'LlamaDSparkModel'"]
    # claimed as Qwen3DSparkModel, SGLang runs it with q/k norms of weight 1: other blocks
    res = sglang_load(edited(tmp_path / "x", tmp_path / "q", config={"architectures": ["Qwen3DSparkModel"]}),
                      "--blocks")
    assert any("q_norm.weight" in p and "initial value" in p for p in res["problems"]), res
    assert res["blocks"]["max_logit_diff"] > 1e-5 * max(1.0, res["blocks"]["logit_scale"]), res
