"""The materialized datasets on disk: one folder per dataset under ``cache_dir()/data/``, built once.

A dataset is built into a temporary folder beside its final one and renamed into place, under a
per-dataset file lock, so readers never see half a dataset and two processes never build the same
one twice. Each folder's ``meta.json`` records `FORMAT_VERSION`; a folder written under another
version is rebuilt, any other is used as it is.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ...util.files import atomic_dir, cache_dir
from .fetch import progress
from .splits import SPLIT_SEED

__all__ = ["FORMAT_VERSION", "data_dir", "ensure", "scratch"]

# Stored in each dataset's meta.json; a cached dataset written under another version is rebuilt.
FORMAT_VERSION = 1


def data_dir(name: str) -> Path:
    return cache_dir() / "data" / name


def _is_current(folder: Path) -> bool:
    try:
        return json.loads((folder / "meta.json").read_text())["format"] == FORMAT_VERSION
    except (OSError, ValueError, KeyError):
        return False


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """Serialize materialization of one dataset across processes (two test runs, two CLI calls)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the atomic rename still keeps readers safe
        yield
        return
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure(name: str, build: Callable[[Path], dict]) -> Path:
    """The folder of dataset ``name``; when missing or stale, ``build(tmp)`` fills a temp folder and
    returns its meta.json fields, and the folder is renamed into place."""
    final = data_dir(name)
    if _is_current(final):
        return final
    with _exclusive(final):
        if _is_current(final):  # another process built it while we waited
            return final
        # Holding the lock, any temp folder of this name is left over from a killed run.
        for stale in final.parent.glob(f".tmp-{name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        progress(f"materializing {name} into {final}")
        start = time.monotonic()
        with atomic_dir(final) as tmp:
            meta = build(tmp)
            meta.update(name=name, format=FORMAT_VERSION, split_seed=SPLIT_SEED)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        progress(f"{name} ready in {time.monotonic() - start:.0f} s")
    return final


@contextlib.contextmanager
def scratch(tmp: Path) -> Iterator[Path]:
    """Download space inside the temp folder, removed before the rename so archives are not kept."""
    work = tmp / ".fetch"
    work.mkdir()
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
