"""``tools/score_batch.py`` on a batch keyed the DeepSpec way.

DeepSpec (github.com/deepseek-ai/DeepSpec) names the anchors ``anchor_positions`` and the
keep mask ``block_keep_mask`` (deepspec/modeling/dspark/common.py), keeps ``input_ids``,
``loss_mask``, ``target_hidden_states`` and ``target_last_hidden_states`` (plus an unused
``attention_mask``) from its collator (deepspec/data/target_cache_dataset.py), stores ids
as int32, masks as uint8 and hidden states as bf16. The same tensors written in both
formats must load to identical tensors and score to identical numbers; a batch of neither
format must be refused with the expected keys of both.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from megaspark.export.files import export_hf
from megaspark.export.score_batch import BATCH_TENSORS, save_batch
from tests import dspark_cases as dc
from tests.launcher import run_distributed, tool
from tests.test_export import fake_target_config

REPO = Path(__file__).resolve().parents[1]
CASE = "S_vanilla_conf"  # Markov head + confidence head: every loss term is non-zero


def _tool_module():
    spec = importlib.util.spec_from_file_location("score_batch_tool", REPO / "tools" / "score_batch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sb = _tool_module()


def score_cli(*args) -> subprocess.CompletedProcess:
    return tool("score_batch.py", *args)


def deepspec_tensors(batch: dict) -> dict:
    """``batch`` (our keys) under DeepSpec's names, dtypes and extra attention_mask."""
    b, S = batch["input_ids"].shape
    return {
        "input_ids": batch["input_ids"].to(torch.int32),
        "attention_mask": torch.ones(b, S, dtype=torch.long),
        "loss_mask": batch["loss_mask"].to(torch.uint8),
        "target_hidden_states": batch["target_hidden_states"].to(torch.bfloat16),
        "target_last_hidden_states": batch["target_last_hidden_states"].to(torch.bfloat16),
        "anchor_positions": batch["anchors"].long(),
        "block_keep_mask": batch["keep"].bool(),
    }


