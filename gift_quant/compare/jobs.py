"""Compare's jobs: each method run is a subprocess (job_main.py) that reads its ``job.json`` and writes ``result.json``.

A subprocess per run keeps one method's failure from ending the comparison and makes peak memory the
method's own. ``result.json`` is the cache: a finished job is never rerun, so a comparison resumes and
grows (more methods, more bit widths) with the same settings. Both comparison modes use this runner.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from ..util.files import atomic_write_text

__all__ = ["run_cached_job"]


def run_cached_job(job: dict, work: Path) -> dict:
    """The result row of ``job`` (a JSON-able dict with a ``mode``), run in a subprocess unless cached in ``work``."""
    result = work / "result.json"
    if not result.is_file():
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(work / "job.json", json.dumps(job, indent=1))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "gift_quant.compare.job_main", str(work / "job.json")],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not result.is_file():
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            failed = {k: job[k] for k in ("method", "bits", "lr") if k in job}
            atomic_write_text(result, json.dumps({**failed, "failed": err, "total_seconds": time.perf_counter() - t0}))
            atomic_write_text(work / "stderr.txt", proc.stderr[-20000:])
    return json.loads(result.read_text())
