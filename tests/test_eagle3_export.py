"""Eagle3 export / import (issue 16, item 4): megaspark writes the format SGLang, vLLM and
SpecForge load (``LlamaForCausalLMEagle3``, ``draft_vocab_size``, ``d2t``/``t2d``,
``eagle_config.eagle_aux_hidden_state_layer_ids``); the validator accepts it and names what
is broken; reading it back gives the same tensors and, in a built TP draft, the same logits;
a SpecForge-format checkpoint (its documented key names) imports."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megaspark.data.draft_vocab import DraftVocab
from megaspark.export.eagle3 import export_eagle3, read_eagle3
from megaspark.export.tensors import ExportError
from tests.launcher import run_distributed, tool
from tests.sglang_marks import needs_sglang
from tests.test_eagle3_model import CFG, CONFIGS, _config, case

REPO = Path(__file__).resolve().parents[1]


def exported(tmp_path, variant="gqa", **kw):
    cfg = CONFIGS[variant]
    w, ids, mask, aux, last, w_lm, d2t = case(cfg=cfg)
    tensors = {k: v.float() for k, v in w.items()}
    vocab = DraftVocab(d2t, cfg["vocab_size"])
    config = export_eagle3(tensors, _config(cfg), vocab, [1, 2, 3], tmp_path / "x", **kw)
    return tensors, vocab, config


def validate(path, *extra):
    return tool("validate_hf_export.py", path, *extra, timeout=120)


def test_export_has_the_engine_format_and_reads_back(tmp_path):
    tensors, vocab, config = exported(tmp_path)
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["num_hidden_layers"] == 1
    assert config["draft_vocab_size"] == CFG["draft_vocab_size"] and config["vocab_size"] == CFG["vocab_size"]
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    raw = load_file(tmp_path / "x" / "model.safetensors")
    assert raw["d2t"].dtype == torch.int64 and raw["t2d"].dtype == torch.bool
    assert torch.equal(torch.arange(CFG["draft_vocab_size"]) + raw["d2t"], vocab.draft_to_target)
    assert "embed_tokens.weight" not in raw  # engines take the target's
    e, layer_ids, back_vocab, back = read_eagle3(tmp_path / "x")
    assert e == _config() and layer_ids == [1, 2, 3]
    assert torch.equal(back_vocab.draft_to_target, vocab.draft_to_target)
    assert set(back) == set(tensors) - {"embed_tokens.weight"}
    assert all(torch.equal(back[k], tensors[k]) for k in back)
    r = validate(tmp_path / "x")
    assert r.returncode == 0 and "eagle3: LlamaForCausalLMEagle3" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("mutation,needle", [
    ("drop_q", "tensor midlayer.self_attn.q_proj.weight missing"),
    ("float_d2t", "d2t is F32"),
    ("short_lm_head", "lm_head.weight has shape"),
    ("two_layers", "num_hidden_layers 2"),
    ("stray", "tensors no engine reads"),
])
def test_validator_names_what_is_broken(tmp_path, mutation, needle):
    exported(tmp_path)
    d = tmp_path / "x"
    t = load_file(d / "model.safetensors")
    c = json.loads((d / "config.json").read_text())
    if mutation == "drop_q":
        del t["midlayer.self_attn.q_proj.weight"]
    elif mutation == "float_d2t":
        t["d2t"] = t["d2t"].float()
    elif mutation == "short_lm_head":
        t["lm_head.weight"] = t["lm_head.weight"][:-1].contiguous()
    elif mutation == "two_layers":
        c["num_hidden_layers"] = 2
    elif mutation == "stray":
        t["midlayer.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(t, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(c))
    r = validate(d)
    assert r.returncode == 1 and needle in r.stdout, r.stdout


def test_specforge_checkpoint_imports(tmp_path):
    """A SpecForge-trained Eagle3 directory: its documented key names (``midlayer.*``, ``fc``,
    ``norm``, ``lm_head``, ``d2t``, ``t2d``, and the target's ``embed_tokens``), a config
    without megaspark's fields."""
    w, *_, d2t = case()
    vocab = DraftVocab(d2t, CFG["vocab_size"])
    sf = tmp_path / "specforge"
    sf.mkdir()
    tensors = {k: v.float().contiguous() for k, v in w.items()}
    save_file({**tensors, "d2t": vocab.d2t, "t2d": vocab.t2d}, sf / "model.safetensors")
    (sf / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": CFG["hidden_size"],
        "num_attention_heads": CFG["num_heads"], "num_key_value_heads": CFG["num_kv_heads"],
        "head_dim": CFG["head_dim"], "intermediate_size": CFG["intermediate_size"], "num_hidden_layers": 1,
        "rms_norm_eps": CFG["rms_norm_eps"], "rope_theta": CFG["rope_theta"], "vocab_size": CFG["vocab_size"],
        "draft_vocab_size": CFG["draft_vocab_size"], "hidden_act": "silu", "tie_word_embeddings": False}))
    e, layer_ids, back_vocab, back = read_eagle3(sf)
    assert (e.ttt_steps, e.step_decay, layer_ids) == (7, 0.8, None)  # Eagle3's defaults
    assert torch.equal(back_vocab.draft_to_target, d2t)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert validate(sf).returncode == 0
    # inconsistent t2d / d2t, a missing tensor: clear errors
    t = load_file(sf / "model.safetensors")
    t["t2d"] = ~t["t2d"]
    save_file(t, sf / "model.safetensors")
    with pytest.raises(ExportError, match="t2d and d2t describe different"):
        read_eagle3(sf)
    del t["t2d"], t["fc.weight"]
    save_file(t, sf / "model.safetensors")
    with pytest.raises(ExportError, match="tensor fc.weight missing"):
        read_eagle3(sf)


