"""Block-wise reconstruction (v2): train one quantized block's grid, rounding and salient columns against the fp block.

Called by the quantization engine right after block i is quantized and before block i + 1 is
calibrated, so block i + 1's GPTQ sees the reconstructed block's outputs (EfficientQAT's Block-AP,
AutoRound's per-block tuning). Each packed linear becomes a ``GridLinear`` (grid_params.py) that starts
exactly at GPTQ's codes and trains, as ``train`` selects: the salient columns (AdamW), the scales as
multipliers of the stored scales, with the zero points when asymmetric (AdamW, own lr), and the
rounding of the non-salient weights as offsets in [-0.5, 0.5] (signed gradient descent, own lr). GIFT-SW's
noise on the non-salient weights is kept when configured. Only the block being processed is on the
device, so this stage scales to models too large for end-to-end training.

Targets (``blockwise_target``):

* ``fp-prefix`` (default): the full-precision block applied to the full-precision model's own inputs to
  this block. The loss then also asks block i to undo the error the earlier quantized blocks left in
  its inputs, which is what the end model is judged by; its cost is a second activation stream.
* ``quant-prefix``: the full-precision block applied to the quantized prefix's outputs (the block's
  own inputs). Each block only removes its own quantization error.

One optimizer step uses one calibration batch (``--calib-batch-size`` windows, the batch the captured
attention masks were recorded for), visited in seeded epochs; the last ``holdout`` share of the
batches never trains, and its loss is logged (before, at four checkpoints, after) so that overfitting
shows. The checkpoint with the lowest held-out loss is kept, GPTQ's own state (step 0) included, so the
stage never returns a block that is worse than GPTQ's on the held-out windows (AutoRound keeps its best
iteration the same way, by training loss).
Schedule: linear warm-up, then cosine decay, for every group; AdamW groups have their gradient norm
clipped separately (sign steps need no clipping). The loss is the relative squared error
``||block(x) - y||^2 / ||y||^2`` of a batch.
"""

from __future__ import annotations

import math
import random
import time

import torch
from torch import nn

from ..config.settings import NoiseSpec
from ..model.arch import block_linears, set_module
from ..model.capture import run_block
from ..packed.qlinear import QuantLinear
from ..util.precision import autocast, resolve_precision, say_precision
from ..util.seeds import derive_seed
from .grid_params import GridLinear, SignSGD
from .noise_schedule import set_noise_progress

NO_NOISE = NoiseSpec("none")  # the block stage's default: its evidence (results/recovery-study-v2) favours none

__all__ = ["holdout_batches", "pack_block", "reconstruct_block", "relative_mse", "train_block"]


@torch.no_grad()
def relative_mse(block: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor], kwargs: dict) -> float:
    """sum ||block(x) - y||^2 / sum ||y||^2 over the given batches (eval mode: no noise)."""
    if not inputs:
        return float("nan")
    num = den = 0.0
    outs = run_block(block, inputs, kwargs)
    for out, y in zip(outs, targets):
        num += float((out.float() - y.float()).pow(2).sum())
        den += float(y.float().pow(2).sum())
    return num / max(den, 1e-30)


def holdout_batches(n_batches: int, share: float) -> int:
    """How many of ``n_batches`` calibration batches are held out: ``share`` of them, at least one, never all."""
    if share <= 0 or n_batches < 2:
        return 0
    return min(max(1, round(share * n_batches)), n_batches - 1)


def _factor(step: int, steps: int, warmup_ratio: float) -> float:
    """Linear warm-up over the first ``warmup_ratio`` of the steps, then cosine decay to 0."""
    warm = math.ceil(warmup_ratio * steps)
    if step < warm:
        return (step + 1) / (warm + 1)
    return 0.5 * (1.0 + math.cos(math.pi * min((step - warm) / max(1, steps - warm), 1.0)))


def reconstruct_block(index: int, block: nn.Module, fp_block: nn.Module, inputs: list[torch.Tensor],
                      targets: list[torch.Tensor], kwargs: dict, **settings) -> dict:
    """Train ``block`` in place and pack it back (QuantLinear -> GridLinear -> QuantLinear); returns its metrics.

    ``settings``: `train_block`'s keywords. The metrics' ``relative_mse_after`` and ``holdout_after`` are
    measured on the packed block, i.e. on what the checkpoint holds.
    """
    metrics = train_block(index, block, fp_block, inputs, targets, kwargs, **settings)
    pack_block(block)
    n_held = metrics["holdout_batches"]
    metrics["relative_mse_after"] = relative_mse(block, inputs, targets, kwargs)
    if n_held:
        metrics["holdout_after"] = relative_mse(block, inputs[-n_held:], targets[-n_held:], kwargs)
    return metrics


def pack_block(block: nn.Module) -> None:
    """Every GridLinear of ``block`` back to its packed QuantLinear (learned codes, fp16 scales, salient columns)."""
    for name, m in list(block_linears(block).items()):
        if isinstance(m, GridLinear):
            set_module(block, name, m.to_quant())
    block.eval().requires_grad_(False)


