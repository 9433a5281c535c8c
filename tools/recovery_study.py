"""The recovery study: which objective and stage win back most of what 3-bit quantization lost.

Every job starts from a quantized starting point (``gift-quant quantize`` output: GPTQ + salient
columns, untrained) made from one calibration draw (``--seed``), and runs one recovery configuration
at a fixed budget; its result (held-out perplexity with per-window NLL on Wikipedia and on held-out
speeches, recovery seconds, settings) goes to ``OUT/jobs/<config>-w<bits>-s<seed>.json``. ``report``
turns every job into the study: the share of the gap closed, ``(ppl_start - ppl_recovered) / (ppl_start -
ppl_fp)``, on both evaluation domains, as a mean with a 95 % Student-t interval over starting points,
the paired difference to the final pipeline (``bw2+kd``) with its t-interval, a paired per-window
bootstrap for single-start screening rows, a CSV/JSON, a markdown table and one plot.

    python tools/recovery_study.py run --config kd-text --seed 0 --start runs/study/start/w3-s0 --out runs/study
    python tools/recovery_study.py report --out runs/study --results results/recovery-study

Configurations (``CONFIGS``) differ only in what the recovery stage does; calibration, salient columns,
evaluation text and the budget are shared. Block-wise configurations re-run GPTQ from the source
model with the same calibration draw (GPTQ is deterministic, so block 0 gets exactly the start's
codes) and count only the block-wise training in their recovery time.

First study: ``paper``, ``paper-nonoise``, ``ce-text(-nonoise)``, ``kd-text(-nonoise, -lr1e-3, -100)``,
``bw(-nonoise)``, ``bw+kd(-nonoise)``, ``ste-kd``, ``quik-lora-kd``. Recovery v2 (issue 21), each a
``gift-quant recover`` run unless said otherwise (``recovery_study.py command --config NAME`` prints it):

* ``bw2``: the block stage alone (64 steps per block: salient, scales, rounding; no noise), ``--steps 0``.
* ``bw2+kd``: the final pipeline: ``bw2`` then 100 KD steps (lr 3e-4) training the salient columns and the
  scales (lr 1e-4), GIFT-SW's noise (normal, 4 bits) on the frozen rest. Every row below differs from it
  in one thing, and the report gives each one's paired difference to it.
* ``bw2+kd-salient``: end to end trains only the salient columns (no scales).
* ``bw2+kd-frozen``: salient columns frozen in both stages (block stage: scales, rounding; end to end: scales).
* ``bw2+kd-nonoise`` / ``bw2+kd-anneal``: distillation without noise / with the noise annealed to 0.
* ``bw2+kd-bwnoise`` / ``bw2+kd-bwanneal``: the block stage with GIFT-SW's noise / with it annealed to 0
  over each block's steps (distillation as ``bw2+kd``).
* ``bw2+kd-actonly``: salient columns chosen by the activation-only metric (``--metric quik``: max |X_j|)
  instead of GIFT-SW's ``gift`` metric; the run re-quantizes with it (its own untrained start is in the job's
  ``ppl_run_start``; the gap closed is measured against the shared ``gift`` start, so it compares final
  perplexities on one scale).
* ``ste-bw2+kd`` / ``quik-lora-bw2+kd``: the baselines at the same budget (compare/methods.py's ``ste``, STE-QAT
  of all weights, and ``quik-lora``, LoRA r64 on the frozen model): they start from the very checkpoint the
  ``bw2`` job wrote (the same block stage as ``bw2+kd``'s, bit for bit: the same calibration draw, block-stage
  settings and seed; the report checks its perplexity against ``bw2+kd``'s block stage) and then train 100 KD
  steps on the same windows, teacher, lr and schedule as ``bw2+kd``'s distillation. Their recovery time
  counts the block stage too. ``run`` runs (or reuses) the ``bw2`` job first.
* ``kd-scales-100``, ``kd-mix-100``: the distillation stage alone, with the scales / on a general text mix.

``run --set KEY=VALUE`` overrides a recover setting of the configuration (tiny smoke runs, screens); the
overrides become part of the job's name, so they never mix with the configuration's own rows.
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
# recovery v2's stages: the block stage (64 steps per block by default, --blockwise-steps changes it; no noise
# there: tools/blockwise_probe.py found it worse) and 100 KD steps on State of the Union
BW2 = dict(blockwise_steps=64, blockwise_train="salient,scales,rounding", blockwise_noise="none")
KD100 = dict(loss="kd", train_data="sotu", lr=3e-4, steps=100)
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
    # recovery v2 (issue 21, module docstring): the block stage, then 100 KD steps that also train the scales
    "bw2": dict(method="recover", steps=0, train_data="sotu", **BW2),
    "bw2+kd": dict(method="recover", **KD100, **BW2, train="salient,scales"),
    "bw2+kd-salient": dict(method="recover", **KD100, **BW2),
    # req 4: GIFT-SW's own ingredients, one at a time on the final pipeline
    "bw2+kd-frozen": dict(method="recover", **KD100, **{**BW2, "blockwise_train": "scales,rounding"}, train="scales"),
    "bw2+kd-nonoise": dict(method="recover", **KD100, **BW2, train="salient,scales", noise="none"),
    "bw2+kd-anneal": dict(method="recover", **KD100, **BW2, train="salient,scales", noise_schedule="anneal"),
    "bw2+kd-bwnoise": dict(method="recover", **KD100, **{**BW2, "blockwise_noise": "normal"}, train="salient,scales"),
    "bw2+kd-bwanneal": dict(method="recover", **KD100, **{**BW2, "blockwise_noise": "normal"}, train="salient,scales",
                            blockwise_noise_schedule="anneal"),
    "bw2+kd-actonly": dict(method="recover", **KD100, **BW2, train="salient,scales", quantize={"metric": "quik"}),
    # req 6: the baselines given bw2+kd's block stage (the bw2 job's checkpoint) and distillation budget
    "ste-bw2+kd": dict(method="ste", **KD100, from_block_stage="bw2"),
    "quik-lora-bw2+kd": dict(method="quik-lora", **KD100, from_block_stage="bw2"),
    # the default recipe's end-to-end stage alone, with the scales trained too; and on a general text mix
    "kd-scales-100": dict(method="recover", loss="kd", train_data="sotu", lr=3e-4, steps=100, train="salient,scales"),
    "kd-mix-100": dict(method="gift-post", loss="kd", train_data="sotu+boolq-passages:train", lr=3e-4, steps=100),
}
REFERENCE = "bw2+kd"  # the final pipeline: the report's paired differences are against it
# the second evaluation domain every row is also scored on (held-out speeches; Wikipedia is the first)
SECOND_DOMAIN = "sotu:test"
NOT_RECOVER = ("method", "quantize", "from_block_stage")  # configuration keys that are no RecoverConfig field


def parse_sets(pairs: list[str] | None) -> dict:
    """``["steps=2", "noise=none"]`` -> typed recover overrides (unknown keys and bad values: one-line errors)."""
    import yaml

    from gift_quant.config.settings import RecoverConfig, check_type
    from gift_quant.util.errors import GiftQuantError

    fields = {f.name: f for f in dataclasses.fields(RecoverConfig) if f.name != "seed"}  # the seed is --seed
    out = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE with KEY a recover setting ({', '.join(fields)})")
        try:
            out[key] = check_type("recover", key, yaml.safe_load(text), str(fields[key].type))
        except GiftQuantError as exc:
            raise SystemExit(f"--set {pair!r}: {exc}") from None
    return out


def job_name(config: str, bits: int, seed: int, blockwise_steps: int | None = None, sets: dict | None = None) -> str:
    """The job's file stem; overrides (``--blockwise-steps``, ``--set``) are part of it."""
    tag = "" if blockwise_steps is None else f"-bw{blockwise_steps}"
    if sets:
        tag += "~" + ",".join(f"{k}={v}" for k, v in sorted(sets.items()))
    return f"{config}{tag}-w{bits}-s{seed}"


