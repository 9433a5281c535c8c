"""Natural vs compact quantization groups on the default model: the table behind issue #12's layout choice.

Reads the outputs of runs made with (one per bits / group size / layout / calibration seed)

    gift-quant quantize --recipe recipes/smollm2-135m-w3.yaml --bits B --group-size G --group-layout L \\
        --seed S --out RUNS/wB-gG-L-sS --no-progress
    gift-quant eval RUNS/wB-gG-L-sS --recipe recipes/smollm2-135m-w3.yaml --json RUNS/wB-gG-L-sS.eval.json

and writes OUT/layout.md (perplexity per setting and seed, the paired natural - compact difference with
a 95 % t interval over calibration seeds where there are two or more) and OUT/layout.json.

    python tools/layout_study.py runs/layout --out results/group-layout
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from datetime import date
from pathlib import Path

T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}  # two-sided 95 % t quantiles by degrees of freedom
NAME = re.compile(r"w(?P<bits>\d)-g(?P<gs>\d+)-(?P<layout>natural|compact)-s(?P<seed>\d+)$")


def collect(runs: Path) -> list[dict]:
    rows = []
    for ev in sorted(runs.glob("*.eval.json")):
        m = NAME.match(ev.name.removesuffix(".eval.json"))
        ckpt = runs / ev.name.removesuffix(".eval.json")
        if not m or not (ckpt / "gift_quant_config.json").is_file():
            continue
        doc = json.loads((ckpt / "gift_quant_config.json").read_text())
        result = json.loads(ev.read_text())
        rows.append({"bits": int(m["bits"]), "group_size": int(m["gs"]), "layout": m["layout"],
                     "seed": int(m["seed"]), "perplexity": result["perplexity"],
                     "window_nll": result.get("window_nll"), "effective_bits": doc.get("effective_bits")})
    return rows


def window_paired(ref: dict, other: dict) -> dict | None:
    """Perplexity ratio other/ref with a 95 % interval over the evaluation windows (one calibration draw)."""
    a, b = ref.get("window_nll"), other.get("window_nll")
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return None
    d = [y - x for x, y in zip(a, b)]
    mean, se = statistics.fmean(d), statistics.stdev(d) / len(d) ** 0.5
    return {"ratio": math.exp(mean), "ci95": [math.exp(mean - 1.96 * se), math.exp(mean + 1.96 * se)]}


def paired(rows: list[dict]) -> list[dict]:
    """Per (bits, group size): natural minus compact perplexity, paired by calibration seed."""
    out = []
    for key in sorted({(r["bits"], r["group_size"]) for r in rows}):
        by = {(r["layout"], r["seed"]): r for r in rows if (r["bits"], r["group_size"]) == key}
        seeds = sorted(s for (lay, s) in by if lay == "natural" and ("compact", s) in by)
        diffs = [by["natural", s]["perplexity"] - by["compact", s]["perplexity"] for s in seeds]
        row = {"bits": key[0], "group_size": key[1], "seeds": seeds, "diffs": diffs,
               "window_paired": [window_paired(by["compact", s], by["natural", s]) for s in seeds]}
        if diffs:
            row["mean"] = statistics.fmean(diffs)
        if len(diffs) >= 2:
            half = T95[len(diffs) - 1] * statistics.stdev(diffs) / len(diffs) ** 0.5
            row["ci95"] = [row["mean"] - half, row["mean"] + half]
        out.append(row)
    return out


def render(rows: list[dict], pairs: list[dict]) -> str:
    lines = [f"# Natural vs compact quantization groups, SmolLM2-135M-Instruct ({date.today().isoformat()})", "",
             "Perplexity on boolq-passages:test (40 windows x 512 tokens), quantized without training "
             "(`gift-quant quantize --recipe recipes/smollm2-135m-w3.yaml --bits B --group-size G --group-layout L "
             "--seed S`; 18/48 salient columns per layer; the seed draws the calibration windows). Reference: the "
             "full-precision model (dequantized from its 4-bit GGUF) scores 23.06.", "",
             "| bits | group | layout | seed | perplexity | bits/weight |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["bits"], r["group_size"], r["seed"], r["layout"])):
        eb = f"{r['effective_bits']:.3f}" if r["effective_bits"] else "?"
        lines.append(f"| {r['bits']} | {r['group_size']} | {r['layout']} | {r['seed']} | "
                     f"{r['perplexity']:.3f} | {eb} |")
    lines += ["", "Paired natural - compact perplexity (negative: natural better):", "",
              "| bits | group | seeds | differences | mean | 95 % t interval over seeds "
              "| natural / compact ppl per seed, 95 % interval over windows |", "|---|---|---|---|---|---|---|"]
    for p in pairs:
        ci = (f"{p['ci95'][0]:+.3f} .. {p['ci95'][1]:+.3f}" if "ci95" in p
              else "one seed: no interval" if p["diffs"] else "no seed run with both layouts")
        diffs = ", ".join(f"{d:+.3f}" for d in p["diffs"])
        mean = f"{p['mean']:+.3f}" if "mean" in p else "-"
        windows = "; ".join(f"{w['ratio']:.4f} ({w['ci95'][0]:.4f}..{w['ci95'][1]:.4f})"
                            for w in p["window_paired"] if w) or "-"
        lines.append(f"| {p['bits']} | {p['group_size']} | {len(p['seeds'])} | {diffs} | {mean} | {ci} | {windows} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    rows = collect(a.runs)
    pairs = paired(rows)
    text = render(rows, pairs)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "layout.md").write_text(text)
    (a.out / "layout.json").write_text(json.dumps({"rows": rows, "paired": pairs}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
