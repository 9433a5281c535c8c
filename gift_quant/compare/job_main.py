"""The subprocess side of a compare job: ``python -m gift_quant.compare.job_main JOB.json`` runs the job in it.

It writes ``result.json`` beside the job file; compare/jobs.py starts it and reads that result.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..config.settings import EvalConfig, QuantizeConfig, RecoverConfig
from ..util.files import atomic_write_text

__all__ = ["run_job_file"]


def run_job_file(job_file: Path) -> int:
    """The subprocess side: run the job described in ``job_file`` and write ``result.json`` beside it."""
    job = json.loads(job_file.read_text())
    qcfg, rcfg = QuantizeConfig(**job["quantize"]), RecoverConfig(**job["recover"])
    t0 = time.perf_counter()
    if job["mode"] == "peft":
        from .peft import run_peft_method

        row = run_peft_method(job["method"], job["lr"], job["model_dir"], Path(job["root"]), qcfg, rcfg,
                              job["tasks"], job["limit"], final=job["final"])
        row["total_seconds"] = time.perf_counter() - t0
    else:
        from .recovery import run_method

        row = run_method(job["method"], job["model_dir"], Path(job["root"]), qcfg, rcfg, EvalConfig(**job["eval"]),
                         job["tasks"], job["limit"])
    atomic_write_text(job_file.parent / "result.json", json.dumps(row, indent=1, default=str))
    return 0


if __name__ == "__main__":
    from ..util.console import quiet_import_noise

    quiet_import_noise()
    sys.exit(run_job_file(Path(sys.argv[1])))
