"""Quantize a loaded model in place, block by block (plumbing around the pure GPTQ core).

For block i: move it to the device; find its linears' true-sequential groups (q/k/v, o, gate/up,
down); for each group collect input statistics with the already-quantized earlier groups in place,
score columns, pick the salient set, run salient-aware GPTQ and swap in a packed ``QuantLinear``;
then compute the block's outputs, which are block i+1's calibration inputs; move it back.

Each finished block is written to ``run_dir/blocks/`` (packed tensors, JSON metrics) and its
sensitivity scores and salient indices to ``run_dir/sensitivity/``; a rerun with the same settings
loads finished blocks instead of recomputing them (only their forward pass is redone).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from ..config.settings import QuantizeConfig
from ..model.arch import block_linears, find_blocks, model_linears, set_module
from ..model.capture import capture_block_inputs, collect_inputs, move_kwargs, run_block, sequential_groups
from ..model.loading import parse_dtype
from ..packed.qlinear import QuantLinear, effective_bits
from ..packed.run_folder import RunFiles
from ..util.errors import GiftQuantError
from ..util.files import atomic_save_tensors, atomic_write_text
from ..util.threads import cpu_threads
from .gptq import gptq_quantize, layer_error
from .grid import GridSpec
from .rtn import rtn_quantize
from .sensitivity import column_scores, parse_metric, select_salient
from .stats import ColumnStats

__all__ = ["QuantizeReport", "check_finite", "quantize_layer", "quantize_model", "score_layer",
           "validate_salient_counts"]

_QL_BUFFERS = ("qweight", "scales", "qzeros", "g_idx", "salient_idx", "salient_weight", "bias")


@dataclass
class QuantizeReport:
    layers: dict[str, dict] = field(default_factory=dict)
    salient: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0  # wall clock
    cpu_seconds: float = 0.0  # the process's CPU time, all threads (steadier than wall time on a shared machine)

    def mean_effective_bits(self) -> float:
        n = sum(v["in_features"] * v["out_features"] for v in self.layers.values())
        return sum(v["effective_bits"] * v["in_features"] * v["out_features"] for v in self.layers.values()) / n


def check_finite(model: nn.Module, source: str) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            bad = (~torch.isfinite(p)).sum().item()
            raise GiftQuantError(f"{source}: parameter {name} has {bad} NaN/Inf values; the checkpoint is corrupt")


def validate_salient_counts(model: nn.Module, cfg: QuantizeConfig) -> None:
    """Refuse settings no layer can take (salient count, group size) before any work starts."""
    for name, lin in model_linears(model).items():
        cfg.salient_count(lin.in_features, name)
        if cfg.group_size > 0 and lin.in_features % cfg.group_size:
            raise GiftQuantError(
                f"--group-size {cfg.group_size} does not divide the {lin.in_features} input columns of {name}: "
                "choose a divisor of every linear's inputs (e.g. 32 or 64), or -1 for per-row grids")


def score_layer(linear: nn.Linear, stats: ColumnStats, cfg: QuantizeConfig, name: str):
    """(sensitivity scores, salient indices) of one linear."""
    metric = parse_metric(cfg.metric)
    weight = linear.weight.detach().float()
    k = cfg.salient_count(linear.in_features, name)
    scores = column_scores(weight, stats.column_norm(metric.rho), metric, cfg.metric_bits or cfg.bits)
    return scores, select_salient(scores, k)


def quantize_layer(linear: nn.Linear, stats: ColumnStats, hessian: torch.Tensor, cfg: QuantizeConfig, name: str,
                   fixed_salient: torch.Tensor | None = None, prerounded: dict | None = None):
    """Score, select and GPTQ one linear -> (QuantLinear, scores, salient, metrics dict).

    ``fixed_salient`` skips the selection (pre-GIFT-SW quantizes with the columns it trained);
    ``prerounded`` (a dict) receives ``name`` -> GPTQ's values right before rounding (GPTQResult.prerounded).
    """
    spec = GridSpec(bits=cfg.bits, sym=cfg.sym, group_size=cfg.group_size, clip=cfg.clip)
    weight = linear.weight.detach().float()
    with cpu_threads(1, weight.device.type == "cpu"):  # clip search: small ops (see threads.py)
        scores, salient = score_layer(linear, stats, cfg, name)
    if fixed_salient is not None:
        salient = fixed_salient.long().sort().values
    k = salient.numel()
    if cfg.algorithm == "rtn":
        with cpu_threads(1, weight.device.type == "cpu"):
            res = rtn_quantize(weight, spec, salient, group_layout=cfg.group_layout)
    else:
        res = gptq_quantize(weight, hessian, spec, salient, act_order=cfg.act_order,
                            static_groups=cfg.static_groups, block_size=cfg.block_size, damp=cfg.damp,
                            group_layout=cfg.group_layout)
    sal_dtype = parse_dtype(cfg.spec.salient_dtype)
    # the in-memory model computes with exactly what the checkpoint will store
    res.salient_weight = res.salient_weight.to(sal_dtype).float()
    qlin = QuantLinear.from_parts(res.codes, res.scales, res.zeros, res.g_idx, res.salient_idx,
                                  res.salient_weight, cfg.spec, linear.bias)
    if prerounded is not None:
        prerounded[name] = res.prerounded
    ref = layer_error(weight, torch.zeros_like(weight), hessian)
    err = layer_error(weight, res.dequantized(), hessian)
    metrics = {
        "in_features": linear.in_features, "out_features": linear.out_features, "salient": k,
        "groups": int(res.scales.shape[1]), "layer_error": err, "relative_error": err / max(ref, 1e-30),
        "gptq_loss": None if math.isnan(res.loss) else res.loss,
        "effective_bits": effective_bits(linear.in_features, linear.out_features, cfg.bits,
                                         int(res.scales.shape[1]), k, cfg.sym, torch.finfo(sal_dtype).bits),
    }
    return qlin.to(linear.weight.device).eval(), scores, salient, metrics


def _block_files(run_dir: Path, i: int) -> tuple[Path, Path, Path]:
    return (run_dir / "blocks" / f"block_{i:03d}.safetensors", run_dir / "blocks" / f"block_{i:03d}.json",
            run_dir / "sensitivity" / f"block_{i:03d}.safetensors")


def _save_block(run_dir: Path, i: int, qlins: dict[str, QuantLinear], scores: dict, salient: dict,
                metrics: dict) -> None:
    tensors_path, json_path, sens_path = _block_files(run_dir, i)
    tensors_path.parent.mkdir(parents=True, exist_ok=True)
    sens_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, q in qlins.items():
        for b in _QL_BUFFERS:
            t = getattr(q, b, None)
            if t is not None:
                tensors[f"{name}.{b}"] = t.detach().cpu().contiguous()
    # write tensors first, the JSON last: the JSON's presence marks the block as finished
    atomic_save_tensors(tensors_path, tensors)
    atomic_save_tensors(sens_path, {**{f"{n}.scores": s.float().cpu() for n, s in scores.items()},
                                    **{f"{n}.salient_idx": s.cpu() for n, s in salient.items()}})
    atomic_write_text(json_path, json.dumps(metrics, indent=1))
    # recorded as soon as it is complete, so a SIGKILL later in the stage loses no finished block
    RunFiles(run_dir).record([tensors_path, sens_path, json_path])


def _load_block(run_dir: Path, i: int, block: nn.Module, cfg: QuantizeConfig) -> tuple[dict, dict] | None:
    tensors_path, json_path, _ = _block_files(run_dir, i)
    if not json_path.is_file() or not tensors_path.is_file():
        return None
    metrics = json.loads(json_path.read_text())
    tensors = load_file(str(tensors_path))
    qlins = {}
    for name, lin in block_linears(block).items():
        m = metrics[name]
        q = QuantLinear.empty_like(lin, cfg.spec, m["groups"], m["salient"])
        q.load_state_dict({b: tensors[f"{name}.{b}"] for b in _QL_BUFFERS if f"{name}.{b}" in tensors})
        qlins[name] = q
    return qlins, metrics


def _quantize_block(block: nn.Module, qualifier: str, inputs, kwargs, cfg: QuantizeConfig, device: torch.device,
                    report: QuantizeReport, score_only: bool, fixed_salient: dict[str, torch.Tensor] | None,
                    prerounded: dict | None = None):
    """GPTQ every linear of one block in sequential groups (in place) -> (qlins, scores, salient, metrics).

    Members of a group share one input, whose statistics are accumulated once; each group sees the
    outputs of the groups quantized before it. ``score_only`` fills ``report.salient`` and changes nothing.
    ``prerounded`` (a dict) receives each linear's (block-local name) pre-rounding values.
    """
    qlins, scores, salient, metrics = {}, {}, {}, {}
    for group in sequential_groups(block, inputs[0], kwargs):
        linears = block_linears(block)
        stats = ColumnStats(linears[group[0]].in_features, device=device)
        collect_inputs(block, group[:1], inputs, kwargs, lambda _n, x, st=stats: st.update(x))
        hessian = stats.hessian.float()
        for name in group:
            lin, qualified = linears[name], f"{qualifier}.{name}"
            if score_only:
                _, report.salient[qualified] = score_layer(lin, stats, cfg, qualified)
                continue
            fixed = None if fixed_salient is None else fixed_salient[qualified]
            q, s, sal, m = quantize_layer(lin, stats, hessian, cfg, qualified, fixed, prerounded)
            if prerounded is not None:
                prerounded[name] = prerounded.pop(qualified)
            set_module(block, name, q)
            qlins[name], scores[name], salient[name], metrics[name] = q, s, sal, m
            report.salient[qualified] = sal
        del stats
    return qlins, scores, salient, metrics


def quantize_model(model: nn.Module, windows: torch.Tensor, cfg: QuantizeConfig, device: torch.device,
                   run_dir: Path | None, progress: bool = True, score_only: bool = False,
                   fixed_salient: dict[str, torch.Tensor] | None = None, reconstruct=None,
                   reconstruct_target: str = "fp-prefix") -> QuantizeReport:
    """Replace every block linear of ``model`` (on CPU) by a QuantLinear; returns per-layer metrics.

    ``score_only``: only select salient columns (``report.salient``), leave the weights untouched;
    ``fixed_salient``: qualified name -> salient indices to use instead of selecting them.
    ``run_dir`` None disables the per-block artifacts (and so resuming).
    ``reconstruct(i, block, fp_block, inputs, targets, kwargs, prerounded=...) -> metrics``: called right after
    block i is quantized, before it is saved and its outputs feed block i + 1 (block-wise reconstruction,
    recover/blockwise.py); ``prerounded``: block-local linear name -> GPTQ's values right before rounding.
    ``targets`` are the full-precision block's outputs on the full-precision model's inputs (``fp-prefix``)
    or on the quantized prefix's (``quant-prefix``).
    """
    t0, c0 = time.perf_counter(), time.process_time()
    prefix, blocks = find_blocks(model)
    validate_salient_counts(model, cfg)
    report = QuantizeReport()
    inputs, all_kwargs = capture_block_inputs(model, blocks, windows, device, cfg.calib_batch_size)
    fp_prefix = reconstruct is not None and reconstruct_target == "fp-prefix"
    fp_inputs = inputs if fp_prefix else None  # the full-precision model's activations, propagated alongside
    bar = tqdm(range(len(blocks)), desc=f"GPTQ w{cfg.bits}", unit="block", disable=not progress)
    for i in bar:
        block = blocks[i].to(device)
        kwargs = move_kwargs(all_kwargs[i], device)
        fp_block = copy.deepcopy(block) if reconstruct is not None else None  # before any quantization
        loaded = None if run_dir is None or score_only else _load_block(run_dir, i, block, cfg)
        targets = None
        if loaded is not None:
            qlins, metrics = loaded
            for name, q in qlins.items():
                set_module(block, name, q.to(device))
        else:
            pre = {} if reconstruct is not None and not score_only else None
            qlins, scores, salient, metrics = _quantize_block(block, f"{prefix}.{i}", inputs, kwargs, cfg, device,
                                                              report, score_only, fixed_salient, pre)
            if reconstruct is not None and not score_only:
                targets = run_block(fp_block, fp_inputs if fp_prefix else inputs, kwargs)
                rec = reconstruct(i, block, fp_block, inputs, targets, kwargs, prerounded=pre)
                del pre
                qlins = dict(block_linears(block))
                for name in metrics:
                    metrics[name]["blockwise"] = rec
            if run_dir is not None and not score_only:
                _save_block(run_dir, i, qlins, scores, salient, metrics)
        for name, m in metrics.items():
            report.layers[f"{prefix}.{i}.{name}"] = m
        if fp_prefix:
            fp_inputs = targets if targets is not None else run_block(fp_block, fp_inputs, kwargs)
        del fp_block
        inputs = run_block(block, inputs, kwargs)
        blocks[i] = block.to("cpu")
        if metrics:
            mean_rel = sum(m["relative_error"] for m in metrics.values()) / len(metrics)
            bar.set_postfix(rel_err=f"{mean_rel:.4f}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report.seconds, report.cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    return report
