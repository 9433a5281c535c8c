"""Paired perplexity comparison: is model B really better than model A on the same windows?

Two checkpoints that differ by a short training run differ in perplexity by a percent or two, which is
the size of run-to-run noise here. Scoring both on the same windows and looking at the per-window
difference of mean token NLL gives a paired estimate with a standard error: the perplexity ratio
B / A = exp(mean difference), with a 95 % interval exp(mean +- 1.96 SE), and how many windows B wins.

    python tools/paired_ppl.py runs/compare-main/runs/w3/owq/ckpt runs/compare-main/runs/w3/gift-post/ckpt \\
        --ppl-data boolq-passages:test --seq-len 512 --max-windows 40 --out results/paired_ppl.json

The first model is the reference; every other model is compared with it. Paths are gift-quant
checkpoints or plain Hugging Face model folders (omit for the default model: ``default``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from datetime import date
from pathlib import Path


def paired_summary(ref: list[float], other: list[float]) -> dict:
    """Perplexity ratio other/ref with a paired 95 % interval over windows (pure numbers, no models)."""
    if len(ref) != len(other) or len(ref) < 2:
        raise ValueError("paired comparison needs the same windows (at least two) for both models")
    diff = [b - a for a, b in zip(ref, other)]
    mean = statistics.fmean(diff)
    se = statistics.stdev(diff) / math.sqrt(len(diff))
    return {"ppl_ratio": math.exp(mean), "ci95": [math.exp(mean - 1.96 * se), math.exp(mean + 1.96 * se)],
            "mean_nll_diff": mean, "se": se, "windows_better": sum(d < 0 for d in diff), "windows": len(diff)}


def score(path: str, ppl_data: str, seq_len: int, max_windows: int) -> dict:
    from gift_quant.config.settings import EvalConfig, Runtime
    from gift_quant.workflows.commands import run_eval_ppl

    cfg = EvalConfig(ppl_data=ppl_data, seq_len=seq_len, max_windows=max_windows)
    return run_eval_ppl(None if path == "default" else path, cfg, Runtime(device="cpu"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="reference first, then the models to compare with it")
    ap.add_argument("--ppl-data", default="boolq-passages:test")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--out", default=None, help="JSON file to write")
    a = ap.parse_args(argv)
    if len(a.models) < 2:
        sys.exit("paired_ppl: give a reference model and at least one model to compare with it")
    scored = {m: score(m, a.ppl_data, a.seq_len, a.max_windows) for m in a.models}
    ref = a.models[0]
    rows = []
    print(f"| model | perplexity | ratio vs {Path(ref).parent.name or ref} | 95 % CI | windows better |")
    print("|---|---|---|---|---|")
    print(f"| {ref} | {scored[ref]['perplexity']:.3f} | 1 | - | - |")
    for m in a.models[1:]:
        s = paired_summary(scored[ref]["window_nll"], scored[m]["window_nll"])
        rows.append({"model": m, "perplexity": scored[m]["perplexity"], **s})
        print(f"| {m} | {scored[m]['perplexity']:.3f} | {s['ppl_ratio']:.4f} | "
              f"{s['ci95'][0]:.4f}-{s['ci95'][1]:.4f} | {s['windows_better']}/{s['windows']} |")
    if a.out:
        doc = {"date": str(date.today()), "command": " ".join(sys.argv), "reference": ref,
               "reference_perplexity": scored[ref]["perplexity"], "rows": rows,
               "window_nll": {m: scored[m]["window_nll"] for m in a.models}}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
