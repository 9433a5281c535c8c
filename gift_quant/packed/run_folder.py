"""Run folders: the output folder's identity, resume, and the record of finished stages.

An output folder of ``quantize``/``recover``/``finetune`` holds the result and a ``run/`` folder with
the stage artifacts (``run.json``: settings and fingerprints; ``stages.json``: finished stages with
their results). Rerunning the same command resumes; a different model, calibration set or setting is
refused instead of mixing two runs.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ..util.errors import GiftQuantError, writing
from ..util.files import atomic_write_text, sha256_file
from .checkpoint import CONFIG_NAME, is_checkpoint

__all__ = ["FILES_NAME", "KEPT_AFTER_SUCCESS", "RUN_DIR", "RUN_FILE", "RunFiles", "Stages", "check_blocks",
           "check_stage_checkpoint", "claim_run", "lock_output", "model_fingerprint", "prepare_output", "record_blocks",
           "remove_intermediate", "tool_version", "warn"]

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
    path = out.parent / f".{out.name}.gift-quant.lock"
    with writing(out, action="--out"):  # a read-only or unwritable place fails here, before any work
        out.parent.mkdir(parents=True, exist_ok=True)
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
    # temporary folders of killed runs (atomic writes that never reached their rename) are ours to remove:
    # inside the folder, and beside it (an atomic_dir write of the folder itself: export, ``.tmp-NAME-*``)
    # (exactly mkdtemp's 8 characters after the prefix: ``.tmp-NAME-2-xxxxxxxx`` belongs to the folder NAME-2)
    beside = [p for p in out.parent.glob(f".tmp-{out.name}-*")
              if re.fullmatch(r"[a-z0-9_]{8}", p.name[len(f".tmp-{out.name}-"):])]
    stale = beside + ([*out.rglob(".tmp-*")] if out.is_dir() else [])
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _existing(out: Path, overwrite: bool) -> bool:
    """Whether ``out`` is an earlier gift-quant output; refuses a file, a foreign folder, and (``overwrite``)
    one holding files gift-quant did not write. Reads only."""
    from .ownership import refuse_foreign

    if not out.exists():
        return False
    if not out.is_dir():
        raise GiftQuantError(f"--out {out} is a file; give a folder path")
    ours = (out / RUN_DIR / RUN_FILE).is_file() or is_checkpoint(out)
    if any(out.iterdir()) and not ours:
        raise GiftQuantError(f"--out {out} exists and is not a gift-quant output; choose a new folder or empty it")
    if overwrite and ours:
        refuse_foreign(out)
    return ours


def prepare_output(out: Path, overwrite: bool, lock: bool = True, inputs: dict | None = None) -> None:
    """Refuse an ``out`` that overlaps an input (``inputs``: label -> path, ownership.check_inputs), that is not
    a gift-quant output, or (``overwrite``) that holds files gift-quant did not write, all before anything is
    created; then lock it for this process and, with ``overwrite``, remove gift-quant's files only."""
    from .ownership import check_inputs, remove_owned

    check_inputs(out, inputs or {})
    _existing(out, overwrite)
    if lock:
        lock_output(out)
    if _existing(out, overwrite) and overwrite:  # checked again holding the lock
        remove_owned(out)


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
        with writing(run_dir):
            run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_file, json.dumps({"identity": identity, "started": time.time()}, indent=1))
    return run_dir


# What a finished run keeps in run/: its identity, its stage record, its training curve.
KEPT_AFTER_SUCCESS = ("run.json", "stages.json", "recover/metrics.jsonl", "train/metrics.jsonl", "salient.safetensors",
                      "files.json")


def remove_intermediate(run_dir: Path) -> int:
    """Delete the resumable state of ``run_dir`` (stage checkpoints, per-block results, optimizer state).

    Keeps `KEPT_AFTER_SUCCESS` and anything gift-quant did not write there (ownership.py); returns the bytes
    freed. The output beside run/ is untouched.
    """
    from .ownership import owned_files

    run_dir = Path(run_dir)
    keep = {run_dir / k for k in KEPT_AFTER_SUCCESS}
    ours = [p for p in owned_files(run_dir.parent)[0] if run_dir in p.parents and p not in keep]
    freed = 0
    for path in ours:
        if path.is_dir() and not path.is_symlink():  # a .tmp-* folder of a killed write
            freed += sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
            shutil.rmtree(path)
        else:
            freed += path.stat().st_size
            path.unlink()
    emptied = {q for p in ours for q in p.parents if run_dir in q.parents}
    for path in sorted(emptied, key=lambda p: len(p.parts), reverse=True):  # the folders that held only ours
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
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

    def drop(self, name: str) -> None:
        """Un-finish ``name`` (its artifact failed its check and is recomputed)."""
        if self.done.pop(name, None) is not None:
            atomic_write_text(self.path, json.dumps(self.done, indent=1, default=str))


