"""The SGLang target adapter (megaspark/targets/sglang.py) on CPU.

No SGLang engine runs here (it needs a GPU): the request/response translation, the
layer-id mapping, the capture plan, the local tail (last layer + final norm) and the
config translation are checked with fake engines that answer exactly as SGLang's
``Engine.generate`` documents (``meta_info["hidden_states"]`` = [prefill rows, ...]),
computing the rows with the HF model. The live engine path needs a GPU check.
"""
import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from megaspark import platform
from megaspark.targets import sglang as sg
from megaspark.targets.hf import HFTargetProvider
from tests.tiny_models import single_thread


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


# ------------------------------------------------------------------ layer ids

def test_layer_id_mapping_both_directions():
    ids = [1, 9, 17, 25, 33]
    assert sg.to_sglang_layer_ids(ids, 36) == ids  # DFLASH/DSPARK convention: same meaning
    assert sg.from_sglang_layer_ids(ids, 36) == ids
    assert sg.to_sglang_capture_indices(ids, 36) == [2, 10, 18, 26, 34]  # "before layer k+1"
    assert sg.from_sglang_capture_indices([2, 10, 18, 26, 34], 36) == ids
    assert sg.to_sglang_capture_indices([0, 34], 36) == [1, 35]


@pytest.mark.parametrize("ids, pattern", [
    ([35], "last decoder layer"),
    ([-1, 3], "embedding"),
    ([3, 3], "strictly increasing"),
    ([36], "out of range"),
    ([], "non-empty"),
])
def test_layer_id_mapping_refuses_uncapturable_ids(ids, pattern):
    with pytest.raises(ValueError, match=pattern):
        sg.to_sglang_layer_ids(ids, 36)
    with pytest.raises(ValueError, match=pattern):
        sg.to_sglang_capture_indices(ids, 36)


@pytest.mark.parametrize("indices", [[0], [36], [2, 2], [True]])
def test_capture_index_inverse_refuses_indices_without_an_id(indices):
    with pytest.raises(ValueError):
        sg.from_sglang_capture_indices(indices, 36)


def test_capture_plan():
    p = sg.plan_capture([1, 9, 17, 25, 33], 36, 4096)
    assert p.capture_ids == (1, 9, 17, 25, 33, 34)
    assert p.aux_blocks == (0, 1, 2, 3, 4) and p.tail_block == 5
    assert p.capture_width == 6 * 4096 and p.aux_width == 5 * 4096
    # layer N-2 already tapped: captured once, used twice
    p = sg.plan_capture([0, 2, 4], 6, 8)
    assert p.capture_ids == (0, 2, 4) and p.tail_block == 2 and p.aux_blocks == (0, 1, 2)
    # a tap above the extra capture keeps ascending (SGLang's return) order
    p = sg.plan_capture([1, 3], 6, 8)
    assert p.capture_ids == (1, 3, 4) and p.tail_block == 2
    p = sg.plan_capture([1, 9], 36, 16, last_hidden="engine")
    assert p.capture_ids == (1, 9) and p.tail_block is None
    with pytest.raises(ValueError, match="tail"):
        sg.plan_capture([1], 36, 16, last_hidden="nope")
    with pytest.raises(ValueError, match="last decoder layer"):
        sg.plan_capture([35], 36, 16)


def test_split_capture_picks_taps_and_tail():
    H = 3
    p = sg.plan_capture([0, 2], 6, H)  # capture 0, 2, 4
    rows = torch.cat([torch.full((5, H), float(k)) for k in p.capture_ids], -1)
    aux, tail = sg.split_capture(rows, p)
    assert aux.shape == (5, 2 * H) and tail.shape == (5, H)
    assert torch.equal(aux, torch.cat([torch.zeros(5, H), torch.full((5, H), 2.0)], -1))
    assert torch.equal(tail, torch.full((5, H), 4.0))
    with pytest.raises(sg.SGLangResponseError, match="captured layers"):
        sg.split_capture(rows[:, :-1], p)


# ------------------------------------------------------------------ requests / responses

def test_strip_padding():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    assert sg.strip_padding(ids) == [[5, 6, 7, 0], [8, 9, 0, 0]]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert sg.strip_padding(ids, mask) == [[5, 6, 7], [8, 9]]
    with pytest.raises(ValueError, match="right padding"):
        sg.strip_padding(ids, torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]]))
    with pytest.raises(ValueError, match="right padding"):
        sg.strip_padding(ids, torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="shape"):
        sg.strip_padding(ids, mask[:, :3])
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        sg.strip_padding(ids[0])


