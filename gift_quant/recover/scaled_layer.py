"""End-to-end distillation that also trains the grid's scales: a SalientLinear with trainable scale multipliers.

``ScaledSalientLinear`` is a ``SalientLinear`` (codes base) whose per-(row, group) scales are
``fp16(s0 * m)`` with a trainable multiplier ``m`` (``gift_scales``, initialised to 1): the codes stay
fixed, only the step sizes move, as in EfficientQAT's E2E-QP; the salient columns train as before.
The multiplier makes one learning rate mean the same relative step in every layer, whatever its
scales' magnitude. The scales are rounded to float16 in the forward pass (the dtype they are stored
in), so what trains is what the packed checkpoint holds.

The forward pass keeps SalientLinear's memory design (one weight rebuilt in a shared scratch buffer,
rebuilt again in backward from codes and the pass's noise seed) but saves the whole input ``x`` (not
only ``x[..., S]``), because the scales' gradient needs the full weight gradient ``g_W = g_y^T x``:
``dL/ds[o, g] = sum over columns j of group g of g_W[o, j] * (code[o, j] - z[o, g])`` (zero on salient
columns, whose code is the zero point). It is a subclass in its own module so that SalientLinear stays
as it is; ``adopt`` turns a prepared SalientLinear into one in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layer import SalientLinear, compute_dtype

__all__ = ["ScaledSalientLinear", "enable_scale_training", "param_groups"]


class ScaledSalientLinear(SalientLinear):
    """SalientLinear whose scales train through ``gift_scales`` multipliers (see the module docstring)."""

    CACHEABLE = False  # its base changes at every step as the scales train: neither cache would stay valid

    @classmethod
    def adopt(cls, layer: SalientLinear) -> ScaledSalientLinear:
        """Make a codes-based ``layer`` trainable in its scales, in place (same buffers, one parameter added)."""
        if layer.codes is None:
            raise TypeError("only a quantized (codes) base has scales to train")
        layer.__class__ = cls
        layer.keep_weight = False
        layer.cache_base(False)
        layer.register_buffer("base_scales", layer.scales.detach().clone())  # the stored (float16) scales
        layer.gift_scales = nn.Parameter(torch.ones_like(layer.base_scales))
        return layer

    def sync_scales(self) -> None:
        """Write the current scales, as stored (float16), into the buffer the base is rebuilt from."""
        with torch.no_grad():
            self.scales.copy_((self.base_scales * self.gift_scales).to(torch.float16).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sync_scales()
        seed = self._pass_seed() if self.noisy() else None
        y = _ScaledMatmul.apply(x, self.gift_salient, self.gift_scales, self, seed)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def base_weight(self) -> torch.Tensor:
        self.sync_scales()
        return super().base_weight()


class _ScaledMatmul(torch.autograd.Function):
    """y = x W^T with W = s * (codes - z) (+ noise) and the salient columns; gradients for x, W_s and m."""

    @staticmethod
    def forward(ctx, x, salient, mult, layer: ScaledSalientLinear, noise_seed):
        w = layer.effective_weight(noise_seed, salient)
        dt = ctx.compute_dtype = compute_dtype(x)  # autocast's (--precision bf16) or x's: layer.compute_dtype
        ctx.x_dtype = x.dtype
        xc = x.to(dt)
        y = F.linear(xc, w.to(dt))
        ctx.layer, ctx.noise_seed = layer, noise_seed
        ctx.save_for_backward(xc, salient)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        layer = ctx.layer
        x, salient = ctx.saved_tensors
        grad_y = grad_y.to(ctx.compute_dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = layer.effective_weight(ctx.noise_seed, salient)
            grad_x = (grad_y @ w.to(grad_y.dtype)).to(ctx.x_dtype)
        gy = grad_y.reshape(-1, grad_y.shape[-1])
        if ctx.compute_dtype == torch.bfloat16:  # the weight gradient's matmul in bf16 too, as autocast's nn.Linear
            g_w = (gy.T @ x.reshape(-1, x.shape[-1])).float()
        else:
            g_w = gy.float().T @ x.reshape(-1, x.shape[-1]).float()  # (out, in)
        grad_salient = g_w[:, layer.salient_idx].to(salient.dtype)
        g = layer.g_idx
        per_column = g_w.mul_(layer.codes.float() - layer.zeros[:, g])  # salient columns: code == zero -> 0
        grad_scale = torch.zeros_like(layer.base_scales).index_add_(1, g, per_column)
        grad_mult = grad_scale * layer.base_scales  # the float16 rounding passes the gradient straight through
        return grad_x, grad_salient, grad_mult, None, None


def enable_scale_training(model: nn.Module) -> list[ScaledSalientLinear]:
    """Every codes-based SalientLinear of ``model`` trains its scales too (``gift_scales``, initialised to 1)."""
    layers = [m for m in model.modules() if isinstance(m, SalientLinear) and m.codes is not None]
    return [ScaledSalientLinear.adopt(m) for m in layers]


def param_groups(model: nn.Module, lr: float, scales_lr: float) -> list[dict]:
    """The trainable parameters as optimizer groups: scale multipliers at ``scales_lr``, the rest at ``lr``."""
    scales, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (scales if name.rsplit(".", 1)[-1] == "gift_scales" else rest).append(p)
    groups = [{"params": rest, "lr": lr}] if rest else []
    return groups + ([{"params": scales, "lr": scales_lr}] if scales else [])
