"""A quantized linear whose grid, rounding and salient columns can all train: the block stage's layer.

Block-wise reconstruction v2 (recover/blockwise.py) swaps each packed ``QuantLinear`` of a block for a
``GridLinear`` built from it and from GPTQ's pre-rounding values ``P`` (GPTQResult.prerounded: each
non-salient weight right before GPTQ rounded it, the error compensation of earlier columns included).
The layer computes, per output row ``o`` and input column ``j`` of group ``g = g_idx[j]``::

    code  = clamp(round(P / s0 + v) + z0, 0, maxq)  v: trainable rounding offset in [-0.5, 0.5]
    s     = fp16(s0 * m)                            scale: the stored scale times a trainable multiplier
    z     = clamp(round(z_c), 0, maxq)              zero point (trainable only on asymmetric grids)
    W     = s * (code - z)  (0 on salient columns) + the salient columns W_s (trainable)

With ``v = 0`` the codes are exactly GPTQ's (the same float operations as quant/grid.py's
``quantize_codes`` on GPTQ's own grid ``s0, z0``), so training starts from the GPTQ model. Every
rounding passes its gradient straight through (STE).

The codes are decided on GPTQ's grid, not on the trained one: the scale is a learned step size over
the codes (as in EfficientQAT's E2E-QP), and only the offsets move a code. Re-rounding ``P / s`` with
the trained scale (LSQ-style, as AutoRound and Block-AP do from the original weights) undoes GPTQ's
error compensation, which was computed for GPTQ's own rounding: on the default model's first blocks it
made the training loss rise (results/recovery-study-v2/README.md).

The scales and the salient columns are rounded in the forward pass to the dtype the checkpoint stores
them in, so the trained layer and its packed form (``to_quant``) compute with identical numbers. Which
of (salient, scales, rounding) train is the caller's choice; the rest stay at their GPTQ values.

Ideas from the peers (read, not copied): AutoRound (intel/auto-round) learns per-weight rounding offsets
in [-0.5, 0.5] with signed gradient descent (``SignSGD`` below; lr = 1 / steps so the offsets can cross
at most half a step) and scales the grid's range by trainable factors; EfficientQAT's Block-AP trains
scales and zero points with STE per block; OmniQuant learns clipping per block. Starting from GPTQ's
pre-rounding values instead of the original weights is ours: it keeps GPTQ's error compensation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config.settings import NoiseSpec
from ..packed.qlinear import QuantLinear
from ..quant.grid import GridSpec, step_sizes
from ..util.seeds import derive_seed

__all__ = ["GridLinear", "SignSGD", "as_stored", "round_ste"]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def as_stored(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rounded to ``dtype`` and back (the value a checkpoint stores), identity backward."""
    if dtype == torch.float32:
        return x
    return x + (x.detach().to(dtype).float() - x.detach())


