"""Round-to-nearest on the same grid and layout as salient-aware GPTQ (a baseline). Pure tensor code.

Groups are runs of ``group_size`` consecutive non-salient columns, exactly as GPTQ without
act-order forms them, so RTN and GPTQ checkpoints differ only in the rounding decisions; salient
columns keep their original values (nothing to compensate).
"""

from __future__ import annotations

import torch

from ..grid import GridSpec, fit_rows, quantize_codes
from .gptq import GPTQResult


def rtn_quantize(weight: torch.Tensor, spec: GridSpec, salient_idx: torch.Tensor | None = None) -> GPTQResult:
    out_f, in_f = weight.shape
    w = weight.float()
    sal = torch.zeros(0, dtype=torch.long) if salient_idx is None else salient_idx.long().sort().values
    keep = torch.ones(in_f, dtype=torch.bool)
    keep[sal] = False
    rest = torch.nonzero(keep).squeeze(1)
    gs = len(rest) if spec.group_size <= 0 or spec.group_size >= len(rest) else spec.group_size
    n_groups = max(1, -(-len(rest) // gs))
    scales = torch.ones(out_f, n_groups)
    zeros = torch.zeros(out_f, n_groups)
    g_idx = torch.full((in_f,), n_groups - 1, dtype=torch.int32)
    codes = torch.empty(out_f, in_f, dtype=torch.int32)
    for g in range(n_groups):
        cols = rest[g * gs:(g + 1) * gs]
        s, z = fit_rows(w[:, cols], spec)
        scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
        g_idx[cols] = g
        codes[:, cols] = quantize_codes(w[:, cols], s, z, spec.maxq).to(torch.int32)
    codes[:, sal] = zeros[:, g_idx[sal].long()].to(torch.int32)
    return GPTQResult(codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, salient_idx=sal,
                      salient_weight=w[:, sal].contiguous(), loss=float("nan"))
