"""The recovery study: which objective and stage win back most of what 3-bit quantization lost.

Every job starts from a quantized starting point (``gift-quant quantize`` output: GPTQ + salient
columns, untrained) made from one calibration draw (``--seed``), and runs one recovery configuration
at a fixed budget; its result (held-out perplexity with per-window NLL, recovery seconds, settings)
goes to ``OUT/jobs/<config>-w<bits>-s<seed>.json``. ``report`` turns every job into the study:
the share of the gap closed, ``(ppl_start - ppl_recovered) / (ppl_start - ppl_fp)``, as a mean with a
95 % t-interval over starting points, plus a paired per-window interval for single-start screening
rows, a CSV/JSON, a markdown table and one plot.

    python tools/recovery_study.py run --config kd-text --seed 0 --start runs/study/start/w3-s0 --out runs/study
    python tools/recovery_study.py report --out runs/study --results results/recovery-study

Configurations (``CONFIGS``) differ only in what the recovery stage does; calibration, salient columns,
evaluation text and the budget are shared. Block-wise configurations re-run GPTQ from the source
model with the same calibration draw (GPTQ is deterministic, so block 0 gets exactly the start's
codes) and count only the block-wise training in their recovery time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "recipes" / "smollm2-135m-w3.yaml"

# Settings shared by every configuration at this budget; each configuration overrides a few.
BASE = dict(seq_len=256, batch_size=2, grad_accum=1, warmup_ratio=0.03, eval_every=0, save_every=10,
            noise="normal", noise_bits=None, variant="post", blockwise_steps=0)
CONFIGS: dict[str, dict] = {
    # the paper's set-up: CE on instruction answers (prompts masked)
    "paper": dict(method="gift-post", loss="ce", train_data="natural-instructions", lr=3e-4),
    "paper-nonoise": dict(method="gift-post", loss="ce", train_data="natural-instructions", lr=3e-4, noise="none"),
    # plain text (State of the Union, calibration speeches left out), every token trained
    "ce-text": dict(method="gift-post", loss="ce", train_data="sotu", lr=3e-4),
    "ce-text-nonoise": dict(method="gift-post", loss="ce", train_data="sotu", lr=3e-4, noise="none"),
    "kd-text": dict(method="gift-post", loss="kd", train_data="sotu", lr=3e-4),
    "kd-text-nonoise": dict(method="gift-post", loss="kd", train_data="sotu", lr=3e-4, noise="none"),
    "kd-text-lr1e-3": dict(method="gift-post", loss="kd", train_data="sotu", lr=1e-3),
    # the same at 100 steps: what the 15-minute budget buys when spent on end-to-end KD alone
    "kd-text-100": dict(method="gift-post", loss="kd", train_data="sotu", lr=3e-4, steps=100),
    # block-wise reconstruction right after each block's GPTQ (no end-to-end step); 16 steps = one pass
    # over the 16 calibration batches of 8 windows
    "bw": dict(method="recover", steps=0, blockwise_steps=16, train_data="sotu"),
    "bw-nonoise": dict(method="recover", steps=0, blockwise_steps=16, train_data="sotu", noise="none"),
    "bw+kd": dict(method="recover", loss="kd", train_data="sotu", lr=3e-4, blockwise_steps=16),
    "bw+kd-nonoise": dict(method="recover", loss="kd", train_data="sotu", lr=3e-4, blockwise_steps=16,
                          noise="none"),
    # baselines at the same objective and budget as kd-text
    "ste-kd": dict(method="ste", loss="kd", train_data="sotu", lr=3e-4),
    "quik-lora-kd": dict(method="quik-lora", loss="kd", train_data="sotu", lr=3e-4),
    # recovery v2 (issue 21): the block stage trains salient columns, scales and rounding (64 steps per block
    # by default, --blockwise-steps changes it; no noise there: tools/blockwise_probe.py found it worse), then
    # 100 KD steps (noise as the recipe) that also train the scales
    "bw2": dict(method="recover", steps=0, blockwise_steps=64, train_data="sotu",
                blockwise_train="salient,scales,rounding", blockwise_noise="none"),
    "bw2+kd": dict(method="recover", loss="kd", train_data="sotu", lr=3e-4, steps=100, blockwise_steps=64,
                   blockwise_train="salient,scales,rounding", blockwise_noise="none", train="salient,scales"),
    "bw2+kd-salient": dict(method="recover", loss="kd", train_data="sotu", lr=3e-4, steps=100, blockwise_steps=64,
                           blockwise_train="salient,scales,rounding", blockwise_noise="none"),
    # the default recipe's end-to-end stage alone, with the scales trained too; and on a general text mix
    "kd-scales-100": dict(method="recover", loss="kd", train_data="sotu", lr=3e-4, steps=100, train="salient,scales"),
    "kd-mix-100": dict(method="gift-post", loss="kd", train_data="sotu+boolq-passages:train", lr=3e-4, steps=100),
}
# the second evaluation domain every row is also scored on (held-out speeches; Wikipedia is the first)
SECOND_DOMAIN = "sotu:test"


def _settings(config: str, bits: int, seed: int, steps: int, recipe_path: Path = RECIPE,
              train_data: str | None = None, blockwise_steps: int | None = None):
    from gift_quant.config.settings import EvalConfig, QuantizeConfig, RecoverConfig, build, read_recipe

    recipe = read_recipe(recipe_path)
    spec = {**BASE, "steps": steps, **CONFIGS[config], **({"train_data": train_data} if train_data else {})}
    if blockwise_steps is not None and spec.get("blockwise_steps"):
        spec["blockwise_steps"] = blockwise_steps
    spec.pop("method")
    qcfg = build(QuantizeConfig, recipe, "quantize", {"bits": bits, "seed": seed})
    fields = {f.name for f in dataclasses.fields(RecoverConfig)}
    rcfg = RecoverConfig(**{k: v for k, v in spec.items() if k in fields}, seed=seed)
    ecfg = build(EvalConfig, recipe, "eval", {})
    return qcfg, rcfg, ecfg


def _second_domain(model, tokenizer, ecfg) -> dict:
    """Perplexity (and per-window NLL) on the second evaluation domain, so a gain that is only domain fitting shows."""
    from gift_quant.compare.recovery import evaluate_model
    from gift_quant.config.settings import Runtime

    res = evaluate_model(model, tokenizer, dataclasses.replace(ecfg, ppl_data=SECOND_DOMAIN), [], None,
                         Runtime(device="cpu", progress=False))
    return {"ppl_2": res["ppl"], "window_nll_2": res["window_nll"], "eval_2": SECOND_DOMAIN}


def run_job(config: str, bits: int, seed: int, start: Path, out: Path, steps: int, model: str | None = None,
            recipe: Path = RECIPE, train_data: str | None = None, blockwise_steps: int | None = None) -> dict:
    """One job's result row (cached in OUT/jobs). ``model``: the source model folder (default: the embedded
    one); ``recipe`` / ``train_data``: the shared settings (default: the study's recipe, each config's data)."""
    from gift_quant.compare.recovery import evaluate_model, run_method
    from gift_quant.config.settings import Runtime
    from gift_quant.model.loading import load_tokenizer, resolve_model_dir

    cpu = Runtime(device="cpu", progress=False)

    out = Path(out)
    name = f"{config}{'' if blockwise_steps is None else f'-bw{blockwise_steps}'}-w{bits}-s{seed}"
    result_path = out / "jobs" / f"{name}.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    method = CONFIGS[config]["method"] if config not in ("fp", "start") else config
    qcfg, rcfg, ecfg = _settings(config if config in CONFIGS else "paper", bits, seed, steps, recipe, train_data,
                                 blockwise_steps)
    work = out / "work" / name
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    label = config if blockwise_steps is None else f"{config}-bw{blockwise_steps}"
    row = {"config": label, "bits": bits, "seed": seed, "start": str(start), "steps": rcfg.steps,
           "recover": dataclasses.asdict(rcfg) if config in CONFIGS else None}
    if method == "fp":
        from gift_quant.model.loading import load_model

        src = resolve_model_dir(model)
        fp_model, tok = load_model(src).eval(), load_tokenizer(src)
        row.update({**evaluate_model(fp_model, tok, ecfg, [], None, cpu), **_second_domain(fp_model, tok, ecfg)})
    elif method == "start":
        from gift_quant.packed.checkpoint import load

        start_model, tok = load(start).eval(), load_tokenizer(Path(start))
        row.update({**evaluate_model(start_model, tok, ecfg, [], None, cpu), **_second_domain(start_model, tok, ecfg)})
    elif method == "recover":
        from gift_quant.workflows.commands import run_recover

        summary = run_recover(model, work / "out", qcfg, rcfg, ecfg, runtime=cpu)
        stages = json.loads((work / "out" / "run" / "stages.json").read_text())
        metrics = json.loads((work / "out" / "gift_quant_config.json").read_text())["layers"]
        per_block = {json.dumps(m.get("blockwise"), sort_keys=True): m.get("blockwise") for m in metrics.values()}
        bw = [b for b in per_block.values() if b]
        row.update({"ppl": summary["ppl_after"], "ppl_run_start": summary["ppl_before"],
                    "ppl_after_blockwise": summary.get("ppl_after_blockwise"),
                    "blockwise_holdout": [[b.get("holdout_before"), b.get("holdout_after")] for b in bw],
                    "blockwise_seconds": sum(b.get("seconds", 0.0) for b in bw),
                    "train_seconds": stages["recover"].get("seconds", 0.0),
                    "blockwise_relative_mse": [[b["relative_mse_before"], b["relative_mse_after"]] for b in bw]})
        from gift_quant.packed.checkpoint import load

        out_model, tok = load(work / "out").eval(), load_tokenizer(work / "out")
        row["window_nll"] = evaluate_model(out_model, tok, ecfg, [], None, cpu)["window_nll"]
        row.update(_second_domain(out_model, tok, ecfg))
        row["recovery_seconds"] = row["blockwise_seconds"] + row["train_seconds"]
    else:
        root = work / "root"
        (root / "owq").mkdir(parents=True, exist_ok=True)
        link = root / "owq" / "ckpt"
        if not link.exists():
            link.symlink_to(Path(start).resolve())
        res = run_method(method, model, root, qcfg, rcfg, ecfg, [], None)
        row.update({k: res[k] for k in ("ppl", "window_nll", "effective_bits", "seconds", "loss_curve") if k in res})
        from gift_quant.packed.checkpoint import load

        ckpt = root / method / "ckpt"
        if (ckpt / "gift_quant_config.json").is_file():
            row.update(_second_domain(load(ckpt).eval(), load_tokenizer(resolve_model_dir(model)), ecfg))
        row["recovery_seconds"] = res["seconds"].get("train")
    row["total_seconds"] = time.perf_counter() - t0
    result_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1))
    tmp.replace(result_path)
    return row


# ------------------------------------------------------------------ report


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): 95 % Student-t interval over independent runs (nan bounds for one run)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, float("nan"), float("nan")
    crit = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365}.get(n, 2.262)
    half = crit * statistics.stdev(values) / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_gap_interval(nll_start, nll_rec, ppl_fp) -> tuple[float, float]:
    """95 % interval of the gap closed over evaluation windows (bootstrap, fixed seed): screening only."""
    import random

    n = len(nll_start)
    rng = random.Random(0)
    vals = []
    for _ in range(2000):
        idx = [rng.randrange(n) for _ in range(n)]
        ps = math.exp(sum(nll_start[i] for i in idx) / n)
        pr = math.exp(sum(nll_rec[i] for i in idx) / n)
        vals.append((ps - pr) / (ps - ppl_fp))
    vals.sort()
    return vals[int(0.025 * len(vals))], vals[int(0.975 * len(vals)) - 1]


def report(out: Path, results: Path) -> list[dict]:
    jobs = [json.loads(p.read_text()) for p in sorted((Path(out) / "jobs").glob("*.json"))]
    fp = [j for j in jobs if j["config"] == "fp"]
    if not fp:
        raise SystemExit("no fp job: run --config fp first")
    ppl_fp = fp[0]["ppl"]
    starts = {(j["bits"], j["seed"]): j for j in jobs if j["config"] == "start"}
    rows = []
    groups: dict[tuple[str, int], list[dict]] = {}
    for j in jobs:
        if j["config"] in ("fp", "start") or (j["bits"], j["seed"]) not in starts:
            continue
        groups.setdefault((j["config"], j["bits"]), []).append(j)
    for (config, bits), js in sorted(groups.items()):
        gaps, pairs = [], []
        for j in sorted(js, key=lambda x: x["seed"]):
            s = starts[(bits, j["seed"])]
            gaps.append((s["ppl"] - j["ppl"]) / (s["ppl"] - ppl_fp))
            pairs.append((s, j))
        mean, lo, hi = t_interval(gaps)
        gaps2 = [(s["ppl_2"] - j["ppl_2"]) / (s["ppl_2"] - fp[0]["ppl_2"]) for s, j in pairs
                 if "ppl_2" in s and "ppl_2" in j and "ppl_2" in fp[0]]
        row = {"config": config, "bits": bits, "seeds": [j["seed"] for _, j in pairs], "gap_closed": gaps,
               "gap_mean": mean, "gap_low": lo, "gap_high": hi,
               "ppl_start": [s["ppl"] for s, _ in pairs], "ppl_recovered": [j["ppl"] for _, j in pairs],
               "recovery_seconds": [j.get("recovery_seconds") for _, j in pairs], "steps": js[0].get("steps")}
        if len(gaps2) == len(pairs):  # the second evaluation domain (held-out speeches)
            row.update({"gap2_closed": gaps2, "gap2_mean": t_interval(gaps2)[0], "gap2_low": t_interval(gaps2)[1],
                        "gap2_high": t_interval(gaps2)[2]})
            if len(pairs) == 1:
                row["window2_low"], row["window2_high"] = paired_gap_interval(
                    pairs[0][0]["window_nll_2"], pairs[0][1]["window_nll_2"], fp[0]["ppl_2"])
        if len(pairs) == 1 and "window_nll" in pairs[0][0] and "window_nll" in pairs[0][1]:
            row["window_low"], row["window_high"] = paired_gap_interval(
                pairs[0][0]["window_nll"], pairs[0][1]["window_nll"], ppl_fp)
        rows.append(row)
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "study.json").write_text(json.dumps({"ppl_fp": ppl_fp, "starts": {f"w{b}-s{s}": v["ppl"] for (b, s), v
                                                    in starts.items()}, "rows": rows}, indent=1))
    _write_csv(results / "study.csv", rows)
    _write_markdown(results / "study.md", rows, ppl_fp, starts)
    zeroshot_table(Path(out) / "zeroshot", results)
    _plot(results / "gap_closed.png", rows)
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["config", "bits", "n_starts", "gap_mean", "gap_low", "gap_high", "window_low", "window_high",
                    "ppl_start_mean", "ppl_recovered_mean", "recovery_seconds_mean"])
        for r in rows:
            secs = [s for s in r["recovery_seconds"] if s is not None]
            w.writerow([r["config"], r["bits"], len(r["seeds"]), f"{r['gap_mean']:.4f}", f"{r['gap_low']:.4f}",
                        f"{r['gap_high']:.4f}", f"{r.get('window_low', float('nan')):.4f}",
                        f"{r.get('window_high', float('nan')):.4f}", f"{statistics.fmean(r['ppl_start']):.3f}",
                        f"{statistics.fmean(r['ppl_recovered']):.3f}",
                        f"{statistics.fmean(secs):.0f}" if secs else ""])


def _fmt_interval(r: dict) -> str:
    if len(r["seeds"]) > 1:
        return (f"{100 * r['gap_mean']:.1f} % ({100 * r['gap_low']:.1f} to {100 * r['gap_high']:.1f}), "
                f"{len(r['seeds'])} starts")
    if "window_low" in r:
        return (f"{100 * r['gap_mean']:.1f} % (windows: {100 * r['window_low']:.1f} to "
                f"{100 * r['window_high']:.1f}), 1 start")
    return f"{100 * r['gap_mean']:.1f} %, 1 start"


def _write_markdown(path: Path, rows: list[dict], ppl_fp: float, starts: dict) -> None:
    lines = ["# Recovery study (generated by tools/recovery_study.py report)", "",
             f"Full-precision reference (dequantized from the Q4_1 GGUF): perplexity {ppl_fp:.3f}.",
             "Starting points (GPTQ + salient columns, untrained): " + ", ".join(
                 f"w{b} seed {s}: {v['ppl']:.3f}" for (b, s), v in sorted(starts.items())), "",
             "| config | bits | gap closed (95 % interval) | perplexity start -> recovered | recovery s "
             f"| {SECOND_DOMAIN}: gap closed (95 % interval) |",
             "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["bits"], -r["gap_mean"])):
        secs = [s for s in r["recovery_seconds"] if s is not None]
        ppl = ", ".join(f"{a:.2f} -> {b:.2f}" for a, b in zip(r["ppl_start"], r["ppl_recovered"]))
        second = "-"
        if "gap2_mean" in r:
            alt = {"seeds": r["seeds"], "gap_mean": r["gap2_mean"], "gap_low": r["gap2_low"],
                   "gap_high": r["gap2_high"]}
            if "window2_low" in r:
                alt.update(window_low=r["window2_low"], window_high=r["window2_high"])
            second = _fmt_interval(alt)
        lines.append(f"| {r['config']} | {r['bits']} | {_fmt_interval(r)} | {ppl} | "
                     f"{f'{statistics.fmean(secs):.0f}' if secs else '-'} | {second} |")
    path.write_text("\n".join(lines) + "\n")


def zeroshot_table(folder: Path, results: Path) -> None:
    """zeroshot.md/json from ``gift-quant eval --tasks ... --json`` files (label = file stem)."""
    files = sorted(Path(folder).glob("*.json"))
    if not files:
        return
    docs = {f.stem: json.loads(f.read_text()) for f in files}
    tasks = sorted({t for d in docs.values() for t in d["tasks"]})
    lines = ["# Zero-shot accuracy (lm-eval, first N documents of each task's validation split)", "",
             "acc_norm where lm-eval defines it (arc_easy, piqa), else acc; +- is lm-eval's standard error.", "",
             "| model | " + " | ".join(f"{t} (n)" for t in tasks) + " | mean |", "|---|" + "---|" * (len(tasks) + 1)]
    for label, d in docs.items():
        cells = []
        for t in tasks:
            e = d["tasks"].get(t, {})
            metric = "acc_norm" if "acc_norm" in e else "acc"
            cells.append(f"{e[metric]:.3f} +- {e.get(metric + '_stderr') or 0:.3f} ({e['n']})" if metric in e else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {d.get('mean', float('nan')):.3f} |")
    (results / "zeroshot.md").write_text("\n".join(lines) + "\n")
    (results / "zeroshot.json").write_text(json.dumps(docs, indent=1))


def _plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: (r["bits"], r["gap_mean"]))
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    for y, r in enumerate(rows):
        multi = len(r["seeds"]) > 1
        lo, hi = (r["gap_low"], r["gap_high"]) if multi else (r.get("window_low"), r.get("window_high"))
        color = "tab:blue" if multi else "tab:gray"
        if lo is not None and not math.isnan(lo):
            ax.plot([100 * lo, 100 * hi], [y, y], color=color, lw=2)
        ax.plot(100 * r["gap_mean"], y, "o", color=color)
        for g in r["gap_closed"]:
            ax.plot(100 * g, y, "|", color="black", ms=8)
    ax.set_yticks(range(len(rows)), [f"{r['config']} (w{r['bits']}, {len(r['seeds'])} start"
                                     f"{'s' if len(r['seeds']) > 1 else ''})" for r in rows])
    ax.axvline(0, color="black", lw=0.8)
    ax.axvline(100, color="green", lw=0.8, ls="--")
    ax.set_xlabel("share of the quantization gap closed, % (0 = untrained start, 100 = full precision)")
    ax.set_title("Recovery by configuration: blue = 95 % t-interval over starts, gray = window bootstrap (1 start)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


PROMPTS = ["What is the capital of France?", "Name three primary colors.", "Who wrote Romeo and Juliet?",
           "What is 12 plus 7?", "Write one sentence about the ocean."]


def greedy_answers(models: dict[str, str | None], results: Path, max_new_tokens: int = 40) -> list[dict]:
    """Greedy answers of each model to fixed chat prompts -> answers.md / answers.json."""
    import torch

    from gift_quant.packed.any_model import load_any

    rows = []
    for label, path in models.items():
        model, tok, _, _ = load_any(path)
        model.eval()
        for prompt in PROMPTS:
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
            with torch.no_grad():
                out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.eos_token_id)
            answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            rows.append({"model": label, "path": path, "prompt": prompt, "answer": answer})
    results.mkdir(parents=True, exist_ok=True)
    (results / "answers.json").write_text(json.dumps(rows, indent=1))
    lines = ["# Greedy answers to fixed prompts", "", "| prompt | " + " | ".join(models) + " |",
             "|---|" + "---|" * len(models)]
    for prompt in PROMPTS:
        cells = [next(r["answer"] for r in rows if r["model"] == m and r["prompt"] == prompt) for m in models]
        lines.append(f"| {prompt} | " + " | ".join(c.replace("|", "/").replace("\n", " ")[:160] for c in cells) + " |")
    (results / "answers.md").write_text("\n".join(lines) + "\n")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--config", required=True, choices=[*CONFIGS, "fp", "start"])
    r.add_argument("--bits", type=int, default=3)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--start", default=None, help="quantized starting point (gift-quant quantize output)")
    r.add_argument("--steps", type=int, default=60, help="end-to-end steps (the budget)")
    r.add_argument("--blockwise-steps", type=int, default=None,
                   help="block-stage steps per block of a block-wise configuration (default: the configuration's)")
    r.add_argument("--out", default="runs/study")
    r.add_argument("--model", default=None, help="source model folder (default: the embedded SmolLM2)")
    r.add_argument("--recipe", default=str(RECIPE), help="shared settings (default: %(default)s)")
    r.add_argument("--train-data", default=None, help="training text for every config (default: each config's)")
    g = sub.add_parser("report")
    g.add_argument("--out", default="runs/study")
    g.add_argument("--results", default="results/recovery-study")
    ans = sub.add_parser("answers", help="greedy answers of LABEL=PATH models (PATH 'default': the fp model)")
    ans.add_argument("models", nargs="+")
    ans.add_argument("--results", default="results/recovery-study")
    a = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.cmd == "run":
        row = run_job(a.config, a.bits, a.seed, Path(a.start) if a.start else None, Path(a.out), a.steps, a.model,
                      Path(a.recipe), a.train_data, a.blockwise_steps)
        print(json.dumps({k: v for k, v in row.items()
                          if k not in ("window_nll", "window_nll_2", "loss_curve", "recover")}))
    elif a.cmd == "answers":
        pairs = dict(m.split("=", 1) for m in a.models)
        greedy_answers({k: None if v == "default" else v for k, v in pairs.items()}, Path(a.results))
    else:
        for row in report(Path(a.out), Path(a.results)):
            print(row["config"], row["bits"], _fmt_interval(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