def _main_worker(rank, world_size, argvs: dict) -> dict:
    """name -> (exit status, stdout) of ``score_batch.main(argv)`` for each argv, in this process."""
    import contextlib
    import io

    tool = _tool_module()
    out = {}
    for name, argv in argvs.items():
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = tool.main(argv)
        out[name] = (rc, buf.getvalue())
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An HF export of a tiny draft and one batch as megaspark safetensors, DeepSpec
    safetensors and a DeepSpec torch.save dict (hidden states bf16-exact, so all agree)."""
    root = tmp_path_factory.mktemp("score_deepspec")
    d, _, weights, batch = dc.make_case(CASE, S=24)
    export_hf(weights, d, fake_target_config(d), root / "draft", target_name="fake")
    for key in ("target_hidden_states", "target_last_hidden_states"):
        batch[key] = batch[key].to(torch.bfloat16).float()
    ours = root / "ours.safetensors"
    save_batch(ours, **{k: batch[k] for k in BATCH_TENSORS})
    theirs = deepspec_tensors(batch)
    save_file(theirs, str(root / "deepspec.safetensors"))
    torch.save(theirs, root / "deepspec.pt")
    return dict(root=root, draft=str(root / "draft"), batch=batch, ours=str(ours),
                ds=str(root / "deepspec.safetensors"), pt=str(root / "deepspec.pt"))


def test_key_map_covers_our_batch():
    assert set(sb.MEGASPARK_KEYS) == set(BATCH_TENSORS)
    assert set(sb.DEEPSPEC_KEYS.values()) == set(BATCH_TENSORS)
    assert sb.DEEPSPEC_KEYS["anchor_positions"] == "anchors"
    assert sb.DEEPSPEC_KEYS["block_keep_mask"] == "keep"


def test_deepspec_batch_loads_to_our_tensors(files):
    ref = sb.load_batch(files["ours"])
    assert sb.detect_batch_format(sb.read_batch_file(files["ours"])) == "megaspark"
    assert sb.detect_batch_format(sb.read_batch_file(files["ds"])) == "deepspec"
    for path, fmt in ((files["ds"], "auto"), (files["ds"], "deepspec"), (files["pt"], "auto")):
        got = sb.load_batch(path, fmt)
        assert set(got) == set(BATCH_TENSORS)
        for k in BATCH_TENSORS:
            assert got[k].dtype == ref[k].dtype, (path, k, got[k].dtype)
            assert torch.equal(got[k], ref[k]), (path, k)
    assert torch.equal(ref["anchors"], files["batch"]["anchors"])
    assert ref["keep"].dtype == torch.bool and ref["input_ids"].dtype == torch.int64
    # forcing the wrong format names what is missing
    with pytest.raises(sb.BatchFormatError, match=r"lacks \['anchors', 'keep'\] of the megaspark format"):
        sb.load_batch(files["ds"], "megaspark")


def test_malformed_batches_are_refused_clearly(files):
    theirs = deepspec_tensors(files["batch"])
    no_anchors = {k: v for k, v in theirs.items() if k not in ("anchor_positions", "block_keep_mask")}
    with pytest.raises(sb.BatchFormatError) as err:
        sb.normalize_batch(no_anchors)
    msg = str(err.value)
    assert "neither format" in msg and "sample_anchor_positions" in msg
    assert "megaspark lacks ['anchors', 'keep']" in msg
    assert "deepspec lacks ['anchor_positions', 'block_keep_mask']" in msg
    for key in (*BATCH_TENSORS, "anchor_positions", "block_keep_mask"):
        assert key in msg.split("Expected keys:")[1], key
    with pytest.raises(sb.BatchFormatError, match="keys of both formats"):
        sb.normalize_batch({**theirs, "anchors": theirs["anchor_positions"], "keep": theirs["block_keep_mask"]})
    bad_keep = dict(theirs, block_keep_mask=theirs["block_keep_mask"].long() * 2)
    with pytest.raises(sb.BatchFormatError, match="'block_keep_mask' must be a 0/1 mask"):
        sb.normalize_batch(bad_keep)
    stacked = dict(theirs, target_hidden_states=theirs["target_hidden_states"].unflatten(-1, (2, -1)))
    with pytest.raises(sb.BatchFormatError, match="'target_hidden_states' must have 3 dimensions"):
        sb.normalize_batch(stacked)
    short = dict(theirs, block_keep_mask=theirs["block_keep_mask"][:, :-1])
    with pytest.raises(sb.BatchFormatError, match="differ in shape"):
        sb.normalize_batch(short)
    # the CLI refuses before building the model, exit status 2, message on stderr
    path = files["root"] / "no_anchors.safetensors"
    save_file(no_anchors, str(path))
    r = score_cli("--draft", files["draft"], "--batch", path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "neither format" in r.stderr and "anchor_positions, block_keep_mask" in r.stderr
    assert "anchors, keep" in r.stderr and r.stdout == ""


def test_both_formats_score_to_the_same_numbers(files):
    # the same batch with one kept block dropped: the comparison can tell batches apart
    theirs = deepspec_tensors(files["batch"])
    keep = theirs["block_keep_mask"].clone()
    assert bool(keep[0, 0])
    keep[0, 0] = False
    changed = files["root"] / "changed.safetensors"
    save_file(dict(theirs, block_keep_mask=keep), str(changed))
    args = {
        "ours": ("--batch", files["ours"]),
        "ds": ("--batch", files["ds"]),
        "pt": ("--batch", files["pt"], "--batch-format", "deepspec"),
        "changed": ("--batch", changed),
    }
    # process start-up dominates: one spawned process runs the tool's main() for every batch
    (runs,) = run_distributed(_main_worker, 1, {k: ["--draft", files["draft"], *map(str, a), "--json"]
                                                  for k, a in args.items()})
    results = {}
    for name, (rc, stdout) in runs.items():
        assert rc == 0, (name, stdout[-3000:])
        got = json.loads(stdout)
        assert got.pop("batch") and got.pop("draft") == files["draft"]
        results[name] = got
    ref = results["ours"]
    assert ref["loss"] > 0 and ref["denominator"] > 0
    assert ref["ce_loss"] > 0 and ref["l1_loss"] > 0 and ref["confidence_loss"] > 0
    assert results["ds"] == ref
    assert results["pt"] == ref
    assert results["changed"]["denominator"] < ref["denominator"]
    assert results["changed"]["loss"] != ref["loss"]
