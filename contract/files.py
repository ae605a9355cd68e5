"""How every stage writes a file, and reads one another party may have written.

Writing: to a temporary name in the same folder, then renamed into place. A killed process never
leaves a half-written artifact: a reader sees the old file or the new one.
Reading: regular files only, their size checked before any byte is read (``open_regular_file``),
so a FIFO, a device or a file larger than the reader's limit is one error, never a hang or an
endless read.
Standard library only, so that the benches that measure without torch (HTTP, soak) write their
results without loading it; train/artifacts.py and train/data.py build on these.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO


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


# --------------------------------------------------------------------------------------------
# Reading

_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class UnreadableFile(ValueError):
    """A file that is missing, not a regular file, larger than the reader's limit, or that the
    system refuses to read; the message is "PATH: reason", ``reason`` says which."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.reason = reason


def open_regular_file(path: Path | str, *, limit: int, follow_symlinks: bool = True) -> BinaryIO:
    """``path`` opened for binary reading, once it is known to be a regular file of at most
    ``limit`` bytes; else UnreadableFile. ``follow_symlinks=False``: a symlink as the last
    component is refused (for a path the caller has already resolved and checked).

    Opened non-blocking, so that a FIFO is refused instead of waiting for a writer, and checked
    with fstat on the descriptor that will be read (not on the name, which may change between).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise UnreadableFile(path, "file not found") from None
    except OSError as e:
        raise UnreadableFile(path, e.strerror or str(e)) from None
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            kind = next((k for test, k in _FILE_KINDS if test(status.st_mode)), "a special file")
            raise UnreadableFile(path, f"{kind}, not a regular file")
        if status.st_size > limit:
            raise UnreadableFile(
                path, f"{status.st_size} bytes, more than the limit of {limit} bytes"
            )
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_file(path: Path | str, *, limit: int, follow_symlinks: bool = True) -> bytes:
    """The bytes of ``path``, a regular file of at most ``limit`` bytes (``open_regular_file``);
    a file that grows past the limit while it is read is refused too."""
    with open_regular_file(path, limit=limit, follow_symlinks=follow_symlinks) as f:
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise UnreadableFile(path, e.strerror or str(e)) from None
    if len(data) > limit:
        raise UnreadableFile(path, f"grew past the limit of {limit} bytes while it was read")
    return data
