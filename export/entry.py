"""A model repository entry, written safe against a concurrent export and a kill at any point.

Writing an entry, safe against a concurrent export and a kill at any point:

- exports to one entry take turns: each holds the lock file REPOSITORY/.NAME.lock (flock) while it
  writes, and checks under it what it checked before lowering (the version is free unless
  ``overwrite``; the entry's other versions share its inputs and outputs), so an export that lost
  a race says so instead of replacing the winner's model;
- the whole new entry is staged in REPOSITORY/.NAME.XXXXXXXX.tmp: its other versions hard-linked
  (or copied), the new version and the config.pbtxt describing them written there, then swapped
  with the old entry in one step (Linux renameat2 RENAME_EXCHANGE), so that the entry a server
  reads is the old one or the new one, both complete, whenever the export is killed. Where the
  file system cannot exchange two folders, two renames do it, with a warning; the next export
  restores an entry a kill left moved aside;
- under the lock, an export first removes the staging folders of exports killed earlier.

serve ignores names starting with "." in the repository, so none of these is ever a model.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import json
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError, Message

from smartmixed.contract import CONFIG_FILE, MODEL_FILE, REPORT_FILE
from smartmixed.serve.model_config import (
    ENUMS,
    ConfigError,
    check_model_config,
    is_version_name,
    parse_model_config,
)

# Modes of what export writes: readable by a server running as another user (the Dockerfile's
# non-root user), or by the owner alone with --private.
PUBLIC_MODES, PRIVATE_MODES = (0o755, 0o644), (0o700, 0o600)  # (folders, files)
LOCK_TIMEOUT_S = 60.0  # the longest an export waits for another one to finish writing the entry
# Linux renameat2(2): AT_FDCWD resolves relative paths as rename(2) does; RENAME_EXCHANGE swaps
AT_FDCWD, RENAME_EXCHANGE = -100, 2

log = logging.getLogger(__name__)


class ExportError(ValueError):
    """An export request that cannot be carried out (bad names, existing entry, missing data)."""


def write_entry(
    entry: Path,
    version: int,
    model: onnx.ModelProto,
    report: dict,
    config: str,
    *,
    run_dir: Path,
    overwrite: bool,
    private: bool,
) -> None:
    """Stage the whole new entry next to the old one (its other versions hard-linked, the new
    version, the config.pbtxt describing them all), then swap the two: a kill at any point
    leaves the old entry or the new one, complete. Under the entry's lock, after removing what
    killed exports left and checking again what ``export_run`` checked before its minutes of
    work. Modes are set explicitly, whatever the umask: a server running as another user must
    read the entry."""
    folder_mode, file_mode = PRIVATE_MODES if private else PUBLIC_MODES
    entry.parent.mkdir(parents=True, exist_ok=True)
    with entry_lock(entry, file_mode=file_mode):
        remove_leftovers(entry)
        target = entry / str(version)
        if (target.exists() or target.is_symlink()) and not overwrite:
            raise ExportError(
                f"{target} was written by another export while this one ran; "
                "pass --overwrite to replace it"
            )
        check_fits_entry(entry, config, version=version, run_dir=run_dir)
        # mkdtemp's name: ".NAME." + 8 characters of [a-z0-9_] + ".tmp" (see remove_leftovers)
        staging = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.", suffix=".tmp"))
        try:
            if entry.exists():  # its other versions, and whatever else it holds, unchanged
                _link_tree(entry, staging, skip=frozenset({str(version), CONFIG_FILE}))
            version_dir = staging / str(version)
            version_dir.mkdir()
            report_bytes = (json.dumps(report, indent=1) + "\n").encode()
            _write_synced(version_dir / MODEL_FILE, model.SerializeToString(), mode=file_mode)
            _write_synced(version_dir / REPORT_FILE, report_bytes, mode=file_mode)
            _write_synced(staging / CONFIG_FILE, config.encode(), mode=file_mode)
            for folder in (version_dir, staging):
                folder.chmod(folder_mode)
                _fsync_folder(folder)
            replaced = _swap_into_place(staging, entry)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # what is left is removed next time
            raise
        _fsync_folder(entry.parent)
        if replaced is not None:  # under the lock: the next export would take it for a leftover
            try:
                _remove(replaced)
            except OSError as e:
                log.warning("cannot remove %s, the entry replaced (%s)", replaced, e.strerror or e)


@contextmanager
def entry_lock(entry: Path, *, file_mode: int) -> Iterator[None]:
    """Hold REPOSITORY/.NAME.lock (flock, exclusive) while the entry is written, waiting up to
    LOCK_TIMEOUT_S for another export to finish. The file stays: deleting it would let a third
    export lock a new file while a second still waits on the old one."""
    path = entry.parent / f".{entry.name}.lock"
    # flock needs no write access; O_NONBLOCK: a FIFO at the path must not hang the open
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, file_mode)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ExportError(f"{path}: the entry's lock file is not a regular file")
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ExportError(
                        f"{entry}: another export has been writing it for over "
                        f"{LOCK_TIMEOUT_S:g} s (it holds {path}); try again once it has finished"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def remove_leftovers(entry: Path) -> None:
    """Clear what exports of this entry killed earlier left, each logged (under the entry's
    lock: no export is writing it). An entry the two-rename swap moved aside is put back if the
    entry is missing (removed otherwise); staging folders, whole new entries or old ones swapped
    out, are removed. One that cannot be removed is harmless (the server skips dot names): it is
    named, and the export goes on."""
    aside = _aside(entry)
    if aside.is_dir() and not aside.is_symlink() and not entry.exists():
        os.rename(aside, entry)
        log.warning("%s: restored the entry an interrupted export had moved to %s", entry, aside)
    elif aside.exists() or aside.is_symlink():
        _remove_logged(aside, "the entry an interrupted export replaced")
    staging = re.compile(rf"\.{re.escape(entry.name)}\.[a-z0-9_]{{8}}\.tmp")
    for path in sorted(entry.parent.iterdir()):
        if staging.fullmatch(path.name):
            _remove_logged(path, "the staging folder of an interrupted export")


def _remove_logged(path: Path, what: str) -> None:
    try:
        _remove(path)
    except OSError as e:
        log.warning("cannot remove %s, %s (%s)", path, what, e.strerror or e)
    else:
        log.warning("removed %s: %s", path, what)


def _aside(entry: Path) -> Path:
    """Where the two-rename swap moves the old entry while the new one takes its name."""
    return entry.parent / f".{entry.name}.replaced"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def check_fits_entry(entry: Path, config: str, *, version: int, run_dir: Path) -> None:
    """Refuse a version whose inputs or outputs differ from those of the versions it would join
    (all but the one it replaces): its ``config`` replaces the entry's, and a server refuses an
    entry whose config.pbtxt does not describe the version it serves. The entry's versions are
    known by its config.pbtxt; where it has none (allowed, as in Triton) or an unusable one, by
    checking ``config`` against each of their ONNX models, as the server will."""
    if not entry.is_dir():
        return
    others = sorted(
        (p.name for p in entry.iterdir() if is_version_name(p.name) and p.name != str(version)),
        key=int,
    )
    if not others:
        return  # a new entry, or its one version replaced
    wanted = parse_model_config(config, source=CONFIG_FILE)
    path = entry / CONFIG_FILE
    try:
        declared = parse_model_config(path.read_text(), source=path)
    except (OSError, UnicodeDecodeError, ConfigError):
        for other in others:
            _check_describes(config, entry / other / MODEL_FILE, entry=entry, run_dir=run_dir)
        return
    if _interface(wanted) != _interface(declared):
        joined = f"version{'s' if len(others) > 1 else ''} {', '.join(others)}"
        raise ExportError(
            f"{run_dir} ({_interface_text(wanted)}) does not fit {entry} "
            f"({_interface_text(declared)} in its {CONFIG_FILE}, {joined}): the versions of an "
            "entry share their inputs and outputs; export it under another --name"
        )


def _check_describes(config: str, path: Path, *, entry: Path, run_dir: Path) -> None:
    """``config`` (of a version from ``run_dir``) checked against the model of another version
    of ``entry``, which has no usable config.pbtxt to compare with."""
    try:
        if not path.is_file():  # a FIFO would hang the read
            raise OSError(f"{'not a regular file' if path.exists() else 'missing'}")
        model = onnx.load(str(path), load_external_data=False)
    except (OSError, DecodeError) as e:
        raise ExportError(
            f"{path}: not a readable ONNX model ({e}); cannot check that {run_dir} has the "
            f"inputs and outputs of this version of {entry}, which has no usable {CONFIG_FILE}"
        ) from None
    try:
        check_model_config(config, model, name=entry.name, source=Path(CONFIG_FILE))
    except ConfigError as e:
        raise ExportError(
            f"{run_dir} does not fit {entry}, which has no usable {CONFIG_FILE}: the one of its "
            f"new version would not describe {path} ({e}); export it under another --name"
        ) from None


def _interface(config: Message) -> tuple[list[tuple[str, int, tuple[int, ...]]], ...]:
    """The inputs and outputs of a parsed config.pbtxt: (name, data type, dims), by name."""
    return tuple(
        sorted((t.name, t.data_type, tuple(t.dims)) for t in tensors)
        for tensors in (config.input, config.output)
    )


def _interface_text(config: Message) -> str:
    """'input [64] -> logits [10], probabilities [10]' (a data type named where not FP32)."""
    types = dict(enumerate(ENUMS["DataType"]))

    def describe(tensors) -> str:
        return ", ".join(
            f"{t.name} {list(t.dims)}"
            + ("" if types.get(t.data_type) == "TYPE_FP32" else f" {types.get(t.data_type)}")
            for t in tensors
        )

    return f"{describe(config.input)} -> {describe(config.output)}"


def _link_tree(source: Path, destination: Path, *, skip: frozenset[str] = frozenset()) -> None:
    """Recreate ``source``'s contents (but the names in ``skip``) in ``destination``: folders
    with their modes, files hard-linked (copied where the file system refuses the link), links
    as links. ``source`` is not changed."""
    for path in sorted(source.iterdir()):
        if path.name in skip:
            continue
        copy = destination / path.name
        if path.is_symlink():
            os.symlink(os.readlink(path), copy)
        elif path.is_dir():
            copy.mkdir()
            _link_tree(path, copy)
            shutil.copymode(path, copy)
        else:
            try:
                os.link(path, copy)
            except OSError:
                if not path.is_file():
                    raise
                shutil.copy2(path, copy)


def _write_synced(path: Path, data: bytes, *, mode: int) -> None:
    """A new file, its mode ``mode`` whatever the umask, on disk before the swap names it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, mode)  # whatever the umask
        f.write(data)
        f.flush()
        os.fsync(fd)


