"""``gift-quant compare``: every method on the same calibration set, training budget and evaluation.

Each (bits, method) runs in its own subprocess (``python -m gift_quant.compare _method ...``), so a
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
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

from .cache import atomic_write_text
from .config import EvalConfig, QuantizeConfig, RecoverConfig
from .errors import GiftQuantError

METHODS = ("fp", "rtn", "gptq", "gptq-peer", "gptq-matched", "owq", "salient-ft", "gift-post", "gift-pre",
           "ste", "quik-lora")
TRAINED = ("salient-ft", "gift-post", "gift-pre", "ste", "quik-lora")
FAIL_ENV = "GIFT_QUANT_TEST_FAIL_METHOD"


# ------------------------------------------------------------------ one method (runs in a subprocess)


def _eval(model, tokenizer, ecfg: EvalConfig, tasks: list[str], limit: int | None, device) -> dict:
    from .eval.perplexity import perplexity
    from .text_sources import load_documents
    from .windows import eval_windows

    docs = load_documents(ecfg.ppl_data, default_split="test")
    windows = eval_windows(tokenizer, docs, ecfg.seq_len, ecfg.max_windows, source=ecfg.ppl_data)
    ppl = perplexity(model, windows, device, progress=False)
    out = {"ppl": ppl["perplexity"], "window_nll": ppl["window_nll"]}  # per window: paired comparisons
    if tasks:
        from .eval.zeroshot import evaluate_tasks

        zs = evaluate_tasks(model, tokenizer, tasks, limit=limit, batch_size=8, device=device, seed=0)
        out["zeroshot"] = zs
    return out


def _dir_size(path: Path) -> int:
    """Bytes of the deployable weights: safetensors files, not the run/ stage artifacts beside them."""
    path = Path(path)
    if not path.exists():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*.safetensors") if "run" not in f.relative_to(path).parts)


def _quantize(model_dir, out: Path, qcfg: QuantizeConfig):
    from .pipeline import quantize_to_checkpoint

    if not (out / "gift_quant_config.json").is_file():
        quantize_to_checkpoint(model_dir, out, qcfg, progress=False)
    from .checkpoint import read_gift_config

    return read_gift_config(out)["effective_bits"]


def _train_and_pack(model, tokenizer, rcfg: RecoverConfig, run_dir: Path, device, src: Path, qcfg: QuantizeConfig):
    from .recover.stage import train_stage

    return train_stage(model, tokenizer, rcfg, run_dir, device, progress=False, teacher_src=src, qcfg=qcfg)


def run_method(method: str, model_dir: str | None, root: Path, qcfg: QuantizeConfig, rcfg: RecoverConfig,
               ecfg: EvalConfig, tasks: list[str], limit: int | None) -> dict:
    """Run one method end to end in this process; returns its result row."""
    from .checkpoint import load, read_gift_config, save_checkpoint
    from .models import load_model, load_tokenizer, parse_dtype, resolve_device, resolve_model_dir
    from .recover.model import convert_to_dense, convert_to_quant, prepare_quantized
    from .recover.qat import convert_qat, prepare_qat

    device = resolve_device(qcfg.device)
    src = resolve_model_dir(model_dir)
    tok = load_tokenizer(src)
    work = root / method
    work.mkdir(parents=True, exist_ok=True)
    k0 = dataclasses.replace(qcfg, salient=0, salient_fraction=0.0)
    salient_base = root / "owq" / "ckpt"
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    row: dict = {"method": method, "bits": qcfg.bits}
    noise_bits = rcfg.resolved_noise_bits(qcfg.bits)

    def timed(stage, fn, *a, **k):
        s = time.perf_counter()
        r = fn(*a, **k)
        timings[stage] = time.perf_counter() - s
        return r

    if os.environ.get(FAIL_ENV) == method:  # lets tests check that failures are reported, not dropped
        raise RuntimeError(f"{method} failed on purpose ({FAIL_ENV})")
    if method == "fp":
        model, bits, ckpt = load_model(src), 32.0, src
    elif method in ("rtn", "gptq", "owq", "gptq-matched"):
        cfg = {"rtn": dataclasses.replace(k0, algorithm="rtn"), "gptq": k0, "owq": qcfg}.get(method)
        if method == "gptq-matched":
            target = json.loads((root / "owq" / "result.json").read_text())["effective_bits"]
            layers = read_gift_config(salient_base)["layers"]
            cfg = dataclasses.replace(k0, group_size=_matched_group_size(target, qcfg.bits, layers))
            row["group_size"] = cfg.group_size
        ckpt = work / "ckpt"
        bits = timed("quantize", _quantize, model_dir, ckpt, cfg)
        model = load(ckpt)
    elif method == "gptq-peer":
        from .peer import quantize_with_gptqmodel

        ckpt = work / "ckpt"
        model, bits = timed("quantize", quantize_with_gptqmodel, src, ckpt, k0)
    elif method in ("salient-ft", "gift-post", "ste", "quik-lora"):
        timed("quantize", _quantize, model_dir, salient_base, qcfg)
        base_bits = read_gift_config(salient_base)["effective_bits"]
        model = load(salient_base)
        if method in ("salient-ft", "gift-post"):
            from .recover.model import linear_weights

            noise = "none" if method == "salient-ft" else rcfg.noise
            prepare_quantized(model, noise=noise, noise_bits=noise_bits, seed=rcfg.seed,
                              reference=linear_weights(load_model(src)))
            timed("train", _train_and_pack, model, tok, rcfg, work / "train", device, src, qcfg)
            convert_to_quant(model.cpu(), qcfg.bits, qcfg.sym, parse_dtype(qcfg.salient_dtype))
        elif method == "ste":
            prepare_qat(model)
            timed("train", _train_and_pack, model, tok, rcfg, work / "train", device, src, qcfg)
            convert_qat(model.cpu())
        else:
            from peft import LoraConfig, get_peft_model

            convert_to_dense(prepare_quantized(model, noise="none"))
            for p in model.parameters():
                p.requires_grad_(False)
            targets = sorted({n.rsplit(".", 1)[-1] for n in read_gift_config(salient_base)["layers"]})
            torch.manual_seed(rcfg.seed)  # LoRA's A is drawn from the global generator: seed it for reruns
            model = get_peft_model(model, LoraConfig(r=64, lora_alpha=64, lora_dropout=0.0, target_modules=targets))
            timed("train", _train_and_pack, model, tok, rcfg, work / "train", device, src, qcfg)
        if method == "quik-lora":
            lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
            layers = read_gift_config(salient_base)["layers"].values()
            quant_w = sum(v["in_features"] * v["out_features"] for v in layers)
            bits = base_bits + 16 * lora / quant_w
            model.save_pretrained(work / "adapter")
            ckpt = work / "adapter"
        else:
            ckpt = work / "ckpt"
            save_checkpoint(model, ckpt, src, {**read_gift_config(salient_base), "method": method})
            bits = read_gift_config(ckpt)["effective_bits"]
    elif method == "gift-pre":
        from .pipeline import run_recover

        ckpt = work / "ckpt"
        # the pre variant injects noise at the target bits (the paper); rcfg.noise_bits is the post variant's
        pre = dataclasses.replace(rcfg, variant="pre", noise_bits=qcfg.bits)
        row["noise_bits"] = qcfg.bits
        summary = timed("recover", run_recover, model_dir, ckpt, qcfg, pre, ecfg, progress=False)
        model, bits = load(ckpt), summary["effective_bits"]
    else:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    model.eval()
    row.update(timed("eval", _eval, model.to(device), tok, ecfg, tasks, limit, device))
    size = _dir_size(ckpt) + (_dir_size(salient_base) if method == "quik-lora" else 0)  # adapter + its base
    row.update({"effective_bits": bits, "size_mb": size / 2**20, "seconds": timings,
                "total_seconds": time.perf_counter() - t0,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    if device.type == "cuda":
        row["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    metrics = work / "train" / "metrics.jsonl"
    if metrics.is_file():
        row["loss_curve"] = [json.loads(line)["loss"] for line in metrics.read_text().splitlines() if line]
    return row


def _matched_group_size(target_bits: float, bits: int, layers: dict) -> int:
    """Largest group size whose K = 0 effective bits (over the same layers) reach ``target_bits``."""
    from .qlinear import effective_bits

    def mean_bits(g: int) -> float:
        num = den = 0.0
        for v in layers.values():
            i, o = v["in_features"], v["out_features"]
            num += effective_bits(i, o, bits, -(-i // g), 0, True) * i * o
            den += i * o
        return num / den

    for g in (1024, 512, 256, 128, 64, 32, 16, 8):
        if mean_bits(g) >= target_bits:
            return g
    return 8


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
    _claim_settings(report_dir / "settings.json", settings, report_dir)
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
        cmd = [sys.executable, "-m", "gift_quant.compare", "_method", method, "--bits", str(bits),
               "--root", str(root), "--settings", str(report_dir / "settings.json")]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not result.is_file():
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            atomic_write_text(result, json.dumps({"method": method, "bits": bits, "failed": err,
                                                  "total_seconds": time.perf_counter() - t0}))
            (root / method / "stderr.txt").write_text(proc.stderr[-20000:])
    return write_report(report_dir, " ".join(sys.argv))


def run_compare_peft(model_dir: str | None, report_dir: Path, methods: list[str], qcfg: QuantizeConfig,
                     rcfg: RecoverConfig, tasks: list[str], limit: int | None, progress: bool = True,
                     lr_grid: list[float] | dict[str, tuple[float, ...]] | None = None) -> dict:
    """PEFT comparison: learning-rate grid on validation, then the best run of each method on test."""
    from tqdm.auto import tqdm

    from .compare_peft import LR_GRID, best_lr, peft_settings_doc, write_peft_report

    report_dir = Path(report_dir)
    root = report_dir / "runs" / "peft"
    root.mkdir(parents=True, exist_ok=True)
    if isinstance(lr_grid, dict):  # per method; the others keep their default grid
        grid = {m: tuple(lr_grid.get(m, LR_GRID[m])) for m in methods}
    else:
        grid = {m: tuple(lr_grid) if lr_grid else LR_GRID[m] for m in methods}
    settings = {"model_dir": model_dir, **peft_settings_doc(qcfg, rcfg), "lr_grid": grid, "tasks": tasks,
                "limit": limit}
    _claim_settings(report_dir / "settings_peft.json", settings, report_dir)
    # the untrained model on the same test split and tasks: the reference every method should beat
    rows = [{**_subprocess_row(report_dir, root, "peft:base:0:final", "settings_peft.json"), "final": True}]
    bar = tqdm(total=sum(len(grid[m]) + 1 for m in methods), desc="compare peft", disable=not progress)
    for method in methods:
        grid_rows = []
        for lr in grid[method]:
            grid_rows.append(_subprocess_row(report_dir, root, f"peft:{method}:{lr:g}:search", "settings_peft.json"))
            bar.update()
        rows += grid_rows
        try:
            lr = best_lr(grid_rows)
        except ValueError:
            rows.append({"method": method, "final": True, "failed": "every learning rate failed"})
            bar.update()
            continue
        final = _subprocess_row(report_dir, root, f"peft:{method}:{lr:g}:final", "settings_peft.json")
        rows.append({**final, "final": True})
        bar.update()
    write_peft_report(report_dir, rows, " ".join(sys.argv))
    return {"rows": rows}


def _claim_settings(path: Path, settings: dict, report_dir: Path) -> None:
    normalized = json.loads(json.dumps(settings))
    if path.is_file() and json.loads(path.read_text()) != normalized:
        old = json.loads(path.read_text())
        changed = [k for k in normalized if old.get(k) != normalized[k]]
        raise GiftQuantError(
            f"{report_dir} holds results made with different {', '.join(changed)}; finished methods would not be "
            "comparable: use a new --out (methods may be added freely with the same settings)")
    atomic_write_text(path, json.dumps(settings, indent=1))


def _subprocess_row(report_dir: Path, root: Path, job: str, settings_name: str) -> dict:
    """Run ``job`` via ``python -m gift_quant.compare _method`` unless its result is cached."""
    result = root / job.replace(":", "_") / "result.json"
    if not result.is_file():
        result.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "gift_quant.compare", "_method", job, "--bits", "0", "--root", str(root),
               "--settings", str(report_dir / settings_name)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not result.is_file():
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            atomic_write_text(result, json.dumps({"job": job, "method": job.split(":")[1], "failed": err,
                                                  "total_seconds": time.perf_counter() - t0}))
            (result.parent / "stderr.txt").write_text(proc.stderr[-20000:])
    return json.loads(result.read_text())


def _collect(report_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((report_dir / "runs").glob("*/*/result.json"))]


def _mean_zs(row: dict):
    zs = row.get("zeroshot")
    return None if not zs else zs.get("mean")  # headline: acc_norm where lm-eval defines it (eval/zeroshot.py)


def write_report(report_dir: Path, command: str) -> dict:
    rows = _collect(report_dir)
    versions = {"gift-quant": _version("gift-quant"), "torch": torch.__version__,
                "transformers": _version("transformers"), "peft": _version("peft"),
                "gptqmodel": _version("gptqmodel"), "lm-eval": _version("lm_eval")}
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


def plot_loss_curves(path: Path, curves: dict[str, list[float]]) -> None:
    """One line per labelled training-loss curve, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, losses in curves.items():
        # small batches make per-step losses jumpy: a faint raw line plus a 5-step running mean
        steps = range(1, len(losses) + 1)
        (raw,) = ax.plot(steps, losses, alpha=0.25, lw=1)
        k = min(5, len(losses))
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, color=raw.get_color(), label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (faint: per step; bold: 5-step mean)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg.replace("_", "-"))
    except PackageNotFoundError:
        return None


def _method_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("method")
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--settings", required=True)
    a = ap.parse_args(argv)
    s = json.loads(Path(a.settings).read_text())
    if a.method.startswith("peft:"):
        from .compare_peft import run_peft_method

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
        from .cli import quiet_import_noise

        quiet_import_noise()
        sys.exit(_method_main(sys.argv[2:]))