def test_group_requests_token_budget():
    assert sg.group_requests([4, 4, 4], 8) == [[0, 1], [2]]
    assert sg.group_requests([10, 3, 3], 8) == [[0], [1, 2]]  # an over-long sample goes alone
    assert sg.group_requests([1, 1, 1], 100) == [[0, 1, 2]]
    with pytest.raises(ValueError):
        sg.group_requests([1], 0)


def test_build_generate_request():
    req = sg.build_generate_request([[1, 2, 3], [4]])
    assert req == {
        "input_ids": [[1, 2, 3], [4]],
        "sampling_params": [{"max_new_tokens": 1, "temperature": 0.0}] * 2,
        "return_hidden_states": True,
    }
    json.dumps(req)  # the same body goes to POST /generate
    req = sg.build_generate_request([[1]], max_new_tokens=3)
    assert req["sampling_params"] == [{"max_new_tokens": 3, "temperature": 0.0}]
    with pytest.raises(ValueError):
        sg.build_generate_request([])
    with pytest.raises(ValueError, match="no tokens"):
        sg.build_generate_request([[1], []])


def _out(rows, decode=()):
    """An Engine.generate output as SGLang builds it: prefill rows first, then one row per
    decode step."""
    return {"text": "", "meta_info": {"hidden_states": [rows, *decode], "prompt_tokens": len(rows)}}


def test_parse_hidden_states_shapes_and_dtype():
    rows = [[float(i * 10 + j) for j in range(6)] for i in range(4)]
    t = sg.parse_hidden_states(_out(rows), num_tokens=4, width=6)
    assert t.shape == (4, 6) and t.dtype == torch.bfloat16
    assert torch.equal(t.float(), torch.tensor(rows))
    # decode rows after the prefill (max_new_tokens > 0) are ignored
    t = sg.parse_hidden_states(_out(rows, decode=[[0.0] * 6]), 4, 6, dtype=torch.float32)
    assert torch.equal(t, torch.tensor(rows))
    # a bare [S, W] list, a tensor and a [1, S, W] tensor are accepted
    bare = {"meta_info": {"hidden_states": rows}}
    assert torch.equal(sg.parse_hidden_states(bare, 4, 6, torch.float32), torch.tensor(rows))
    as_tensor = {"meta_info": {"hidden_states": [torch.tensor(rows)]}}
    assert sg.parse_hidden_states(as_tensor, 4, 6).shape == (4, 6)
    batched = {"meta_info": {"hidden_states": torch.tensor([rows])}}
    assert sg.parse_hidden_states(batched, 4, 6).shape == (4, 6)
    # one token: the prefill entry is a single row inside the list
    one = sg.parse_hidden_states(_out([[1.0, 2.0]]), 1, 2, torch.float32)
    assert torch.equal(one, torch.tensor([[1.0, 2.0]]))


def test_parse_hidden_states_errors():
    rows = [[0.0] * 6 for _ in range(4)]
    with pytest.raises(sg.SGLangResponseError, match="rows for 5 prompt tokens"):
        sg.parse_hidden_states(_out(rows), 5, 6)  # prefix cache / chunked prefill symptom
    with pytest.raises(sg.SGLangResponseError, match="width 6 != expected 8"):
        sg.parse_hidden_states(_out(rows), 4, 8)
    with pytest.raises(sg.SGLangResponseError, match="enable_return_aux_hidden_states"):
        sg.parse_hidden_states({"meta_info": {}}, 4, 6)
    with pytest.raises(sg.SGLangResponseError, match="empty"):
        sg.parse_hidden_states({"meta_info": {"hidden_states": []}}, 4, 6)


def test_parse_generate_response_per_sample():
    a = [[1.0, 2.0]] * 3
    b = [[3.0, 4.0]] * 2
    out = sg.parse_generate_response([_out(a), _out(b)], [3, 2], 2, torch.float32)
    assert [t.shape for t in out] == [(3, 2), (2, 2)]
    assert sg.parse_generate_response(_out(a), [3], 2)[0].shape == (3, 2)  # single dict
    with pytest.raises(sg.SGLangResponseError, match="sent 2 samples, got 1"):
        sg.parse_generate_response([_out(a)], [3, 2], 2)
    with pytest.raises(sg.SGLangResponseError, match="output 1"):
        sg.parse_generate_response([_out(a), _out(b)], [3, 3], 2)


