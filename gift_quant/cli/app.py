"""Command line: flags -> config objects -> workflow calls. No logic lives here.

Every user-facing failure is a GiftQuantError (or a few well-understood OS errors), printed as one
line ``gift-quant: error: ...`` with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..util.cpu_policy import apply_at_launch

__all__ = ["INTERRUPTED", "TERMINATED", "TRACEBACK_ENV", "Terminated", "cmd_clean", "cmd_compare",
           "cmd_eval", "cmd_export", "cmd_finetune", "cmd_inspect", "cmd_quantize", "cmd_recover",
           "main", "make_parser", "parse_lr_grid"]

apply_at_launch()  # thread settings of the gift-quant command: before torch loads (cli/flags -> config -> torch)

from ..config.settings import (  # noqa: E402
    DEFAULT_PEFT_TRAIN_DATA,
    EvalConfig,
    QuantizeConfig,
    RecoverConfig,
    Runtime,
    build,
    read_recipe,
)
from ..util.console import quiet_import_noise, silence_library_bars  # noqa: E402
from ..util.errors import GiftQuantError  # noqa: E402
from ..util.files import atomic_write_text  # noqa: E402
from . import flags as F  # noqa: E402


def _quantize_overrides(a) -> dict:
    bits = a.bits[0] if isinstance(a.bits, list) else a.bits
    return {"bits": bits, "group_size": a.group_size, "sym": a.sym, "act_order": a.act_order,
            "static_groups": a.static_groups, "group_layout": a.group_layout, "clip": a.clip, "damp": a.damp,
            "salient": a.salient,
            "salient_fraction": a.salient_fraction, "metric": a.metric, "calib_data": a.calib_data,
            "calib_samples": a.calib_samples, "seq_len": a.seq_len, "calib_batch_size": a.calib_batch_size,
            "seed": a.seed, "dtype": a.dtype}


def _runtime(a, recipe: dict | None = None) -> Runtime:
    """How this command runs: the recipe's ``runtime`` section, then --device / --no-progress /
    --trust-remote-code. Remote code is enabled by the flag alone, never by a recipe file."""
    recipe = recipe or {}
    if "trust_remote_code" in recipe.get("runtime", {}):
        raise GiftQuantError("recipe runtime.trust_remote_code: only the --trust-remote-code flag runs a model "
                             "folder's own code; remove the key from the recipe")
    flags = {"device": getattr(a, "device", None), "progress": False if getattr(a, "no_progress", False) else None,
             "trust_remote_code": True if getattr(a, "trust_remote_code", False) else None}
    return build(Runtime, recipe, "runtime", flags)


_DATA_LABELS = {"calib_data": "calibration data", "train_data": "training data", "eval_data": "evaluation data",
                "ppl_data": "perplexity data"}


def _inputs(a, *cfgs) -> dict:
    """label -> local path of everything the command reads (data specs that are not files are left out)."""
    from ..packed.ownership import data_input

    inputs = {"recipe": getattr(a, "recipe", None), "model folder": getattr(a, "model_dir", None)}
    for cfg in cfgs:
        for name, label in _DATA_LABELS.items():
            if hasattr(cfg, name):
                inputs[label] = data_input(getattr(cfg, name))
    return inputs


def _check_run(a, *cfgs) -> None:
    """What the config objects cannot check alone, before any folder is touched or model loaded: the metric,
    and an --out (or --json file) that would write where the command reads."""
    from ..packed.ownership import check_inputs
    from ..quant.sensitivity import parse_metric

    for cfg in cfgs:
        if isinstance(cfg, QuantizeConfig):
            try:
                parse_metric(cfg.metric)
            except ValueError as exc:
                raise GiftQuantError(f"--metric: {exc}") from None
    inputs = _inputs(a, *cfgs)
    if getattr(a, "out", None):
        check_inputs(Path(a.out), inputs)
    _check_json_out(a, inputs)


def _check_json_out(a, inputs: dict) -> None:
    """--json FILE must not replace a file the command reads (or one inside a folder it reads)."""
    from ..packed.ownership import check_file_target

    if getattr(a, "json_out", None):
        check_file_target(Path(a.json_out), inputs)


def cmd_quantize(a) -> dict:
    from ..workflows.commands import run_quantize

    recipe = read_recipe(a.recipe)
    cfg = build(QuantizeConfig, recipe, "quantize", _quantize_overrides(a))
    _check_run(a, cfg)
    res = run_quantize(a.model_dir, a.out, cfg, overwrite=a.overwrite, runtime=_runtime(a, recipe))
    print(f"wrote {res['out']}: {cfg.bits}-bit, {res['effective_bits']:.3f} effective bits/weight, "
          f"mean relative layer error {res['mean_relative_error']:.4f}, {res['total_seconds']:.0f} s")
    return res


def cmd_eval(a) -> dict:
    from ..workflows.commands import run_eval_ppl

    if a.tasks:
        from ..eval.zeroshot import format_table, run_eval_tasks

        _check_limit(a)
        res = run_eval_tasks(a.path, a.tasks, limit=a.limit, batch_size=a.batch_size, runtime=_runtime(a),
                             seed=a.seed)
        print(format_table(res))
        print(f"{res['effective_bits']:.3f} effective bits/weight ({res['kind']})")
        return res

    recipe = read_recipe(a.recipe)
    cfg = build(EvalConfig, recipe, "eval", {"ppl_data": a.ppl_data, "seq_len": a.seq_len,
                                             "max_windows": a.max_windows})
    _check_json_out(a, {**_inputs(a, cfg), "model folder": a.path})
    res = run_eval_ppl(a.path, cfg, _runtime(a, recipe))
    print(f"perplexity {res['perplexity']:.3f} on {res['ppl_data']} ({res['windows']} x {res['seq_len']} tokens), "
          f"{res['effective_bits']:.3f} effective bits/weight ({res['kind']})")
    return res


def cmd_recover(a) -> dict:
    from ..workflows.commands import run_recover

    recipe = read_recipe(a.recipe)
    qcfg = build(QuantizeConfig, recipe, "quantize", _quantize_overrides(a))
    rcfg = build(RecoverConfig, recipe, "recover", _recover_overrides(a))
    ecfg = build(EvalConfig, recipe, "eval", {"ppl_data": a.ppl_data, "seq_len": a.ppl_seq_len,
                                              "max_windows": a.max_windows})
    _check_run(a, qcfg, rcfg, ecfg)
    res = run_recover(a.model_dir, a.out, qcfg, rcfg, ecfg, overwrite=a.overwrite, runtime=_runtime(a, recipe),
                      keep_intermediate=a.keep_intermediate)
    gap = "" if res.get("gap_closed") is None else f", {100 * res['gap_closed']:.1f} % of the gap closed"
    block = ""
    if res.get("ppl_after_blockwise") is not None:
        share = res.get("gap_closed_blockwise")
        block = (f" -> {res['ppl_after_blockwise']:.3f} after the block stage"
                 + ("" if share is None else f" ({100 * share:.1f} % of the gap)"))
    print(f"wrote {res['out']}: GIFT-SW {res['variant']} w{res['bits']} ({res['effective_bits']:.3f} bits/weight), "
          f"loss {rcfg.loss}, perplexity {res['ppl_before']:.3f} before recovery{block} -> {res['ppl_after']:.3f} "
          f"after (full precision {res['ppl_fp']:.3f}{gap}); summary in {res['out']}/summary.md")
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


def _check_limit(a) -> None:
    for flag, value in (("--limit", getattr(a, "limit", None)), ("--batch-size", getattr(a, "batch_size", None))):
        if value is not None and value < 1:
            raise GiftQuantError(f"{flag} {value} must be a whole number >= 1")


def cmd_compare(a) -> dict:
    from ..compare.methods import METHODS
    from ..compare.peft import run_compare_peft
    from ..compare.recovery import run_compare
    from ..workflows.stages import preflight

    recipe = read_recipe(a.recipe)
    qcfg = build(QuantizeConfig, recipe, "quantize", _quantize_overrides(a))
    overrides = _peft_overrides(a, recipe) if a.mode == "peft" else _recover_overrides(a)
    rcfg = build(RecoverConfig, recipe, "recover", overrides)
    _check_run(a, qcfg, rcfg)
    if a.mode == "peft":
        from ..compare.peft import PEFT_METHODS

        methods = list(PEFT_METHODS) if a.methods in (None, "all") else [m.strip() for m in a.methods.split(",")]
        unknown = sorted(set(methods) - set(PEFT_METHODS))
        if unknown:
            raise GiftQuantError(f"unknown PEFT method(s) {unknown}; choose from {', '.join(PEFT_METHODS)}")
        tasks = [] if not a.tasks else _expand_tasks(a.tasks)
        grid = parse_lr_grid(a.lr_grid, methods) if a.lr_grid else None
        _check_limit(a)
        runtime = _runtime(a, recipe)
        preflight(a.model_dir, qcfg, rcfg, runtime=runtime)
        run_compare_peft(a.model_dir, Path(a.out), methods, qcfg, rcfg, tasks, a.limit, runtime=runtime, lr_grid=grid)
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
    _check_limit(a)
    _check_run(a, qcfg, rcfg, ecfg)
    runtime = _runtime(a, recipe)
    preflight(a.model_dir, qcfg, rcfg, ecfg, runtime)
    doc = run_compare(a.model_dir, Path(a.out), a.bits or [qcfg.bits], methods, qcfg, rcfg, ecfg, tasks, a.limit,
                      runtime)
    print((Path(a.out) / "report.md").read_text())
    failed = [f"w{r['bits']} {r['method']}" for r in doc["rows"] if "failed" in r]
    if failed:
        print(f"gift-quant: {len(failed)} method(s) failed and are reported as failed: {', '.join(failed)}",
              file=sys.stderr)
    return {"report": str(Path(a.out) / "report.md"), "failed": failed}


def cmd_export(a) -> dict:
    from ..export import export

    _check_json_out(a, {"checkpoint": a.ckpt})
    res = export(a.ckpt, a.out, fmt=a.format, dtype=a.dtype, checkpoint_format=a.checkpoint_format,
                 overwrite=a.overwrite)
    for w in res.get("warnings", []):
        print(f"gift-quant: warning: {w}", file=sys.stderr)
    if "chosen_because" in res:
        print(f"gift-quant: format {res['format']} ({res['chosen_because']}; --format picks another)")
    if res["format"] == "gptq-lora":
        print(f"wrote {res['out']} (GPTQ {res['bits']}-bit, group size {res['group_size']}, desc_act "
              f"{res['desc_act']}, {res['checkpoint_format']}) and {res['out']}/adapter (LoRA rank {res['lora_rank']})")
    elif res["format"] == "compressed-tensors":
        print(f"wrote {res['out']} (compressed-tensors {res['ct_format']}, {res['bits']}-bit, {res['strategy']} "
              f"strategy, group size {res['group_size']}, {'sym' if res['sym'] else 'asym'}) and {res['out']}/adapter "
              f"(LoRA rank {res['lora_rank']})")
    elif res["format"] == "gguf":
        files = " and ".join(f"{res['out']}/{f}" for f in res["files"])
        print(f"wrote {files} (GGUF {res['ggml_type']}, LoRA rank {res['lora_rank']}); serve with: "
              f"{res['commands']['llama-server']}")
    else:
        print(f"wrote {res['out']} (merged, {res['dtype']}, {res['parameters']:,} parameters)")
    return res


def cmd_inspect(a) -> dict:
    from ..export.inspection import format_report, inspect_checkpoint

    _check_json_out(a, {"inspected folder": a.path})
    for f in sorted(Path(a.path).glob("*.json")) if Path(a.path).is_dir() else []:  # inspect reads them as is
        try:
            json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise GiftQuantError(f"{f} is not valid JSON ({str(exc).splitlines()[0][:120]}): the folder is damaged "
                                 "(truncated or edited); re-create it") from None
    info = inspect_checkpoint(a.path)
    print(format_report(info, layers=a.layers))
    if str(info.get("health", "")).startswith("broken"):
        raise GiftQuantError(f"{a.path} is not healthy: {info['health'][len('broken: '):]}")
    return info


def cmd_clean(a) -> dict:
    from ..packed.checkpoint import is_checkpoint
    from ..packed.run_folder import RUN_DIR, remove_intermediate

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
    from ..workflows.finetune import run_finetune

    recipe = read_recipe(a.recipe)
    qcfg = build(QuantizeConfig, recipe, "quantize", _quantize_overrides(a))
    rcfg = build(RecoverConfig, recipe, "recover", _peft_overrides(a, recipe))
    _check_run(a, qcfg, rcfg)
    res = run_finetune(a.model_dir, a.out, qcfg, rcfg, overwrite=a.overwrite, runtime=_runtime(a, recipe))
    print(f"wrote {res['out']} (merged, {res['dtype']}) and {res['adapter']} (LoRA rank {res['lora_rank']}, "
          f"{res['trainable_params']:,} trained weights, noise {res['noise']})")
    return res


def _expand_tasks(text: str) -> list[str]:
    from ..eval.zeroshot import resolve_tasks

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
            "gradient_checkpointing": a.gradient_checkpointing, "cache_mb": a.cache_mb, "seed": a.seed, "loss": a.loss,
            "kd_temperature": a.kd_temperature, "ce_weight": a.ce_weight, "teacher_device": a.teacher_device,
            "blockwise_steps": a.blockwise_steps, "blockwise_lr": a.blockwise_lr,
            "blockwise_target": a.blockwise_target, "blockwise_train": a.blockwise_train,
            "blockwise_scales_lr": a.blockwise_scales_lr, "blockwise_rounding_lr": a.blockwise_rounding_lr,
            "blockwise_warmup_ratio": a.blockwise_warmup_ratio, "blockwise_holdout": a.blockwise_holdout,
            "blockwise_noise": a.blockwise_noise, "noise_schedule": a.noise_schedule,
            "blockwise_noise_schedule": a.blockwise_noise_schedule,
            "train": a.train, "scales_lr": a.scales_lr, "precision": a.precision}


def make_parser() -> argparse.ArgumentParser:
    from ..packed.run_folder import tool_version

    parser = argparse.ArgumentParser(prog="gift-quant", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"gift-quant {tool_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = [
        ("quantize", "salient-aware GPTQ -> native checkpoint", cmd_quantize, (F.add_quantize_flags, F.add_common)),
        ("recover", "quantize + GIFT-SW recovery of the salient columns -> native checkpoint", cmd_recover,
         (F.add_quantize_flags, F.add_recover_flags, F.add_common, _add_keep_intermediate)),
        ("clean", "remove the resumable state under OUT/run (stage checkpoints, optimizer state)", cmd_clean,
         (F.add_clean_flags,)),
        ("finetune", "GIFT-SW as PEFT on a full-precision model -> merged folder + adapter", cmd_finetune,
         (F.add_quantize_flags, F.add_recover_flags, F.add_common)),
        ("compare", "every method on the same data and budget -> report (md, csv, json, png)", cmd_compare,
         (lambda c: F.add_quantize_flags(c, multi_bits=True), F.add_recover_flags, F.add_compare_flags,
          F.add_common)),
        ("eval", "perplexity of a model folder or gift checkpoint", cmd_eval, (F.add_eval_flags, F.add_common)),
        ("export", "native checkpoint -> GPTQ or compressed-tensors + LoRA adapter, or merged dense folder",
         cmd_export, (F.add_export_flags,)),
        ("inspect", "health, bits, groups, salient columns, effective bits, size, provenance", cmd_inspect,
         (F.add_inspect_flags,)),
    ]
    for name, help_text, func, adders in commands:
        p = sub.add_parser(name, help=help_text)
        for add in adders:
            add(p)
        p.set_defaults(func=func)
    return parser


def _add_keep_intermediate(r: argparse.ArgumentParser) -> None:
    r.add_argument("--keep-intermediate", action="store_true",
                   help="keep run/'s stage checkpoints and optimizer state after success (default: removed)")


class Terminated(BaseException):
    """SIGTERM as an exception (like KeyboardInterrupt for SIGINT): unwinds through finally blocks."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _redeliver_swallowed_stops(unraisable) -> None:
    """sys.unraisablehook: a Ctrl-C or SIGTERM that landed inside a ``__del__`` or a gc/weakref callback is
    swallowed there (``Exception ignored in ... __del__``) and the run would go on; deliver it again."""
    import _thread
    import signal
    import threading

    signum = {KeyboardInterrupt: signal.SIGINT, Terminated: signal.SIGTERM}.get(unraisable.exc_type)
    if signum is None:
        sys.__unraisablehook__(unraisable)
        return
    # from another thread, a moment later: raised here, it would be swallowed again (we are inside the hook)
    threading.Timer(0.01, _thread.interrupt_main, args=(signum,)).start()


