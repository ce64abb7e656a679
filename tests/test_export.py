"""HF export / import (DSPARK_SPEC.md §9, §13 items 21 and 23) and the export tools.

Fast part (no processes): parameter counts, config/tensor round trips of every draft
variant in both layouts, a DeepSpec-written Qwen3 checkpoint, import errors, and the
validator accepting a good export and rejecting broken ones.

Process part: a draft trained with ``pretrain_dspark.py`` at TP=2, re-saved from that
checkpoint at PP=2 and at TP=1 (the same weights in three layouts); conversions of all
three are bit-identical; the checkpoint and its exports (both layouts) give identical
draft hidden states, logits and loss (in-process and through ``tools/score_batch.py``);
an export loads at TP=2; the model's trainable parameter count matches the helper.
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megaspark.config import DSparkConfig
from megaspark.export.files import export_hf, read_hf
from megaspark.export.hf_config import canonical
from megaspark.export.loading import (
    build_model,
    export_checkpoint,
    load_draft,
    load_hf_draft_weights,
    target_embeddings,
)
from megaspark.export.score_batch import load_batch, save_batch
from megaspark.export.tensors import (
    FROZEN_TENSORS,
    TENSORS,
    ExportError,
    hf_tensor_shapes,
    parameter_counts,
    trainable_parameter_count,
)
from megaspark.parallel import init_single_process_group
from tests import dspark_cases as dc
from tests import launcher
from tests.launcher import base_flags, ok, run, run_distributed

REPO = Path(__file__).resolve().parents[1]


def tool(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return launcher.tool(name, *args, timeout=timeout)


def fake_target_config(d: DSparkConfig) -> dict:
    """A target text config that the draft ``d`` could have been derived from."""
    return {
        "architectures": ["SomethingForCausalLM"], "_name_or_path": "/somewhere/target",
        "model_type": d.target_model_type, "hidden_size": d.hidden_size,
        "num_hidden_layers": d.num_target_layers, "num_attention_heads": d.num_attention_heads,
        "num_key_value_heads": d.num_query_groups, "head_dim": d.kv_channels,
        "intermediate_size": d.ffn_hidden_size, "vocab_size": d.vocab_size, "rms_norm_eps": d.rms_norm_eps,
        "rope_parameters": {"rope_theta": d.rope_theta, "rope_type": "default"},
        "max_position_embeddings": d.max_position_embeddings, "attention_bias": d.attention_bias,
        "tie_word_embeddings": True, "hidden_act": "silu",
    }


def export_case(name: str, out: Path, layout: str = "deepspec", **kw):
    d, _, weights, batch = dc.make_case(name)
    config = export_hf(weights, d, fake_target_config(d), out, layout=layout, target_name="fake", **kw)
    return d, weights, batch, config


# =====================================================================================
# §13 item 21: parameter counts from the shapes
# =====================================================================================


def qwen3_draft(hidden, heads, inter, n_target, **kw) -> DSparkConfig:
    from megaspark.config import default_target_layer_ids

    return DSparkConfig(
        hidden_size=hidden, num_layers=5, num_attention_heads=heads, num_query_groups=8, kv_channels=128,
        ffn_hidden_size=inter, vocab_size=151936, qk_norm=True, target_model_type="qwen3",
        num_target_layers=n_target, target_layer_ids=default_target_layer_ids(n_target, 5),
        mask_token_id=151669, rope_theta=1e6, **kw,
    ).validate()


def test_tensor_table_covers_the_adapter():
    from megaspark.models.dspark.state_dict_adapter import MAPPINGS

    assert {t.hf for t in TENSORS} == {n for m in MAPPINGS for n in m.hf}


def test_parameter_counts_match_the_spec():
    d8 = qwen3_draft(4096, 32, 12288, 36)
    counts = parameter_counts(d8)
    assert trainable_parameter_count(d8) == counts["trainable"] == 1_126_422_017
    assert counts["per_layer"] == 192_946_432
    assert counts["frozen"] == 1_244_659_712
    dflash = qwen3_draft(4096, 32, 12288, 36, markov_rank=0, confidence_head=False)
    assert trainable_parameter_count(dflash) == 1_048_626_432
    shapes = hf_tensor_shapes(d8)
    assert shapes["markov_head.markov_w1.weight"] == shapes["markov_head.markov_w2.weight"] == (151936, 256)
    assert shapes["confidence_head.proj.weight"] == (1, 4352)
    assert shapes["fc.weight"] == (4096, 5 * 4096)
    # the other released sizes (§2.2)
    assert trainable_parameter_count(qwen3_draft(2560, 32, 9728, 36)) == 615_221_249
    assert trainable_parameter_count(qwen3_draft(5120, 40, 17408, 40)) == 1_860_438_529


# =====================================================================================
# export / import without processes
# =====================================================================================


@pytest.mark.parametrize("layout", ["deepspec", "specforge"])
@pytest.mark.parametrize("name", list(dc.CASES))
def test_every_variant_round_trips(tmp_path, name, layout):
    d, weights, _, _ = export_case(name, tmp_path / "x", layout)
    back, state = read_hf(tmp_path / "x")
    assert canonical(back) == canonical(d)
    expected = {k for k in weights if layout == "deepspec" or k not in FROZEN_TENSORS}
    assert set(state) == expected
    for k in expected:
        assert torch.equal(state[k], weights[k]), k
    r = tool("validate_hf_export.py", tmp_path / "x", "--engine", "sglang")
    problems = [line for line in r.stdout.splitlines() if line.startswith("PROBLEM")]
    # SGLang takes only Convention S drafts with a Markov head, and builds q/k norms
    allowed = ("markov_rank must be > 0", "Convention D") + (
        ("always have per-head q/k norms",) if not d.qk_norm and d.attention_type == "gqa" else ())
    assert all(any(a in p for a in allowed) for p in problems), r.stdout
    assert (r.returncode == 0) == (not problems)


def test_deepspec_config_has_the_spec_fields(tmp_path):
    d, weights, _, config = export_case("S_vanilla_noconf_qwen3", tmp_path / "q")
    assert config["architectures"] == ["Qwen3DSparkModel"] and config["model_type"] == "qwen3"
    assert config["num_hidden_layers"] == d.num_layers and config["num_target_layers"] == d.num_target_layers
    assert config["layer_types"] == ["full_attention"] * d.num_layers
    assert config["tie_word_embeddings"] is False
    for key, value in (("block_size", d.block_size), ("mask_token_id", d.mask_token_id),
                       ("target_layer_ids", d.target_layer_ids), ("num_anchors", d.num_anchors),
                       ("enable_confidence_head", False), ("markov_rank", d.markov_rank),
                       ("markov_head_type", "vanilla"), ("dspark_slot_convention", "S"),
                       ("sample_from_anchor", True), ("loss_decay_gamma", d.gamma)):
        assert config[key] == value, key
    assert "confidence_head_with_markov" not in config  # present iff the confidence head is
    assert "speculators_model_type" not in config
    assert "_name_or_path" not in config and config["dspark_target"] == "fake"
    on_disk = json.loads((tmp_path / "q" / "config.json").read_text())
    assert on_disk == config
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    assert not any("rotary" in k for k in tensors)
    assert torch.equal(tensors["embed_tokens.weight"], weights["embed_tokens.weight"])
    assert torch.equal(tensors["lm_head.weight"], weights["lm_head.weight"])

    _, _, _, conf = export_case("S_vanilla_conf", tmp_path / "c")
    assert conf["architectures"] == ["LlamaDSparkModel"] and conf["model_type"] == "llama"
    assert conf["enable_confidence_head"] is True and conf["confidence_head_with_markov"] is True
    _, _, _, dflash = export_case("S_dflash_rank0_noconf", tmp_path / "f")
    assert dflash["markov_rank"] == 0 and "markov_head_type" not in dflash
    _, _, _, conv_d = export_case("D_vanilla_conf", tmp_path / "d")
    assert conv_d["dspark_slot_convention"] == "D" and conv_d["sample_from_anchor"] is False
    assert conv_d["speculators_model_type"] == "dspark"  # SGLang refuses it instead of misreading it


def test_draft_shape_that_differs_from_the_target_is_top_level(tmp_path):
    d, _, weights, _ = dc.make_case("S_vanilla_conf")
    target = fake_target_config(d)
    target.update(num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=40)
    config = export_hf(weights, d, target, tmp_path / "x")
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"],
            config["intermediate_size"]) == (4, 2, 8, 48)
    assert config["dspark_target_shape"] == dict(num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                                 intermediate_size=40)
    assert canonical(read_hf(tmp_path / "x")[0]) == canonical(d)


def test_specforge_layout(tmp_path):
    d, weights, _, config = export_case("S_gated_conf_nomarkov", tmp_path / "s", "specforge")
    assert config["architectures"] == ["DSparkDraftModel"]
    assert config["auto_map"] == {"AutoModel": "dspark.DSparkDraftModel"}
    nested = config["dflash_config"]
    assert nested["mask_token_id"] == d.mask_token_id and nested["target_layer_ids"] == d.target_layer_ids
    assert nested["projector_type"] == "dspark" and nested["attention_mode"] == "gqa"
    assert nested["markov_head_type"] == "gated" and nested["confidence_head_with_markov"] is False
    assert nested["confidence_head_alpha"] == d.alpha_conf
    assert "mask_token_id" not in config and config["block_size"] == d.block_size
    tensors = load_file(tmp_path / "s" / "model.safetensors")
    assert "embed_tokens.weight" not in tensors and "lm_head.weight" not in tensors
    assert canonical(read_hf(tmp_path / "s")[0]) == canonical(d)
    assert tool("validate_hf_export.py", tmp_path / "s", "--engine", "sglang").returncode == 0
    r = tool("validate_hf_export.py", tmp_path / "s", "--engine", "vllm")
    assert r.returncode == 1 and "vLLM reads DSpark fields at the top level" in r.stdout
    # embeddings on request; a Convention-S DFlash baseline keeps the DSpark class (the z-lab
    # DFlashDraftModel class means Convention D to its loaders)
    _, _, _, flash = export_case("S_dflash_rank0_noconf", tmp_path / "f", "specforge", include_embeddings=True)
    assert flash["architectures"] == ["DSparkDraftModel"] and flash["sample_from_anchor"] is True
    assert "embed_tokens.weight" in load_file(tmp_path / "f" / "model.safetensors")


def _deepspec_qwen3_dir(path: Path, markov_rank=6, confidence=True, dtype=torch.bfloat16, prefix="model.",
                        rotary=True):
    """What DeepSpec's save_pretrained writes (§9.1): a transformers-4 style Qwen3 config
    with the DSpark fields at the top level, no megaspark fields, bf16 tensors."""
    from tests import reference

    d = dc.make_config("S_vanilla_noconf_qwen3")
    cfg = {
        "architectures": ["Qwen3DSparkModel"], "model_type": "qwen3", "hidden_size": d.hidden_size,
        "num_hidden_layers": d.num_layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "intermediate_size": 48, "vocab_size": 64, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "rope_scaling": None, "attention_bias": False,
        "max_position_embeddings": 40960, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "layer_types": ["full_attention"] * d.num_layers, "use_sliding_window": False,
        "sliding_window": None, "num_target_layers": 6, "block_size": 7, "mask_token_id": 60,
        "target_layer_ids": [1, 3], "num_anchors": 512, "enable_confidence_head": confidence,
        "markov_rank": markov_rank, "transformers_version": "4.57.1",
    }
    if confidence:
        cfg["confidence_head_with_markov"] = markov_rank > 0
    if markov_rank:
        cfg["markov_head_type"] = "vanilla"
    rc = dc.reference_cfg(d)
    rc.update(markov_rank=markov_rank, confidence_head=confidence, confidence_with_markov=markov_rank > 0)
    weights = reference.random_weights(rc, 3, L=2, dtype=dtype)
    if not confidence:
        weights = {k: v for k, v in weights.items() if not k.startswith("confidence_head")}
    tensors = {prefix + k: v for k, v in weights.items()}
    if rotary:
        tensors[prefix + "rotary_emb.inv_freq"] = torch.ones(4)
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, path / "model.safetensors")
    return cfg, weights


def test_deepspec_written_qwen3_checkpoint_imports(tmp_path):
    cfg, weights = _deepspec_qwen3_dir(tmp_path / "ds")
    d, state = read_hf(tmp_path / "ds")
    assert (d.target_model_type, d.qk_norm, d.rope_theta, d.num_layers, d.block_size, d.mask_token_id) == (
        "qwen3", True, 1e6, 2, 7, 60)
    assert (d.convention, d.gamma, d.alpha_ce, d.alpha_l1, d.alpha_conf) == ("S", 4.0, 0.1, 0.9, 1.0)
    assert (d.markov_rank, d.confidence_head, d.confidence_with_markov) == (6, True, True)
    assert d.max_position_embeddings == 40960 and d.num_anchors == 512
    assert set(state) == set(weights)  # no prefix, no rotary buffer
    assert all(torch.equal(state[k], weights[k]) for k in weights)
    r = tool("validate_hf_export.py", tmp_path / "ds")
    assert r.returncode == 1 and "no 'model.' prefix" in r.stdout and "rotary" in r.stdout
    # DeepSpec's DFlash: same class, markov_rank 0 and no confidence head -> CE only
    _deepspec_qwen3_dir(tmp_path / "df", markov_rank=0, confidence=False, dtype=torch.float32, prefix="",
                        rotary=False)
    d, _ = read_hf(tmp_path / "df")
    assert (d.markov_rank, d.confidence_head, d.alpha_ce, d.alpha_l1, d.alpha_conf) == (0, False, 1.0, 0.0, 0.0)
    r = tool("validate_hf_export.py", tmp_path / "df", "--engine", "vllm")
    assert r.returncode == 0, r.stdout


def test_import_and_export_errors_are_clear(tmp_path):
    export_case("S_vanilla_conf", tmp_path / "x")
    cfg_file = tmp_path / "x" / "config.json"
    good = json.loads(cfg_file.read_text())
    broken = {k: v for k, v in good.items() if k != "target_layer_ids"}
    cfg_file.write_text(json.dumps(broken))
    with pytest.raises(ExportError, match="missing required field 'target_layer_ids'"):
        read_hf(tmp_path / "x")
    cfg_file.write_text(json.dumps(dict(good, mask_token_id=good["vocab_size"])))
    with pytest.raises(ExportError, match="mask-token-id"):
        read_hf(tmp_path / "x")
    cfg_file.write_text(json.dumps(dict(good, markov_rank=7)))
    with pytest.raises(ExportError, match="markov_w1.weight' has shape"):
        read_hf(tmp_path / "x")
    with pytest.raises(ExportError, match="no config.json"):
        read_hf(tmp_path)

    d, _, weights, _ = dc.make_case("S_vanilla_conf")
    target = fake_target_config(d)
    with pytest.raises(ExportError, match=r"missing tensors \['norm.weight'\]"):
        export_hf({k: v for k, v in weights.items() if k != "norm.weight"}, d, target, tmp_path / "y")
    with pytest.raises(ExportError, match="unexpected tensors"):
        export_hf(dict(weights, **{"layers.9.mlp.up_proj.weight": weights["fc.weight"]}), d, target,
                  tmp_path / "y")
    with pytest.raises(ExportError, match="target vocab_size"):
        export_hf(weights, d, dict(target, vocab_size=128), tmp_path / "y")
    assert not (tmp_path / "y").exists()
    # rotary buffers are dropped, never shipped
    export_hf(dict(weights, **{"layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}), d, target,
              tmp_path / "y")
    assert not any("rotary" in k for k in load_file(tmp_path / "y" / "model.safetensors"))


# ----------------------------------------------------------------------------- validator


def _mutated_export(tmp_path, name, config_changes=None, drop=(), add=None, replace=None):
    out = tmp_path / "m"
    export_case(name, out)
    if config_changes:
        cfg = json.loads((out / "config.json").read_text())
        cfg.update(config_changes)
        (out / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(out / "model.safetensors")
    for k in drop:
        del tensors[k]
    tensors.update(add or {})
    tensors.update(replace or {})
    save_file(tensors, out / "model.safetensors")
    return out


@pytest.mark.parametrize("mutation, needle", [
    (dict(drop=["layers.1.mlp.up_proj.weight"]), "tensor 'layers.1.mlp.up_proj.weight': missing"),
    (dict(replace={"fc.weight": torch.zeros(32, 32)}),
     "tensor 'fc.weight': shape [32, 32], the config implies [32, 64]"),
    (dict(replace={"layers.0.self_attn.k_proj.weight": torch.zeros(8, 32)}), "k_proj.weight': shape [8, 32]"),
    (dict(config_changes={"mask_token_id": 64}), "mask_token_id 64 is outside the target vocabulary [0, 64)"),
    (dict(add={"extra_head.weight": torch.zeros(2)}), "tensor 'extra_head.weight': not part of this draft"),
    (dict(add={"layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(4)}), "rotary embedding buffers"),
    (dict(drop=["confidence_head.proj.weight", "confidence_head.proj.bias"]),
     "confidence_head.proj.weight': missing (the confidence head is enabled)"),
    (dict(config_changes={"enable_confidence_head": False}), "confidence head is disabled"),
    (dict(config_changes={"target_layer_ids": [3, 1]}), "strictly increasing"),
    (dict(config_changes={"markov_head_type": "lstm"}), "markov_head_type must be one of"),
])
def test_validator_rejects_broken_exports(tmp_path, mutation, needle):
    out = _mutated_export(tmp_path, "S_vanilla_conf", **mutation)
    r = tool("validate_hf_export.py", out)
    assert r.returncode == 1, r.stdout
    assert needle in r.stdout, r.stdout
    assert "problem(s)" in r.stdout


def test_validator_engine_specific_rules(tmp_path):
    export_case("S_dflash_rank0_noconf", tmp_path / "f")
    assert tool("validate_hf_export.py", tmp_path / "f", "--engine", "vllm").returncode == 0
    r = tool("validate_hf_export.py", tmp_path / "f", "--engine", "sglang")
    assert r.returncode == 1 and "markov_rank must be > 0" in r.stdout
    export_case("D_vanilla_conf", tmp_path / "d")
    r = tool("validate_hf_export.py", tmp_path / "d")
    assert r.returncode == 1 and "refuses checkpoints tagged speculators_model_type" in r.stdout
    r = tool("validate_hf_export.py", tmp_path / "missing")
    assert r.returncode == 1 and "not a directory" in r.stdout


# =====================================================================================
# checkpoints at three layouts -> HF, and back
# =====================================================================================


def _score_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("score_batch_tool", REPO / "tools" / "score_batch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _summarise(model, dcfg, batch):
    tool_module = _score_module()
    results, outputs = tool_module.score(model, dcfg, batch, with_outputs=True)
    return dict(results=tool_module._finite(results), outputs=outputs)


def _export_worker(rank, world_size, ckpt, hf, batch_path):
    from megaspark.models.dspark.state_dict_adapter import hf_state_dict

    init_single_process_group()
    out = {}
    export_checkpoint(ckpt, hf["SF"], layout="specforge")
    batch = load_batch(batch_path)
    for key, path in (("ckpt", ckpt), ("hf", hf["A"]), ("hfSF", hf["SF"])):
        model, dcfg = load_draft(path)  # hfSF: embed_tokens/lm_head from the recorded target
        out[key] = _summarise(model, dcfg, batch)
    out["trainable_in_model"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out["counts"] = parameter_counts(dcfg)
    # the --load-hf-draft path: a fresh (differently initialised) model takes the trainable
    # tensors of an export and keeps its own frozen copies
    fresh = build_model(dcfg, 1)
    reference, before = hf_state_dict(model), hf_state_dict(fresh)
    load_hf_draft_weights([fresh], hf["A"], dcfg)
    after = hf_state_dict(fresh)
    out["load_hf_draft_weights"] = all(
        torch.equal(after[k], reference[k]) for k in reference if k not in FROZEN_TENSORS)
    out["frozen_untouched"] = all(torch.equal(after[k], before[k]) for k in FROZEN_TENSORS)
    # every draft variant: model -> export -> load_draft -> identical forward
    same = {}
    for name in dc.CASES:
        d, _, weights, case_batch = dc.make_case(name)
        m = dc.build_model(d, weights)
        path = Path(hf["A"]).parent / f"case-{name}"
        export_hf(hf_state_dict(m), d, fake_target_config(d), path)
        m2, d2 = load_draft(path)
        a, b = _summarise(m, d, case_batch), _summarise(m2, d2, case_batch)
        same[name] = a["results"] == b["results"] and all(
            torch.equal(a["outputs"][k], b["outputs"][k]) for k in a["outputs"])
    out["cases"] = same
    # a DeepSpec-written Qwen3 checkpoint (bf16, `model.` prefix, rotary buffer) loads
    root = Path(hf["A"]).parent / "deepspec"
    _, weights = _deepspec_qwen3_dir(root)
    m, _ = load_draft(root)
    got = hf_state_dict(m)
    out["deepspec_weights"] = all(torch.equal(got[k], weights[k].float()) for k in weights)
    return out


def _resaved_worker(rank, world_size, ck, hf, batch_path):
    init_single_process_group()
    out = {k: export_checkpoint(ck[k], hf[k]) for k in ("B", "C")}
    model, dcfg = load_draft(ck["B"])
    out["ckB"] = _summarise(model, dcfg, load_batch(batch_path))
    return out


def _tp2_worker(rank, world_size, hf_dir, batch_path):
    from megaspark.parallel import initialize_distributed

    initialize_distributed(tensor_model_parallel_size=2)
    model, dcfg = load_draft(hf_dir, tp=2)
    results, _ = _score_module().score(model, dcfg, load_batch(batch_path))
    return results


def _flags(target, data, *extra):
    return base_flags(target, data, "--global-batch-size", "2", "--train-iters", "2", *extra)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir, data_dir):
    """A draft trained for two iterations at TP=2 with pretrain_dspark.py."""
    root = tmp_path_factory.mktemp("export_ckpts")
    ckpt = str(root / "ckA")
    ok(run(2, *_flags(tiny_llama_dir, data_dir, "--tensor-model-parallel-size", "2", "--save", ckpt)))
    return root, ckpt


@pytest.fixture(scope="module")
def real_batch(trained, tiny_llama_dir, data_dir):
    """Two training samples with the target's real hidden states."""
    from megaspark.blocks import sample_anchors
    from megaspark.checkpoint_files import read_state
    from megaspark.targets.hf import HFTargetProvider

    root, ckpt = trained
    dcfg = DSparkConfig.from_dict(read_state(ckpt)["dspark_config"])
    rows = [json.loads(line) for line in Path(data_dir, "train.jsonl").read_text().splitlines()[:2]]
    S = min(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"][:S] for r in rows])
    mask = torch.tensor([r["loss_mask"][:S] for r in rows])
    target = HFTargetProvider(tiny_llama_dir, layer_ids=dcfg.target_layer_ids)
    out = target.compute(ids)
    anchors, keep = sample_anchors(mask, dcfg.num_anchors, generator=torch.Generator().manual_seed(0))
    path = root / "batch.safetensors"
    save_batch(path, ids, mask, out.aux_hidden_states, out.last_hidden_states, anchors, keep)
    return str(path)


@pytest.fixture(scope="module")
def exported(trained, real_batch):
    """The TP=2 checkpoint converted by the tool (deepspec) and in-process (specforge), and
    the checkpoint and both exports scored in one process."""
    root, ckpt = trained
    hf = {"A": str(root / "hfA"), "SF": str(root / "hfSF")}
    cli = tool("convert_checkpoint_to_hf.py", "--load", ckpt, "--output", hf["A"])
    assert cli.returncode == 0, cli.stderr[-3000:]
    (result,) = run_distributed(_export_worker, 1, ckpt, hf, real_batch)
    return dict(hf=hf, ckpt=ckpt, cli=cli, worker=result)


@pytest.fixture(scope="module")
def resaved(trained, exported, real_batch, tiny_llama_dir, data_dir):
    """The same weights re-saved by pretrain_dspark.py at PP=2 and at TP=1, converted."""
    root, ckpt = trained
    ck = {"B": str(root / "ckB"), "C": str(root / "ckC")}
    with ThreadPoolExecutor(2) as pool:
        b = pool.submit(run, 2, *_flags(tiny_llama_dir, data_dir, "--pipeline-model-parallel-size", "2",
                                        "--load", ckpt, "--save", ck["B"]))
        c = pool.submit(run, 1, *_flags(tiny_llama_dir, data_dir, "--load", ckpt, "--save", ck["C"]))
        ok(b.result())
        ok(c.result())
    hf = {k: str(root / f"hf{k}") for k in ck}
    (result,) = run_distributed(_resaved_worker, 1, ck, hf, real_batch)
    return dict(hf=hf, worker=result)


def test_convert_tool_summary_and_validation(exported):
    out = exported["cli"].stdout
    assert "saved at TP 2 PP 1 DP 1" in out and "layout deepspec, slot convention S" in out
    assert "embeddings included" in out and "trainable" in out
    r = tool("validate_hf_export.py", exported["hf"]["A"])
    assert r.returncode == 0, r.stdout
    # a draft trained for the (Llama) tiny target, flags left at their defaults: the block
    # the engines build (q/k norms), under the name they load, their keys beside ours
    config = json.loads((Path(exported["hf"]["A"]) / "config.json").read_text())
    assert config["architectures"] == ["Qwen3DSparkModel"] and config["model_type"] == "llama"
    assert config["dspark_qk_norm"] is True
    for ours, theirs in (("block_size", "dspark_block_size"), ("markov_rank", "dspark_markov_rank"),
                         ("markov_head_type", "dspark_markov_head_type"),
                         ("mask_token_id", "dspark_noise_token_id"),
                         ("target_layer_ids", "dspark_target_layer_ids")):
        assert config[ours] == config[theirs], ours
    names = set(load_file(Path(exported["hf"]["A"]) / "model.safetensors"))
    assert {"layers.0.self_attn.q_norm.weight", "layers.0.self_attn.k_norm.weight"} <= names
    help_text = tool("convert_checkpoint_to_hf.py", "--help").stdout
    assert "--layout" in help_text and "--no-embeddings" in help_text
    bad = tool("convert_checkpoint_to_hf.py", "--load", exported["hf"]["A"] + "-nope", "--output",
               exported["hf"]["A"] + "-out")
    assert bad.returncode == 2 and "no complete megaspark checkpoint" in bad.stderr


def test_export_embeddings_are_the_targets_bit_for_bit(exported, tiny_llama_dir):
    tensors = load_file(Path(exported["hf"]["A"]) / "model.safetensors")
    target = load_file(Path(tiny_llama_dir) / "model.safetensors")
    embed = target["model.embed_tokens.weight"]
    assert tensors["embed_tokens.weight"].dtype == embed.dtype
    assert torch.equal(tensors["embed_tokens.weight"], embed)
    assert torch.equal(tensors["lm_head.weight"], target.get("lm_head.weight", embed))  # tied target
    assert not any("rotary" in k for k in tensors)
    assert torch.equal(target_embeddings(tiny_llama_dir)[1], embed)
    sf = load_file(Path(exported["hf"]["SF"]) / "model.safetensors")
    assert set(sf) == set(tensors) - set(FROZEN_TENSORS)
    assert all(torch.equal(sf[k], tensors[k]) for k in sf)


def test_round_trip_gives_identical_logits_and_loss(exported):
    w = exported["worker"]
    ref = w["ckpt"]
    assert ref["results"]["denominator"] > 0 and ref["results"]["loss"] > 0
    for key in ("hf", "hfSF"):
        assert w[key]["results"] == ref["results"], key
        for name, tensor in ref["outputs"].items():
            assert torch.equal(w[key]["outputs"][name], tensor), (key, name)
    assert w["load_hf_draft_weights"] and w["frozen_untouched"]
    assert all(w["cases"].values()), w["cases"]
    assert w["deepspec_weights"]


def test_trainable_count_matches_the_model(exported):
    w = exported["worker"]
    assert w["trainable_in_model"] == w["counts"]["trainable"]


def test_score_tool_matches_the_checkpoint(exported, real_batch):
    r = tool("score_batch.py", "--draft", exported["hf"]["A"], "--batch", real_batch, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout)
    assert got.pop("draft") == exported["hf"]["A"] and got.pop("batch") == real_batch
    assert got == exported["worker"]["ckpt"]["results"]
    assert {"tau", "accept_rate@0", "count@0", "ce_loss", "l1_loss", "confidence_loss"} <= set(got["metrics"])


@pytest.mark.slow
def test_any_layout_converts_to_the_same_tensors(exported, resaved):
    hf = dict(exported["hf"], **resaved["hf"])
    a, b, c = (load_file(Path(hf[k]) / "model.safetensors") for k in "ABC")
    assert set(a) == set(b) == set(c)
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]), k
    configs = [json.loads((Path(hf[k]) / "config.json").read_text()) for k in "ABC"]
    assert configs[0] == configs[1] == configs[2]
    w = resaved["worker"]
    assert w["B"]["parallel_layout"] == {"tp": 1, "pp": 2, "dp": 1}
    assert w["C"]["parallel_layout"] == {"tp": 1, "pp": 1, "dp": 1}
    assert w["ckB"]["results"] == exported["worker"]["ckpt"]["results"]


@pytest.mark.slow
def test_export_loads_at_tp2(exported, real_batch):
    ref = exported["worker"]["hf"]["results"]
    for got in run_distributed(_tp2_worker, 2, exported["hf"]["A"], real_batch):
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert got["metrics"]["tau"] == pytest.approx(ref["metrics"]["tau"], rel=1e-5)


def test_draft_without_qk_norm_loaded_by_a_default_run_suggests_the_flag(tmp_path):
    """Drafts became serving-compatible (q/k norms on by default): starting from an older
    export without them fails on the shape check and names --no-qk-norm."""
    import dataclasses

    d, _, _, _ = export_case("S_vanilla_conf", tmp_path / "x")
    assert not d.qk_norm
    with pytest.raises(ExportError, match="qk_norm: export False vs run True.*--no-qk-norm"):
        load_hf_draft_weights([], tmp_path / "x", dcfg=dataclasses.replace(d, qk_norm=True))