def test_pad_batch():
    x = sg.pad_batch([torch.ones(3, 2), torch.ones(1, 2)], 4)
    assert x.shape == (2, 4, 2) and x[0, 3].abs().sum() == 0 and x[1, 1:].abs().sum() == 0
    with pytest.raises(ValueError):
        sg.pad_batch([torch.ones(5, 2)], 4)


# ------------------------------------------------------------------ config translation

def test_options_from_args_and_flags():
    from megaspark.arguments import add_sglang_arguments
    from megaspark.arguments.configs import sglang_options

    ns = argparse.Namespace(seq_length=4096, seed=7, bf16=True)
    o = sglang_options(ns, env={})
    assert (o.url, o.tp_size, o.mem_fraction_static, o.context_length, o.random_seed, o.last_hidden) == \
        (None, 1, 0.35, 4096, 7, "tail")
    o = sglang_options(ns, env={sg.ENV_URL: "http://127.0.0.1:30000"})
    assert o.url == "http://127.0.0.1:30000"

    p = argparse.ArgumentParser()
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--seed", type=int, default=42)
    add_sglang_arguments(p)
    ns = p.parse_args(["--sglang-tp-size", "2", "--sglang-mem-fraction-static", "0.5",
                       "--sglang-last-hidden", "engine", "--sglang-url", "http://h:1"])
    o = sglang_options(ns, env={sg.ENV_URL: "http://ignored"})
    assert (o.tp_size, o.mem_fraction_static, o.last_hidden, o.url, o.context_length) == \
        (2, 0.5, "engine", "http://h:1", 512)
    with pytest.raises(ValueError, match="mem-fraction"):
        sglang_options(argparse.Namespace(sglang_mem_fraction_static=1.5), env={})


def test_engine_kwargs_aux_and_last():
    plan = sg.plan_capture([1, 9, 17, 25, 33], 36, 4096)
    o = sg.SGLangOptions(tp_size=2, mem_fraction_static=0.4, context_length=4096, random_seed=42,
                         base_gpu_id=4)
    kw = sg.engine_kwargs(o, "/models/Qwen3-8B", plan, "aux")
    assert kw == {
        "model_path": "/models/Qwen3-8B", "tp_size": 2, "mem_fraction_static": 0.4,
        "dtype": "bfloat16", "random_seed": 42, "skip_tokenizer_init": True,
        "disable_radix_cache": True, "chunked_prefill_size": -1, "log_level": "error",
        "base_gpu_id": 4, "context_length": 4096,
        "enable_return_aux_hidden_states": True, "speculative_algorithm": "DSPARK",
        "return_aux_hidden_state_layer_ids": [1, 9, 17, 25, 33, 34],
    }
    last = sg.engine_kwargs(o, "/m", None, "last")
    assert last["enable_return_hidden_states"] is True
    assert "enable_return_aux_hidden_states" not in last and "speculative_algorithm" not in last
    with pytest.raises(ValueError, match="capture plan"):
        sg.engine_kwargs(o, "/m", None, "aux")
    o.extra_engine_kwargs = {"attention_backend": "fa3"}
    assert sg.engine_kwargs(o, "/m", plan)["attention_backend"] == "fa3"


def test_server_argv_matches_kwargs():
    plan = sg.plan_capture([1, 9], 36, 16)
    kw = sg.engine_kwargs(sg.SGLangOptions(dp_size=8), "/m", plan)
    argv = sg.server_argv(kw, port=31000)
    assert argv[:3] == ["python3", "-m", "sglang.launch_server"]
    s = " ".join(argv)
    assert "--model-path /m" in s and "--dp-size 8" in s and "--chunked-prefill-size -1" in s
    assert "--enable-return-aux-hidden-states --speculative-algorithm DSPARK" in s
    assert "--return-aux-hidden-state-layer-ids 1 9 34" in s
    assert s.endswith("--host 127.0.0.1 --port 31000") and "--log-level" not in s


