"""Command line: flags -> config objects -> pipeline calls. No logic lives here.

Every user-facing failure is a GiftQuantError (or a few well-understood OS errors), printed as one
line ``gift-quant: error: ...`` with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cache import atomic_write_text
from .config import DEFAULT_PEFT_TRAIN_DATA, NOISE_KINDS, EvalConfig, QuantizeConfig, RecoverConfig, build, read_recipe
from .errors import GiftQuantError
from .logs import quiet_import_noise


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--json", dest="json_out", default=None, metavar="FILE", help="also write the result as JSON")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_quantize_flags(p: argparse.ArgumentParser, multi_bits: bool = False) -> None:
    p.add_argument("model_dir", nargs="?", default=None,
                   help="local Hugging Face model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="output folder (created; resumable)")
    p.add_argument("--recipe", default=None, help="YAML recipe (see recipes/); flags override it")
    if multi_bits:
        p.add_argument("--bits", type=int, nargs="+", default=None, help="bit widths to sweep (default 3)")
    else:
        p.add_argument("--bits", type=int, default=None, help="2, 3, 4 or 8 (default 3)")
    p.add_argument("--group-size", type=int, default=None, help="columns per grid; -1 = per row (default)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None, help="symmetric grid (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid with zero points")
    p.add_argument("--act-order", action="store_true", default=None, help="GPTQ act-order among non-salient columns")
    p.add_argument("--static-groups", action="store_true", default=None, help="fit groups before act-order")
    p.add_argument("--clip", choices=["mse", "minmax"], default=None, help="grid range search (default mse)")
    p.add_argument("--damp", type=float, default=None, help="GPTQ dampening fraction (default 0.01)")
    sal = p.add_mutually_exclusive_group()
    sal.add_argument("--salient", type=int, default=None, metavar="K", help="salient columns per linear")
    sal.add_argument("--salient-fraction", type=float, default=None, metavar="F",
                     help="salient columns as a fraction of in_features")
    p.add_argument("--metric", default=None,
                   help="gift (default), owq, quik, wanda, or tau=..,rho=..,gamma=..,d=quant|weight")
    p.add_argument("--calib-data", default=None, help="named dataset, .txt/.jsonl/.parquet file or folder, or HF name")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default 128)")
    p.add_argument("--seq-len", type=int, default=None, help="calibration window length (default 256)")
    p.add_argument("--calib-batch-size", type=int, default=None, help="windows per calibration forward (default 8)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default=None, help="compute dtype of the model: float32 (default) or bfloat16")
    p.add_argument("--overwrite", action="store_true", help="discard an earlier gift-quant run in --out")


def _quantize_overrides(a) -> dict:
    bits = a.bits[0] if isinstance(a.bits, list) else a.bits
    return {"bits": bits, "group_size": a.group_size, "sym": a.sym, "act_order": a.act_order,
            "static_groups": a.static_groups, "clip": a.clip, "damp": a.damp, "salient": a.salient,
            "salient_fraction": a.salient_fraction, "metric": a.metric, "calib_data": a.calib_data,
            "calib_samples": a.calib_samples, "seq_len": a.seq_len, "calib_batch_size": a.calib_batch_size,
            "seed": a.seed, "dtype": a.dtype,
            "device": a.device}


def cmd_quantize(a) -> dict:
    from .pipeline import run_quantize
    from .sensitivity import parse_metric

    recipe = read_recipe(a.recipe)
    cfg = build(QuantizeConfig, recipe, "quantize", _quantize_overrides(a))
    try:
        parse_metric(cfg.metric)
    except ValueError as exc:
        raise GiftQuantError(str(exc)) from exc
    res = run_quantize(a.model_dir, a.out, cfg, overwrite=a.overwrite, trust_remote_code=a.trust_remote_code,
                       progress=not a.no_progress)
    print(f"wrote {res['out']}: {cfg.bits}-bit, {res['effective_bits']:.3f} effective bits/weight, "
          f"mean relative layer error {res['mean_relative_error']:.4f}, {res['total_seconds']:.0f} s")
    return res


def cmd_eval(a) -> dict:
    from .pipeline import run_eval_ppl

    if a.tasks:
        from .eval.zeroshot import format_table, run_eval_tasks

        res = run_eval_tasks(a.path, a.tasks, limit=a.limit, batch_size=a.batch_size,
                             device_name=a.device or "auto", trust_remote_code=a.trust_remote_code,
                             progress=not a.no_progress, seed=a.seed)
        print(format_table(res))
        print(f"{res['effective_bits']:.3f} effective bits/weight ({res['kind']})")
        return res

    recipe = read_recipe(a.recipe)
    cfg = build(EvalConfig, recipe, "eval", {"ppl_data": a.ppl_data, "seq_len": a.seq_len,
                                             "max_windows": a.max_windows})
    res = run_eval_ppl(a.path, cfg, a.device or "auto", a.trust_remote_code, progress=not a.no_progress)
    print(f"perplexity {res['perplexity']:.3f} on {res['ppl_data']} ({res['windows']} x {res['seq_len']} tokens), "
          f"{res['effective_bits']:.3f} effective bits/weight ({res['kind']})")
    return res


def _add_recover_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", choices=["post", "pre"], default=None,
                   help="post: quantize then train (default, best at 2-3 bits); pre: train then quantize")
    p.add_argument("--no-noise", dest="noise", action="store_const", const="none", default=None,
                   help="plain salient fine-tuning (ablation)")
    p.add_argument("--noise", dest="noise", choices=NOISE_KINDS, help="noise distribution")
    p.add_argument("--noise-bits", type=int, default=None, help="bits of the noise step (post default 4)")
    p.add_argument("--loss", choices=["ce", "kd", "kd+ce"], default=None,
                   help="objective: kd (KL to the full-precision model; recover's default), ce (next-token "
                        "cross-entropy; finetune's default), kd+ce")
    p.add_argument("--kd-temperature", type=float, default=None, help="distillation temperature (default 1)")
    p.add_argument("--ce-weight", type=float, default=None, help="weight of CE in kd+ce (default 1)")
    p.add_argument("--teacher-device", choices=["auto", "cpu"], default=None,
                   help="where the full-precision teacher runs (cpu keeps it off the accelerator)")
    p.add_argument("--blockwise-steps", type=int, default=None,
                   help="block-wise reconstruction steps per block right after its GPTQ (0 = off)")
    p.add_argument("--blockwise-lr", type=float, default=None, help="block-wise learning rate (default 1e-3)")
    p.add_argument("--blockwise-target", choices=["fp-prefix", "quant-prefix"], default=None,
                   help="block-wise targets: fp block on fp inputs (default) or on the quantized prefix's")
    p.add_argument("--steps", type=int, default=None,
                   help="end-to-end optimizer steps (default 100; 0 = block-wise only)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 3e-4)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step")
    p.add_argument("--warmup-ratio", type=float, default=None)
    p.add_argument("--train-data", default=None,
                   help="named dataset, file or HF name (default sotu for recover, natural-instructions for finetune)")
    p.add_argument("--eval-data", default=None, help="held-out text for periodic eval during training")
    p.add_argument("--save-every", type=int, default=None, help="save resumable state every N steps")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None)
    p.add_argument("--ppl-data", default=None, help="perplexity text (default boolq-passages:test)")
    p.add_argument("--ppl-seq-len", type=int, default=None, help="perplexity window (default 512)")
    p.add_argument("--max-windows", type=int, default=None, help="perplexity windows (default 40)")


def cmd_recover(a) -> dict:
    from .pipeline import run_recover

    recipe = read_recipe(a.recipe)
    qcfg = build(QuantizeConfig, recipe, "quantize", _quantize_overrides(a))
    rcfg = build(RecoverConfig, recipe, "recover", _recover_overrides(a))
    ecfg = build(EvalConfig, recipe, "eval", {"ppl_data": a.ppl_data, "seq_len": a.ppl_seq_len,
                                              "max_windows": a.max_windows})
    res = run_recover(a.model_dir, a.out, qcfg, rcfg, ecfg, overwrite=a.overwrite,
                      trust_remote_code=a.trust_remote_code, progress=not a.no_progress,
                      keep_intermediate=a.keep_intermediate)
    before = "after block-wise reconstruction" if rcfg.blockwise_steps else "before recovery"
    gap = "" if res.get("gap_closed") is None else f", {100 * res['gap_closed']:.1f} % of the gap closed"
    print(f"wrote {res['out']}: GIFT-SW {res['variant']} w{res['bits']} ({res['effective_bits']:.3f} bits/weight), "
          f"loss {rcfg.loss}, perplexity {res['ppl_before']:.3f} {before} -> {res['ppl_after']:.3f} after "
          f"(full precision {res['ppl_fp']:.3f}{gap}); summary in {res['out']}/summary.md")
    return res


def parse_lr_grid(text: str, methods: list[str]) -> dict[str, tuple[float, ...]] | list[float]:
    """``--lr-grid``: one comma list for every method, or ``method=lr,lr;method=lr`` per method."""
    def rates(part: str) -> tuple[float, ...]:
        try:
            values = tuple(float(x) for x in part.split(",") if x.strip())
        except ValueError:
            values = ()
        if not values or any(v <= 0 for v in values):
            raise GiftQuantError(f"--lr-grid: {part!r} is not a comma list of positive learning rates")
        return values

    if "=" not in text:
        return list(rates(text))
    grid = {}
    for item in filter(str.strip, text.split(";")):
        name, _, values = item.partition("=")
        if name.strip() not in methods:
            raise GiftQuantError(f"--lr-grid names {name.strip()!r}, which is not among the methods {methods}")
        grid[name.strip()] = rates(values)
    return grid


def cmd_compare(a) -> dict:
    from .compare import METHODS, run_compare
    from .compare_peft import run_compare_peft

    recipe = read_recipe(a.recipe)
    qcfg = build(QuantizeConfig, recipe, "quantize", _quantize_overrides(a))
    overrides = _peft_overrides(a, recipe) if a.mode == "peft" else _recover_overrides(a)
    rcfg = build(RecoverConfig, recipe, "recover", overrides)
    if a.mode == "peft":
        from .compare_peft import PEFT_METHODS

        methods = list(PEFT_METHODS) if a.methods in (None, "all") else [m.strip() for m in a.methods.split(",")]
        unknown = sorted(set(methods) - set(PEFT_METHODS))
        if unknown:
            raise GiftQuantError(f"unknown PEFT method(s) {unknown}; choose from {', '.join(PEFT_METHODS)}")
        tasks = [] if not a.tasks else _expand_tasks(a.tasks)
        grid = parse_lr_grid(a.lr_grid, methods) if a.lr_grid else None
        run_compare_peft(a.model_dir, Path(a.out), methods, qcfg, rcfg, tasks, a.limit, progress=not a.no_progress,
                         lr_grid=grid)
        print((Path(a.out) / "report_peft.md").read_text())
        return {"report": str(Path(a.out) / "report_peft.md")}
    ecfg = build(EvalConfig, recipe, "eval", {"ppl_data": a.ppl_data, "seq_len": a.ppl_seq_len,
                                              "max_windows": a.max_windows})
    methods = list(METHODS) if a.methods in (None, "all") else [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise GiftQuantError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    for b in a.bits or [qcfg.bits]:
        QuantizeConfig(bits=b)  # validates each width up front
    tasks = [] if not a.tasks else _expand_tasks(a.tasks)
    doc = run_compare(a.model_dir, Path(a.out), a.bits or [qcfg.bits], methods, qcfg, rcfg, ecfg, tasks, a.limit,
                      progress=not a.no_progress)
    print((Path(a.out) / "report.md").read_text())
    failed = [f"w{r['bits']} {r['method']}" for r in doc["rows"] if "failed" in r]
    if failed:
        print(f"gift-quant: {len(failed)} method(s) failed and are reported as failed: {', '.join(failed)}",
              file=sys.stderr)
    return {"report": str(Path(a.out) / "report.md"), "failed": failed}


def cmd_export(a) -> dict:
    from .export import export

    res = export(a.ckpt, a.out, fmt=a.format, dtype=a.dtype, checkpoint_format=a.checkpoint_format,
                 overwrite=a.overwrite)
    for w in res.get("warnings", []):
        print(f"gift-quant: warning: {w}", file=sys.stderr)
    if res["format"] == "gptq-lora":
        print(f"wrote {res['out']} (GPTQ {res['bits']}-bit, group size {res['group_size']}, desc_act "
              f"{res['desc_act']}, {res['checkpoint_format']}) and {res['out']}/adapter (LoRA rank {res['lora_rank']})")
    elif res["format"] == "compressed-tensors":
        print(f"wrote {res['out']} (compressed-tensors {res['ct_format']}, {res['bits']}-bit, {res['strategy']} "
              f"strategy, group size {res['group_size']}, {'sym' if res['sym'] else 'asym'}) and {res['out']}/adapter "
              f"(LoRA rank {res['lora_rank']})")
    else:
        print(f"wrote {res['out']} (merged, {res['dtype']}, {res['parameters']:,} parameters)")
    return res


def cmd_inspect(a) -> dict:
    from .inspect_ckpt import format_report, inspect_checkpoint

    info = inspect_checkpoint(a.path)
    print(format_report(info, layers=a.layers))
    if str(info.get("health", "")).startswith("broken"):
        raise GiftQuantError(f"{a.path} is not healthy: {info['health'][len('broken: '):]}")
    return info


def cmd_clean(a) -> dict:
    from .checkpoint import is_checkpoint
    from .rundir import RUN_DIR, remove_intermediate

    out = Path(a.out)
    run_dir = out / RUN_DIR
    if not run_dir.is_dir():
        raise GiftQuantError(f"{out} has no {RUN_DIR}/ folder: nothing to clean")
    finished = is_checkpoint(out) or (out / "finetune_summary.json").is_file()
    if not finished and not a.discard_progress:
        raise GiftQuantError(f"{out} is an unfinished run: cleaning it discards its progress; "
                             "rerun the same command to finish it, or pass --discard-progress")
    freed = remove_intermediate(run_dir)
    print(f"removed {freed / 2**20:.1f} MB of resumable state from {run_dir}")
    return {"out": str(out), "freed_bytes": freed}


def cmd_finetune(a) -> dict:
    from .finetune import run_finetune

    recipe = read_recipe(a.recipe)
    qcfg = build(QuantizeConfig, recipe, "quantize", _quantize_overrides(a))
    rcfg = build(RecoverConfig, recipe, "recover", _peft_overrides(a, recipe))
    res = run_finetune(a.model_dir, a.out, qcfg, rcfg, overwrite=a.overwrite, trust_remote_code=a.trust_remote_code,
                       progress=not a.no_progress)
    print(f"wrote {res['out']} (merged, {res['dtype']}) and {res['adapter']} (LoRA rank {res['lora_rank']}, "
          f"{res['trainable_params']:,} trained weights, noise {res['noise']})")
    return res


def _expand_tasks(text: str) -> list[str]:
    from .eval.zeroshot import resolve_tasks

    return resolve_tasks(text)  # fails fast on unknown names, before any model is built


def _peft_overrides(a, recipe: dict) -> dict:
    """Fine-tuning a full-precision model: CE on instructions unless the recipe or a flag says otherwise.

    Distillation needs a teacher better than the student; here the teacher would be the model itself.
    """
    overrides = _recover_overrides(a)
    section = recipe.get("recover", {})
    for key, value in (("loss", "ce"), ("train_data", DEFAULT_PEFT_TRAIN_DATA)):
        if overrides.get(key) is None and key not in section:
            overrides[key] = value
    if (overrides.get("loss") or section.get("loss")) != "ce":
        raise GiftQuantError("fine-tuning a full-precision model has no better teacher to distil from: "
                             "use --loss ce (the default for finetune and compare --mode peft)")
    return overrides


def _recover_overrides(a) -> dict:
    return {"variant": a.variant, "noise": a.noise, "noise_bits": a.noise_bits, "steps": a.steps, "lr": a.lr,
            "batch_size": a.batch_size, "grad_accum": a.grad_accum, "warmup_ratio": a.warmup_ratio,
            "seq_len": a.seq_len, "train_data": a.train_data, "eval_data": a.eval_data, "save_every": a.save_every,
            "gradient_checkpointing": a.gradient_checkpointing, "seed": a.seed, "loss": a.loss,
            "kd_temperature": a.kd_temperature, "ce_weight": a.ce_weight, "teacher_device": a.teacher_device,
            "blockwise_steps": a.blockwise_steps, "blockwise_lr": a.blockwise_lr,
            "blockwise_target": a.blockwise_target}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gift-quant", description=__doc__.splitlines()[0])
    from .rundir import tool_version

    parser.add_argument("--version", action="version", version=f"gift-quant {tool_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="salient-aware GPTQ -> native checkpoint")
    _add_quantize_flags(q)
    _add_common(q)
    q.set_defaults(func=cmd_quantize)

    r = sub.add_parser("recover", help="quantize + GIFT-SW recovery of the salient columns -> native checkpoint")
    _add_quantize_flags(r)
    _add_recover_flags(r)
    _add_common(r)
    r.add_argument("--keep-intermediate", action="store_true",
                   help="keep run/'s stage checkpoints and optimizer state after success (default: removed)")
    r.set_defaults(func=cmd_recover)

    k = sub.add_parser("clean", help="remove the resumable state under OUT/run (stage checkpoints, optimizer state)")
    k.add_argument("out", help="an output folder of quantize, recover or finetune")
    k.add_argument("--discard-progress", action="store_true", help="also clean an unfinished run (it restarts)")
    k.add_argument("--json", dest="json_out", default=None, metavar="FILE", help="also write the result as JSON")
    k.set_defaults(func=cmd_clean)

    f = sub.add_parser("finetune", help="GIFT-SW as PEFT on a full-precision model -> merged folder + adapter")
    _add_quantize_flags(f)
    _add_recover_flags(f)
    _add_common(f)
    f.set_defaults(func=cmd_finetune)

    c = sub.add_parser("compare", help="every method on the same data and budget -> report (md, csv, json, png)")
    _add_quantize_flags(c, multi_bits=True)
    _add_recover_flags(c)
    c.add_argument("--mode", choices=["quant", "peft"], default="quant",
                   help="quant: recovery after quantization (default); peft: GIFT-SW vs LoRA/DoRA/full FT")
    c.add_argument("--lr-grid", default=None,
                   help="peft mode: learning rates to try, for every method ('1e-4,3e-4') or per method "
                        "('gift=3e-4,1e-3;full=3e-5,1e-4'; unnamed methods keep their default grid)")
    c.add_argument("--methods", default=None, help="comma-separated subset (default all; see gift_quant.compare)")
    c.add_argument("--tasks", default=None, help="zero-shot tasks, e.g. gift6 (needs the [eval] extra)")
    c.add_argument("--limit", type=int, default=None, help="zero-shot examples per task")
    _add_common(c)
    c.set_defaults(func=cmd_compare)

    e = sub.add_parser("eval", help="perplexity of a model folder or gift checkpoint")
    e.add_argument("path", nargs="?", default=None, help="model folder or checkpoint (default: embedded model)")
    e.add_argument("--ppl-data", default=None, help="named dataset, file or HF name (default boolq-passages:test)")
    e.add_argument("--seq-len", type=int, default=None, help="window length (default 512)")
    e.add_argument("--max-windows", type=int, default=None, help="score at most N windows (default 40)")
    e.add_argument("--recipe", default=None)
    e.add_argument("--tasks", default=None,
                   help="zero-shot accuracy with lm-eval instead of perplexity: gift6 (ARC-e, ARC-c, BoolQ, "
                        "HellaSwag, PIQA, WinoGrande), all (+ lambada), or a comma list (needs the [eval] extra)")
    e.add_argument("--limit", type=int, default=None, metavar="N", help="first N documents of each task")
    e.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size (default 8)")
    e.add_argument("--seed", type=int, default=0)
    _add_common(e)
    e.set_defaults(func=cmd_eval)
    x = sub.add_parser("export", help="native checkpoint -> GPTQ or compressed-tensors + LoRA adapter, or merged "
                                      "dense folder")
    x.add_argument("ckpt", help="gift-quant checkpoint folder (quantize / recover output)")
    x.add_argument("--out", required=True, help="export folder (created; an earlier export needs --overwrite)")
    x.add_argument("--format", choices=["gptq-lora", "compressed-tensors", "dense"], default="gptq-lora",
                   help="gptq-lora: GPTQ base + PEFT adapter in OUT/adapter (default); compressed-tensors: "
                        "pack-quantized base (vLLM's WNA16 path) + the same adapter; dense: merged model")
    x.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the unquantized tensors (dense: of all; compressed-tensors: also of the scales); "
                        "default the checkpoint's; vLLM's GPTQ kernels want float16")
    x.add_argument("--checkpoint-format", choices=["auto", "gptq", "gptq_v2"], default="auto",
                   help="GPTQ zero-point layout: gptq (v1, widest support), gptq_v2, auto (v1 unless it cannot)")
    x.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    x.add_argument("--json", dest="json_out", default=None, metavar="FILE", help="also write the result as JSON")
    x.set_defaults(func=cmd_export)

    i = sub.add_parser("inspect", help="bits, groups, salient columns, effective bits, size, provenance")
    i.add_argument("path", help="native checkpoint, gptq-lora / GPTQ / compressed-tensors export, or dense model "
                                "folder")
    i.add_argument("--layers", action="store_true", help="add the per-layer table")
    i.add_argument("--json", dest="json_out", default=None, metavar="FILE", help="also write the result as JSON")
    i.set_defaults(func=cmd_inspect)
    return parser


class Terminated(BaseException):
    """SIGTERM as an exception (like KeyboardInterrupt for SIGINT): unwinds through finally blocks."""


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    quiet_import_noise()
    parser = make_parser()
    a = parser.parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # the default SIGTERM kills without cleanup or message; as an exception it stops like Ctrl-C does
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        result = a.func(a)
        if getattr(a, "json_out", None):
            atomic_write_text(Path(a.json_out), json.dumps(result, indent=1, default=str))
        return 0
    except GiftQuantError as exc:
        print(f"gift-quant: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gift-quant: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Terminated:
        print("gift-quant: terminated (SIGTERM); rerun the same command to resume", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
