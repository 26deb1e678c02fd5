"""Atomic, locked file writes: no output is ever left half-written."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from muse_bench.core.errors import MuseError


def make_dirs(path: str | os.PathLike[str]) -> Path:
    """`mkdir -p path`, or MuseError saying why not (a file in the way, no permission...)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        for parent in (path, *path.parents):
            if parent.exists() and not parent.is_dir():
                raise MuseError(
                    f"cannot write to '{path}': '{parent}' is a file, not a directory."
                ) from exc
        raise MuseError(f"cannot write to '{path}': {exc.strerror or exc}.") from exc
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, then rename over `path`."""
    path = Path(path)
    make_dirs(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise MuseError(f"cannot write to '{path.parent}': {exc.strerror}.") from exc
    try:
        # mkstemp makes 0600 files; published pages and shared CSVs need the usual umask
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise MuseError(f"writing '{path}' failed: {exc.strerror or exc}.") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Atomically write a UTF-8 text file."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> None:
    """Atomically write `obj` as JSON (UTF-8, non-ASCII kept)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def check_writable_dir(path: str | os.PathLike[str]) -> Path:
    """Make sure `path` is (or can be made) a directory this process can write into.

    Run before any work, so an unwritable --out fails at once instead of after training.
    Creates `path` (and its parents) if needed; nothing else is left behind.
    """
    path = make_dirs(path)
    try:
        with tempfile.TemporaryFile(prefix=".muse-write-test.", dir=path):
            pass
    except OSError as exc:
        raise MuseError(
            f"output directory '{path}' is not writable: {exc.strerror or exc}."
        ) from exc
    return path


def remove_stale_temps(path: str | os.PathLike[str]) -> int:
    """Delete temporary files that interrupted atomic writes of `path` left beside it.

    Only safe while holding `file_lock(path)` when every writer of `path` takes that lock
    (as leaderboard CSVs do): then no other writer can be half-way. Returns the count.
    """
    path = Path(path)
    removed = 0
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed += 1
    return removed


class LockedError(MuseError):
    """Another process holds the lock."""


@contextlib.contextmanager
def try_lock(path: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Hold an exclusive lock on `path` or fail at once (LockedError) if another process has it.

    The kernel releases the lock when its process dies, even by SIGKILL, so a crashed run
    never leaves a stale lock behind.
    """
    path = Path(path)
    make_dirs(path.parent)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(
                f"{what} is in progress in another process (lock '{path}'); wait for it to "
                "finish or stop it, then run again."
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path + '.lock'` for the duration of the block."""
    lock_path = Path(str(path) + ".lock")
    make_dirs(lock_path.parent)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