def _fsync_folder(path: Path) -> None:
    """Make the names in a folder durable (a power loss after the swap keeps the new entry)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:  # a file system that cannot sync a folder
            raise
    finally:
        os.close(fd)


def _swap_into_place(staging: Path, entry: Path) -> Path | None:
    """Put the complete ``staging`` folder at ``entry``; return where the entry it replaced now
    is (None: there was none), for the caller to delete."""
    if not entry.exists():
        os.rename(staging, entry)  # atomic: the entry appears complete
        return None
    if exchange(staging, entry):
        return staging
    aside = _aside(entry)
    log.warning(
        "%s: this file system cannot swap two folders in one step; replacing the entry by two "
        "renames (an export killed between them leaves it in %s, and the next export restores it)",
        entry,
        aside,
    )
    os.rename(entry, aside)
    try:
        os.rename(staging, entry)
    except OSError:
        os.rename(aside, entry)
        raise
    return aside


@functools.cache
def _renameat2():
    """libc's renameat2 (Linux, glibc 2.28 or later), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = (
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    )
    function.restype = ctypes.c_int
    return function


def exchange(a: Path, b: Path) -> bool:
    """Swap the folders at ``a`` and ``b`` in one step, so that a reader of ``b`` finds one of
    the two, whole. False where the platform or the file system cannot (nothing is changed)."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # no such call here
        return False
    raise OSError(code, os.strerror(code), str(b))
