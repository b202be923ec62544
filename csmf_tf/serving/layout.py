"""The on-disk model layout shared by the exporter and the server: version names and scratch directories.

``<base_path>/<model_name>/<version>/`` is a version when ``<version>`` is a plain ASCII decimal number
that fits TF Serving's int64 version field; everything else (``.tmp-*`` scratch directories of an
export in progress, ``notes``, ``v2``, ``²``, ``-1``, a 30-digit number) is ignored, as TF Serving
ignores names it cannot parse as a version.

An export writes ``.tmp-<uuid>/`` and renames it to its version number once complete. While it writes,
it holds an exclusive ``flock`` on the sibling file ``.tmp-<uuid>.lock``; the kernel drops that lock
when the exporter dies (even on SIGKILL), so :func:`remove_stale_scratch_dirs` can tell an abandoned
scratch directory (lock free) from one that a live exporter is still writing (lock held) without
guessing from timestamps. Scratch directories without a lock file (written by something else) are
left alone.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

#: Prefix of an export's scratch directory (hidden, non-numeric: never taken for a version).
TMP_PREFIX = ".tmp-"
LOCK_SUFFIX = ".lock"
#: TF Serving's version is an int64 (``ModelSpec.version``); larger numbers cannot be addressed.
MAX_VERSION = 2 ** 63 - 1


def parse_version(name: str) -> int | None:
    """The version number a directory name stands for, or ``None`` when it is not a version.

    Only ASCII digits count: ``str.isdigit`` also accepts characters such as ``"²"`` on which ``int()``
    raises, and one such directory must not stop the server from scanning the others.
    """
    if not name or not name.isascii() or not name.isdigit():
        return None
    version = int(name)
    return version if version <= MAX_VERSION else None


def version_dirs(model_dir: str | os.PathLike) -> dict[int, Path]:
    """``{version: path}`` of the version directories under ``model_dir`` (see module docstring).

    When two names denote the same number (``7`` and ``007``), the canonical spelling wins, then the
    lexicographically first, so the choice does not depend on directory listing order.
    """
    root = Path(model_dir)
    try:
        entries = sorted(root.iterdir(), key=lambda p: p.name)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    out: dict[int, Path] = {}
    for p in entries:
        v = parse_version(p.name)
        if v is None or not p.is_dir():
            continue
        if v not in out or (p.name == str(v) and out[v].name != str(v)):
            out[v] = p
    return out


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (names created, renamed or removed in it) to stable storage."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` to stable storage.

    A rename is atomic for readers, but after a power loss the renamed directory may hold files whose
    data never reached the disk unless they were flushed *before* the rename.
    """
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


@contextlib.contextmanager
def scratch_dir(model_dir: Path) -> Iterator[Path]:
    """A fresh ``.tmp-<uuid>`` path under ``model_dir`` (not created), locked while the block runs.

    The lock file is created and locked *before* the caller creates the directory, so a cleaner never
    sees a scratch directory of a live exporter with a free lock. On exit the directory (if the caller
    did not rename it away) and the lock file are removed.
    """
    tmp = model_dir / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    lock_path = tmp.with_name(tmp.name + LOCK_SUFFIX)
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)   # a brand-new file: nobody else holds it, this never waits
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                lock_path.unlink()
    finally:
        os.close(fd)


def remove_stale_scratch_dirs(model_dir: str | os.PathLike) -> list[Path]:
    """Remove scratch directories whose exporter died (their lock is free); returns what was removed.

    Safe to run while other exports are in progress: their locks are held, so they are skipped.
    """
    root = Path(model_dir)
    removed: list[Path] = []
    try:
        entries = list(root.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for lock_path in entries:
        name = lock_path.name
        if not (name.startswith(TMP_PREFIX) and name.endswith(LOCK_SUFFIX)):
            continue
        tmp = lock_path.with_name(name[: -len(LOCK_SUFFIX)])
        try:
            fd = os.open(lock_path, os.O_RDWR)
        except FileNotFoundError:
            continue                      # its exporter (or another cleaner) just removed it
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    continue              # a live exporter holds it
                raise
            # The owner is gone. Remove the directory first, the lock file last, so that a crash of
            # this cleaner leaves a lock file behind and the next cleaner finishes the job.
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
                log.info("removed %s, left behind by an export that did not finish", tmp)
            with contextlib.suppress(FileNotFoundError):
                lock_path.unlink()
        finally:
            os.close(fd)
    return removed


__all__ = ["MAX_VERSION", "TMP_PREFIX", "fsync_dir", "fsync_tree", "parse_version",
           "remove_stale_scratch_dirs", "scratch_dir", "version_dirs"]
