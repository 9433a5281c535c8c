"""The pipeline's stages as public functions, shared by ``quantize``, ``recover``, ``finetune`` and ``compare``.

* `load_source`: checked model, tokenizer, calibration windows and the run identity they define;
* `select_salient`: sensitivity scores -> salient column indices of every block linear (no quantization);
* `quantize_stage`: salient-aware GPTQ (optionally with block-wise reconstruction) -> native checkpoint;
* `prepare_recovery` + `train_stage` (recover/training.py) + `convert_recovered`: prepare -> train -> convert;
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

from ..config.settings import EvalConfig, NoiseSpec, QuantizeConfig, RecoverConfig, Runtime
from ..data.sources import load_documents
from ..data.windows import calibration_windows, eval_windows, fingerprint_tokens
from ..eval.perplexity import perplexity
from ..model.arch import model_linears
from ..model.loading import (
    check_causal_lm,
    check_lengths,
    check_vocabulary,
    load_model,
    load_tokenizer,
    parse_dtype,
    resolve_device,
    resolve_model_dir,
)
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
from ..recover.model import convert_to_quant, linear_weights, prepare_quantized, salient_layers
from ..recover.training import train_stage
from ..util.errors import writing

__all__ = ["blockwise_reconstructor", "calibration_set", "check_data", "convert_recovered", "preflight",
           "evaluate_perplexity", "gift_config", "load_source", "perplexity_windows", "prepare_recovery",
           "quantize_stage", "quantize_to_checkpoint", "run_inputs", "select_salient", "source_perplexity",
           "train_stage"]


def run_inputs(src: Path, qcfg: QuantizeConfig, rcfg: RecoverConfig | None = None,
               ecfg: EvalConfig | None = None) -> dict:
    """What a run reads from local files (label -> path): an --out overlapping any of them is refused."""
    from ..packed.ownership import data_input

    inputs = {"model folder": src, "calibration data": data_input(qcfg.calib_data)}
    if rcfg is not None:
        inputs.update({"training data": data_input(rcfg.train_data), "evaluation data": data_input(rcfg.eval_data)})
    if ecfg is not None:
        inputs["perplexity data"] = data_input(ecfg.ppl_data)
    return inputs


def calibration_set(tokenizer, cfg: QuantizeConfig) -> torch.Tensor:
    docs = load_documents(cfg.calib_data, default_split="train")
    return calibration_windows(tokenizer, docs, cfg.calib_samples, cfg.seq_len, cfg.seed, source=cfg.calib_data)


def check_data(tokenizer, qcfg: QuantizeConfig | None = None, rcfg: RecoverConfig | None = None,
               ecfg: EvalConfig | None = None) -> None:
    """Read and tokenize enough of every data source a run will use to know each is readable and long enough,
    before the first expensive stage (a bad --train-data must not surface after quantization)."""
    from ..recover.training import training_windows

    if rcfg is not None and rcfg.steps > 0:
        training_windows(tokenizer, rcfg, 1, qcfg)
    if ecfg is not None:
        eval_windows(tokenizer, load_documents(ecfg.ppl_data, default_split="test"), ecfg.seq_len, 1,
                     source=ecfg.ppl_data)


def preflight(model_dir: str | None, qcfg: QuantizeConfig, rcfg: RecoverConfig | None = None,
              ecfg: EvalConfig | None = None, runtime: Runtime = Runtime()) -> Path:
    """What a command checks before its first expensive stage (compare runs its methods as subprocesses that
    would each fail late): the model folder, every window against its positions, every data source."""
    src = resolve_model_dir(model_dir)
    lengths = {"--seq-len": qcfg.seq_len, **({"recover.seq_len": rcfg.seq_len} if rcfg else {}),
               **({"--ppl-seq-len": ecfg.seq_len} if ecfg else {})}
    check_lengths(src, lengths, runtime.trust_remote_code)
    tokenizer = load_tokenizer(src, runtime.trust_remote_code)
    calibration_set(tokenizer, qcfg)
    check_data(tokenizer, qcfg, rcfg, ecfg)
    return src


def load_source(src: Path, cfg: QuantizeConfig, dtype: torch.dtype, runtime: Runtime = Runtime()):
    """Checked model, tokenizer and calibration windows of ``src``, and the run identity they define.

    The identity (model and calibration fingerprints, settings) is what a resumed run must match.
    """
    trust = runtime.trust_remote_code
    config = check_causal_lm(src, trust)
    tokenizer = load_tokenizer(src, trust)
    check_vocabulary(src, config, tokenizer)
    windows = calibration_set(tokenizer, cfg)  # the calibration text is checked before the model is loaded
    model = load_model(src, dtype, trust)
    check_finite(model, str(src))
    validate_salient_counts(model, cfg)
    identity = {"model": model_fingerprint(src), "calibration": fingerprint_tokens(windows),
                "settings": dataclasses.asdict(cfg)}
    return tokenizer, model, windows, identity


def select_salient(model, windows: torch.Tensor, cfg: QuantizeConfig, runtime: Runtime = Runtime()
                   ) -> dict[str, torch.Tensor]:
    """Qualified linear name -> salient column indices, chosen on ``model`` as it is (weights untouched)."""
    report = quantize_model(model, windows, cfg, resolve_device(runtime.device), None, progress=runtime.progress,
                            score_only=True)
    return {k: v.contiguous() for k, v in report.salient.items()}


def blockwise_reconstructor(rcfg: RecoverConfig, noise: NoiseSpec):
    """The engine's per-block hook for ``--blockwise-steps`` (recover/blockwise.py), or None when off."""
    if rcfg.blockwise_steps <= 0:
        return None
    from ..config.settings import BLOCKWISE_TRAINABLE, trainable_sets
    from ..recover.blockwise import reconstruct_block

    return functools.partial(
        reconstruct_block, steps=rcfg.blockwise_steps, noise=noise, seed=rcfg.seed,
        train=trainable_sets(rcfg.blockwise_train, BLOCKWISE_TRAINABLE, "--blockwise-train"), lr=rcfg.blockwise_lr,
        scales_lr=rcfg.blockwise_scales_lr, rounding_lr=rcfg.blockwise_rounding_lr,
        warmup_ratio=rcfg.blockwise_warmup_ratio, holdout=rcfg.blockwise_holdout, max_grad_norm=rcfg.max_grad_norm,
        precision=rcfg.precision)