def _roundtrip_worker(rank, world_size, path, variant="gqa"):
    from megaspark.models.eagle3.model import Eagle3Draft, load_hf_tensors
    from megaspark.parallel import initialize_distributed
    from megaspark.export.eagle3 import gather_hf_tensors

    initialize_distributed(tensor_model_parallel_size=world_size)
    w, ids, mask, aux, last, w_lm, d2t = case(cfg=CONFIGS[variant])
    out = {}
    for source in ("original", "export"):
        if source == "original":
            e, vocab_ids, tensors = _config(CONFIGS[variant]), d2t, {k: v.float() for k, v in w.items()}
        else:
            e, _, vocab, tensors = read_eagle3(path)
            vocab_ids = vocab.draft_to_target
            tensors = dict(tensors, **{"embed_tokens.weight": w["embed_tokens.weight"].float()})
        model = Eagle3Draft(e.transformer_config(world_size), e, vocab_ids)
        load_hf_tensors(model, tensors, target_lm_head=w_lm)
        with torch.no_grad():
            out[source] = [z.clone() for z in model(ids, aux.float().transpose(0, 1).contiguous())]
        out[source + "_gathered"] = gather_hf_tensors(model)
    return out


@pytest.mark.parametrize("variant", ["gqa", "mla_q_lora"])
def test_export_import_gives_identical_logits_at_tp2(tmp_path, variant):
    exported(tmp_path, variant)
    for res in run_distributed(_roundtrip_worker, 2, str(tmp_path / "x"), variant):
        assert all(torch.equal(a, b) for a, b in zip(res["original"], res["export"]))
        w = case(cfg=CONFIGS[variant])[0]
        assert set(res["export_gathered"]) == set(w)  # every tensor, the attention's of its variant
        assert all(torch.equal(res["export_gathered"][k], w[k].float()) for k in res["export_gathered"])


