"""Uniform quantization grid: fitting scales/zeros, rounding, dequantizing. Pure tensor code.

Conventions follow the GPTQ reference so that checkpoints export to the GPTQ format unchanged:

* codes are unsigned integers in ``[0, maxq]`` with ``maxq = 2**bits - 1``;
* ``dequant = scale * (code - zero)``;
* symmetric grids use the fixed zero point ``2**(bits-1)``, so the signed levels are
  ``-2**(bits-1) .. 2**(bits-1)-1`` and the step is ``scale = 2 * clip / maxq``;
* asymmetric grids span ``[min, max]`` of the row with an integer zero point.

The clip search shrinks the range by a grid of factors and keeps, per row, the factor minimizing
``sum |w - Q(w)|**norm`` (norm 2 by default: the squared error of docs/method.md [Q]; GPTQ used 2.4).
Scales are rounded to float16 at fit time because that is how they are stored: the in-memory model
and the packed checkpoint then compute with identical numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config.settings import GRID_BITS
from ..packed.bits import dequantize

__all__ = ["GridSpec", "fake_quantize", "fit_rows", "params_from_range", "quantize_codes", "quantize_rtn", "step_sizes"]


@dataclass(frozen=True)
class GridSpec:
    """How one linear is quantized. ``group_size <= 0`` means one grid per output row."""

    bits: int = 3
    sym: bool = True
    group_size: int = -1
    clip: str = "mse"  # "mse" (grid search) or "minmax"
    clip_grid: int = 100
    clip_max_shrink: float = 0.8
    clip_norm: float = 2.0

    def __post_init__(self) -> None:
        if self.bits not in GRID_BITS:
            raise ValueError(f"bits must be in {GRID_BITS.start}..{GRID_BITS.stop - 1} (got {self.bits})")
        if self.clip not in ("mse", "minmax"):
            raise ValueError(f"clip must be 'mse' or 'minmax' (got {self.clip!r})")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1


def params_from_range(xmin: torch.Tensor, xmax: torch.Tensor, spec: GridSpec):
    """Scale and zero for rows whose values lie in [xmin, xmax] (xmin <= 0 <= xmax)."""
    maxq = spec.maxq
    if spec.sym:
        amax = torch.maximum(xmin.abs(), xmax)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        scale = (xmax - xmin) / maxq
        zero = None
    # All-zero rows: any positive scale quantizes them exactly; 1.0 keeps the division safe.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.to(torch.float16).to(scale.dtype)
    if zero is None:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (as w's float dtype) for w with per-row scale/zero broadcast over columns."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return dequantize(quantize_codes(w, scale, zero, maxq), scale, zero)


def fit_rows(w: torch.Tensor, spec: GridSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit one (scale, zero) per row of ``w`` (rows x cols); returns two (rows, 1) tensors."""
    w = w.float()
    zeros_col = torch.zeros(w.shape[0], device=w.device)
    xmin = torch.minimum(w.min(dim=1).values, zeros_col)
    xmax = torch.maximum(w.max(dim=1).values, zeros_col)
    scale, zero = params_from_range(xmin, xmax, spec)
    if spec.clip == "mse" and w.shape[1] > 0:
        best = _row_error(w, scale, zero, spec)
        for i in range(1, int(spec.clip_max_shrink * spec.clip_grid) + 1):
            p = 1 - i / spec.clip_grid
            s, z = params_from_range(p * xmin, p * xmax, spec)
            err = _row_error(w, s, z, spec)
            better = err < best
            if better.any():
                best = torch.where(better, err, best)
                scale = torch.where(better, s, scale)
                zero = torch.where(better, z, zero)
    return scale.unsqueeze(1), zero.unsqueeze(1)


def _row_error(w, scale, zero, spec: GridSpec) -> torch.Tensor:
    # the clip search's hot loop: one temporary, updated in place (same numbers as fake_quantize)
    s, z = scale.unsqueeze(1), zero.unsqueeze(1)
    d = torch.round(w / s).add_(z).clamp_(0, spec.maxq).sub_(z).mul_(s).sub_(w)
    if spec.clip_norm == 2:
        return d.square_().sum(dim=1)
    return d.abs_().pow_(spec.clip_norm).sum(dim=1)


def quantize_rtn(w: torch.Tensor, spec: GridSpec, columns: torch.Tensor | None = None) -> torch.Tensor:
    """Round-to-nearest fake quantization with grids fitted on ``columns`` (all by default).

    Returns the dequantized matrix; columns outside ``columns`` are returned unchanged (they are the
    salient columns, kept in full precision). Groups are consecutive runs of ``group_size`` fitted
    columns, matching what GPTQ does without act-order.
    """
    out = w.clone().float()
    cols = torch.arange(w.shape[1], device=w.device) if columns is None else columns
    gs = spec.group_size if spec.group_size > 0 else len(cols)
    for start in range(0, len(cols), max(gs, 1)):
        idx = cols[start : start + gs]
        block = out[:, idx]
        scale, zero = fit_rows(block, spec)
        out[:, idx] = fake_quantize(block, scale, zero, spec.maxq)
    return out.to(w.dtype)


def step_sizes(w: torch.Tensor, spec: GridSpec) -> torch.Tensor:
    """Per-row quantization step ``Delta_i`` of a per-row grid fitted on ``w`` (rows,)."""
    scale, _ = fit_rows(w, GridSpec(bits=spec.bits, sym=spec.sym, group_size=-1, clip=spec.clip,
                                     clip_grid=spec.clip_grid, clip_max_shrink=spec.clip_max_shrink,
                                     clip_norm=spec.clip_norm))
    return scale.squeeze(1)