def test_check_server_info():
    expected = {"return_aux_hidden_state_layer_ids": [1, 9, 34], "disable_radix_cache": True}
    sg.check_server_info({"return_aux_hidden_state_layer_ids": [1, 9, 34], "disable_radix_cache": True}, expected)
    sg.check_server_info({}, expected)  # fields a version does not report are not held against it
    with pytest.raises(RuntimeError, match="return_aux_hidden_state_layer_ids"):
        sg.check_server_info({"return_aux_hidden_state_layer_ids": [1, 9]}, expected, "http://h")


# ------------------------------------------------------------------ fail fast

def test_fails_fast_without_gpu_naming_the_flag(tiny_qwen3_dir, monkeypatch):
    monkeypatch.setattr(platform, "gpu_available", lambda: False)
    with pytest.raises(RuntimeError, match="--target-backend sglang") as e:
        sg.SGLangTargetProvider(tiny_qwen3_dir)
    assert "GPU" in str(e.value)


def test_fails_fast_without_sglang_with_install_hint(tiny_qwen3_dir, monkeypatch):
    import importlib.util

    monkeypatch.setattr(platform, "gpu_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sglang" else real(name, *a))
    with pytest.raises(RuntimeError, match="--target-backend sglang") as e:
        sg.SGLangTargetProvider(tiny_qwen3_dir)
    assert "tools/install.sh --with-sglang" in str(e.value) and "0.5.23" in str(e.value)
    assert "--sglang-url" in str(e.value)  # the server alternative
    # with a server URL the trainer process does not import sglang
    sg.check_sglang_available(need_import=False)
    # the co-located backend is refused by the flag validator with the same install message
    from megaspark.arguments import ArgumentError, parse_args

    with pytest.raises(ArgumentError) as e:
        parse_args(["--target-model", str(tiny_qwen3_dir), "--data-path", str(tiny_qwen3_dir),
                    "--target-backend", "sglang"])
    assert "--target-backend sglang needs the sglang package (0.5.23)" in str(e.value)
    assert "tools/install.sh --with-sglang" in str(e.value) and "--target-backend hf" in str(e.value)


# ------------------------------------------------------------------ the provider, end to end

class FakeEngine:
    """Answers Engine.generate like SGLang in aux mode (taps at the outputs of layers
    ``capture_ids``, ascending) or stock mode (post-norm last state), from the HF model."""

    def __init__(self, hf, capture_ids=None):
        self.hf, self.capture_ids, self.requests = hf, capture_ids, []

    def generate(self, request):
        assert set(request) == {"input_ids", "sampling_params", "return_hidden_states"}
        assert request["return_hidden_states"] is True
        assert all(p["max_new_tokens"] == 1 for p in request["sampling_params"])
        self.requests.append(request)
        outs = []
        for toks in request["input_ids"]:
            o = self.hf.backbone(input_ids=torch.tensor([toks]), output_hidden_states=True)
            if self.capture_ids is None:
                rows = o.last_hidden_state[0]
            else:
                rows = torch.cat([o.hidden_states[k + 1][0] for k in sorted(self.capture_ids)], -1)
            outs.append({"text": "", "meta_info": {"hidden_states": [rows.tolist()],
                                                   "prompt_tokens": len(toks)}})
        return outs


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def family_dir(request, tiny_llama_dir, tiny_qwen3_dir):
    return request.param, (tiny_llama_dir if request.param == "llama" else tiny_qwen3_dir)


@pytest.mark.parametrize("taps", [[0, 2, 3], [1, 4]])
def test_provider_matches_hf_with_local_tail(family_dir, taps):
    family, path = family_dir
    hf = HFTargetProvider(path, taps)
    plan = sg.plan_capture(taps, 6, hf.hidden_size)
    engine = FakeEngine(hf, plan.capture_ids)
    prov = sg.SGLangTargetProvider(path, taps, sg.SGLangOptions(max_tokens_per_request=40),
                                   dtype=torch.float32, device="cpu", engine=engine)
    assert prov.plan.capture_ids == tuple(sorted(set(taps) | {4}))
    assert prov.aux_engine_kwargs()["return_aux_hidden_state_layer_ids"] == list(plan.capture_ids)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (3, 16), generator=g)
    ref, out = hf.compute(ids), prov.compute(ids)
    assert len(engine.requests) == 2  # 48 tokens at 40 per request
    assert out.aux_hidden_states.shape == (3, 16, len(taps) * hf.hidden_size)
    assert out.last_hidden_states.shape == (3, 16, hf.hidden_size)
    assert torch.equal(out.aux_hidden_states, ref.aux_hidden_states)
    torch.testing.assert_close(out.last_hidden_states, ref.last_hidden_states, atol=1e-5, rtol=1e-5)

    # right padding removed before sending, zeros after each sample's end
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[1, 9:] = 0
    out = prov.compute(ids, mask)
    assert engine.requests[-1]["input_ids"][-1] == ids[2].tolist()
    assert [len(t) for r in engine.requests[-2:] for t in r["input_ids"]] == [16, 9, 16]
    torch.testing.assert_close(out.last_hidden_states[1, :9], ref.last_hidden_states[1, :9], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.aux_hidden_states[1, :9], ref.aux_hidden_states[1, :9], atol=1e-5, rtol=1e-5)
    assert out.aux_hidden_states[1, 9:].abs().sum() == 0 and out.last_hidden_states[1, 9:].abs().sum() == 0