@pytest.mark.parametrize("variant", ["mla", "mla_q_lora"])
def test_mla_draft_exports_as_deepseek_v3_eagle3_and_a_specforge_one_imports(tmp_path, variant):
    """The MLA draft's engine format (SpecForge's DeepseekV3ForCausalLMEagle3: DeepSeek-V3's
    attention tensor names and config keys), read back and validated; a SpecForge-written
    directory (its key names, a config with DeepseekV3Config's fields only: no head_dim,
    q_lora_rank null for none) imports to the same draft; a missing latent tensor is named."""
    cfg = CONFIGS[variant]
    tensors, vocab, config = exported(tmp_path, variant)
    assert config["architectures"] == ["DeepseekV3ForCausalLMEagle3"] and config["model_type"] == "deepseek_v3"
    assert (config["kv_lora_rank"], config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]) \
        == (cfg["kv_lora_rank"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"])
    assert config["q_lora_rank"] == (cfg["q_lora_rank"] or None)
    e, layer_ids, back_vocab, back = read_eagle3(tmp_path / "x")
    assert e == _config(cfg) and e.is_mla and layer_ids == [1, 2, 3]
    assert all(torch.equal(back[k], tensors[k]) for k in back) and set(back) == set(tensors) - {"embed_tokens.weight"}
    r = validate(tmp_path / "x")
    assert r.returncode == 0 and "DeepseekV3ForCausalLMEagle3 (MLA)" in r.stdout, r.stdout + r.stderr
    sf = tmp_path / "specforge"
    sf.mkdir()
    save_file({**{k: v.contiguous() for k, v in tensors.items()}, "d2t": vocab.d2t, "t2d": vocab.t2d},
              sf / "model.safetensors")
    (sf / "config.json").write_text(json.dumps({
        "architectures": ["DeepseekV3ForCausalLMEagle3"], "model_type": "deepseek_v3",
        "hidden_size": cfg["hidden_size"], "num_attention_heads": cfg["num_heads"],
        "num_key_value_heads": cfg["num_heads"], "intermediate_size": cfg["intermediate_size"],
        "num_hidden_layers": 1, "rms_norm_eps": cfg["rms_norm_eps"], "rope_theta": cfg["rope_theta"],
        "vocab_size": cfg["vocab_size"], "draft_vocab_size": cfg["draft_vocab_size"],
        "q_lora_rank": cfg["q_lora_rank"] or None, "kv_lora_rank": cfg["kv_lora_rank"],
        "qk_nope_head_dim": cfg["qk_nope_head_dim"], "qk_rope_head_dim": cfg["qk_rope_head_dim"],
        "v_head_dim": cfg["v_head_dim"], "hidden_act": "silu", "tie_word_embeddings": False}))
    e2, _, back_vocab, back2 = read_eagle3(sf)
    import dataclasses

    assert e2 == dataclasses.replace(_config(cfg), ttt_steps=7)  # Eagle3's default TTT steps
    assert torch.equal(back_vocab.draft_to_target, vocab.draft_to_target)
    assert all(torch.equal(back2[k], back[k]) for k in back)
    assert validate(sf).returncode == 0
    t = load_file(sf / "model.safetensors")
    del t["midlayer.self_attn.kv_b_proj.weight"]
    save_file(t, sf / "model.safetensors")
    r = validate(sf)
    assert r.returncode == 1 and "tensor midlayer.self_attn.kv_b_proj.weight missing" in r.stdout, r.stdout
    with pytest.raises(ExportError, match="kv_b_proj.weight missing"):
        read_eagle3(sf)


@needs_sglang
def test_real_sglang_loads_the_eagle3_export(tmp_path):
    """SGLang 0.5.23's own LlamaForCausalLMEagle3 built from the export (CPU, one rank) and
    loaded by its own load_weights: every parameter (q/k/v and gate/up fused) holds the
    export's tensor, its hot-token map is the draft vocabulary; a renamed norm fails."""
    from tests.test_sglang_serving import edited, sglang_load

    exported(tmp_path)
    res = sglang_load(tmp_path / "x")
    assert res["architecture"] == "LlamaForCausalLMEagle3"
    assert res["problems"] == [] and res["ignored"] == [], res
    assert res["loaded"] == 13  # 12 weight tensors (q/k/v, gate/up fused) + d2t
    bad = sglang_load(edited(tmp_path / "x", tmp_path / "bad", rename={
        "midlayer.hidden_norm.weight": "midlayer.hidden_layernorm.weight"}))
    assert any("midlayer.hidden_norm.weight" in p and "initial value" in p for p in bad["problems"]), bad
