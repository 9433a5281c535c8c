"""Salient-aware GPTQ (GPTQ with OWQ/QUIK-style full-precision columns). Pure tensor code.

Columns are processed in the order ``[non-salient (act-order or natural)] + [salient]``. GPTQ rounds
the non-salient columns one at a time and spreads each rounding error over the not-yet-processed
columns through the inverse Hessian; the salient columns come last, are never rounded, and so absorb
the compensation of every rounding before them. They are returned in full precision with those
compensated values. With no salient columns this is exactly GPTQ (Frantar et al. 2022, Alg. 1 with
lazy batch updates and a Cholesky-factored inverse Hessian).

Which group each column belongs to, and whether its grid is fitted lazily or upfront, is groups.py's
plan (``natural`` groups ``j // g`` by default, ``compact`` runs of non-salient columns as an option).
Salient columns store the zero point of their group, so the quantized part holds exactly 0 there and
the full layer is ``dequant(codes) + scatter(salient_weight)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..packed.bits import dequantize, dequantize_codes
from ..util.threads import cpu_threads
from .grid import GridSpec, fit_rows, quantize_codes
from .groups import plan_groups

__all__ = ["GPTQResult", "damped_inverse_cholesky", "empty_grids", "gptq_quantize", "layer_error", "processing_order"]


@dataclass
class GPTQResult:
    codes: torch.Tensor  # (out, in) int32 in [0, maxq]; salient columns hold their group's zero
    scales: torch.Tensor  # (out, n_groups) float32, float16-representable
    zeros: torch.Tensor  # (out, n_groups) float32, integer-valued
    g_idx: torch.Tensor  # (in,) int32, group of each input column
    salient_idx: torch.Tensor  # (K,) int64, ascending
    salient_weight: torch.Tensor  # (out, K) float32, GPTQ-compensated values
    loss: float  # GPTQ's own objective: sum over rounded columns of err^2 / (2 d^2)
    # (out, in) float32: each rounded column's value right before GPTQ rounded it (error updates included),
    # the salient columns' final values elsewhere; ``quantize_codes(prerounded, scale, zero)`` gives ``codes``.
    # Block-wise reconstruction learns the rounding from here (recover/grid_params.py).
    prerounded: torch.Tensor | None = None

    def dequantized(self) -> torch.Tensor:
        """The effective weight: dequantized codes with the salient columns inserted."""
        # the packed layer's dequantization, on this result's (out, in) tensors seen in the GPTQ layout
        w = dequantize_codes(self.codes.T, self.scales.T, self.zeros.T, self.g_idx)
        w[:, self.salient_idx] = self.salient_weight
        return w


def processing_order(diag_h: torch.Tensor, salient_idx: torch.Tensor, act_order: bool) -> torch.Tensor:
    """Non-salient columns (by descending Hessian diagonal under act-order), then salient ones."""
    n = diag_h.numel()
    is_salient = torch.zeros(n, dtype=torch.bool)
    is_salient[salient_idx] = True
    rest = torch.nonzero(~is_salient).squeeze(1)
    if act_order:
        rest = rest[torch.sort(-diag_h[rest].cpu(), stable=True).indices]
    return torch.cat([rest, salient_idx.sort().values])


def damped_inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, as GPTQ uses it."""
    h = h.clone()
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    try:
        low = torch.linalg.cholesky(h)
    except torch.linalg.LinAlgError as exc:
        raise ValueError(
            f"Hessian is not positive definite even with dampening {damp}: increase --damp "
            "or use more calibration data") from exc
    return torch.linalg.cholesky(torch.cholesky_inverse(low), upper=True)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: GridSpec,
    salient_idx: torch.Tensor | None = None,
    act_order: bool = False,
    static_groups: bool = False,
    block_size: int = 128,
    damp: float = 0.01,
    dtype: torch.dtype = torch.float32,
    group_layout: str = "natural",
) -> GPTQResult:
    with cpu_threads(1, weight.device.type == "cpu"):  # see threads.py
        return _gptq(weight, hessian, spec, salient_idx, act_order, static_groups, block_size, damp, dtype,
                     group_layout)


