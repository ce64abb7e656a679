"""Exports loaded by real SGLang (0.5.23, CPU): SGLang's own DSpark draft class is built
from the export's config and its own ``load_weights`` reads the export; every parameter it
built must then hold the export's tensors (fused q/k/v and gate/up included), and no
tensor of the export may go unread. A renamed q/k-norm or Markov key, or a draft without
q/k norms under an engine's name, must fail (tests of the test).

SGLang's own Markov heads (vanilla, gated, RNN), fed the export's weights and walked slot
by slot as SGLang drafts, give megaspark's Markov bias.

Not covered yet (issue 14): running a whole draft block through SGLang's forward (its
attention needs a ForwardBatch and a KV pool) and comparing its proposals with megaspark's."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.sglang_marks import needs_sglang
from tests.test_export import export_case

REPO = Path(__file__).resolve().parents[1]


def sglang_load(path, *extra) -> dict:
    r = subprocess.run([sys.executable, str(REPO / "tests" / "sglang_loader_worker.py"), str(path), *extra],
                       capture_output=True, text=True, timeout=300, cwd=REPO,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
    lines = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


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


@needs_sglang
@pytest.mark.parametrize("case", ["S_gated_conf_nomarkov", "S_vanilla_noconf_qwen3"])
def test_export_loads_in_sglang_and_a_renamed_key_fails(tmp_path, case):
    d, _, _, config = export_case(case, tmp_path / "x")
    assert d.qk_norm and config["architectures"] == ["Qwen3DSparkModel"]
    res = sglang_load(tmp_path / "x")
    assert res["architecture"] == "Qwen3DSparkModel"
    assert res["problems"] == [] and res["ignored"] == [], res
    assert res["loaded"] >= 9 * d.num_layers  # every layer's tensors (q, k, v fused) and more
    # a q/k-norm weight under another name: SGLang keeps its norm at 1 and ignores the tensor
    bad = sglang_load(edited(tmp_path / "x", tmp_path / "qk", rename={
        "layers.0.self_attn.q_norm.weight": "layers.0.self_attn.query_norm.weight"}))
    assert any("layers.0.self_attn.q_norm.weight" in p and "initial value" in p for p in bad["problems"]), bad
    assert bad["ignored"] == ["layers.0.self_attn.query_norm.weight"]
    # a Markov table under another name
    bad = sglang_load(edited(tmp_path / "x", tmp_path / "mk", rename={
        "markov_head.markov_w1.weight": "markov_head.w1.weight"}))
    assert bad["problems"], bad


@needs_sglang
def test_draft_without_qk_norm_is_not_served_as_an_engine_class(tmp_path):
    d, _, _, config = export_case("S_vanilla_conf", tmp_path / "x")  # --no-qk-norm draft
    assert not d.qk_norm and config["architectures"] == ["LlamaDSparkModel"]
    assert sglang_load(tmp_path / "x")["problems"] == ["SGLang has no DSpark draft class 'LlamaDSparkModel'"]
    # claimed as Qwen3DSparkModel, SGLang would run it with q/k norms of weight 1
    res = sglang_load(edited(tmp_path / "x", tmp_path / "q", config={"architectures": ["Qwen3DSparkModel"]}))
    assert any("q_norm.weight" in p and "initial value" in p for p in res["problems"]), res


@needs_sglang
@pytest.mark.parametrize("case,head", [("S_vanilla_noconf_qwen3", "VanillaMarkov"),
                                       ("S_gated_conf_nomarkov", "GatedMarkovHead"),
                                       ("S_rnn_conf", "RNNHead")])
def test_sglang_markov_heads_give_megaspark_bias(tmp_path, case, head):
    d, _, _, _ = export_case(case, tmp_path / "x")
    res = sglang_load(tmp_path / "x", "--markov")
    assert res["head"] == head and res["missing"] == [] and res["unexpected"] == [], res
    assert res["scale"] > 0 and res["max_abs_diff"] <= 1e-5 * max(1.0, res["scale"]), res
