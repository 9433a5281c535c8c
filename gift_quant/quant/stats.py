"""Pure accumulators over a linear layer's calibration inputs.

``ColumnStats`` collects, in one pass over token batches, everything later stages need about the
inputs ``X`` (tokens x in) of one linear: the Hessian proxy ``H = 2/n XᵀX`` that GPTQ uses and the
per-column norms ``||X_:,j||_p`` (p = 1, 2, inf) that the sensitivity metric uses.
Accumulation is in float64 for H's running mean so long calibration sets do not lose precision.
"""

from __future__ import annotations

import torch

__all__ = ["ColumnStats"]


class ColumnStats:
    def __init__(self, in_features: int, device: torch.device | str = "cpu", hessian: bool = True):
        self.in_features = in_features
        self.n_tokens = 0
        self._xtx = torch.zeros(in_features, in_features, dtype=torch.float64, device=device) if hessian else None
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.abs_max = torch.zeros(in_features, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of inputs of shape (..., in_features)."""
        x = x.reshape(-1, x.shape[-1]).to(self.abs_sum.device, torch.float32)
        n = x.shape[0]
        if n == 0:
            return
        if self._xtx is not None:
            # the batch product in float32 (fast), the running sum in float64 (no drift)
            self._xtx += (x.T @ x).double()
        self.n_tokens += n
        ax = x.abs()
        self.abs_sum += ax.sum(0, dtype=torch.float64)
        self.sq_sum += (x * x).sum(0, dtype=torch.float64)
        self.abs_max = torch.maximum(self.abs_max, ax.max(0).values.double())

    @property
    def hessian(self) -> torch.Tensor | None:
        """H = 2/n XᵀX (the GPTQ reference's scaling), float64."""
        if self._xtx is None:
            return None
        return self._xtx * (2.0 / max(self.n_tokens, 1))

    def column_norm(self, p: str) -> torch.Tensor:
        """||X_:,j||_p for p in {'1', '2', 'inf'} over all tokens seen."""
        if p == "1":
            return self.abs_sum.clone()
        if p == "2":
            return self.sq_sum.sqrt()
        if p == "inf":
            return self.abs_max.clone()
        raise ValueError(f"unknown norm {p!r}: use 1, 2 or inf")