def _settings(config: str, bits: int, seed: int, steps: int, recipe_path: Path = RECIPE,
              train_data: str | None = None, blockwise_steps: int | None = None, sets: dict | None = None):
    from gift_quant.config.settings import EvalConfig, QuantizeConfig, RecoverConfig, build, read_recipe

    recipe = read_recipe(recipe_path)
    spec = {**BASE, "steps": steps, **CONFIGS[config], **({"train_data": train_data} if train_data else {})}
    if blockwise_steps is not None and spec.get("blockwise_steps"):
        spec["blockwise_steps"] = blockwise_steps
    spec.update(sets or {})
    qcfg = build(QuantizeConfig, recipe, "quantize", {"bits": bits, "seed": seed, **spec.get("quantize", {})})
    fields = {f.name for f in dataclasses.fields(RecoverConfig)}
    rcfg = RecoverConfig(**{k: v for k, v in spec.items() if k in fields and k not in NOT_RECOVER}, seed=seed)
    ecfg = build(EvalConfig, recipe, "eval", {})
    return qcfg, rcfg, ecfg


def recover_flags(config: str, seed: int = 0) -> str:
    """The ``gift-quant recover`` command line a recover-method configuration runs.

    ``BASE`` is the default recipe's recover section (``eval_every`` aside: the study skips the periodic
    held-out loss, which changes no trained weight), so only the configuration's own keys become flags.
    """
    flags = {"loss": "--loss", "train_data": "--train-data", "lr": "--lr", "steps": "--steps", "noise": "--noise",
             "noise_schedule": "--noise-schedule", "blockwise_steps": "--blockwise-steps",
             "blockwise_train": "--blockwise-train", "blockwise_noise": "--blockwise-noise",
             "blockwise_noise_schedule": "--blockwise-noise-schedule", "train": "--train"}
    spec = CONFIGS[config]
    if spec["method"] != "recover":
        raise ValueError(f"{config} runs compare's {spec['method']!r} method, not gift-quant recover")
    parts = [f"{flags[k]} {v}" for k, v in spec.items() if k in flags]
    parts += [f"--{k.replace('_', '-')} {v}" for k, v in spec.get("quantize", {}).items()]
    return f"gift-quant recover --recipe recipes/{RECIPE.name} --seed {seed} " + " ".join(parts)


