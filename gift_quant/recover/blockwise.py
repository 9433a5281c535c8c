"""Block-wise reconstruction: train one quantized block's salient columns to match the full-precision block.

Called by the quantization engine right after block i is quantized and before block i + 1 is
calibrated, so block i + 1's GPTQ sees the reconstructed block's outputs (EfficientQAT's Block-AP idea,
restricted to GIFT-SW's trainable set: only the salient columns move, with the same noise injected
into the frozen quantized rest). Only the block being processed is on the device, so this stage scales
to models that are too large for end-to-end training.

Targets (``blockwise_target``):

* ``fp-prefix`` (default): the full-precision block applied to the full-precision model's own inputs to
  this block. The loss then also asks block i to undo the error the earlier quantized blocks left in
  its inputs, which is what the end model is judged by; its cost is a second activation stream.
* ``quant-prefix``: the full-precision block applied to the quantized prefix's outputs (the block's
  own inputs). Each block only removes its own quantization error.

One optimizer step uses one calibration batch (``--calib-batch-size`` windows, the batch the captured
attention masks were recorded for), batches visited in a seeded order; AdamW with a cosine schedule.
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
from .layer import SalientLinear
from .model import freeze_all_but_gift, quant_from_salient, salient_from_quant


@torch.no_grad()
def relative_mse(block: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor], kwargs: dict) -> float:
    """sum ||block(x) - y||^2 / sum ||y||^2 over every batch (eval mode: no noise)."""
    num = den = 0.0
    outs = run_block(block, inputs, kwargs)
    for out, y in zip(outs, targets):
        num += float((out.float() - y.float()).pow(2).sum())
        den += float(y.float().pow(2).sum())
    return num / max(den, 1e-30)


def reconstruct_block(index: int, block: nn.Module, fp_block: nn.Module, inputs: list[torch.Tensor],
                      targets: list[torch.Tensor], kwargs: dict, *, steps: int, lr: float, noise: NoiseSpec,
                      seed: int = 0) -> dict:
    """Train ``block``'s salient columns in place (QuantLinear -> SalientLinear -> QuantLinear); returns metrics."""
    t0 = time.perf_counter()
    block.eval()
    before = relative_mse(block, inputs, targets, kwargs)
    fp_linears = block_linears(fp_block)
    for j, (name, q) in enumerate(block_linears(block).items()):
        if not isinstance(q, QuantLinear):
            raise TypeError(f"block {index}: {name} is {type(q).__name__}, expected a QuantLinear")
        layer_seed = (seed * 1_009 + index) * 100_003 + j
        set_module(block, name, salient_from_quant(q, noise, layer_seed, fp_linears[name].weight))
    params = freeze_all_but_gift(block)
    layers = [m for m in block.modules() if isinstance(m, SalientLinear)]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s / max(steps, 1), 1.0))))
    order: list[int] = []
    rng = random.Random(seed * 7_919 + index)
    block.train()
    losses = []
    with torch.enable_grad():
        for step in range(steps):
            if not order:
                order = list(range(len(inputs)))
                rng.shuffle(order)
            b = order.pop()
            for m in layers:  # the noise of a step is a pure function of (layer seed, step): resumable, replicable
                m.noise_key = step
            out = block(inputs[b], **kwargs)
            out = out[0] if isinstance(out, (tuple, list)) else out
            y = targets[b].float()
            loss = (out.float() - y).pow(2).mean() / y.pow(2).mean().clamp_min(1e-30)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    for m in layers:
        m.noise_key = None
    for name, s in list(block_linears(block).items()):
        set_module(block, name, quant_from_salient(s))
    block.eval().requires_grad_(False)
    after = relative_mse(block, inputs, targets, kwargs)
    return {"relative_mse_before": before, "relative_mse_after": after, "steps": steps,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "seconds": time.perf_counter() - t0}