INTERRUPTED = "gift-quant: interrupted; rerun the same command to resume"
TERMINATED = "gift-quant: terminated (SIGTERM); rerun the same command to resume"
TRACEBACK_ENV = "GIFT_QUANT_TRACEBACK"  # set to 1: an unexpected exception shows its traceback


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    previous_hook = sys.unraisablehook
    try:  # an interrupt at any moment, parsing and imports included, ends in one line
        quiet_import_noise()
        parser = make_parser()
        a = parser.parse_args(argv)
        if getattr(a, "no_progress", False):
            silence_library_bars()
        if getattr(a, "threads", None):  # also when main() is called from Python (cpu_policy covers the command)
            import torch

            torch.set_num_threads(a.threads)
        if threading.current_thread() is threading.main_thread():
            # the default SIGTERM kills without cleanup or message; as an exception it stops like Ctrl-C does
            signal.signal(signal.SIGTERM, _raise_terminated)
        sys.unraisablehook = _redeliver_swallowed_stops
        result = a.func(a)
        if getattr(a, "json_out", None):
            atomic_write_text(Path(a.json_out), json.dumps(result, indent=1, default=str))
        return 0
    except GiftQuantError as exc:
        print(f"gift-quant: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except Terminated:
        print(TERMINATED, file=sys.stderr)
        return 143
    except OSError as exc:  # an environment fault at a site errors.writing does not name: still one line
        from ..util.errors import os_error

        print(f"gift-quant: error: {os_error(exc, exc.filename or '', '')}", file=sys.stderr)
        return 2
    except Exception as exc:  # a library's error that no input check anticipated: one line, never a traceback
        import os
        import traceback

        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{Path(frame.filename).name}:{frame.lineno}"
        text = " ".join(str(exc).split())[:240] or "no message"
        print(f"gift-quant: error: unexpected {type(exc).__name__} in {where}: {text}; the inputs above may be in a "
              f"form gift-quant does not check yet, or this is a bug: rerun with {TRACEBACK_ENV}=1 and report it",
              file=sys.stderr)
        return 1
    finally:
        sys.unraisablehook = previous_hook


if __name__ == "__main__":
    sys.exit(main())
