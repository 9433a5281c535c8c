"""``gift-quant compare``: every method on the same calibration set, training budget and evaluation.

Each (bits, method) runs in its own subprocess (``python -m gift_quant.compare.recovery _method ...``), so a
failing method is reported as failed instead of ending the comparison, and peak memory is the
method's own. Results are cached per method in ``REPORT_DIR/runs/w{bits}/{method}/result.json``;
rerunning the command skips finished methods. The report (markdown, CSV, JSON, PNG plots) is
rewritten at the end from every result found.

Methods (``--methods``, default all):
  fp            full-precision reference (no quantization)
  rtn           round-to-nearest, K = 0
  gptq          gift-quant GPTQ, K = 0
  gptq-peer     GPTQModel's GPTQ (the peer; needs the [peers] extra), K = 0
  gptq-matched  GPTQ, K = 0, with the smallest group size whose effective bits reach GIFT-SW's
  owq           GPTQ + salient columns, no training (OWQ / QUIK style)
  salient-ft    post-quantization salient fine-tuning without noise (ablation)
  gift-post     GIFT-SW post (noise at --noise-bits, 4 by default)
  gift-pre      GIFT-SW pre (train with noise at the target bits, then quantize)
  ste           STE quantization-aware training of all weights, salient columns in full precision
  quik-lora     LoRA rank 64 on the frozen GPTQ + salient model
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

from ..config.settings import EvalConfig, QuantizeConfig, RecoverConfig
from ..util.files import atomic_write_text
from .report import claim_settings, package_version, plot_loss_curves

METHODS = ("fp", "rtn", "gptq", "gptq-peer", "gptq-matched", "owq", "salient-ft", "gift-post", "gift-pre",
           "ste", "quik-lora")
TRAINED = ("salient-ft", "gift-post", "gift-pre", "ste", "quik-lora")


# ------------------------------------------------------------------ one method (runs in a subprocess)


def _eval(model, tokenizer, ecfg: EvalConfig, tasks: list[str], limit: int | None, device) -> dict:
    from ..workflows.stages import evaluate_perplexity

    ppl = evaluate_perplexity(model, tokenizer, ecfg, device, progress=False)
    out = {"ppl": ppl["perplexity"], "window_nll": ppl["window_nll"]}  # per window: paired comparisons
    if tasks:
        from ..eval.zeroshot import evaluate_tasks

        zs = evaluate_tasks(model, tokenizer, tasks, limit=limit, batch_size=8, device=device, seed=0)
        out["zeroshot"] = zs
    return out


def _dir_size(path: Path) -> int:
    """Bytes of the deployable weights: safetensors files, not the run/ stage artifacts beside them."""
    path = Path(path)
    if not path.exists():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*.safetensors") if "run" not in f.relative_to(path).parts)


def run_method(method: str, model_dir: str | None, root: Path, qcfg: QuantizeConfig, rcfg: RecoverConfig,
               ecfg: EvalConfig, tasks: list[str], limit: int | None) -> dict:
    """Run one method (compare_methods.METHOD_TABLE) end to end in this process; returns its result row."""
    from ..model.loading import load_tokenizer, resolve_device, resolve_model_dir
    from .methods import METHOD_TABLE, Job

    if method not in METHOD_TABLE:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    src = resolve_model_dir(model_dir)
    job = Job(method, model_dir, src, Path(root), qcfg, rcfg, ecfg, load_tokenizer(src), resolve_device(qcfg.device),
              {"method": method, "bits": qcfg.bits})
    job.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, bits, ckpt = METHOD_TABLE[method](job)
    model.eval()
    row = job.row
    row.update(job.timed("eval", _eval, model.to(job.device), job.tokenizer, ecfg, tasks, limit, job.device))
    size = _dir_size(ckpt) + (_dir_size(job.salient_base) if method == "quik-lora" else 0)  # adapter + its base
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
                limit: int | None, progress: bool = True) -> dict:
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    # bits vary per job (--bits 2 3 4, or added later with another --bits): not part of the shared settings
    quantize = {k: v for k, v in dataclasses.asdict(qcfg).items() if k != "bits"}
    settings = {"model_dir": model_dir, "quantize": quantize, "recover": dataclasses.asdict(rcfg),
                "eval": dataclasses.asdict(ecfg), "tasks": tasks, "limit": limit}
    claim_settings(report_dir / "settings.json", settings, report_dir)
    # owq first: the trained methods start from its checkpoint and gptq-matched reads its bits
    ordered = sorted(methods, key=lambda m: (m != "owq", METHODS.index(m)))
    if any(m in ordered for m in (*TRAINED[:2], "ste", "quik-lora", "gptq-matched")) and "owq" not in ordered:
        ordered.insert(0, "owq")
    jobs = [(b, m) for b in bits_list for m in ordered if not (m == "fp" and b != bits_list[0])]
    from tqdm.auto import tqdm

    for bits, method in tqdm(jobs, desc="compare", unit="method", disable=not progress):
        root = report_dir / "runs" / ("fp" if method == "fp" else f"w{bits}")
        result = root / method / "result.json"
        if result.is_file():
            continue
        (root / method).mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "gift_quant.compare.recovery", "_method", method, "--bits", str(bits),
               "--root", str(root), "--settings", str(report_dir / "settings.json")]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not result.is_file():
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            atomic_write_text(result, json.dumps({"method": method, "bits": bits, "failed": err,
                                                  "total_seconds": time.perf_counter() - t0}))
            (root / method / "stderr.txt").write_text(proc.stderr[-20000:])
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
    for r in sorted(rows, key=lambda r: (r.get("method") != "fp", r.get("bits", 0), _order(r.get("method")))):
        if "failed" in r:
            lines.append(f"| {r['bits']} | {r['method']} | failed: {r['failed'][:80]} | | | | | | |")
            continue
        zs, gap = _mean_zs(r), gaps.get(id(r))
        lines.append(f"| {'fp' if r['method'] == 'fp' else r['bits']} | {r['method']} | {r['effective_bits']:.3f} | "
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
    if row.get("method") not in TRAINED or "failed" in row or row.get("ppl") is None:
        return None
    fp = next((r for r in rows if r.get("method") == "fp" and "failed" not in r), None)
    start = next((r for r in rows if r.get("method") == "owq" and r.get("bits") == row.get("bits")
                  and "failed" not in r), None)
    if fp is None or start is None or start["ppl"] <= fp["ppl"]:
        return None
    return (start["ppl"] - row["ppl"]) / (start["ppl"] - fp["ppl"])


def _order(method):
    return METHODS.index(method) if method in METHODS else 99


def _plots(report_dir: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "failed" not in r and r.get("ppl") and math.isfinite(r["ppl"])]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in sorted({r["method"] for r in ok}, key=_order):
        pts = sorted((r["effective_bits"], r["ppl"]) for r in ok if r["method"] == method)
        if method == "fp":
            ax.axhline(pts[0][1], color="k", ls="--", lw=1, label="full precision")
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set_xlabel("effective bits per weight (scales, zeros, salient columns included)")
    ax.set_ylabel("perplexity (lower is better)")
    ppls = [r["ppl"] for r in ok]
    if ppls and max(ppls) / min(ppls) > 3:
        ax.set_yscale("log")
    low_bits = [r["effective_bits"] for r in ok if r["method"] != "fp"]
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

    fp = next((r["ppl"] for r in ok if r["method"] == "fp"), None)
    widths = sorted({r["bits"] for r in ok if r["method"] != "fp"})
    if not widths:
        return
    fig, axes = plt.subplots(1, len(widths), figsize=(4.2 * len(widths), 0.45 * len(METHODS) + 1.2), squeeze=False)
    for ax, bits in zip(axes[0], widths):
        rs = sorted((r for r in ok if r["bits"] == bits and r["method"] != "fp"), key=lambda r: _order(r["method"]))
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


def _method_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("method")
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--settings", required=True)
    a = ap.parse_args(argv)
    s = json.loads(Path(a.settings).read_text())
    if a.method.startswith("peft:"):
        from .peft import run_peft_method

        _, method, lr, phase = a.method.split(":")
        t0 = time.perf_counter()
        row = run_peft_method(method, float(lr), s["model_dir"], Path(a.root), QuantizeConfig(**s["quantize"]),
                              RecoverConfig(**s["recover"]), s["tasks"], s["limit"], final=phase == "final")
        row["total_seconds"] = time.perf_counter() - t0
        out = Path(a.root) / a.method.replace(":", "_") / "result.json"
        atomic_write_text(out, json.dumps(row, indent=1, default=str))
        return 0
    qcfg = dataclasses.replace(QuantizeConfig(**s["quantize"]), bits=a.bits)
    rcfg, ecfg = RecoverConfig(**s["recover"]), EvalConfig(**s["eval"])
    row = run_method(a.method, s["model_dir"], Path(a.root), qcfg, rcfg, ecfg, s["tasks"], s["limit"])
    atomic_write_text(Path(a.root) / a.method / "result.json", json.dumps(row, indent=1, default=str))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_method":
        from ..util.console import quiet_import_noise

        quiet_import_noise()
        sys.exit(_method_main(sys.argv[2:]))
