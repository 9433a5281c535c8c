"""The orchestrator: the only module that knows every stage. Run folders, fingerprints, resume.

An output folder of ``quantize`` holds the checkpoint and a ``run/`` folder with the stage artifacts
(``run.json`` settings + fingerprints, per-block GPTQ results, sensitivity scores). Rerunning the same
command resumes from the finished blocks; a different model, calibration set or setting is refused
instead of mixing two runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from .cache import atomic_write_text
from .checkpoint import is_checkpoint, load, read_gift_config, save_checkpoint
from .config import EvalConfig, QuantizeConfig
from .errors import GiftQuantError
from .eval.perplexity import perplexity
from .models import (
    check_causal_lm,
    load_model,
    load_tokenizer,
    parse_dtype,
    resolve_device,
    resolve_model_dir,
)
from .quant.engine import check_finite, quantize_model, validate_salient_counts
from .text_sources import load_documents
from .windows import calibration_windows, eval_windows, fingerprint_tokens

RUN_DIR = "run"
RUN_FILE = "run.json"


def tool_version() -> str:
    try:
        return version("gift-quant")
    except PackageNotFoundError:
        return "0+unknown"


def model_fingerprint(path: Path) -> str:
    """sha256 over config.json and the weight files (names, sizes and contents)."""
    h = hashlib.sha256()
    files = [path / "config.json"] + sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    for f in files:
        if f.is_file():
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    h.update(chunk)
    return h.hexdigest()[:16]


def prepare_output(out: Path, overwrite: bool) -> None:
    """Refuse folders that hold something else; ``overwrite`` clears a previous gift-quant output."""
    if not out.exists():
        return
    if not out.is_dir():
        raise GiftQuantError(f"--out {out} is a file; give a folder path")
    ours = (out / RUN_DIR / RUN_FILE).is_file() or is_checkpoint(out)
    if any(out.iterdir()) and not ours:
        raise GiftQuantError(
            f"--out {out} exists and is not a gift-quant output; choose a new folder or empty it")
    if overwrite and ours:
        shutil.rmtree(out)


def claim_run(out: Path, identity: dict) -> Path:
    """Create or resume ``out/run``; refuses to mix runs whose identity differs."""
    run_dir = out / RUN_DIR
    run_file = run_dir / RUN_FILE
    if run_file.is_file():
        previous = json.loads(run_file.read_text())
        if previous.get("identity") != identity:
            old = previous.get("identity", {})
            changed = []
            for k in sorted(set(old) | set(identity)):
                a, b = old.get(k), identity.get(k)
                if a == b:
                    continue
                if isinstance(a, dict) and isinstance(b, dict):
                    diffs = [f"{f}: {a.get(f)} -> {b.get(f)}" for f in sorted(set(a) | set(b)) if a.get(f) != b.get(f)]
                    changed.append(f"{k} ({', '.join(diffs)})")
                else:
                    changed.append(k)
            raise GiftQuantError(
                f"{out} holds a run with different {', '.join(changed)}; resume needs the same model, data and "
                "settings: use a new --out or pass --overwrite to start over")
        print(f"gift-quant: resuming the run in {out}", file=sys.stderr)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_file, json.dumps({"identity": identity, "started": time.time()}, indent=1))
    return run_dir


def calibration_set(tokenizer, cfg: QuantizeConfig) -> torch.Tensor:
    docs = load_documents(cfg.calib_data, default_split="train")
    return calibration_windows(tokenizer, docs, cfg.calib_samples, cfg.seq_len, cfg.seed, source=cfg.calib_data)


def run_quantize(model_dir: str | None, out: str | Path, cfg: QuantizeConfig, overwrite: bool = False,
                 trust_remote_code: bool = False, progress: bool = True) -> dict:
    """quantize: calibrate -> sensitivity -> salient-aware GPTQ -> native checkpoint in ``out``."""
    return quantize_to_checkpoint(model_dir, out, cfg, overwrite, trust_remote_code, progress)[1]


def load_source(src: Path, cfg: QuantizeConfig, dtype: torch.dtype, trust_remote_code: bool = False):
    """Checked model, tokenizer and calibration windows of ``src``, and the run identity they define.

    The identity (model and calibration fingerprints, settings) is what a resumed run must match.
    """
    check_causal_lm(src, trust_remote_code)
    tokenizer = load_tokenizer(src, trust_remote_code)
    model = load_model(src, dtype, trust_remote_code)
    check_finite(model, str(src))
    validate_salient_counts(model, cfg)
    windows = calibration_set(tokenizer, cfg)
    identity = {"model": model_fingerprint(src), "calibration": fingerprint_tokens(windows),
                "settings": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "device"}}
    return tokenizer, model, windows, identity


def quantize_to_checkpoint(model_dir: str | None, out: str | Path, cfg: QuantizeConfig, overwrite: bool = False,
                           trust_remote_code: bool = False, progress: bool = True):
    """(in-memory quantized model, summary dict); the checkpoint is written to ``out``."""
    t0 = time.perf_counter()
    out = Path(out)
    src = resolve_model_dir(model_dir)
    prepare_output(out, overwrite)
    device = resolve_device(cfg.device)
    tokenizer, model, windows, identity = load_source(src, cfg, parse_dtype(cfg.dtype), trust_remote_code)
    run_dir = claim_run(out, identity)
    report = quantize_model(model, windows, cfg, device, run_dir, progress=progress)
    gift_config = _gift_config(cfg, report, src, identity, windows)
    save_checkpoint(model, out, src, gift_config)
    return model, {"out": str(out), "effective_bits": report.mean_effective_bits(),
            "quantize_seconds": report.seconds, "total_seconds": time.perf_counter() - t0,
            "mean_relative_error": sum(m["relative_error"] for m in report.layers.values()) / len(report.layers)}


def load_any(path: str | None, dtype: torch.dtype = torch.float32, device="cpu", trust_remote_code=False):
    """(model, tokenizer, effective bits, description) for a gift checkpoint or a plain model folder."""
    if path is not None and is_checkpoint(path):
        doc = read_gift_config(Path(path))
        model = load(path, device=device, trust_remote_code=trust_remote_code)
        return model, load_tokenizer(Path(path), trust_remote_code), doc["effective_bits"], "gift-quant checkpoint"
    if path is not None and (Path(path) / RUN_DIR / RUN_FILE).is_file():
        raise GiftQuantError(f"{path} is an unfinished gift-quant run: rerun the same command to finish it")
    src = resolve_model_dir(path)
    model = load_model(src, dtype, trust_remote_code).to(device)
    return model, load_tokenizer(src, trust_remote_code), float(torch.finfo(dtype).bits), "full-precision model"


def run_eval_ppl(path: str | None, cfg: EvalConfig, device_name: str = "auto", trust_remote_code: bool = False,
                 progress: bool = True) -> dict:
    device = resolve_device(device_name)
    model, tokenizer, bits, kind = load_any(path, device=device, trust_remote_code=trust_remote_code)
    docs = load_documents(cfg.ppl_data, default_split="test")
    windows = eval_windows(tokenizer, docs, cfg.seq_len, cfg.max_windows, source=cfg.ppl_data)
    result = perplexity(model, windows, device, progress=progress)
    return {"model": str(path) if path else "default", "kind": kind, "effective_bits": bits,
            "ppl_data": cfg.ppl_data, **result}


# ---------------------------------------------------------------------------- recover


class Stages:
    """``run/stages.json``: which stages finished, with their results; written atomically."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "stages.json"
        self.done: dict = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def finished(self, name: str) -> bool:
        return name in self.done

    def mark(self, name: str, result: dict) -> None:
        self.done[name] = result
        atomic_write_text(self.path, json.dumps(self.done, indent=1, default=str))


