"""Small file helpers shared by the dataset, hidden-state cache and checkpoint writers."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def file_sha256(path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never a part
    (a temporary next to it, fsynced, then renamed over it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


__all__ = ["file_sha256", "atomic_write_text"]
