"""STE quantization-aware training baseline: all weights train, salient columns stay full precision.

The paper's STE baseline: every weight of the targeted linears is trainable; the forward pass uses
the fake-quantized non-salient columns (grid fixed from the GPTQ checkpoint: scales, zeros, groups)
with the straight-through estimator, the salient columns as they are. ``convert_qat`` rounds the
trained weights on the same grid back into a packed QuantLinear.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model.arch import model_linears, set_module
from ..packed.bits import dequantize
from ..packed.qlinear import QuantLinear
from ..quant.grid import quantize_codes
from .model import freeze_all_but_gift

__all__ = ["QATLinear", "convert_qat", "prepare_qat"]


class QATLinear(nn.Module):
    is_gift_linear = True

    def __init__(self, q: QuantLinear):
        super().__init__()
        self.in_features, self.out_features, self.spec = q.in_features, q.out_features, q.spec
        self.bits = q.bits
        g = q.g_idx.long()
        self.register_buffer("scale_cols", q.scales.float()[g].T.contiguous())  # (out, in)
        self.register_buffer("zero_cols", q.zero_points()[g].T.contiguous())
        self.register_buffer("g_idx", q.g_idx.clone())
        self.register_buffer("salient_idx", q.salient_idx.long().clone())
        mask = torch.ones(q.in_features, dtype=torch.bool)
        mask[self.salient_idx] = False
        self.register_buffer("nonsalient_mask", mask)
        self.register_buffer("scales_g", q.scales.clone())
        self.register_buffer("zeros_g", q.zero_points().clone())
        self.gift_weight = nn.Parameter(q.dense_weight(torch.float32).contiguous())
        self.register_buffer("bias", None if q.bias is None else q.bias.clone())

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        maxq = 2**self.bits - 1
        q = dequantize(quantize_codes(w, self.scale_cols, self.zero_cols, maxq), self.scale_cols, self.zero_cols)
        q = torch.where(self.nonsalient_mask, q, w)
        return w + (q - w).detach()  # straight-through: identity gradient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fake_quant(self.gift_weight)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def prepare_qat(model: nn.Module) -> nn.Module:
    for name, q in model_linears(model).items():
        if not isinstance(q, QuantLinear):
            raise TypeError(f"{name} is {type(q).__name__}, expected a QuantLinear")
        set_module(model, name, QATLinear(q).to(q.qweight.device))
    freeze_all_but_gift(model)
    return model


def convert_qat(model: nn.Module) -> nn.Module:
    for name, m in list(model.named_modules()):
        if not isinstance(m, QATLinear):
            continue
        w = m.gift_weight.detach().float()
        codes = quantize_codes(w, m.scale_cols, m.zero_cols, 2**m.bits - 1).to(torch.int32)
        codes[:, m.salient_idx] = m.zero_cols[:, m.salient_idx].to(torch.int32)
        q = QuantLinear.from_parts(codes, m.scales_g.float().T, m.zeros_g.T, m.g_idx, m.salient_idx,
                                   w[:, m.salient_idx], m.spec, m.bias)
        set_module(model, name, q.to(w.device).eval())
    return model
