"""Files that appear whole or not at all: written under a temporary name beside the target, then renamed.

A kill mid-write leaves at most a stray `.<name>.<pid>.tmp`, never half a file under the real name, so a resumed
run can trust every file it finds. The temporary name carries the process id: concurrent writers of one file
(sampling shards, forked fits) do not collide, and the last rename wins whole.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write `path`'s content to; it replaces `path` in one rename when the block ends
    normally, and is removed if the block raises."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """`Path(path).write_text(text)`, whole or not at all."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
