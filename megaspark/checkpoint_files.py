"""The on-disk format of a megaspark checkpoint directory: finding, reading and verifying one.

A ``--save`` directory holds ``iter_NNNNNNN/`` checkpoints (each with ``megaspark_state.pt``
and, written last, ``checksums.json``: size and sha256 of every other file) and ``latest`` /
``best`` pointer files. Writing checkpoints is training's job
(:mod:`megaspark.training.checkpointing`); this module only knows the files, so that tools
and exporters can read checkpoints without the training stack.
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

import torch

from megaspark.fileio import atomic_write_text, file_sha256

STATE_FILE = "megaspark_state.pt"
MANIFEST_FILE = "checksums.json"
ITER_RE = re.compile(r"^iter_(\d{7})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, read or resumed from; the message says why."""


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory, or a --save directory holding a ``latest`` pointer."""
    pointer = os.path.join(path, "latest")
    if os.path.isfile(pointer):
        with open(pointer) as f:
            name = f.read().strip()
        path = os.path.join(path, name)
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise CheckpointError(f"--load {path}: no complete megaspark checkpoint found there")
    return path


def _checkpoint_files(path: str) -> list:
    out = []
    for dirpath, _, files in os.walk(path):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), path)
            if rel != MANIFEST_FILE:
                out.append(rel)
    return sorted(out)


def write_manifest(path: str) -> None:
    """``checksums.json``: the size and sha256 of every file of the checkpoint at ``path``."""
    files = {rel: {"bytes": os.path.getsize(os.path.join(path, rel)),
                   "sha256": file_sha256(os.path.join(path, rel))} for rel in _checkpoint_files(path)}
    atomic_write_text(os.path.join(path, MANIFEST_FILE), json.dumps({"files": files}, indent=1))


def verify_checkpoint(path: str, checksums: bool = True) -> Optional[str]:
    """What is wrong with the checkpoint at ``path`` (None when intact): its state file or
    manifest missing, a file of the manifest missing, of another size or (``checksums``)
    another sha256. A checkpoint written before manifests existed is checked for its state
    file only."""
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        return f"no {STATE_FILE} (incomplete)"
    manifest = os.path.join(path, MANIFEST_FILE)
    if not os.path.isfile(manifest):
        return f"no {MANIFEST_FILE} (incomplete)" if _has_manifest_flag(path) else None
    try:
        with open(manifest) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"{MANIFEST_FILE} unreadable ({e})"
    for rel, rec in files.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"file {rel} missing"
        size = os.path.getsize(full)
        if size != rec["bytes"]:
            return f"file {rel} has {size} bytes, {rec['bytes']} were written (truncated or changed)"
        if checksums and file_sha256(full) != rec["sha256"]:
            return f"file {rel} fails its sha256 checksum (corrupted)"
    return None


def _has_manifest_flag(path: str) -> bool:
    """Was this checkpoint written with a manifest? (False: before manifests existed)"""
    try:
        state = torch.load(os.path.join(path, STATE_FILE), weights_only=False, map_location="cpu")
    except Exception:  # noqa: BLE001 - an unreadable state file: the manifest would say more
        return True
    return bool(state.get("has_manifest", False))


def checkpoint_names(root: str) -> list:
    """Complete checkpoint directories (``iter_N``, not ``iter_N.tmp``) under a --save
    directory, newest first."""
    if not os.path.isdir(root):
        return []
    return sorted((n for n in os.listdir(root) if ITER_RE.match(n)), reverse=True)


def find_resumable(root: str, checksums: bool = True) -> tuple:
    """``(path of the newest intact checkpoint under root or None, [problems of newer
    ones])``: the one ``latest`` names, else (damaged) the next older ones. A ``root`` that
    is itself a checkpoint directory must be intact."""
    if os.path.isfile(os.path.join(root, STATE_FILE)) or ITER_RE.match(os.path.basename(os.path.normpath(root))):
        problem = verify_checkpoint(root, checksums)
        if problem:
            raise CheckpointError(f"--load {root}: {problem}; use its --save directory to fall "
                                  "back to an earlier checkpoint")
        return root, []
    problems = []
    names = checkpoint_names(root)
    pointer = os.path.join(root, "latest")
    if os.path.isfile(pointer):  # what `latest` names first (a manual rollback is honoured)
        with open(pointer) as f:
            latest = f.read().strip()
        if latest in names:
            names = [latest] + [n for n in names if n < latest]
    for name in names:
        path = os.path.join(root, name)
        problem = verify_checkpoint(path, checksums)
        if problem is None:
            return path, problems
        problems.append(f"{path}: {problem}")
    return None, problems


def read_state(path: str) -> dict:
    """The ``megaspark_state.pt`` dict of a checkpoint (or of the one ``latest`` names)."""
    return torch.load(os.path.join(resolve_checkpoint(path), STATE_FILE), weights_only=False)


__all__ = [
    "STATE_FILE", "MANIFEST_FILE", "ITER_RE", "CheckpointError", "resolve_checkpoint", "write_manifest",
    "verify_checkpoint", "checkpoint_names", "find_resumable", "read_state",
]