def quantize_stage(model, windows: torch.Tensor, qcfg: QuantizeConfig, src: Path, identity: dict, out: Path,
                   runtime: Runtime = Runtime(), fixed_salient: dict | None = None, reconstruct=None,
                   reconstruct_target: str = "fp-prefix"):
    """Quantize ``model`` in place and write the native checkpoint to ``out`` (per-block resume in out/run).

    The finished blocks are checked against their recorded sha256 before the engine may reuse them
    (run_folder.check_blocks: a failing one is recomputed). The engine records each block's sha256 as soon as
    the block is written, so even a SIGKILL loses no finished block; ``record_blocks`` at the stop is a
    safety net for blocks written by an older version.
    """
    run_dir = Path(out) / RUN_DIR
    check_blocks(run_dir)
    try:
        with writing(run_dir):
            report = quantize_model(model, windows, qcfg, resolve_device(runtime.device), run_dir,
                                    progress=runtime.progress,
                                    fixed_salient=fixed_salient, reconstruct=reconstruct,
                                    reconstruct_target=reconstruct_target)
    finally:
        with writing(run_dir):
            record_blocks(run_dir)
    save_checkpoint(model, Path(out), src, gift_config(qcfg, report, src, identity, windows))
    return report


def quantize_to_checkpoint(model_dir: str | None, out: str | Path, cfg: QuantizeConfig, overwrite: bool = False,
                           runtime: Runtime = Runtime()):
    """(in-memory quantized model, summary dict); the checkpoint is written to ``out``."""
    t0 = time.perf_counter()
    out = Path(out)
    src = resolve_model_dir(model_dir)
    resolve_device(runtime.device)  # an unavailable --device is refused before the output folder is touched
    check_lengths(src, {"--seq-len": cfg.seq_len}, runtime.trust_remote_code)
    prepare_output(out, overwrite, inputs=run_inputs(src, cfg))
    tokenizer, model, windows, identity = load_source(src, cfg, parse_dtype(cfg.dtype), runtime)
    claim_run(out, identity)
    report = quantize_stage(model, windows, cfg, src, identity, out, runtime)
    return model, {"out": str(out), "effective_bits": report.mean_effective_bits(),
                   "quantize_seconds": report.seconds, "quantize_cpu_seconds": report.cpu_seconds,
                   "total_seconds": time.perf_counter() - t0,
                   "mean_relative_error": sum(m["relative_error"] for m in report.layers.values())
                   / len(report.layers)}