def _second_domain(model, tokenizer, ecfg) -> dict:
    """Perplexity (and per-window NLL) on the second evaluation domain, so a gain that is only domain fitting shows."""
    from gift_quant.compare.recovery import evaluate_model
    from gift_quant.config.settings import Runtime

    res = evaluate_model(model, tokenizer, dataclasses.replace(ecfg, ppl_data=SECOND_DOMAIN), [], None,
                         Runtime(device="cpu", progress=False))
    return {"ppl_2": res["ppl"], "window_nll_2": res["window_nll"], "eval_2": SECOND_DOMAIN}


def _lora_model(root: Path):
    """compare's quik-lora model as trained: the start checkpoint made dense, with the saved adapter on top."""
    from peft import PeftModel

    from gift_quant.config.settings import NoiseSpec
    from gift_quant.packed.checkpoint import load
    from gift_quant.recover.model import convert_to_dense, prepare_quantized

    base = convert_to_dense(prepare_quantized(load(root / "owq" / "ckpt"), noise=NoiseSpec("none")))
    return PeftModel.from_pretrained(base, str(root / "quik-lora" / "adapter")).eval()


def run_job(config: str, bits: int, seed: int, start: Path, out: Path, steps: int, model: str | None = None,
            recipe: Path = RECIPE, train_data: str | None = None, blockwise_steps: int | None = None,
            sets: dict | None = None) -> dict:
    """One job's result row (cached in OUT/jobs). ``model``: the source model folder (default: the embedded
    one); ``recipe`` / ``train_data``: the shared settings (default: the study's recipe, each config's data);
    ``sets``: recover settings overriding the configuration's (part of the job's name)."""
    from gift_quant.compare.recovery import evaluate_model, run_method
    from gift_quant.config.settings import Runtime
    from gift_quant.model.loading import load_tokenizer, resolve_model_dir

    cpu = Runtime(device="cpu", progress=False)

    out = Path(out)
    name = job_name(config, bits, seed, blockwise_steps, sets)
    result_path = out / "jobs" / f"{name}.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    method = CONFIGS[config]["method"] if config not in ("fp", "start") else config
    qcfg, rcfg, ecfg = _settings(config if config in CONFIGS else "paper", bits, seed, steps, recipe, train_data,
                                 blockwise_steps, sets)
    work = out / "work" / name
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    label = name[:name.rindex("-w")]
    row = {"config": label, "base": config, "tag": label[len(config):], "bits": bits, "seed": seed,
           "start": str(start), "steps": rcfg.steps, "metric": qcfg.metric, "eval": ecfg.ppl_data,
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
        block_stage = CONFIGS[config].get("from_block_stage")
        if block_stage:  # the same block stage as bw2+kd: the bw2 job's checkpoint (run first, or reused)
            block_sets = {k: v for k, v in (sets or {}).items() if k != "steps"}
            bw_row = run_job(block_stage, bits, seed, start, out, steps, model, recipe, train_data, blockwise_steps,
                             block_sets)
            begin = out / "work" / job_name(block_stage, bits, seed, blockwise_steps, block_sets) / "out"
            row.update({"block_stage": bw_row["config"], "ppl_block_stage": bw_row["ppl"],
                        "ppl_run_start": bw_row.get("ppl_run_start"),
                        "blockwise_seconds": bw_row["blockwise_seconds"]})
        else:
            begin = Path(start)
        if not link.exists():
            link.symlink_to(begin.resolve())
        res = run_method(method, model, root, qcfg, rcfg, ecfg, [], None)
        row.update({k: res[k] for k in ("ppl", "window_nll", "effective_bits", "seconds", "loss_curve") if k in res})
        from gift_quant.packed.checkpoint import load

        ckpt = root / method / "ckpt"
        tok = load_tokenizer(resolve_model_dir(model))
        if (ckpt / "gift_quant_config.json").is_file():
            row.update(_second_domain(load(ckpt).eval(), tok, ecfg))
        elif method == "quik-lora":
            row.update(_second_domain(_lora_model(root), tok, ecfg))
        row["recovery_seconds"] = (res["seconds"].get("train") or 0.0) + row.get("blockwise_seconds", 0.0)
    row["total_seconds"] = time.perf_counter() - t0
    result_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1))
    tmp.replace(result_path)
    return row


