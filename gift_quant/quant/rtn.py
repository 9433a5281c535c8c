"""Round-to-nearest on the same grid and layout as salient-aware GPTQ (a baseline). Pure tensor code.

Groups follow groups.py's plan for the same layout as GPTQ without act-order, so RTN and GPTQ
checkpoints differ only in the rounding decisions (RTN fits every grid on the original weights);
salient columns keep their original values (nothing to compensate).
"""

from __future__ import annotations

import torch

from .gptq import GPTQResult, empty_grids, processing_order
from .grid import GridSpec, fit_rows, quantize_codes
from .groups import plan_groups

__all__ = ["rtn_quantize"]


def rtn_quantize(weight: torch.Tensor, spec: GridSpec, salient_idx: torch.Tensor | None = None,
                 group_layout: str = "natural") -> GPTQResult:
    out_f, in_f = weight.shape
    w = weight.float()
    sal = torch.zeros(0, dtype=torch.long) if salient_idx is None else salient_idx.long().sort().values
    is_salient = torch.zeros(in_f, dtype=torch.bool)
    is_salient[sal] = True
    order = processing_order(torch.zeros(in_f), sal, act_order=False)
    plan = plan_groups(order, in_f - sal.numel(), spec.group_size, group_layout, act_order=False,
                       static_groups=True)
    scales, zeros = empty_grids(out_f, plan.n_groups, spec, w.device)
    codes = torch.empty(out_f, in_f, dtype=torch.int32)
    for g in range(plan.n_groups):
        cols = plan.fitted_columns(g, is_salient)
        if not cols.numel():
            continue
        s, z = fit_rows(w[:, cols], spec)
        scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
        codes[:, cols] = quantize_codes(w[:, cols], s, z, spec.maxq).to(torch.int32)
    codes[:, sal] = zeros[:, plan.g_idx[sal].long()].to(torch.int32)
    return GPTQResult(codes=codes, scales=scales, zeros=zeros, g_idx=plan.g_idx, salient_idx=sal,
                      salient_weight=w[:, sal].contiguous(), loss=float("nan"), prerounded=w.clone())
