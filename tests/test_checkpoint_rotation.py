"""Checkpoint rotation keeps the last N and never deletes what `latest` or `best` name;
`resolve_checkpoint` follows the pointer and refuses incomplete directories."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from megaspark.training.checkpointing import STATE_FILE, Checkpointer, CheckpointError, resolve_checkpoint


def _make(root, *iters):
    for it in iters:
        d = root / f"iter_{it:07d}"
        d.mkdir()
        (d / STATE_FILE).write_bytes(b"x")


def test_rotation_protects_latest_and_best(tmp_path):
    _make(tmp_path, 1, 2, 3, 4, 5, 6)
    (tmp_path / "iter_0000007.tmp").mkdir()  # an unfinished write is not a checkpoint
    (tmp_path / "latest").write_text("iter_0000006")
    (tmp_path / "best").write_text("iter_0000002")
    Checkpointer(SimpleNamespace(keep_last=2), None, "fp")._rotate(str(tmp_path))
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("iter_"))
    assert left == ["iter_0000002", "iter_0000005", "iter_0000006", "iter_0000007.tmp"]


def test_latest_is_kept_even_if_older_than_the_window(tmp_path):
    _make(tmp_path, 1, 2, 3)
    (tmp_path / "latest").write_text("iter_0000001")
    Checkpointer(SimpleNamespace(keep_last=1), None, "fp")._rotate(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["iter_0000001", "iter_0000003"]


def test_resolve_follows_latest_and_refuses_incomplete(tmp_path):
    _make(tmp_path, 3)
    (tmp_path / "latest").write_text("iter_0000003")
    assert resolve_checkpoint(str(tmp_path)).endswith("iter_0000003")
    (tmp_path / "iter_0000004").mkdir()
    with pytest.raises(CheckpointError, match="no complete megaspark checkpoint"):
        resolve_checkpoint(str(tmp_path / "iter_0000004"))