# ---------------------------------------------------------------- integrity of the resumable state
#
# run/ is a cache of deterministic computations (resume is byte-identical to an uninterrupted run), so a
# resumable item that fails its check (truncated, flipped bytes, missing, or never recorded) is discarded
# and recomputed with a one-line warning, rather than refused: recomputing gives the very result an
# uninterrupted run gives, while a refusal would leave the user only --overwrite, which recomputes more.
# What must never happen is loading it: that gives a silently different final checkpoint.

FILES_NAME = "files.json"


def warn(message: str) -> None:
    print(f"gift-quant: warning: {message}", file=sys.stderr, flush=True)


class RunFiles:
    """``run/files.json``: the sha256 of each resumable file, recorded after the file is in place.

    The record is written atomically after the files it names, so a recorded file was complete when
    recorded; a file that is not recorded (the run was killed in between) cannot be trusted.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / FILES_NAME
        try:
            doc = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (OSError, ValueError):
            doc = {}  # a damaged record trusts nothing: every item is recomputed
        self.files: dict[str, str] = doc if isinstance(doc, dict) else {}

    def _key(self, path: Path) -> str:
        return str(Path(path).relative_to(self.run_dir))

    def record(self, paths) -> None:
        for p in paths:
            self.files[self._key(p)] = sha256_file(p)
        atomic_write_text(self.path, json.dumps(self.files, indent=1, sort_keys=True))

    def forget(self, paths) -> None:
        paths = list(paths)
        for p in paths:
            Path(p).unlink(missing_ok=True)
            self.files.pop(self._key(p), None)
        atomic_write_text(self.path, json.dumps(self.files, indent=1, sort_keys=True))

    def problem(self, paths) -> str | None:
        """Why ``paths`` cannot be trusted (the first file that fails), or None when all match their record."""
        for p in paths:
            key = self._key(p)
            if not Path(p).is_file():
                return f"{p} is missing"
            if key not in self.files:
                return f"{p} has no recorded sha256 (the run was stopped before recording it)"
            if sha256_file(p) != self.files[key]:
                return f"{p} does not match the sha256 recorded when it was written (truncated or changed)"
        return None


def _block_items(run_dir: Path) -> dict[int, list[Path]]:
    """The quantize engine's finished blocks (block_NNN.json present) -> their files (engine._block_files)."""
    items = {}
    for marker in sorted((run_dir / "blocks").glob("block_[0-9][0-9][0-9].json")):
        i = int(marker.stem.split("_")[1])
        items[i] = [run_dir / "blocks" / f"block_{i:03d}.safetensors", run_dir / "sensitivity" /
                    f"block_{i:03d}.safetensors", marker]  # the marker last: deleting it first un-finishes the block
    return items


def check_blocks(run_dir: Path) -> None:
    """Before the engine resumes: discard every finished block whose files fail their record (see above)."""
    files = RunFiles(run_dir)
    for i, paths in _block_items(Path(run_dir)).items():
        why = files.problem(paths)
        if why is not None:
            warn(f"{why}; recomputing block {i}")
            files.forget([paths[-1], *paths[:-1]])


def record_blocks(run_dir: Path) -> None:
    """After the engine stops (finished, failed or interrupted): record the finished blocks not yet recorded."""
    files = RunFiles(run_dir)
    new = [p for paths in _block_items(Path(run_dir)).values() if all(p.is_file() for p in paths)
           for p in paths if str(p.relative_to(run_dir)) not in files.files]
    if new:
        files.record(new)


def check_stage_checkpoint(path: Path) -> str | None:
    """Why the stage checkpoint at ``path`` (a native checkpoint under run/) cannot be used, or None."""
    if not (Path(path) / CONFIG_NAME).is_file():
        return f"{path} is missing or incomplete"
    from .checkpoint import verify_checkpoint

    try:
        verify_checkpoint(path)
    except GiftQuantError as exc:
        return str(exc).split(";")[0]
    return None