# ------------------------------------------------------------------ report


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval over independent runs (nan bounds for fewer than two runs)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, float("nan"), float("nan")
    try:
        from scipy import stats
    except ImportError as exc:  # scipy comes with the [dev] and [eval] extras
        raise SystemExit("recovery_study report needs scipy for the t quantile: pip install scipy") from exc
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * statistics.stdev(values) / math.sqrt(n)
    return mean, mean - half, mean + half


def _gap(start: float, recovered: float, fp: float) -> float:
    return (start - recovered) / (start - fp)


def _bootstrap(n: int, stat, draws: int = 2000) -> tuple[float, float]:
    """95 % percentile interval of ``stat(indices)`` over resampled evaluation windows (fixed seed)."""
    import random

    rng = random.Random(0)
    vals = sorted(stat([rng.randrange(n) for _ in range(n)]) for _ in range(draws))
    return vals[int(0.025 * draws)], vals[int(0.975 * draws) - 1]


def _ppl(nll: list[float], idx: list[int]) -> float:
    return math.exp(sum(nll[i] for i in idx) / len(idx))


def paired_gap_interval(nll_start, nll_rec, ppl_fp) -> tuple[float, float]:
    """95 % interval of the gap closed over evaluation windows (bootstrap, fixed seed): screening only."""
    return _bootstrap(len(nll_start), lambda i: _gap(_ppl(nll_start, i), _ppl(nll_rec, i), ppl_fp))


def paired_diff_interval(nll_start, nll_a, nll_b, ppl_fp) -> tuple[float, float]:
    """95 % window-bootstrap interval of gap closed by a minus gap closed by b on one start (same windows)."""
    def diff(i):
        s = _ppl(nll_start, i)
        return _gap(s, _ppl(nll_a, i), ppl_fp) - _gap(s, _ppl(nll_b, i), ppl_fp)
    return _bootstrap(len(nll_start), diff)


# the two evaluation domains: (key suffix in the report rows, perplexity key, per-window NLL key)
DOMAINS = (("", "ppl", "window_nll"), ("2", "ppl_2", "window_nll_2"))


