"""User-facing errors: the CLI prints their message on one line and exits non-zero, no traceback.

`os_error` turns an environment fault (disk full, read-only or unwritable folder, permission denied)
into one of them, naming the path and the cause; `writing` wraps a write site with it. Every write of
a command goes through `writing` (directly, or through cache.atomic_write_bytes / atomic_dir).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil

__all__ = ["GiftQuantError", "os_error", "writing"]


class GiftQuantError(Exception):
    """A problem with the user's input or environment, with a message saying what to do."""


_CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied (the folder is not writable by this user)",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder, not a file",
    errno.ELOOP: "too many levels of symbolic links (a symlink loop)",
    errno.EIO: "input/output error (a failing disk or a network file system)",
}
_ADVICE = {
    errno.ENOSPC: "free some space or choose --out on another disk",
    errno.EDQUOT: "free some space or choose --out on another disk",
    errno.EROFS: "choose --out on a writable disk",
    errno.EACCES: "choose a folder you can write to, or fix its permissions",
    errno.EPERM: "choose a folder you can write to, or fix its permissions",
}
# torch.save and safetensors report a full disk as a RuntimeError / SafetensorError, not an OSError
# (torch: `enforce fail at inline_container.cc ... file write failed`)
_DISK_FULL_TEXT = ("No space left on device", "StorageFull", "file write failed", "PytorchStreamWriter failed writing")


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MB"


def os_error(exc: BaseException, path: str | os.PathLike, action: str = "writing",
             need_bytes: int | None = None) -> GiftQuantError:
    """One line naming ``path`` and the cause of ``exc``; for a full disk, what is free and what the write needs."""
    code = getattr(exc, "errno", None)
    if code is None and any(t in str(exc) for t in _DISK_FULL_TEXT):
        code = errno.ENOSPC
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    cause = _CAUSES.get(code) or getattr(exc, "strerror", None) or text or type(exc).__name__
    # the library's file name is more precise, unless it is one of our temporary names (.tmp-*, .NAME.xyz)
    named = getattr(exc, "filename", None)
    where = named if named and not os.path.basename(os.fspath(named)).startswith(".") else path
    msg = f"{action} {os.fspath(where) if where else ''}".strip()
    msg = f"{msg}: {cause}" if msg else cause
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = None
        with contextlib.suppress(OSError):
            probe = os.fspath(path)
            while probe and not os.path.exists(probe):
                probe = os.path.dirname(probe)
            free = shutil.disk_usage(probe or ".").free
        parts = []
        if need_bytes:
            parts.append(f"this step writes about {_mb(need_bytes)}")
        if free is not None:
            parts.append(f"{_mb(free)} free")
        if parts:
            msg += f" ({', '.join(parts)})"
    advice = _ADVICE.get(code)
    return GiftQuantError(f"{msg}; {advice}" if advice else msg)


def _is_disk_fault(exc: BaseException) -> bool:
    """An OSError, or a library's error that reports a failed write (torch.save, safetensors on a full disk)."""
    return isinstance(exc, OSError) or any(t in str(exc) for t in _DISK_FULL_TEXT)


@contextlib.contextmanager
def writing(path: str | os.PathLike, need_bytes: int | None = None, action: str = "writing"):
    """Turn an environment fault raised inside the block into a one-line GiftQuantError naming ``path``."""
    try:
        yield
    except GiftQuantError:
        raise
    except Exception as exc:  # re-raised unchanged unless it is an environment fault
        if not _is_disk_fault(exc):
            raise
        raise os_error(exc, path, action, need_bytes) from None