def train_block(index: int, block: nn.Module, fp_block: nn.Module, inputs: list[torch.Tensor],
                targets: list[torch.Tensor], kwargs: dict, *, prerounded: dict | None = None, steps: int,
                train: frozenset[str] = frozenset({"salient"}), lr: float = 1e-3, scales_lr: float = 5e-3,
                rounding_lr: float | None = None, warmup_ratio: float = 0.05, holdout: float = 0.125,
                max_grad_norm: float = 1.0, noise: NoiseSpec = NO_NOISE, seed: int = 0,
                precision: str = "auto") -> dict:
    """Swap ``block``'s QuantLinears for GridLinears and train them; the block is left in eval mode, unpacked.

    ``prerounded``: block-local linear name -> GPTQ's pre-rounding values (needed when scales or rounding
    train). ``lr``: the salient columns'; ``rounding_lr`` None: ``1 / steps`` (offsets can cross half a step).
    ``precision``: the training forward passes' (``--precision``, resolved on the block's device); the
    parameters, the loss and the held-out measurements stay float32.
    """
    t0 = time.perf_counter()
    device = inputs[0].device if inputs else torch.device("cpu")
    compute = resolve_precision(precision, device)
    if steps > 0:
        say_precision(compute)
    block.eval()
    n_held = holdout_batches(len(inputs), holdout)
    fit = list(range(len(inputs) - n_held))
    held_x, held_y = inputs[len(fit):], targets[len(fit):]
    before = relative_mse(block, inputs, targets, kwargs)
    held_curve = [(0, relative_mse(block, held_x, held_y, kwargs))] if n_held else []
    block.requires_grad_(False)
    fp_linears = block_linears(fp_block)
    for j, (name, q) in enumerate(block_linears(block).items()):
        if not isinstance(q, QuantLinear):
            raise TypeError(f"block {index}: {name} is {type(q).__name__}, expected a QuantLinear")
        pre = None if prerounded is None else prerounded.get(name)
        layer_seed = derive_seed(seed, "block-noise", index, j)
        set_module(block, name, GridLinear(q, pre, train, noise, layer_seed, fp_linears[name].weight))
    layers = [m for m in block.modules() if isinstance(m, GridLinear)]
    groups = []
    if "salient" in train:
        groups.append({"params": [m.salient for m in layers], "lr": lr})
    if "scales" in train:
        groups.append({"params": [p for m in layers for p in (m.scale_mult, m.zero) if p.requires_grad],
                       "lr": scales_lr})
    optimizers = [torch.optim.AdamW(groups, weight_decay=0.0)] if groups else []
    if "rounding" in train:
        optimizers.append(SignSGD([m.round_offset for m in layers], lr=rounding_lr or 1.0 / max(steps, 1)))
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: _factor(s, steps, warmup_ratio)) for o in optimizers]
    trained = [p for m in layers for p in m.parameters() if p.requires_grad]
    best = (held_curve[0][1], 0, [p.detach().clone() for p in trained]) if n_held else None
    order: list[int] = []
    rng = random.Random(derive_seed(seed, "block-order", index))
    check_every = max(1, steps // 4)
    losses = []
    with torch.enable_grad():
        for step in range(steps):
            if not order:
                order = list(fit)
                rng.shuffle(order)
            b = order.pop()
            block.train()
            for m in layers:  # the noise of a step is a pure function of (layer seed, step): resumable, replicable
                m.noise_key = step
            set_noise_progress(block, step, steps)  # --blockwise-noise-schedule: its scale, over this block's steps
            with autocast(compute, device):  # the forward pass; the loss below in float32, backward outside
                out = block(inputs[b], **kwargs)
            out = out[0] if isinstance(out, (tuple, list)) else out
            y = targets[b].float()
            loss = (out.float() - y).pow(2).mean() / y.pow(2).mean().clamp_min(1e-30)
            loss.backward()
            for group in groups:
                torch.nn.utils.clip_grad_norm_(group["params"], max_grad_norm)
            for o, sch in zip(optimizers, schedules):
                o.step()
                sch.step()
                o.zero_grad(set_to_none=True)
            for m in layers:
                m.clamp_offsets()
            losses.append(float(loss.detach()))
            if n_held and ((step + 1) % check_every == 0 or step + 1 == steps):
                block.eval()
                held_curve.append((step + 1, relative_mse(block, held_x, held_y, kwargs)))
                if held_curve[-1][1] < best[0]:
                    best = (held_curve[-1][1], step + 1, [p.detach().clone() for p in trained])
    if best is not None:  # keep the checkpoint (GPTQ's own state included) with the lowest held-out loss
        with torch.no_grad():
            for p, kept in zip(trained, best[2]):
                p.copy_(kept)
    changes = [m.changes() for m in layers]
    block.eval().requires_grad_(False)
    return {"relative_mse_before": before, "relative_mse_after": relative_mse(block, inputs, targets, kwargs),
            "steps": steps, "train": sorted(train), "train_batches": len(fit), "holdout_batches": n_held,
            "holdout_before": held_curve[0][1] if held_curve else None,
            "holdout_after": best[0] if best else None, "holdout_curve": held_curve,
            "kept_step": best[1] if best else steps,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "codes_changed": sum(c["codes_changed"] for c in changes) / max(len(changes), 1),
            "scale_shift": sum(c["scale_shift"] for c in changes) / max(len(changes), 1),
            "seconds": time.perf_counter() - t0}