def _domain(d: str, ppl: str, nll: str, pairs: list, fp: dict, ref: dict) -> dict:
    """One domain's numbers of a row: gaps per start, t-interval, window bootstrap (one start), paired difference
    to the reference row (``ref``: seed -> its job) with its t-interval (or window bootstrap on one start)."""
    if ppl not in fp or not all(ppl in s and ppl in j for s, j in pairs):
        return {}
    gaps = [_gap(s[ppl], j[ppl], fp[ppl]) for s, j in pairs]
    mean, lo, hi = t_interval(gaps)
    out = {f"gap{d}_closed": gaps, f"gap{d}_mean": mean, f"gap{d}_low": lo, f"gap{d}_high": hi}
    if len(pairs) == 1 and nll in pairs[0][0] and nll in pairs[0][1]:
        out[f"window{d}_low"], out[f"window{d}_high"] = paired_gap_interval(pairs[0][0][nll], pairs[0][1][nll],
                                                                            fp[ppl])
    both = [(s, j, ref[j["seed"]]) for s, j in pairs if j["seed"] in ref and ppl in ref[j["seed"]]]
    if ref and both and not all(j is r for _, j, r in both):
        diffs = [_gap(s[ppl], j[ppl], fp[ppl]) - _gap(s[ppl], r[ppl], fp[ppl]) for s, j, r in both]
        mean, lo, hi = t_interval(diffs)
        out.update({f"diff{d}": diffs, f"diff{d}_seeds": [j["seed"] for _, j, _ in both], f"diff{d}_mean": mean,
                    f"diff{d}_low": lo, f"diff{d}_high": hi})
        s, j, r = both[0]
        if len(both) == 1 and all(nll in x for x in (s, j, r)):
            out[f"diffwin{d}_low"], out[f"diffwin{d}_high"] = paired_diff_interval(s[nll], j[nll], r[nll], fp[ppl])
    return out


def report(out: Path, results: Path) -> list[dict]:
    jobs = [json.loads(p.read_text()) for p in sorted((Path(out) / "jobs").glob("*.json"))]
    fp = [j for j in jobs if j["config"] == "fp"]
    if not fp:
        raise SystemExit("no fp job: run --config fp first")
    fp = fp[0]
    ppl_fp = fp["ppl"]
    starts = {(j["bits"], j["seed"]): j for j in jobs if j["config"] == "start"}
    rows = []
    groups: dict[tuple[str, int], list[dict]] = {}
    for j in jobs:
        if j["config"] in ("fp", "start") or (j["bits"], j["seed"]) not in starts:
            continue
        groups.setdefault((j["config"], j["bits"]), []).append(j)
    for (config, bits), js in sorted(groups.items()):
        js = sorted(js, key=lambda x: x["seed"])
        pairs = [(starts[(bits, j["seed"])], j) for j in js]
        tag = js[0].get("tag", "")
        ref = {j["seed"]: j for j in groups.get((REFERENCE + tag, bits), [])}
        row = {"config": config, "base": js[0].get("base", config), "tag": tag, "bits": bits,
               "seeds": [j["seed"] for j in js], "reference": REFERENCE + tag if ref else None,
               "ppl_start": [s["ppl"] for s, _ in pairs], "ppl_recovered": [j["ppl"] for j in js],
               "recovery_seconds": [j.get("recovery_seconds") for j in js], "steps": js[0].get("steps")}
        for d, ppl, nll in DOMAINS:
            row.update(_domain(d, ppl, nll, pairs, fp, ref))
        # a baseline's block stage must be bw2+kd's: the same perplexity, start by start
        checks = [(j["seed"], j["ppl_block_stage"], ref[j["seed"]].get("ppl_after_blockwise")) for j in js
                  if "ppl_block_stage" in j and j["seed"] in ref]
        if checks:
            row["block_stage_check"] = checks
        own = [(j["seed"], j["ppl_run_start"]) for s, j in pairs if j.get("ppl_run_start") is not None
               and not math.isclose(j["ppl_run_start"], s["ppl"], rel_tol=1e-6)]
        if own:
            row["own_start"] = own  # quantized differently from the shared start (e.g. another metric)
        rows.append(row)
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "study.json").write_text(json.dumps({"ppl_fp": ppl_fp, "ppl_fp_2": fp.get("ppl_2"),
                                                    "starts": {f"w{b}-s{s}": v["ppl"] for (b, s), v in starts.items()},
                                                    "reference": REFERENCE, "rows": rows}, indent=1))
    _write_csv(results / "study.csv", rows)
    _write_markdown(results / "study.md", rows, fp, starts)
    zeroshot_table(Path(out) / "zeroshot", results)
    _plot(results / "gap_closed.png", rows, fp)
    return rows


