"""Speed caches of a training run, sized to a memory budget (``RecoverConfig.cache_mb``).

Each SalientLinear can trade float32 copies of its weight for work a step repeats (recover/layer.py):

1. ``keep_weight``: the forward pass's noisy weight kept for the backward pass, so the noise is drawn once
   per pass instead of twice. Drawing the noise costs about eight dequantizations (BENCHMARKS.md, "One
   distillation step"), so this comes first.
2. ``cache_base``: the frozen base dequantized once instead of on every pass.

Both give bit-identical training (tests/test_train_caches.py), so the budget is a speed/memory choice
only and a resumed run may change it. The budget is filled layer by layer in that order; ``None`` (the
default) allows a quarter of the memory still free on the training device after the first step (the
training loop plans the caches then, so the step's own activations count as used), i.e. the caches are
on whenever the model is small next to the free memory; 0 turns both off (the leanest run).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .layer import SalientLinear

AUTO_FRACTION = 0.25  # of the free memory at the start of training; the rest stays for activations and others
MB = 2**20

__all__ = ["AUTO_FRACTION", "CachePlan", "free_bytes", "plan_caches", "release_caches"]


def free_bytes(device: torch.device | str) -> int | None:
    """Memory free for this process on ``device`` now: the GPU's free memory, or the host's MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class CachePlan(dict):
    """What plan_caches decided: budget, bytes and layer counts of each cache."""

    def line(self) -> str:
        """One line for the user."""
        how = "auto: 1/4 of the free memory" if self["auto"] else "--cache-mb"  # free after the first step
        if not self["kept_layers"] and not self["base_layers"]:
            return (f"gift-quant: training caches off ({self['budget_mb']:.0f} MB allowed, {how}): the noise is drawn "
                    "again and the base rebuilt in each backward pass")
        parts = []
        if self["kept_layers"]:
            parts.append(f"noisy weights kept for backward in {self['kept_layers']}/{self['layers']} layers "
                         f"({self['kept_mb']:.0f} MB)")
        if self["base_layers"]:
            parts.append(f"dense base in {self['base_layers']}/{self['layers']} layers ({self['base_mb']:.0f} MB)")
        return f"gift-quant: training caches: {' and '.join(parts)}, within {self['budget_mb']:.0f} MB ({how})"


def plan_caches(model: nn.Module, budget_mb: int | None, device: torch.device | str) -> CachePlan | None:
    """Turn the caches on layer by layer within the budget (kept weights first); None for a model without
    SalientLinear layers (LoRA, full fine-tuning). Call it where the model trains: a move drops the caches."""
    layers = [m for m in model.modules() if isinstance(m, SalientLinear) and m.CACHEABLE]
    if not layers:
        return None
    auto = budget_mb is None
    if auto:
        free = free_bytes(device)
        budget = 0 if free is None else int(AUTO_FRACTION * free)
    else:
        budget = int(budget_mb) * MB
    left = budget
    kept = base = 0
    for layer in layers:
        cost = layer.weight_bytes()
        layer.keep_weight = cost <= left
        if layer.keep_weight:
            left -= cost
            kept += 1
    for layer in layers:
        cost = layer.weight_bytes() if layer.codes is not None else 0  # a dense base is its own cache
        on = cost > 0 and cost <= left
        layer.cache_base(on)
        if on:
            left -= cost
            base += 1
    per = {id(m): m.weight_bytes() / MB for m in layers}
    return CachePlan(auto=auto, budget_mb=budget / MB, layers=len(layers), kept_layers=kept, base_layers=base,
                     kept_mb=sum(per[id(m)] for m in layers if m.keep_weight),
                     base_mb=sum(per[id(m)] for m in layers if m._base_cache is not None))


def release_caches(model: nn.Module) -> None:
    """Free every cache (after training: evaluation and packing need none)."""
    for m in model.modules():
        if isinstance(m, SalientLinear):
            m.keep_weight = False
            m.cache_base(False)
            m._kept = m._kept_pass = None
