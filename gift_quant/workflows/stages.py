"""The pipeline's stages as public functions, shared by ``quantize``, ``recover``, ``finetune`` and ``compare``.

* `load_source`: checked model, tokenizer, calibration windows and the run identity they define;
* `select_salient`: sensitivity scores -> salient column indices of every block linear (no quantization);
* `quantize_stage`: salient-aware GPTQ (optionally with block-wise reconstruction) -> native checkpoint;
* `prepare_recovery` + `train_stage` (recover/stage.py) + `convert_recovered`: prepare -> train -> convert;
* `evaluate_perplexity`: held-out perplexity of an in-memory model; `source_perplexity`: the full-precision
  source's, cached across runs.

Each is resumable through the run folder it is given; none knows about the commands that call it.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import torch

from ..config.settings import EvalConfig, NoiseSpec, QuantizeConfig, RecoverConfig
from ..data.sources import load_documents
from ..data.windows import calibration_windows, eval_windows, fingerprint_tokens
from ..eval.perplexity import perplexity
from ..model.arch import model_linears
from ..model.loading import check_causal_lm, load_model, load_tokenizer, parse_dtype, resolve_device, resolve_model_dir
from ..model.source_weights import source_weights
from ..packed.checkpoint import load, save_checkpoint
from ..packed.run_folder import (
    RUN_DIR,
    check_blocks,
    claim_run,
    model_fingerprint,
    prepare_output,
    record_blocks,
    tool_version,
)
from ..quant.engine import check_finite, quantize_model, validate_salient_counts
from ..recover.model import convert_to_quant, linear_weights, prepare_quantized
from ..recover.training import train_stage
from ..util.errors import writing

__all__ = ["calibration_set", "convert_recovered", "evaluate_perplexity", "load_source", "perplexity_windows",
           "prepare_recovery", "quantize_stage", "quantize_to_checkpoint", "select_salient", "source_perplexity",
           "train_stage"]


def calibration_set(tokenizer, cfg: QuantizeConfig) -> torch.Tensor:
    docs = load_documents(cfg.calib_data, default_split="train")
    return calibration_windows(tokenizer, docs, cfg.calib_samples, cfg.seq_len, cfg.seed, source=cfg.calib_data)


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


def select_salient(model, windows: torch.Tensor, cfg: QuantizeConfig, device, progress: bool = True
                   ) -> dict[str, torch.Tensor]:
    """Qualified linear name -> salient column indices, chosen on ``model`` as it is (weights untouched)."""
    report = quantize_model(model, windows, cfg, device, None, progress=progress, score_only=True)
    return {k: v.contiguous() for k, v in report.salient.items()}


def blockwise_reconstructor(rcfg: RecoverConfig, noise: NoiseSpec):
    """The engine's per-block hook for ``--blockwise-steps`` (recover/blockwise.py), or None when off."""
    if rcfg.blockwise_steps <= 0:
        return None
    from ..recover.blockwise import reconstruct_block

    return functools.partial(reconstruct_block, steps=rcfg.blockwise_steps, lr=rcfg.blockwise_lr, noise=noise,
                             seed=rcfg.seed)


def quantize_stage(model, windows: torch.Tensor, qcfg: QuantizeConfig, src: Path, identity: dict, out: Path,
                   device, progress: bool = True, fixed_salient: dict | None = None, reconstruct=None,
                   reconstruct_target: str = "fp-prefix"):
    """Quantize ``model`` in place and write the native checkpoint to ``out`` (per-block resume in out/run).

    The finished blocks are checked against their recorded sha256 before the engine may reuse them
    (rundir.check_blocks: a failing one is recomputed). The engine records each block's sha256 as soon as
    the block is written, so even a SIGKILL loses no finished block; ``record_blocks`` at the stop is a
    safety net for blocks written by an older version.
    """
    run_dir = Path(out) / RUN_DIR
    check_blocks(run_dir)
    try:
        with writing(run_dir):
            report = quantize_model(model, windows, qcfg, device, run_dir, progress=progress,
                                    fixed_salient=fixed_salient, reconstruct=reconstruct,
                                    reconstruct_target=reconstruct_target)
    finally:
        with writing(run_dir):
            record_blocks(run_dir)
    save_checkpoint(model, Path(out), src, gift_config(qcfg, report, src, identity, windows))
    return report