def empty_grids(out_f: int, n_groups: int, spec: GridSpec, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros of groups with nothing to fit (all-salient groups): scale 1 and the grid's zero for 0."""
    s, z = fit_rows(torch.zeros(out_f, 1, device=device), spec)
    return s.repeat(1, n_groups), z.repeat(1, n_groups)


def _gptq(weight, hessian, spec, salient_idx, act_order, static_groups, block_size, damp, dtype,
          group_layout) -> GPTQResult:
    out_f, in_f = weight.shape
    dev = weight.device
    sal = (torch.zeros(0, dtype=torch.long) if salient_idx is None else salient_idx.long().cpu()).sort().values
    W = weight.to(dtype).clone()
    H = hessian.to(dev, dtype).clone()

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    order = processing_order(torch.diag(H), sal, act_order).to(dev)
    n_rounded = in_f - sal.numel()
    plan = plan_groups(order, n_rounded, spec.group_size, group_layout, act_order, static_groups)
    scales, zeros = empty_grids(out_f, plan.n_groups, spec, dev)
    if plan.upfront:
        _fit_groups_upfront(W, sal, plan, spec, scales, zeros)
        g_pos, fit_width = plan.g_idx[order[:n_rounded]].long(), None
    else:
        g_pos, fit_width = plan.first_positions(order, n_rounded)

    Wp = W[:, order]
    Hinv = damped_inverse_cholesky(H[order][:, order], damp)
    pre_p = torch.empty_like(Wp)
    codes_p, loss = _round_columns(Wp, Hinv, n_rounded, g_pos, fit_width, spec, scales, zeros, block_size, pre_p)
    pre_p[:, n_rounded:] = Wp[:, n_rounded:]

    codes = torch.empty(out_f, in_f, dtype=torch.int32, device=dev)
    codes[:, order[:n_rounded]] = codes_p.to(torch.int32)
    salient_cols = order[n_rounded:]
    codes[:, salient_cols] = zeros[:, plan.g_idx[salient_cols].long()].to(torch.int32)
    prerounded = torch.empty(out_f, in_f, dtype=torch.float32, device=dev)
    prerounded[:, order] = pre_p.float()
    return GPTQResult(
        codes=codes,
        scales=scales,
        zeros=zeros,
        g_idx=plan.g_idx,
        salient_idx=salient_cols.cpu(),
        salient_weight=Wp[:, n_rounded:].float().contiguous(),
        loss=loss,
        prerounded=prerounded,
    )


def _fit_groups_upfront(W, sal, plan, spec, scales, zeros) -> None:
    """Every group's grid from the original weights of its non-salient columns (in place)."""
    is_salient = torch.zeros(W.shape[1], dtype=torch.bool, device=W.device)
    is_salient[sal.to(W.device)] = True
    for g in range(plan.n_groups):
        cols = plan.fitted_columns(g, is_salient)
        if cols.numel():
            s, z = fit_rows(W[:, cols], spec)
            scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]


def _round_columns(Wp, Hinv, n_rounded, g_pos, fit_width, spec, scales, zeros, block_size, pre_p=None):
    """GPTQ's loop over the first ``n_rounded`` columns of ``Wp`` (processing order), updating Wp in place.

    Returns (codes of those columns, GPTQ's loss); ``pre_p`` (when given) receives each column's value
    right before it is rounded. ``fit_width`` (lazy fitting) is the group's width at
    the group's first position, else 0; None when every grid was fitted upfront.
    """
    dtype = Wp.dtype
    codes_p = torch.empty(Wp.shape[0], n_rounded, dtype=dtype, device=Wp.device)
    loss = torch.zeros((), dtype=torch.float64, device=Wp.device)
    for i1 in range(0, n_rounded, block_size):
        i2 = min(i1 + block_size, n_rounded)
        W1 = Wp[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            pos = i1 + i
            g = int(g_pos[pos])
            if fit_width is not None and int(fit_width[pos]):
                # fit on the current (error-updated) values of this group's columns
                current = torch.cat([W1[:, i:], Wp[:, i2:n_rounded]], dim=1)[:, : int(fit_width[pos])]
                s, z = fit_rows(current, spec)
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
            w = W1[:, i]
            d = Hinv1[i, i]
            s_g = scales[:, g].to(dtype)
            z_g = zeros[:, g].to(dtype)
            c = quantize_codes(w, s_g, z_g, spec.maxq)
            q = dequantize(c, s_g, z_g)
            codes_p[:, pos] = c
            if pre_p is not None:
                pre_p[:, pos] = w
            loss += ((w - q) ** 2).sum().double() / (2 * d * d).double()
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Wp[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes_p, float(loss)


def layer_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """||(W - Q) X||_F^2 / n  =  tr((W-Q) H (W-Q)^T) / 2 with H = 2/n XᵀX."""
    d = (weight.double() - approx.double())
    return float(((d @ hessian.double().to(d.device)) * d).sum() / 2)