def test_provider_bf16_outputs(tiny_qwen3_dir):
    hf = HFTargetProvider(tiny_qwen3_dir, [1, 3])
    engine = FakeEngine(hf, sg.plan_capture([1, 3], 6, hf.hidden_size).capture_ids)
    prov = sg.SGLangTargetProvider(tiny_qwen3_dir, [1, 3], engine=engine, device="cpu")
    out = prov.compute(torch.randint(0, 300, (2, 8)))
    assert out.aux_hidden_states.dtype == torch.bfloat16 and out.last_hidden_states.dtype == torch.bfloat16


def test_provider_second_engine_for_last_hidden(tiny_llama_dir):
    hf = HFTargetProvider(tiny_llama_dir, [1, 3])
    opts = sg.SGLangOptions(last_hidden="engine")
    prov = sg.SGLangTargetProvider(tiny_llama_dir, [1, 3], opts, dtype=torch.float32, device="cpu",
                                   engine=FakeEngine(hf, [1, 3]), last_hidden_engine=FakeEngine(hf))
    assert prov.tail is None and prov.plan.capture_ids == (1, 3)
    assert prov.last_engine_kwargs()["enable_return_hidden_states"] is True
    ids = torch.randint(0, 300, (2, 12))
    ref, out = hf.compute(ids), prov.compute(ids)
    assert torch.equal(out.aux_hidden_states, ref.aux_hidden_states)
    assert torch.equal(out.last_hidden_states, ref.last_hidden_states)
    with pytest.raises(ValueError, match="last_hidden_engine"):
        sg.SGLangTargetProvider(tiny_llama_dir, [1, 3], sg.SGLangOptions(last_hidden="engine"),
                                engine=FakeEngine(hf, [1, 3]))


def test_provider_wrong_engine_layers_is_an_error(tiny_llama_dir):
    hf = HFTargetProvider(tiny_llama_dir, [1, 3])
    prov = sg.SGLangTargetProvider(tiny_llama_dir, [1, 3], engine=FakeEngine(hf, [1, 3]), device="cpu")
    with pytest.raises(sg.SGLangResponseError, match="width"):  # engine lacks the N-2 capture
        prov.compute(torch.randint(0, 300, (1, 8)))


def test_provider_weights_config_and_fingerprint(family_dir):
    family, path = family_dir
    hf = HFTargetProvider(path, [0, 2, 4])
    prov = sg.SGLangTargetProvider(path, [0, 2, 4], engine=FakeEngine(hf, [0, 2, 4]), device="cpu")
    assert torch.equal(prov.embedding_weight(), hf.embedding_weight())
    assert torch.equal(prov.lm_head_weight(), hf.lm_head_weight())
    assert prov.embedding_weight().dtype == torch.float32
    assert prov.fingerprint() == hf.fingerprint()  # checkpoints interchangeable between backends
    assert prov.final_norm() is None and prov.last_hidden_is_post_norm
    assert prov.tokenizer is not None and prov.aux_hidden_size == 3 * hf.hidden_size
    assert "capture=[0, 2, 4]" in repr(prov)
    assert sg.SGLangTargetProvider(path, engine=FakeEngine(hf, [1, 2, 3]), device="cpu").layer_ids == \
        hf.__class__(path).layer_ids  # same default taps as the HF provider