def quantize_to_checkpoint(model_dir: str | None, out: str | Path, cfg: QuantizeConfig, overwrite: bool = False,
                           trust_remote_code: bool = False, progress: bool = True):
    """(in-memory quantized model, summary dict); the checkpoint is written to ``out``."""
    t0 = time.perf_counter()
    out = Path(out)
    src = resolve_model_dir(model_dir)
    device = resolve_device(cfg.device)  # a bad --device is refused before the output folder is touched
    prepare_output(out, overwrite)
    tokenizer, model, windows, identity = load_source(src, cfg, parse_dtype(cfg.dtype), trust_remote_code)
    claim_run(out, identity)
    report = quantize_stage(model, windows, cfg, src, identity, out, device, progress)
    return model, {"out": str(out), "effective_bits": report.mean_effective_bits(),
                   "quantize_seconds": report.seconds, "total_seconds": time.perf_counter() - t0,
                   "mean_relative_error": sum(m["relative_error"] for m in report.layers.values())
                   / len(report.layers)}


def prepare_recovery(qckpt: Path, src: Path, noise: NoiseSpec, seed: int,
                     dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                     fit_device: torch.device | str = "cpu"):
    """The packed checkpoint as a model whose salient columns train, the noise step fitted on ``src``'s weights.

    The paper's code fits the step on the full-precision weights; fitting it on the quantized ones locks
    the clip search onto a sub-grid of the codes and gives 20-33 % less noise. The weights are read one
    linear at a time from ``src``'s safetensors onto ``fit_device`` (source_weights.py); only folders
    that do not store them by module name are loaded whole.
    """
    model = load(qckpt)
    names = list(model_linears(model))
    reference = source_weights(Path(src), names, fit_device)
    if reference is None:
        reference = linear_weights(load_model(Path(src), dtype, trust_remote_code))
    return prepare_quantized(model, noise=noise, seed=seed, reference=reference)


def convert_recovered(model):
    """Trained SalientLinear layers back to packed QuantLinear layers holding the trained columns."""
    return convert_to_quant(model.cpu())  # each layer carries its bits, grid and salient dtype


def perplexity_windows(tokenizer, ecfg: EvalConfig) -> torch.Tensor:
    docs = load_documents(ecfg.ppl_data, default_split="test")
    return eval_windows(tokenizer, docs, ecfg.seq_len, ecfg.max_windows, source=ecfg.ppl_data)


def evaluate_perplexity(model, tokenizer, ecfg: EvalConfig, device, progress: bool = True,
                        desc: str = "perplexity") -> dict:
    return perplexity(model.to(device), perplexity_windows(tokenizer, ecfg), device, progress=progress, desc=desc)


def source_perplexity(load, fingerprint: str, tokenizer, ecfg: EvalConfig, dtype: torch.dtype, device,
                      progress: bool = True, desc: str = "perplexity") -> dict:
    """The full-precision source model's perplexity, from the cache when the same inputs were evaluated before
    (eval/reference_cache.py); ``load()`` gives the model on a miss only."""
    from ..eval.reference_cache import cached_perplexity

    return cached_perplexity(load, fingerprint, perplexity_windows(tokenizer, ecfg), dtype, torch.device(device),
                             progress, desc)


def gift_config(cfg: QuantizeConfig, report, src: Path, identity: dict, windows: torch.Tensor) -> dict:
    """The checkpoint's gift_quant_config.json: settings, per-layer metrics, provenance."""
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