CSV_FIELDS = ["gap_mean", "gap_low", "gap_high", "window_low", "window_high", "gap2_mean", "gap2_low", "gap2_high",
              "window2_low", "window2_high", "diff_mean", "diff_low", "diff_high", "diff2_mean", "diff2_low",
              "diff2_high"]


def _write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["config", "bits", "n_starts", *CSV_FIELDS, "ppl_start_mean", "ppl_recovered_mean",
                    "recovery_seconds_mean"])
        for r in rows:
            secs = [s for s in r["recovery_seconds"] if s is not None]
            w.writerow([r["config"], r["bits"], len(r["seeds"]), *(f"{r.get(k, float('nan')):.4f}" for k in CSV_FIELDS),
                        f"{statistics.fmean(r['ppl_start']):.3f}", f"{statistics.fmean(r['ppl_recovered']):.3f}",
                        f"{statistics.fmean(secs):.0f}" if secs else ""])


def _fmt_interval(r: dict, d: str = "", kind: str = "gap") -> str:
    """``kind`` gap: the gap closed of domain ``d``; diff: its paired difference to the reference."""
    window = "window" if kind == "gap" else "diffwin"
    mean = r.get(f"{kind}{d}_mean")
    if mean is None:
        return "-"
    n = len(r["seeds"] if kind == "gap" else r[f"diff{d}_seeds"])
    sign = "+" if kind == "diff" and mean >= 0 else ""
    if n > 1:
        return (f"{sign}{100 * mean:.1f} % ({100 * r[f'{kind}{d}_low']:.1f} to {100 * r[f'{kind}{d}_high']:.1f}), "
                f"{n} starts")
    if f"{window}{d}_low" in r:
        return (f"{sign}{100 * mean:.1f} % (windows: {100 * r[f'{window}{d}_low']:.1f} to "
                f"{100 * r[f'{window}{d}_high']:.1f}), 1 start")
    return f"{sign}{100 * mean:.1f} %, 1 start"