def _ppl(model, tokenizer, ecfg: EvalConfig, device, progress: bool, desc: str) -> dict:
    docs = load_documents(ecfg.ppl_data, default_split="test")
    windows = eval_windows(tokenizer, docs, ecfg.seq_len, ecfg.max_windows, source=ecfg.ppl_data)
    return perplexity(model.to(device), windows, device, progress=progress, desc=desc)


def run_recover(model_dir: str | None, out: str | Path, qcfg: QuantizeConfig, rcfg, ecfg: EvalConfig,
                overwrite: bool = False, trust_remote_code: bool = False, progress: bool = True) -> dict:
    """recover: calibrate -> sensitivity -> quantize -> recover -> pack -> eval, resumable by stage.

    post: GPTQ with salient columns, then noise-injected training of those columns (noise at
    ``noise_bits``, 4 by default). pre: train the salient columns of the full-precision model with
    noise at the target bits, then quantize with the same columns.
    """
    from accelerate import PartialState

    from .recover.model import convert_to_dense, convert_to_quant, linear_weights, prepare_dense, prepare_quantized
    from .recover.stage import train_stage

    out = Path(out)
    src = resolve_model_dir(model_dir)
    device = resolve_device(qcfg.device)
    # Under torchrun / accelerate launch there is one process per rank: rank 0 alone claims the run and runs
    # every stage before training (the others wait, then find those stages finished and only load); all
    # ranks train; rank 0 alone writes the trained model, packs and evaluates.
    dist = PartialState(cpu=device.type == "cpu")
    with dist.main_process_first():
        prepare_output(out, overwrite and dist.is_main_process)
        tokenizer, model, windows, identity = load_source(src, qcfg, parse_dtype(qcfg.dtype), trust_remote_code)
        identity.update(recover=dataclasses.asdict(rcfg), eval=dataclasses.asdict(ecfg))
        run_dir = claim_run(out, identity)
        stages = Stages(run_dir)
        noise_bits = rcfg.resolved_noise_bits(qcfg.bits)

        def quantized_checkpoint(name: str, source_model, fixed=None, blockwise: bool = False) -> Path:
            """Quantize ``source_model`` into run/<name> (a native checkpoint); resumable per block."""
            path = run_dir / name
            if not stages.finished(name):
                t0 = time.perf_counter()
                qmodel = source_model
                rec = blockwise_reconstructor(rcfg, qcfg, noise_bits) if blockwise else None
                report = quantize_model(qmodel, windows, qcfg, device, path / RUN_DIR, progress=progress,
                                        fixed_salient=fixed, reconstruct=rec,
                                        reconstruct_target=rcfg.blockwise_target)
                save_checkpoint(qmodel, path, src, _gift_config(qcfg, report, src, identity, windows))
                stages.mark(name, {"seconds": time.perf_counter() - t0,
                                   "effective_bits": report.mean_effective_bits()})
            return path

        if rcfg.variant == "post":
            qpath = quantized_checkpoint("quantized", model, blockwise=rcfg.blockwise_steps > 0)
            del model
            if not stages.finished("eval_before"):
                stages.mark("eval_before", _ppl(load(qpath), tokenizer, ecfg, device, progress, "ppl before"))
        else:
            # pre: pick the salient columns on the full-precision model, train them with noise, quantize
            if not stages.finished("select"):
                sel_model = load_model(src, parse_dtype(qcfg.dtype), trust_remote_code)
                report = quantize_model(sel_model, windows, qcfg, device, None, progress=progress, score_only=True)
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in report.salient.items()},
                          str(run_dir / "salient.safetensors"))
                stages.mark("select", {"layers": len(report.salient)})
            from safetensors.torch import load_file

            salient = load_file(str(run_dir / "salient.safetensors"))
            quantized_checkpoint("quantized", load_model(src, parse_dtype(qcfg.dtype), trust_remote_code), salient)
            if not stages.finished("eval_before"):
                stages.mark("eval_before", _ppl(load(run_dir / "quantized"), tokenizer, ecfg, device, progress,
                                                "ppl before"))
    before = stages.done["eval_before"]

    if not stages.finished("recover") and rcfg.steps == 0:  # block-wise reconstruction only
        if dist.is_main_process:
            shutil.copytree(qpath if rcfg.variant == "post" else run_dir / "quantized", run_dir / "recovered",
                            dirs_exist_ok=True, ignore=shutil.ignore_patterns(RUN_DIR))
            stages.mark("recover", {"seconds": 0.0, "noise_bits": noise_bits, "final_loss": None})
    if not stages.finished("recover"):
        t0 = time.perf_counter()
        if rcfg.variant == "post":
            # the noise step is fitted on the full-precision weights (as the paper's code does)
            reference = linear_weights(load_model(src, parse_dtype(qcfg.dtype), trust_remote_code))
            model = prepare_quantized(load(qpath), noise=rcfg.noise, noise_bits=noise_bits, seed=rcfg.seed,
                                      reference=reference)
            del reference
        else:
            prepare_dense(model, salient, noise=rcfg.noise, noise_bits=noise_bits, seed=rcfg.seed)
        summary = train_stage(model, tokenizer, rcfg, run_dir / "recover", device, progress, teacher_src=src,
                              qcfg=qcfg, trust_remote_code=trust_remote_code)
        if dist.is_main_process:
            if rcfg.variant == "post":
                convert_to_quant(model.cpu(), qcfg.bits, qcfg.sym, parse_dtype(qcfg.salient_dtype))
                save_checkpoint(model, run_dir / "recovered", src,
                                {**read_gift_config(qpath), "recover": dataclasses.asdict(rcfg)})
            else:
                convert_to_dense(model.cpu())
                model.save_pretrained(run_dir / "trained")
            stages.mark("recover", {"seconds": time.perf_counter() - t0, "noise_bits": noise_bits,
                                    "final_loss": summary["history"][-1]["loss"] if summary["history"] else None,
                                    "train_tokens": summary.get("train_tokens"),
                                    "teacher_mb": summary.get("teacher_mb")})
    if not dist.is_main_process:
        dist.wait_for_everyone()  # rank 0 packs and evaluates
        return json.loads((out / "summary.json").read_text())
    if rcfg.variant == "post":
        final_src = run_dir / "recovered"
    else:
        del model
        trained = load_model(run_dir / "trained", parse_dtype(qcfg.dtype))
        final_src = quantized_checkpoint("recovered", trained, salient, blockwise=rcfg.blockwise_steps > 0)

    if not stages.finished("pack"):
        t0 = time.perf_counter()
        final = load(final_src)
        doc = read_gift_config(final_src)
        doc.update({"recover": dataclasses.asdict(rcfg), "variant": rcfg.variant})
        doc.pop("format", None)
        doc.pop("format_version", None)
        save_checkpoint(final, out, src, doc)
        stages.mark("pack", {"seconds": time.perf_counter() - t0})
    if not stages.finished("eval_after"):
        stages.mark("eval_after", _ppl(load(out), tokenizer, ecfg, device, progress, "ppl after"))
    after = stages.done["eval_after"]
    timings = {k: v.get("seconds") for k, v in stages.done.items() if isinstance(v, dict) and "seconds" in v}
    summary = {"out": str(out), "variant": rcfg.variant, "bits": qcfg.bits, "noise": rcfg.noise,
               "noise_bits": noise_bits, "effective_bits": read_gift_config(out)["effective_bits"],
               "ppl_before": before["perplexity"], "ppl_after": after["perplexity"], "ppl_data": ecfg.ppl_data,
               "seconds": timings}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    dist.wait_for_everyone()
    return summary


