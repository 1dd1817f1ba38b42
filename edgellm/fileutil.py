"""Small file helpers shared by the builder, the reader and `pull`."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from edgellm.errors import EdgeLLMError


def cache_dir() -> Path:
    """~/.cache/edgellm (or $XDG_CACHE_HOME/edgellm, the standard override)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgellm"


def read_json(path: Path):
    """The JSON value in a file, or a one-line error naming the file."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgeLLMError(f"{path} is not valid JSON: {e}") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


SAMPLE_PAGES, PAGE = 8, 4096


def sample_sha256(path: Path) -> str:
    """sha256 of the file's size and of 8 pages of 4 KiB spread evenly over it, first and last
    included (the whole file when it is smaller): cheap enough for every load (32 KiB a file),
    and it tells a file overwritten or swapped since it was built."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= SAMPLE_PAGES * PAGE:
            h.update(f.read())
        else:
            last = size - PAGE
            for i in range(SAMPLE_PAGES):
                f.seek(last * i // (SAMPLE_PAGES - 1))
                h.update(f.read(PAGE))
    return h.hexdigest()
