"""Run folders: the output folder's identity, resume, and the record of finished stages.

An output folder of ``quantize``/``recover``/``finetune`` holds the result and a ``run/`` folder with
the stage artifacts (``run.json``: settings and fingerprints; ``stages.json``: finished stages with
their results). Rerunning the same command resumes; a different model, calibration set or setting is
refused instead of mixing two runs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .cache import atomic_write_text
from .checkpoint import is_checkpoint
from .errors import GiftQuantError

RUN_DIR = "run"
RUN_FILE = "run.json"


def tool_version() -> str:
    try:
        return version("gift-quant")
    except PackageNotFoundError:
        return "0+unknown"


def model_fingerprint(path: Path) -> str:
    """sha256 over config.json and the weight files (names, sizes and contents)."""
    h = hashlib.sha256()
    files = [path / "config.json"] + sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    for f in files:
        if f.is_file():
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    h.update(chunk)
    return h.hexdigest()[:16]


_LOCKS: dict[str, object] = {}  # held open for the life of the process; the OS releases them at exit or kill


def lock_output(out: Path) -> None:
    """One writer per output folder: an advisory lock beside ``out``, held until this process ends.

    A second run into the same folder is refused, naming the process that holds it. The lock file lives
    beside the folder (``.NAME.gift-quant.lock``) so that ``--overwrite`` can delete the folder itself.
    """
    import fcntl
    import os

    out = Path(out).resolve()
    key = str(out)
    if key in _LOCKS:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f".{out.name}.gift-quant.lock"
    fh = open(path, "a+")  # noqa: SIM115 - kept open on purpose: closing it releases the lock
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise GiftQuantError(f"--out {out} is being written by {holder}: wait for it to finish (or stop it), "
                             "or choose another --out") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"gift-quant process {os.getpid()}")
    fh.flush()
    _LOCKS[key] = fh
    # temporary folders of killed runs (atomic writes that never reached their rename) are ours to remove
    if out.is_dir():
        for stale in out.rglob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def prepare_output(out: Path, overwrite: bool, lock: bool = True) -> None:
    """Lock ``out`` for this process; refuse folders that hold something else; ``overwrite`` clears ours."""
    if lock:
        lock_output(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise GiftQuantError(f"--out {out} is a file; give a folder path")
    ours = (out / RUN_DIR / RUN_FILE).is_file() or is_checkpoint(out)
    if any(out.iterdir()) and not ours:
        raise GiftQuantError(
            f"--out {out} exists and is not a gift-quant output; choose a new folder or empty it")
    if overwrite and ours:
        shutil.rmtree(out)


def claim_run(out: Path, identity: dict) -> Path:
    """Create or resume ``out/run``; refuses to mix runs whose identity differs."""
    run_dir = out / RUN_DIR
    run_file = run_dir / RUN_FILE
    if run_file.is_file():
        previous = json.loads(run_file.read_text())
        if previous.get("identity") != identity:
            old = previous.get("identity", {})
            changed = []
            for k in sorted(set(old) | set(identity)):
                a, b = old.get(k), identity.get(k)
                if a == b:
                    continue
                if isinstance(a, dict) and isinstance(b, dict):
                    diffs = [f"{f}: {a.get(f)} -> {b.get(f)}" for f in sorted(set(a) | set(b)) if a.get(f) != b.get(f)]
                    changed.append(f"{k} ({', '.join(diffs)})")
                else:
                    changed.append(k)
            raise GiftQuantError(
                f"{out} holds a run with different {', '.join(changed)}; resume needs the same model, data and "
                "settings: use a new --out or pass --overwrite to start over")
        print(f"gift-quant: resuming the run in {out}", file=sys.stderr)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_file, json.dumps({"identity": identity, "started": time.time()}, indent=1))
    return run_dir


# What a finished run keeps in run/: its identity, its stage record, its training curve.
KEPT_AFTER_SUCCESS = ("run.json", "stages.json", "recover/metrics.jsonl", "train/metrics.jsonl", "salient.safetensors")


def remove_intermediate(run_dir: Path) -> int:
    """Delete the resumable state of ``run_dir`` (stage checkpoints, per-block results, optimizer state).

    Keeps `KEPT_AFTER_SUCCESS`; returns the bytes freed. The output beside run/ is untouched.
    """
    run_dir = Path(run_dir)
    keep = {run_dir / k for k in KEPT_AFTER_SUCCESS}
    freed = 0
    for path in sorted(run_dir.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path in keep or any(k.is_relative_to(path) for k in keep if k.exists()):
            continue
        if path.is_file() or path.is_symlink():
            freed += path.stat().st_size if path.is_file() else 0
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return freed


class Stages:
    """``run/stages.json``: which stages finished, with their results; written atomically."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "stages.json"
        self.done: dict = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def finished(self, name: str) -> bool:
        return name in self.done

    def mark(self, name: str, result: dict) -> None:
        self.done[name] = result
        atomic_write_text(self.path, json.dumps(self.done, indent=1, default=str))