def blockwise_reconstructor(rcfg, qcfg: QuantizeConfig, noise_bits: int):
    """The engine's per-block hook for ``--blockwise-steps`` (recover/blockwise.py)."""
    import functools

    from .recover.blockwise import reconstruct_block

    return functools.partial(reconstruct_block, steps=rcfg.blockwise_steps, lr=rcfg.blockwise_lr, noise=rcfg.noise,
                             noise_bits=noise_bits, bits=qcfg.bits, sym=qcfg.sym,
                             salient_dtype=parse_dtype(qcfg.salient_dtype), seed=rcfg.seed)


def _gift_config(cfg: QuantizeConfig, report, src: Path, identity: dict, windows: torch.Tensor) -> dict:
    return {
        "tool": "gift-quant", "version": tool_version(), "dtype": cfg.dtype, "quantize": identity["settings"],
        "bits": cfg.bits, "group_size": cfg.group_size, "metric": cfg.metric,
        "effective_bits": report.mean_effective_bits(),
        "salient_per_layer": {n: m["salient"] for n, m in report.layers.items()},
        "layers": report.layers,
        "provenance": {"source_model": str(src), "model_fingerprint": identity["model"],
                       "calibration_data": cfg.calib_data, "calibration_fingerprint": identity["calibration"],
                       "calibration_tokens": int(windows.numel())},
    }