def _write_markdown(path: Path, rows: list[dict], fp: dict, starts: dict) -> None:
    first = fp.get("eval", "boolq-passages:test")
    second = fp.get("eval_2", SECOND_DOMAIN)
    lines = ["# Recovery study (generated by tools/recovery_study.py report)", "",
             f"Full-precision reference: perplexity {fp['ppl']:.3f} on {first}"
             + (f", {fp['ppl_2']:.3f} on {second}" if "ppl_2" in fp else "") + ".",
             "Starting points (GPTQ + salient columns, untrained): " + ", ".join(
                 f"w{b} seed {s}: {v['ppl']:.3f}" for (b, s), v in sorted(starts.items())), "",
             "Gap closed: (start - recovered) / (start - full precision) perplexity. Intervals: 95 % Student-t over "
             "starts (independent calibration draws); on one start, a bootstrap over evaluation windows "
             f"(screening only). 'minus {REFERENCE}': the paired difference, start by start, to the final "
             "pipeline's gap closed on the same start.", "",
             f"| config | bits | gap closed, {first} | gap closed, {second} | minus {REFERENCE}, {first} "
             f"| minus {REFERENCE}, {second} | perplexity start -> recovered | recovery s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["bits"], -r["gap_mean"])):
        secs = [s for s in r["recovery_seconds"] if s is not None]
        ppl = ", ".join(f"{a:.2f} -> {b:.2f}" for a, b in zip(r["ppl_start"], r["ppl_recovered"]))
        lines.append(f"| {r['config']} | {r['bits']} | {_fmt_interval(r)} | {_fmt_interval(r, '2')} | "
                     f"{_fmt_interval(r, '', 'diff')} | {_fmt_interval(r, '2', 'diff')} | {ppl} | "
                     f"{f'{statistics.fmean(secs):.0f}' if secs else '-'} |")
    notes = []
    for r in rows:
        for seed, mine, theirs in r.get("block_stage_check", []):
            same = theirs is not None and math.isclose(mine, theirs, rel_tol=1e-6)
            notes.append(f"- {r['config']} seed {seed}: starts from a block stage with perplexity {mine:.4f}; "
                         f"{r['reference']}'s own block stage: "
                         + (f"{theirs:.4f}" if theirs is not None else "not recorded")
                         + (" (the same)" if same else " (DIFFERENT: not the same block stage)"))
        for seed, own in r.get("own_start", []):
            notes.append(f"- {r['config']} seed {seed}: its own untrained start has perplexity {own:.3f} (quantized "
                         "with its own settings); the gap closed above is against the shared start")
    if notes:
        lines += ["", *notes]
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


def _plot(path: Path, rows: list[dict], fp: dict) -> None:
    """Gap closed per configuration, one panel per evaluation domain, with each row's interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: (r["bits"], r["gap_mean"]))
    names = (("", fp.get("eval", "boolq-passages:test")), ("2", fp.get("eval_2", SECOND_DOMAIN)))
    domains = [(d, name) for d, name in names if any(f"gap{d}_mean" in r for r in rows)]
    fig, axes = plt.subplots(1, len(domains), figsize=(6 * len(domains), 0.45 * len(rows) + 1.8), sharey=True,
                             squeeze=False)
    for ax, (d, name) in zip(axes[0], domains):
        for y, r in enumerate(rows):
            if f"gap{d}_mean" not in r:
                continue
            multi = len(r["seeds"]) > 1
            lo, hi = (r[f"gap{d}_low"], r[f"gap{d}_high"]) if multi else (r.get(f"window{d}_low"),
                                                                          r.get(f"window{d}_high"))
            color = "tab:blue" if multi else "tab:gray"
            if lo is not None and not math.isnan(lo):
                ax.plot([100 * lo, 100 * hi], [y, y], color=color, lw=2)
            ax.plot(100 * r[f"gap{d}_mean"], y, "o", color=color)
            for g in r[f"gap{d}_closed"]:
                ax.plot(100 * g, y, "|", color="black", ms=8)
        ax.axvline(0, color="black", lw=0.8)
        ax.axvline(100, color="green", lw=0.8, ls="--")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("share of the quantization gap closed, %\n(0 = untrained start, 100 = full precision)")
        ax.grid(alpha=0.3, axis="x")
    axes[0][0].set_yticks(range(len(rows)), [f"{r['config']} (w{r['bits']}, {len(r['seeds'])} start"
                                             f"{'s' if len(r['seeds']) > 1 else ''})" for r in rows])
    fig.suptitle("Recovery by configuration: blue = 95 % t-interval over starts, gray = window bootstrap (1 start), "
                 "| = each start", fontsize=9)
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
    r.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="override a recover setting of the configuration (repeatable; part of the job's name)")
    c = sub.add_parser("command", help="the gift-quant recover command line a recover configuration runs")
    c.add_argument("--config", required=True, choices=[k for k, v in CONFIGS.items() if v["method"] == "recover"])
    c.add_argument("--seed", type=int, default=0)
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
                      Path(a.recipe), a.train_data, a.blockwise_steps, parse_sets(a.set))
        print(json.dumps({k: v for k, v in row.items()
                          if k not in ("window_nll", "window_nll_2", "loss_curve", "recover")}))
    elif a.cmd == "command":
        print(recover_flags(a.config, a.seed))
    elif a.cmd == "answers":
        pairs = dict(m.split("=", 1) for m in a.models)
        greedy_answers({k: None if v == "default" else v for k, v in pairs.items()}, Path(a.results))
    else:
        for row in report(Path(a.out), Path(a.results)):
            print(row["config"], row["bits"], _fmt_interval(row), "|", SECOND_DOMAIN, _fmt_interval(row, "2"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
