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
from .checkpoint import CONFIG_NAME, is_checkpoint, load, read_gift_config, save_checkpoint
from .config import EvalConfig, QuantizeConfig
from .data import calibration_windows, eval_windows, fingerprint_tokens, load_documents
from .errors import GiftQuantError
from .eval.perplexity import perplexity
from .models import load_model, load_tokenizer, parse_dtype, resolve_device, resolve_model_dir
from .quant.engine import check_finite, quantize_model, validate_salient_counts

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
            changed = sorted(k for k in set(previous.get("identity", {})) | set(identity)
                             if previous.get("identity", {}).get(k) != identity.get(k))
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


def quantize_to_checkpoint(model_dir: str | None, out: str | Path, cfg: QuantizeConfig, overwrite: bool = False,
                           trust_remote_code: bool = False, progress: bool = True):
    """(in-memory quantized model, summary dict); the checkpoint is written to ``out``."""
    t0 = time.perf_counter()
    out = Path(out)
    src = resolve_model_dir(model_dir)
    prepare_output(out, overwrite)
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(src, trust_remote_code)
    model = load_model(src, parse_dtype(cfg.dtype), trust_remote_code)
    check_finite(model, str(src))
    validate_salient_counts(model, cfg)
    windows = calibration_set(tokenizer, cfg)
    identity = {
        "model": model_fingerprint(src),
        "calibration": fingerprint_tokens(windows),
        "settings": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "device"},
    }
    run_dir = claim_run(out, identity)
    report = quantize_model(model, windows, cfg, device, run_dir, progress=progress)
    gift_config = {
        "tool": "gift-quant",
        "version": tool_version(),
        "dtype": cfg.dtype,
        "quantize": identity["settings"],
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "metric": cfg.metric,
        "effective_bits": report.mean_effective_bits(),
        "salient_per_layer": {n: m["salient"] for n, m in report.layers.items()},
        "layers": report.layers,
        "provenance": {"source_model": str(src), "model_fingerprint": identity["model"],
                       "calibration_data": cfg.calib_data, "calibration_fingerprint": identity["calibration"],
                       "calibration_tokens": int(windows.numel())},
    }
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
