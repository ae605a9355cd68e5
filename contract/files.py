"""How every stage writes a file: to a temporary name in the same folder, then renamed into place.

A killed process never leaves a half-written artifact: a reader sees the old file or the new one.
Standard library only, so that the benches that measure without torch (HTTP, soak) write their
results without loading it; train/artifacts.py builds weights, specs and checkpoints on these.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (its folder created if missing) through a temporary file in the
    same folder, fsynced, then ``os.replace``d: the rename is atomic within one file system."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts get the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """``atomic_write_bytes`` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode())


def _umask() -> int:
    # the only way to read the umask is to set it: set it back at once
    current = os.umask(0)
    os.umask(current)
    return current
