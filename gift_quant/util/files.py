"""Where materialized assets (default model, named datasets) live, and atomic directory writes."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import writing

CACHE_ENV = "GIFT_QUANT_CACHE"


def cache_dir() -> Path:
    """``$GIFT_QUANT_CACHE`` or ``~/.cache/gift-quant``; created on demand."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gift-quant")
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    # Linux reports it without changing it; os.umask can only read by setting (racy with other threads)
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    current = os.umask(0o022)
    os.umask(current)
    return current


def publish_mode(path: Path, is_dir: bool) -> None:
    """Give a temp file/folder the permissions a plain open()/mkdir() would have (mkstemp/mkdtemp make
    them private, 0600/0700, which an inference server running as another user cannot read)."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_dir(final: Path, need_bytes: int | None = None):
    """Yield a temp dir beside ``final``; on success rename it into place (replacing nothing).

    An interrupted write leaves only a ``.tmp-*`` folder that the next attempt ignores and removes.
    A disk fault inside the block (full, read-only, permission) becomes one GiftQuantError naming
    ``final`` (``need_bytes``: about how much the block writes, shown when the disk is full).
    """
    final = Path(final)
    with writing(final, need_bytes):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        publish_mode(tmp, is_dir=True)
        try:
            yield tmp
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, need_bytes: int | None = None):
    """Yield a temp file path beside ``path``; on success it replaces ``path`` (the one temp-then-rename).

    Readers see the old file or the new one, never a partial one; a failed write (disk full, Ctrl-C)
    leaves no temp behind, and a disk fault becomes one GiftQuantError naming ``path``.
    """
    path = Path(path)
    with writing(path, need_bytes):
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            publish_mode(Path(tmp), is_dir=False)
            yield Path(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path, len(data)) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written atomically (contiguous copies of the tensors are saved)."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    with atomic_path(path, sum(v.numel() * v.element_size() for v in tensors.values())) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


__all__ = ["CACHE_ENV", "atomic_dir", "atomic_path", "atomic_save_tensors", "atomic_write_bytes", "atomic_write_text",
           "cache_dir", "publish_mode", "sha256_file"]
