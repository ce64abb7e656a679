"""The offline hidden-states cache: ``tools/precompute_hidden_states.py`` writes it,
``megaspark.targets.offline.OfflineTargetProvider`` reads it (DESIGN.md §3).

Against a tiny random Llama target and a tiny prepared dataset of varied lengths: shard
and manifest contents, exact (fp32) / bf16-rounded equality with the HF provider, the
drop-in ``compute()`` and ``compute_for_samples`` on padded micro-batches, refusal of
mismatching caches, resume after an interruption, and shard ranks / workers writing the
same bytes as one process. Single-process tool runs call its ``main`` in-process.
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megaspark.targets.offline import (
    SCHEMA_VERSION, HiddenStatesCacheError, OfflineTargetProvider, dataset_hash, file_sha256,
    load_target_embeddings,
)
from tests.sglang_marks import needs_sglang
from tests.tiny_models import single_thread

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "precompute_hidden_states.py"
LAYER_IDS = [1, 3]  # --num-target-taps 2 on the 6-layer tiny target (as tests/test_pretrain.py)


def _tool():
    """The tool as a module, importable by name in the worker processes it spawns."""
    try:
        import tools.precompute_hidden_states as mod  # `tools` is a namespace package of the repo
    except ImportError:  # another `tools` package shadows it: load by path (no --num-workers)
        name = "megaspark_precompute_tool"
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, TOOL)
            sys.modules[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(sys.modules[name])
        mod = sys.modules[name]
    return mod


def tool_argv(target, data, out, *extra):
    return ["--target-model", target, "--data-path", str(data), "--output", str(out),
            "--num-target-taps", "2", "--samples-per-shard", "8", "--threads", "1", "--quiet",
            "--no-progress-bar", *extra]


def precompute(target, data, out, *extra) -> int:
    """One single-process tool run, in this process (no interpreter start-up)."""
    with single_thread():
        return _tool().main(tool_argv(target, data, out, *extra))


def precompute_subprocess(target, data, out, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(TOOL), *tool_argv(target, data, out, *extra)],
                            cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _chat_file(path: Path, n: int = 40) -> Path:
    """Conversations with answers of varied length (some samples hit --max-length, most
    do not), plus one exact duplicate."""
    rng = random.Random(1)
    words = "the cat sat on a mat and then it ran to see the dog who was very happy today".split()
    lines = []
    for _ in range(n):
        q = " ".join(rng.choices(words, k=rng.randint(1, 3)))
        a = " ".join(rng.choices(words, k=rng.randint(1, 12)))
        lines.append(json.dumps({"messages": [{"role": "user", "content": q},
                                              {"role": "assistant", "content": a}]}))
    lines.append(lines[3])
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_llama_dir):
    from tests.launcher import prepare_tiny_data

    root = tmp_path_factory.mktemp("offline_data")
    return Path(prepare_tiny_data(_chat_file(root / "c.jsonl"), tiny_llama_dir, root / "data",
                                  valid_fraction=0.2, min_supervised=2))


@pytest.fixture(scope="module")
def hf(tiny_llama_dir):
    from megaspark.targets.hf import HFTargetProvider

    return HFTargetProvider(tiny_llama_dir, layer_ids=LAYER_IDS)


@pytest.fixture(scope="module")
def datasets(data_dir):
    from megaspark.data.dataset import PreparedDataset

    return {s: PreparedDataset(data_dir, s) for s in ("train", "valid")}


@pytest.fixture(scope="module")
def cache_fp32(tmp_path_factory, tiny_llama_dir, data_dir):
    """fp32, one sample per forward: bit-identical to the HF provider on that sample."""
    out = tmp_path_factory.mktemp("cache_fp32") / "c"
    assert precompute(tiny_llama_dir, data_dir, out, "--dtype", "fp32", "--batch-size", "1") == 0
    return out


@pytest.fixture(scope="module")
def cache_fp32_b4(tmp_path_factory, tiny_llama_dir, data_dir):
    """fp32, batches of 4 right-padded samples: the reference for resume / parallel runs."""
    out = tmp_path_factory.mktemp("cache_fp32_b4") / "c"
    assert precompute(tiny_llama_dir, data_dir, out, "--dtype", "fp32", "--batch-size", "4") == 0
    return out


@pytest.fixture(scope="module")
def offline(cache_fp32, tiny_llama_dir, data_dir):
    return OfflineTargetProvider(cache_fp32, tiny_llama_dir, layer_ids=LAYER_IDS, dataset_dir=data_dir)


def _shard_digests(cache: Path) -> dict:
    return {p.name: file_sha256(p) for p in sorted(cache.glob("*.safetensors"))}


def _manifest(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text())


# --------------------------------------------------------------------------------- writing

def test_shards_and_manifest(cache_fp32, data_dir, datasets, hf, tiny_llama_dir):
    from safetensors import safe_open

    m = _manifest(cache_fp32)
    assert m["format"] == "megaspark-hidden-states" and m["schema_version"] == SCHEMA_VERSION
    assert m["layer_ids"] == LAYER_IDS and m["dtype"] == "fp32"
    assert m["hidden_size"] == 64 and m["aux_hidden_size"] == 128 and m["num_target_layers"] == 6
    assert m["target_fingerprint"] == hf.fingerprint() and m["target"] == tiny_llama_dir
    assert m["dataset"]["hash"] == dataset_hash(data_dir)[0] and m["samples_per_shard"] == 8
    assert json.loads((cache_fp32 / "cache_config.json").read_text())["target_fingerprint"] == hf.fingerprint()
    for split, ds in datasets.items():
        rec = m["splits"][split]
        assert rec["num_samples"] == len(ds) == m["dataset"]["num_samples"][split]
        assert rec["num_tokens"] == sum(ds.lengths())
        assert [(s["start"], s["end"]) for s in rec["shards"]] == \
            [(a, min(a + 8, len(ds))) for a in range(0, len(ds), 8)]
        for sh in rec["shards"]:
            path = cache_fp32 / sh["file"]
            assert sh["bytes"] == path.stat().st_size and sh["sha256"] == file_sha256(path)
            with safe_open(str(path), framework="pt") as f:
                assert set(f.keys()) == {"offsets", "aux_hidden_states", "last_hidden_states", "input_ids"}
                assert f.metadata()["split"] == split and int(f.metadata()["start"]) == sh["start"]
                off = f.get_tensor("offsets")
                lengths = ds.lengths()[sh["start"]: sh["end"]]
                assert off.diff().tolist() == lengths and sh["num_tokens"] == sum(lengths)
                T = sum(lengths)
                assert f.get_tensor("aux_hidden_states").shape == (T, 128)
                assert f.get_tensor("last_hidden_states").shape == (T, 64)
                ids = f.get_tensor("input_ids")
                assert ids.dtype == torch.int32
                assert ids.long().tolist() == torch.cat([ds[i]["input_ids"] for i in range(sh["start"], sh["end"])]).tolist()
    assert len(set(datasets["train"].lengths())) > 5  # the lengths really vary
    assert not [p for p in cache_fp32.iterdir() if ".tmp" in p.name]


def test_fp32_cache_is_the_hf_output_exactly(offline, datasets, hf):
    with single_thread():
        for split, ds in datasets.items():
            for i in range(len(ds)):
                ids, aux, last = offline.get_sample(split, i)
                ref = hf.compute(ds[i]["input_ids"][None])
                assert ids.tolist() == ds[i]["input_ids"].tolist()
                assert aux.dtype == torch.float32
                assert torch.equal(aux, ref.aux_hidden_states[0]), (split, i)
                assert torch.equal(last, ref.last_hidden_states[0]), (split, i)


def test_bf16_cache_within_bf16_rounding(tmp_path, tiny_llama_dir, data_dir, datasets, hf):
    out = tmp_path / "bf16"
    assert precompute(tiny_llama_dir, data_dir, out, "--batch-size", "4") == 0  # bf16 is the default
    assert _manifest(out)["dtype"] == "bf16"
    prov = OfflineTargetProvider(out, tiny_llama_dir, layer_ids=LAYER_IDS, dataset_dir=data_dir)
    with single_thread():
        for split, ds in datasets.items():
            for i in range(0, len(ds), 3):
                _, aux, last = prov.get_sample(split, i)
                assert aux.dtype == torch.bfloat16
                ref = hf.compute(ds[i]["input_ids"][None])
                # bf16 keeps 8 significant bits: rounding error <= 2^-9 relative
                torch.testing.assert_close(aux.float(), ref.aux_hidden_states[0], rtol=2 ** -8, atol=1e-5)
                torch.testing.assert_close(last.float(), ref.last_hidden_states[0], rtol=2 ** -8, atol=1e-5)
        out_b = prov.compute_for_samples([0, 1], "train", 64)
        assert out_b.aux_hidden_states.dtype == torch.float32  # upcast for the trainer


# --------------------------------------------------------------------------------- reading

def _micro_batches(ds, mbs=2, count=6, seed=0):
    from megaspark.data.dataset import BatchSampler

    it = iter(BatchSampler(len(ds), mbs, seed=seed))
    return [next(it) for _ in range(count)]


def test_provider_matches_hf_on_padded_micro_batches(offline, datasets, hf):
    from megaspark.data.dataset import collate

    with single_thread():
        for split, ds in datasets.items():
            for seq_length in (64, 52):  # 52: longer samples are truncated by collate
                for indices in _micro_batches(ds, mbs=3, count=4):
                    batch = collate([ds[i] for i in indices], seq_length, ds.pad_id)
                    ref = hf.compute(batch["input_ids"])  # what the trainer does online
                    got = offline.compute(batch["input_ids"])
                    by_index = offline.compute_for_samples(indices, split, seq_length)
                    with_mask = offline.compute(batch["input_ids"], batch["attention_mask"])
                    real = batch["attention_mask"].bool()
                    for o in (got, by_index, with_mask):
                        assert o.aux_hidden_states.shape == ref.aux_hidden_states.shape
                        assert o.last_hidden_states.shape == ref.last_hidden_states.shape
                        assert o.aux_hidden_states.dtype == torch.float32
                        torch.testing.assert_close(o.aux_hidden_states[real], ref.aux_hidden_states[real],
                                                   rtol=1e-5, atol=1e-5)
                        torch.testing.assert_close(o.last_hidden_states[real], ref.last_hidden_states[real],
                                                   rtol=1e-5, atol=1e-5)
                        assert not o.aux_hidden_states[~real].any() and not o.last_hidden_states[~real].any()
                    assert torch.equal(got.aux_hidden_states, by_index.aux_hidden_states)
                    assert torch.equal(got.last_hidden_states, by_index.last_hidden_states)
                    assert torch.equal(got.aux_hidden_states, with_mask.aux_hidden_states)


def test_provider_interface(offline, hf, tiny_llama_dir, tiny_qwen3_dir, datasets):
    assert offline.fingerprint() == hf.fingerprint()
    assert offline.layer_ids == LAYER_IDS and offline.hidden_size == 64 and offline.aux_hidden_size == 128
    assert offline.final_norm() is None and offline.last_hidden_is_post_norm
    assert offline.tokenizer is not None and len(offline.tokenizer) == len(hf.tokenizer)
    assert torch.equal(offline.embedding_weight(), hf.embedding_weight())
    assert torch.equal(offline.lm_head_weight(), hf.lm_head_weight())
    # untied head (Qwen3-like): read from the checkpoint without building the model
    from megaspark.targets.hf import HFTargetProvider, load_config_offline

    q = HFTargetProvider(tiny_qwen3_dir, layer_ids=LAYER_IDS)
    emb, head = load_target_embeddings(tiny_qwen3_dir, load_config_offline(tiny_qwen3_dir).get_text_config())
    assert torch.equal(emb, q.embedding_weight()) and torch.equal(head, q.lm_head_weight())
    assert not torch.equal(emb, head)
    # a sample that is not in the dataset is refused, naming the flag
    ids = datasets["train"][0]["input_ids"].clone()
    ids[1] = (ids[1] + 1) % 300
    with pytest.raises(HiddenStatesCacheError, match="--hidden-states-dir.*not in the cache"):
        offline.compute(ids[None])
    # an already built provider can supply config, tokenizer and weights
    other = OfflineTargetProvider(offline.cache_dir, hf, layer_ids=LAYER_IDS, dataset_dir=offline.dataset_dir)
    assert other.fingerprint() == hf.fingerprint()
    assert torch.equal(other.compute_for_samples([2], "valid").last_hidden_states,
                       offline.compute_for_samples([2], "valid").last_hidden_states)


def test_ambiguous_padding_and_truncation(tmp_path, tiny_llama_dir, hf):
    """Samples that end in the pad id, differ only by trailing pads, repeat, or are longer
    than the micro-batch: the drop-in lookup still returns correct states."""
    from megaspark.data.dataset import PreparedDataset, collate

    data = tmp_path / "data"
    data.mkdir()
    rows = [[5, 6, 7], [5, 6, 7, 0], [5, 6, 7, 0, 0], [5, 6, 7], list(range(10, 30)), [9],
            [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 40]]
    (data / "train.jsonl").write_text("".join(
        json.dumps({"input_ids": r, "loss_mask": [1] * len(r)}) + "\n" for r in rows))
    (data / "meta.json").write_text(json.dumps({"model_vocab_size": 320, "pad_token_id": 0,
                                                "eos_token_id": 2, "max_length": 64}))
    out = tmp_path / "cache"
    assert precompute(tiny_llama_dir, data, out, "--dtype", "fp32", "--batch-size", "1",
                      "--samples-per-shard", "3") == 0
    prov = OfflineTargetProvider(out, tiny_llama_dir, layer_ids=LAYER_IDS, dataset_dir=data)
    ds = PreparedDataset(data, "train")
    with single_thread():
        for S in (8, 16, 24):
            batch = collate([ds[i] for i in range(len(ds))], S, 0)
            ref = hf.compute(batch["input_ids"])
            got = prov.compute(batch["input_ids"])
            masked = prov.compute(batch["input_ids"], batch["attention_mask"])
            for i, r in enumerate(rows):
                n = min(len(r), S)
                for o in (got, masked):
                    torch.testing.assert_close(o.aux_hidden_states[i, :n], ref.aux_hidden_states[i, :n],
                                               rtol=1e-5, atol=1e-5)
                # with the mask the exact-length sample is chosen: zeros after its end
                assert not masked.aux_hidden_states[i, n:].any()
            # without a mask [5, 6, 7] + padding is served by its longest twin [5, 6, 7, 0, 0]
            torch.testing.assert_close(got.last_hidden_states[0, :5], ref.last_hidden_states[0, :5],
                                       rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------- refusals

def _copy_cache(src: Path, dst: Path, edit=None) -> Path:
    shutil.copytree(src, dst)
    if edit is not None:
        m = _manifest(dst)
        edit(m)
        (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_mismatching_cache_is_refused(tmp_path, cache_fp32, tiny_llama_dir, tiny_qwen3_dir, data_dir):
    def build(cache, target=tiny_llama_dir, layer_ids=LAYER_IDS, data=data_dir, **kw):
        return OfflineTargetProvider(cache, target, layer_ids=layer_ids, dataset_dir=data, **kw)

    def refused(match, *a, **kw):
        with pytest.raises(HiddenStatesCacheError, match=match) as e:
            build(*a, **kw)
        assert "--hidden-states-dir" in str(e.value)
        assert isinstance(e.value, ValueError)

    refused("layer ids \\[1, 3\\].*taps \\[1, 2\\].*--target-layer-ids 1 3", cache_fp32, layer_ids=[1, 2])
    refused("different target config", cache_fp32, target=tiny_qwen3_dir)
    refused("schema version 99",
            _copy_cache(cache_fp32, tmp_path / "schema", lambda m: m.update(schema_version=99)))
    refused("different target config",
            _copy_cache(cache_fp32, tmp_path / "fp", lambda m: m.update(target_fingerprint="0" * 16)))
    refused("hidden size 32",
            _copy_cache(cache_fp32, tmp_path / "hidden", lambda m: m.update(hidden_size=32)))
    refused("no complete 'valid' split",
            _copy_cache(cache_fp32, tmp_path / "novalid", lambda m: m["splits"].pop("valid")))
    # the dataset was edited after the cache was made
    other = tmp_path / "data"
    shutil.copytree(data_dir, other)
    lines = (other / "train.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    rec["input_ids"][0] = (rec["input_ids"][0] + 1) % 300
    lines[0] = json.dumps(rec)
    (other / "train.jsonl").write_text("\n".join(lines) + "\n")
    refused("another dataset", cache_fp32, data=other)
    # incomplete (no manifest yet) and damaged shard
    inc = _copy_cache(cache_fp32, tmp_path / "incomplete")
    (inc / "manifest.json").unlink()
    refused("incomplete", inc)
    dmg = _copy_cache(cache_fp32, tmp_path / "damaged")
    shard = sorted(dmg.glob("train-*.safetensors"))[1]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    build(dmg)  # same size: only a checksum notices
    refused("sha256", dmg, verify_checksums=True)
    shard.write_bytes(bytes(raw[:-4]))
    refused("wrong size", dmg)
    # the tool refuses to mix settings in one output directory
    mixed = _copy_cache(cache_fp32, tmp_path / "mixed")
    assert precompute(tiny_llama_dir, data_dir, mixed, "--dtype", "bf16") == 2
    assert _manifest(mixed)["dtype"] == "fp32"


def test_sglang_server_backend_fails_fast_without_gpu(tmp_path, tiny_llama_dir, data_dir, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert precompute(tiny_llama_dir, data_dir, tmp_path / "c", "--target-backend", "sglang-server") == 2
    err = capsys.readouterr().err
    assert "--target-backend sglang-server" in err and "GPU" in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()


@needs_sglang
def test_sglang_colocated_cache_equals_hf_cache(tmp_path, cache_fp32, tiny_llama_dir, data_dir):
    """The co-located SGLang target (real SGLang, CPU, fp32) writes, in batches of 4
    unpadded samples, the cache HF writes one sample at a time."""
    from safetensors.torch import load_file

    out = tmp_path / "sgl"
    p = precompute_subprocess(tiny_llama_dir, data_dir, out, "--dtype", "fp32", "--batch-size", "4",
                              "--target-backend", "sglang")
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stdout[-2000:] + stderr[-4000:]
    ref, got = _manifest(cache_fp32), _manifest(out)
    assert got["target_backend"] == "sglang" and got["target_fingerprint"] == ref["target_fingerprint"]
    files = sorted(p.name for p in cache_fp32.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in out.glob("*.safetensors"))
    for name in files:
        a, b = load_file(str(cache_fp32 / name)), load_file(str(out / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k, (a[k].float() - b[k].float()).abs().max())


# --------------------------------------------------------------------------------- resume, parallel

def test_interrupted_run_resumes_only_missing_shards(tmp_path, cache_fp32_b4, tiny_llama_dir, data_dir,
                                                     monkeypatch):
    ref = _shard_digests(cache_fp32_b4)
    cache = _copy_cache(cache_fp32_b4, tmp_path / "c")  # its manifest.json is now stale
    # a deleted shard, a shard whose write was cut short (temporary file, no record),
    # and a shard damaged on disk (same size, bytes changed)
    train = sorted(cache.glob("train-*.safetensors"))
    deleted, cut, bad = train[1], train[3], sorted(cache.glob("valid-*.safetensors"))[0]
    deleted.unlink()
    cut.unlink()
    Path(str(cut) + ".json").unlink()
    (cache / f".{cut.name}.tmp-12345").write_bytes(b"partial")
    raw = bytearray(bad.read_bytes())
    raw[-1] ^= 0xFF
    bad.write_bytes(bytes(raw))

    tool = _tool()
    done = []
    real = tool.compute_shard
    monkeypatch.setattr(tool, "compute_shard", lambda *a, **k: done.append(a[3]["file"]) or real(*a, **k))
    assert precompute(tiny_llama_dir, data_dir, cache, "--dtype", "fp32", "--batch-size", "4") == 0
    assert sorted(done) == sorted(p.name for p in (deleted, cut, bad))
    assert _shard_digests(cache) == ref
    assert _manifest(cache)["splits"] == _manifest(cache_fp32_b4)["splits"]
    assert not [p for p in cache.iterdir() if ".tmp" in p.name]
    # nothing left to do: a rerun computes nothing and keeps the manifest
    done.clear()
    assert precompute(tiny_llama_dir, data_dir, cache, "--dtype", "fp32", "--batch-size", "4") == 0
    assert done == []


def test_shard_ranks_and_workers_write_what_one_process_writes(tmp_path, cache_fp32_b4, tiny_llama_dir,
                                                               data_dir):
    common = ("--dtype", "fp32", "--batch-size", "4")
    ref = _shard_digests(cache_fp32_b4)
    # two shard ranks, one after the other: the last one to finish writes the manifest
    ranks = tmp_path / "ranks"
    assert precompute(tiny_llama_dir, data_dir, ranks, *common, "--shard-rank", "1", "--num-shard-ranks", "2") == 0
    assert not (ranks / "manifest.json").exists()
    half = _shard_digests(ranks)
    assert 0 < len(half) < len(ref) and all(ref[k] == v for k, v in half.items())
    assert precompute(tiny_llama_dir, data_dir, ranks, *common, "--shard-rank", "0", "--num-shard-ranks", "2") == 0
    # two worker processes of one run
    workers = tmp_path / "workers"
    assert precompute(tiny_llama_dir, data_dir, workers, *common, "--num-workers", "2") == 0
    for cache in (ranks, workers):
        assert _shard_digests(cache) == ref, cache.name
        assert _manifest(cache)["splits"] == _manifest(cache_fp32_b4)["splits"], cache.name


@pytest.mark.slow
def test_concurrent_shard_ranks(tmp_path, cache_fp32_b4, tiny_llama_dir, data_dir):
    """Two processes started together (as on two nodes) share the work and one manifest."""
    out = tmp_path / "c"
    procs = [precompute_subprocess(tiny_llama_dir, data_dir, out, "--dtype", "fp32", "--batch-size", "4",
                                   "--shard-rank", str(r), "--num-shard-ranks", "2") for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert _shard_digests(out) == _shard_digests(cache_fp32_b4)
    assert _manifest(out)["splits"] == _manifest(cache_fp32_b4)["splits"]


# --------------------------------------------------------------------------------- training

def test_training_from_cache_matches_online(tmp_path, cache_fp32, tiny_llama_dir, data_dir):
    """pretrain_dspark.py with --target-backend offline reproduces the online losses."""
    from tests.launcher import base_flags, losses, ok, run

    flags = base_flags(tiny_llama_dir, str(data_dir), "--global-batch-size", "4", "--train-iters", "4",
                       "--eval-interval", "2", "--eval-iters", "1")
    off_log, on_log = tmp_path / "offline.jsonl", tmp_path / "online.jsonl"
    # offline first: without the wiring it fails in seconds
    ok(run(1, *flags, "--target-backend", "offline", "--hidden-states-dir", str(cache_fp32),
           "--log-jsonl", str(off_log)))
    ok(run(1, *flags, "--log-jsonl", str(on_log)))
    for kind in ("train", "eval"):
        a, b = losses(on_log, kind), losses(off_log, kind)
        assert sorted(a) == sorted(b) and a, (kind, a, b)
        for it in a:
            assert b[it] == pytest.approx(a[it], rel=1e-5), (kind, it, a, b)