def prepare_recovery(qckpt: Path, src: Path, noise: NoiseSpec, seed: int,
                     dtype: torch.dtype = torch.float32, runtime: Runtime = Runtime(),
                     fit_device: torch.device | str = "cpu", train: frozenset[str] = frozenset({"salient"})):
    """The packed checkpoint as a model whose salient columns train, the noise step fitted on ``src``'s weights.

    ``train``: what trains, from ``E2E_TRAINABLE`` (``scales``: the grid's scales, recover/scaled_layer.py).

    The paper's code fits the step on the full-precision weights; fitting it on the quantized ones locks
    the clip search onto a sub-grid of the codes and gives 20-33 % less noise. The weights are read one
    linear at a time from ``src``'s safetensors onto ``fit_device`` (source_weights.py); only folders
    that do not store them by module name are loaded whole.
    """
    model = load(qckpt)
    names = list(model_linears(model))
    reference = source_weights(Path(src), names, fit_device)
    if reference is None:
        reference = linear_weights(load_model(Path(src), dtype, runtime.trust_remote_code))
    model = prepare_quantized(model, noise=noise, seed=seed, reference=reference)
    if "scales" in train:
        from ..recover.model import freeze_all_but_gift
        from ..recover.scaled_layer import enable_scale_training

        enable_scale_training(model)
        freeze_all_but_gift(model)
    if "salient" not in train:
        for m in salient_layers(model).values():
            m.gift_salient.requires_grad_(False)
    return model


def convert_recovered(model):
    """Trained SalientLinear layers back to packed QuantLinear layers holding the trained columns."""
    return convert_to_quant(model.cpu())  # each layer carries its bits, grid and salient dtype


def perplexity_windows(tokenizer, ecfg: EvalConfig) -> torch.Tensor:
    docs = load_documents(ecfg.ppl_data, default_split="test")
    return eval_windows(tokenizer, docs, ecfg.seq_len, ecfg.max_windows, source=ecfg.ppl_data)


def evaluate_perplexity(model, tokenizer, ecfg: EvalConfig, runtime: Runtime = Runtime(),
                        desc: str = "perplexity") -> dict:
    device = resolve_device(runtime.device)
    return perplexity(model.to(device), perplexity_windows(tokenizer, ecfg), device, progress=runtime.progress,
                      desc=desc)


def source_perplexity(load, fingerprint: str, tokenizer, ecfg: EvalConfig, dtype: torch.dtype,
                      runtime: Runtime = Runtime(), desc: str = "perplexity") -> dict:
    """The full-precision source model's perplexity, from the cache when the same inputs were evaluated before
    (eval/reference_cache.py); ``load()`` gives the model on a miss only."""
    from ..eval.reference_cache import cached_perplexity

    return cached_perplexity(load, fingerprint, perplexity_windows(tokenizer, ecfg), dtype,
                             resolve_device(runtime.device), runtime.progress, desc)


def gift_config(cfg: QuantizeConfig, report, src: Path, identity: dict, windows: torch.Tensor) -> dict:
    """The checkpoint's gift_quant_config.json: settings, per-layer metrics, provenance."""
    return {
        # the spec (bits, sym, groups, layout, salient dtype) is written once by save_checkpoint, from the layers
        "tool": "gift-quant", "version": tool_version(), "dtype": cfg.dtype, "quantize": identity["settings"],
        "effective_bits": report.mean_effective_bits(),
        "salient_per_layer": {n: m["salient"] for n, m in report.layers.items()},
        "layers": report.layers,
        "provenance": {"source_model": str(src), "model_fingerprint": identity["model"],
                       "calibration_data": cfg.calib_data, "calibration_fingerprint": identity["calibration"],
                       "calibration_tokens": int(windows.numel())},
    }