class SignSGD(torch.optim.Optimizer):
    """``p <- p - lr * sign(grad)``: a step of fixed size whatever the gradient's scale (AutoRound's rule).

    Rounding offsets live in [-0.5, 0.5] and only their sign relative to the rounding boundary matters,
    so a bounded, scale-free step suits them better than Adam's; torch has no such optimizer.
    """

    def __init__(self, params, lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(torch.sign(p.grad), alpha=-group["lr"])


class GridLinear(nn.Module):
    """One packed layer with trainable (salient columns, scales [+ zeros], rounding); see the module docstring."""

    is_gift_linear = True  # recognized by arch.block_linears like an nn.Linear

    def __init__(self, q: QuantLinear, prerounded: torch.Tensor | None, train: frozenset[str] | set[str],
                 noise: NoiseSpec | None = None, seed: int = 0, noise_reference: torch.Tensor | None = None):
        super().__init__()
        noise = NoiseSpec("none") if noise is None else noise
        if prerounded is None and "rounding" in train:
            raise ValueError("training the rounding needs GPTQ's pre-rounding values")
        dev = q.qweight.device
        self.in_features, self.out_features = q.in_features, q.out_features
        self.spec, self.bits, self.sym, self.maxq = q.spec, q.bits, q.sym, 2**q.bits - 1
        self.salient_dtype = q.salient_weight.dtype
        self.train_sets = frozenset(train)
        self.noise_spec, self.seed, self.noise_key = noise, seed, None
        self.noise_scale = 1.0  # the current step's factor on the noise (recover/noise_schedule.py)
        sal = q.salient_idx.long().to(dev)
        keep = torch.ones(q.in_features, dtype=torch.bool, device=dev)
        keep[sal] = False
        self.register_buffer("salient_idx", sal)
        self.register_buffer("nonsalient", keep)
        self.register_buffer("g_idx", q.g_idx.long().to(dev))
        self.register_buffer("codes0", q.codes().to(dev).float())  # GPTQ's codes
        self.register_buffer("scales0", q.scales.T.float().contiguous())  # (out, G), float16 values
        self.register_buffer("zeros0", q.zero_points().T.float().contiguous().to(dev))  # GPTQ's zero points
        self.register_buffer("prerounded", None if prerounded is None else prerounded.to(dev).float())
        self.register_buffer("bias", None if q.bias is None else q.bias.detach().clone())
        trains = self.train_sets.__contains__
        self.scale_mult = nn.Parameter(torch.ones_like(self.scales0), requires_grad=trains("scales"))
        # asymmetric zero points train with the scales (continuous, rounded in the forward pass)
        self.zero = nn.Parameter(self.zeros0.clone(), requires_grad=trains("scales") and not q.sym)
        self.round_offset = (nn.Parameter(torch.zeros(q.out_features, q.in_features, device=dev))
                             if trains("rounding") else None)
        self.salient = nn.Parameter(q.salient_weight.detach().float().clone(), requires_grad=trains("salient"))
        delta = torch.zeros(q.out_features, device=dev)
        if noise.kind != "none":
            ref = self.base_weight().detach() if noise_reference is None else noise_reference.detach().float().to(dev)
            delta = step_sizes(ref[:, keep], GridSpec(bits=noise.bits, sym=True))
        self.register_buffer("delta", delta)

    # ------------------------------------------------------------------ numerics

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scales as stored, zero points) per (row, group), differentiable."""
        s = as_stored(self.scales0 * self.scale_mult, torch.float16)
        z = self.zero if self.sym else round_ste(self.zero).clamp(0, self.maxq)
        return s, z

    def codes(self) -> torch.Tensor:
        """Current integer codes (out, in) as float, differentiable in the offsets through STE.

        Decided on GPTQ's grid (``s0``, ``z0``); salient columns hold their group's current zero point.
        """
        _, z = self.grid()
        if self.round_offset is None:
            codes = self.codes0
        else:
            u = self.prerounded / self.scales0[:, self.g_idx] + self.round_offset
            codes = torch.clamp(round_ste(u) + self.zeros0[:, self.g_idx], 0, self.maxq)
        return torch.where(self.nonsalient, codes, z[:, self.g_idx])

    def base_weight(self) -> torch.Tensor:
        """The quantized part ``s * (code - z)`` (out, in), zero on the salient columns."""
        s, z = self.grid()
        return (self.codes() - z[:, self.g_idx]) * s[:, self.g_idx]

    def weight(self) -> torch.Tensor:
        """The layer's effective weight: quantized part with the (stored-dtype) salient columns inserted."""
        return self.base_weight().index_copy(1, self.salient_idx, as_stored(self.salient, self.salient_dtype))

    def _noise(self) -> torch.Tensor:
        """GIFT-SW's ``0.5 * Delta_i * N(0, 1)`` on the non-salient columns, keyed by (seed, noise_key)."""
        key = 0 if self.noise_key is None else self.noise_key
        gen = torch.Generator(device=self.delta.device).manual_seed(derive_seed(self.seed, "pass-noise", key))
        shape = (self.out_features, self.in_features)
        if self.noise_spec.kind == "normal":
            n = torch.randn(shape, generator=gen, device=self.delta.device) * (
                (0.5 * self.noise_scale) * self.delta.unsqueeze(1))
        else:
            n = (torch.rand(shape, generator=gen, device=self.delta.device) - 0.5) * (
                self.noise_scale * self.delta.unsqueeze(1))
        return n * self.nonsalient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight()
        if self.training and self.noise_spec.kind != "none" and self.noise_scale > 0:
            w = w + self._noise()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def clamp_offsets(self) -> None:
        """Offsets back into [-0.5, 0.5]; scale multipliers kept positive (a stored scale must be > 0)."""
        if self.round_offset is not None:
            self.round_offset.clamp_(-0.5, 0.5)
        self.scale_mult.clamp_(min=1e-3)

    # ------------------------------------------------------------------ back to the packed form

    @torch.no_grad()
    def to_quant(self) -> QuantLinear:
        """The packed layer holding the learned codes, scales (the stored fp16 scales), zeros and salient columns."""
        s, z = self.grid()
        codes = self.codes().round().to(torch.int64)
        q = QuantLinear.from_parts(codes, s, z.round(), self.g_idx, self.salient_idx, self.salient.float(), self.spec,
                                   self.bias)
        return q.to(self.scales0.device).eval()

    @torch.no_grad()
    def changes(self) -> dict:
        """How far training moved the grid: share of non-salient codes changed, mean |scale multiplier - 1|."""
        codes = self.codes()
        moved = (codes != self.codes0)[:, self.nonsalient]
        return {"codes_changed": float(moved.float().mean()) if moved.numel() else 0.0,
                "scale_shift": float((self.scale_mult - 1).abs().mean())}

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
                f"salient={self.salient_idx.numel()}, train={','.join(sorted(self.train_sets))}, "
                f"noise={self.noise_spec.kind}")