def test_tail_refuses_unsupported_families(tiny_llama_dir):
    from megaspark.targets.hf import load_config_offline

    cfg = load_config_offline(tiny_llama_dir)
    cfg.model_type = "gemma3_text"
    with pytest.raises(ValueError, match="--sglang-last-hidden engine"):
        sg.TargetTail(tiny_llama_dir, cfg, torch.float32)


# ------------------------------------------------------------------ HTTP transport

def test_http_engine_against_a_fake_server(tiny_llama_dir):
    hf = HFTargetProvider(tiny_llama_dir, [1, 3])
    fake = FakeEngine(hf, [1, 3, 4])
    info = {"return_aux_hidden_state_layer_ids": [1, 3, 4], "enable_return_aux_hidden_states": True,
            "disable_radix_cache": True, "chunked_prefill_size": -1}
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, obj):
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            seen.append(self.path)
            self._send(info)

        def do_POST(self):
            seen.append(self.path)
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self._send(fake.generate(req))

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        # inject the HTTPEngine (without an injected engine, construction needs a GPU)
        opts = sg.SGLangOptions(url=url)
        probe = sg.SGLangTargetProvider(tiny_llama_dir, [1, 3], opts, dtype=torch.float32,
                                        device="cpu", engine=FakeEngine(hf, [1, 3, 4]))
        http = sg.HTTPEngine(url, expected=probe._expected_server(probe.aux_engine_kwargs()))
        prov = sg.SGLangTargetProvider(tiny_llama_dir, [1, 3], opts, dtype=torch.float32,
                                       device="cpu", engine=http)
        ids = torch.randint(0, 300, (2, 10))
        ref, out = hf.compute(ids), prov.compute(ids)
        assert seen[0] == "/server_info" and seen[1:] == ["/generate"]
        assert torch.equal(out.aux_hidden_states, ref.aux_hidden_states)
        torch.testing.assert_close(out.last_hidden_states, ref.last_hidden_states, atol=1e-5, rtol=1e-5)

        info["return_aux_hidden_state_layer_ids"] = [1, 3]  # a server started for other taps
        stale = sg.HTTPEngine(url, expected=probe._expected_server(probe.aux_engine_kwargs()))
        with pytest.raises(RuntimeError, match="return_aux_hidden_state_layer_ids"):
            stale.generate(sg.build_generate_request([[1, 2]]))
    finally:
        server.shutdown()
        server.server_close()


def test_http_engine_unreachable_names_flag_and_url():
    e = sg.HTTPEngine("http://127.0.0.1:9", startup_timeout=0)
    with pytest.raises(RuntimeError, match=r"--target-backend sglang.*http://127\.0\.0\.1:9"):
        e.generate(sg.build_generate_request([[1]]))


# ------------------------------------------------------- co-located memory share (pure logic)

def test_colocated_memory_fraction_from_the_plan():
    """SGLang's mem_fraction_static for the co-located target: the target's weights shard
    plus one prefill's KV pool, with headroom, as a share of the device."""
    from transformers import Qwen3Config

    from megaspark.memory_plan import target_parameter_count
    from megaspark.targets.sglang_colocated import memory_fraction
    from tests.test_memory_plan import QWEN3_8B

    cfg = Qwen3Config(**{k: v for k, v in QWEN3_8B.items() if k not in ("architectures", "model_type")})
    total = 141 * 2**30  # an H200
    weights = target_parameter_count(cfg) * 2
    kv = 4096 * 36 * 2 * 8 * 128 * 2  # tokens x layers x (k, v) x kv heads x head dim x bf16
    f1 = memory_fraction(cfg, 2, 4096, 1, total)
    assert f1 == pytest.approx(1.05 * (weights + kv) / total + 0.02, abs=1e-4)
    assert 0.13 < f1 < 0.145  # (15.3 GiB of weights + 0.6 GiB of KV) x 1.05 on 141 GiB, + 2%
    # sharded over 8 ranks: 1/8 of the weights, KV heads 8/8 = 1 per rank
    f8 = memory_fraction(cfg, 2, 4096, 8, total)
    assert f8 == pytest.approx(1.05 * (weights / 8 + kv / 8) / total + 0.02, abs=1e-4)
    with pytest.raises(ValueError, match="--target-tensor-parallel-size"):
        memory_fraction(cfg, 2, 4096, 1, 16 * 2**30)  # a 16 GiB device cannot hold it
