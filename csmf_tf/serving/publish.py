"""Atomic publication of a new model version: write into a scratch directory, verify, flush, rename.

Servers only look at numeric directories (:mod:`csmf_tf.serving.layout`), so a version appears in
one step, complete, or not at all: everything is written to ``<model_dir>/.tmp-<uuid>`` and checked
there, flushed to disk (``fsync``), then renamed to ``<max existing version + 1>``. A process killed
mid-export (even by SIGKILL) leaves only its ``.tmp-*`` directory, never a version; the next export
removes such leftovers (:func:`csmf_tf.serving.layout.remove_stale_scratch_dirs`: only those whose
exporter is dead).
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Callable

from csmf_tf.serving.layout import fsync_dir, fsync_tree, remove_stale_scratch_dirs, scratch_dir, version_dirs

log = logging.getLogger(__name__)


def publish_next_version(model_dir: Path, write: Callable[[Path], None]) -> Path:
    """Let ``write(tmp)`` fill (and verify) a scratch directory, then publish it; returns the version path.

    ``write`` raising leaves no trace: the scratch directory is removed on any failure, even
    ``KeyboardInterrupt``.
    """
    model_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch_dirs(model_dir)
    with scratch_dir(model_dir) as tmp:
        write(tmp)
        # Data on disk before the name appears: after a power loss a version is complete or absent.
        fsync_tree(tmp)
        return rename_to_next_version(tmp, model_dir)


def rename_to_next_version(tmp: Path, model_dir: Path, attempts: int = 100) -> Path:
    """Rename ``tmp`` to the next free version; another exporter may race us, so retry on collision."""
    for _ in range(attempts):
        versions = version_dirs(model_dir)
        target = model_dir / str(max(versions, default=0) + 1)
        try:
            # os.rename refuses a non-empty existing target: a concurrent exporter keeps its version.
            os.rename(tmp, target)
        except OSError:
            if target.exists():
                continue
            raise
        with contextlib.suppress(OSError):   # make the rename itself durable (best effort)
            fsync_dir(model_dir)
        log.info("exported %s", target)
        return target
    raise RuntimeError(f"could not find a free version under {model_dir}")
