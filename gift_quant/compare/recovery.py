"""``gift-quant compare``: every method on the same calibration set, training budget and evaluation.

Each (bits, method) is a job (compare/jobs.py): its own subprocess, its result cached in
``REPORT_DIR/runs/w{bits}/{method}/result.json``, so a failing method is reported as failed instead of
ending the comparison and rerunning the command skips finished methods. The report (markdown, CSV, JSON,
PNG plots) is rewritten at the end from every result found. The methods are registered in
compare/methods.py (``--methods``, default all).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import platform
import resource
import sys
import time
from datetime import date
from pathlib import Path

import torch

from ..config.settings import EvalConfig, QuantizeConfig, RecoverConfig, Runtime
from ..model.loading import resolve_device
from ..util.files import atomic_write_text
from ..util.precision import resolve_precision
from .jobs import run_cached_job
from .methods import METHODS, REFERENCE, SALIENT_START, Job, run_order
from .report import claim_settings, package_version, plot_loss_curves

__all__ = ["evaluate_model", "gap_closed", "run_compare", "run_method", "write_report"]


# ------------------------------------------------------------------ one method (runs in a subprocess)


def evaluate_model(model, tokenizer, ecfg: EvalConfig, tasks: list[str], limit: int | None,
                   runtime: Runtime = Runtime(progress=False)) -> dict:
    from ..workflows.stages import evaluate_perplexity

    ppl = evaluate_perplexity(model, tokenizer, ecfg, runtime)
    out = {"ppl": ppl["perplexity"], "window_nll": ppl["window_nll"]}  # per window: paired comparisons
    if tasks:
        from ..eval.zeroshot import evaluate_tasks

        zs = evaluate_tasks(model, tokenizer, tasks, limit=limit, batch_size=8, device=resolve_device(runtime.device),
                            seed=0)
        out["zeroshot"] = zs
    return out


def _dir_size(path: Path) -> int:
    """Bytes of the deployable weights: safetensors files, not the run/ stage artifacts beside them."""
    path = Path(path)
    if not path.exists():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*.safetensors") if "run" not in f.relative_to(path).parts)


def run_method(method: str, model_dir: str | None, root: Path, qcfg: QuantizeConfig, rcfg: RecoverConfig,
               ecfg: EvalConfig, tasks: list[str], limit: int | None,
               runtime: Runtime = Runtime(progress=False)) -> dict:
    """Run one registered method end to end in this process; returns its result row."""
    from ..model.loading import load_tokenizer, resolve_model_dir

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    src = resolve_model_dir(model_dir)
    job = Job(method, model_dir, src, Path(root), qcfg, rcfg, ecfg, load_tokenizer(src), runtime,
              {"method": method, "bits": qcfg.bits})
    job.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, bits, ckpt = METHODS[method].build(job)
    model.eval()
    row = job.row
    row.update(job.timed("eval", evaluate_model, model.to(job.device), job.tokenizer, ecfg, tasks, limit, runtime))
    size = _dir_size(ckpt) + sum(_dir_size(job.root / m / "ckpt") for m in METHODS[method].size_includes)
    row.update({"effective_bits": bits, "size_mb": size / 2**20, "seconds": job.timings,
                "total_seconds": time.perf_counter() - t0,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    if job.device.type == "cuda":
        row["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    metrics = job.work / "train" / "metrics.jsonl"
    if metrics.is_file():
        row["loss_curve"] = [json.loads(line)["loss"] for line in metrics.read_text().splitlines() if line]
    return row


# ------------------------------------------------------------------ orchestration + report


def run_compare(model_dir: str | None, report_dir: Path, bits_list: list[int], methods: list[str],
                qcfg: QuantizeConfig, rcfg: RecoverConfig, ecfg: EvalConfig, tasks: list[str],
                limit: int | None, runtime: Runtime = Runtime()) -> dict:
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    # a report covers several bit widths (--bits 2 3 4, or more added later): the shared settings are the
    # rest; each job's own job.json carries its complete configs, bits included
    shared = {"model_dir": model_dir, "quantize": {k: v for k, v in dataclasses.asdict(qcfg).items() if k != "bits"},
              "recover": dataclasses.asdict(rcfg), "eval": dataclasses.asdict(ecfg), "tasks": tasks, "limit": limit}
    # what the precision resolves to here, not "auto": a report continued where auto means another precision
    # is refused by claim_settings instead of mixing bf16 and fp32 rows in one table
    shared["recover"]["precision"] = resolve_precision(rcfg.precision, resolve_device(runtime.device)).name
    claim_settings(report_dir / "settings.json", shared, report_dir)
    ordered = run_order(methods)
    jobs = [(b, m) for b in bits_list for m in ordered if METHODS[m].per_bit_width or b == bits_list[0]]
    from tqdm.auto import tqdm

    # each job runs without bars of its own (it is a subprocess); this loop shows the comparison's progress
    job_runtime = dataclasses.replace(runtime, progress=False)
    for bits, method in tqdm(jobs, desc="compare", unit="method", disable=not runtime.progress):
        root = report_dir / "runs" / (f"w{bits}" if METHODS[method].per_bit_width else method)
        job = {"mode": "recovery", "method": method, "bits": bits, "root": str(root), "model_dir": model_dir,
               "quantize": dataclasses.asdict(dataclasses.replace(qcfg, bits=bits)),
               "recover": dataclasses.asdict(rcfg), "eval": dataclasses.asdict(ecfg), "tasks": tasks, "limit": limit,
               "runtime": dataclasses.asdict(job_runtime)}
        run_cached_job(job, root / method)
    return write_report(report_dir, " ".join(sys.argv))


def _collect(report_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((report_dir / "runs").glob("*/*/result.json"))]


def _mean_zs(row: dict):
    zs = row.get("zeroshot")
    return None if not zs else zs.get("mean")  # headline: acc_norm where lm-eval defines it (eval/zeroshot.py)


def write_report(report_dir: Path, command: str) -> dict:
    rows = _collect(report_dir)
    versions = {"gift-quant": package_version("gift-quant"), "torch": torch.__version__,
                "transformers": package_version("transformers"), "peft": package_version("peft"),
                "gptqmodel": package_version("gptqmodel"), "lm-eval": package_version("lm_eval")}
    doc = {"date": str(date.today()), "command": command, "machine": platform.platform(),
           "cpus": torch.get_num_threads(), "versions": versions, "rows": rows}
    atomic_write_text(report_dir / "report.json", json.dumps(doc, indent=1, default=str))
    fields = ["bits", "method", "effective_bits", "ppl", "gap_closed", "zeroshot_mean", "size_mb", "total_seconds",
              "peak_rss_mb", "failed"]
    gaps = {id(r): g for r in rows if (g := gap_closed(r, rows)) is not None}
    with open(report_dir / "report.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            extra = {"zeroshot_mean": _mean_zs(r), "gap_closed": gaps.get(id(r))}
            w.writerow({k: extra[k] if k in extra else r.get(k) for k in fields})
    lines = [f"# gift-quant compare ({doc['date']})", "", f"Command: `{command}`", "",
             "Gap closed: (ppl of the untrained GPTQ + salient start - ppl) / (that - full-precision ppl), "
             "for methods trained from that start.", "",
             "| bits | method | eff. bits | perplexity | gap closed | zero-shot mean | size (MB) | time (s) | "
             "peak RSS (MB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r.get("method") != REFERENCE, r.get("bits", 0), _order(r.get("method")))):
        if "failed" in r:
            lines.append(f"| {r['bits']} | {r['method']} | failed: {r['failed'][:80]} | | | | | | |")
            continue
        zs, gap = _mean_zs(r), gaps.get(id(r))
        width = "fp" if r["method"] == REFERENCE else r["bits"]
        lines.append(f"| {width} | {r['method']} | {r['effective_bits']:.3f} | "
                     f"{r['ppl']:.3f} | {'' if gap is None else f'{100 * gap:.1f} %'} | "
                     f"{'' if zs is None else f'{zs:.4f}'} | {r['size_mb']:.1f} | "
                     f"{r['total_seconds']:.0f} | {r['peak_rss_mb']:.0f} |")
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), "",
              "![perplexity by method](ppl_by_method.png)", "", "![perplexity vs effective bits](ppl_vs_bits.png)", "",
              "![training loss](loss_curves.png)", ""]
    atomic_write_text(report_dir / "report.md", "\n".join(lines))
    _plots(report_dir, rows)
    return doc


def gap_closed(row: dict, rows: list[dict]) -> float | None:
    """Share of the gap between the untrained start (owq) and full precision that a trained method closed."""
    method = METHODS.get(row.get("method"))
    if method is None or not method.trains or "failed" in row or row.get("ppl") is None:
        return None
    fp = next((r for r in rows if r.get("method") == REFERENCE and "failed" not in r), None)
    start = next((r for r in rows if r.get("method") == SALIENT_START and r.get("bits") == row.get("bits")
                  and "failed" not in r), None)
    if fp is None or start is None or start["ppl"] <= fp["ppl"]:
        return None
    return (start["ppl"] - row["ppl"]) / (start["ppl"] - fp["ppl"])


def _order(method):
    return list(METHODS).index(method) if method in METHODS else 99


def _plots(report_dir: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "failed" not in r and r.get("ppl") and math.isfinite(r["ppl"])]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in sorted({r["method"] for r in ok}, key=_order):
        pts = sorted((r["effective_bits"], r["ppl"]) for r in ok if r["method"] == method)
        if method == REFERENCE:
            ax.axhline(pts[0][1], color="k", ls="--", lw=1, label="full precision")
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set_xlabel("effective bits per weight (scales, zeros, salient columns included)")
    ax.set_ylabel("perplexity (lower is better)")
    ppls = [r["ppl"] for r in ok]
    if ppls and max(ppls) / min(ppls) > 3:
        ax.set_yscale("log")
    low_bits = [r["effective_bits"] for r in ok if r["method"] != REFERENCE]
    if low_bits:
        ax.set_xlim(min(low_bits) - 0.25, min(max(low_bits), 9) + 0.25)  # LoRA on tiny models can exceed this
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(report_dir / "ppl_vs_bits.png", dpi=120)
    plt.close(fig)
    _bars(report_dir / "ppl_by_method.png", ok)
    plot_loss_curves(report_dir / "loss_curves.png",
                     {f"w{r['bits']} {r['method']}": r["loss_curve"] for r in ok if r.get("loss_curve")})


def _bars(path: Path, ok: list[dict]) -> None:
    """One panel per bit width: a bar per method (log perplexity), labelled with value and effective bits."""
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fp = next((r["ppl"] for r in ok if r["method"] == REFERENCE), None)
    widths = sorted({r["bits"] for r in ok if r["method"] != REFERENCE})
    if not widths:
        return
    fig, axes = plt.subplots(1, len(widths), figsize=(4.2 * len(widths), 0.45 * len(METHODS) + 1.2), squeeze=False)
    for ax, bits in zip(axes[0], widths):
        rs = sorted((r for r in ok if r["bits"] == bits and r["method"] != REFERENCE),
                    key=lambda r: _order(r["method"]))
        ys = range(len(rs))
        colors = ["tab:green" if r["method"].startswith("gift") else "tab:gray" for r in rs]
        ax.barh(list(ys), [r["ppl"] for r in rs], color=colors)
        ax.set_yticks(list(ys), [r["method"] for r in rs])
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # narrow ranges label minor ticks too
        for y, r in zip(ys, rs):
            ax.text(r["ppl"], y, f" {r['ppl']:.1f} ({r['effective_bits']:.2f} b)", va="center", fontsize=7)
        if fp is not None:
            ax.axvline(fp, color="k", ls="--", lw=1)
        ax.set_title(f"{bits}-bit (dashed: full precision {fp:.1f})" if fp else f"{bits}-bit", fontsize=9)
        ax.set_xlabel("perplexity, log scale (lower is better)")
        ax.margins(x=0.35)
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
