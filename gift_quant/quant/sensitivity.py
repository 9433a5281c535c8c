"""Generalized sensitivity metric and salient-column selection. Pure tensor code.

``s_j = ||D_:,j||_tau * ||X_:,j||_rho ** gamma`` (GIFT-SW's generalized sensitivity, docs/method.md [S])
where ``D = W - Q_b(W)`` for a symmetric per-row grid with clip search, or ``D = W``. The paper's choice
(preset ``gift``) is tau = rho = inf, gamma = 1. Other presets are special cases used by related methods:

* ``owq``:   diag(H)_j * ||D_:,j||_2^2, i.e. tau = 2 (squared) and ||X_j||_2^2 (rho = 2, gamma = 2);
* ``quik``:  max_t |X_tj|  (what the released GIFT-SW code does: D = 1, rho = inf, gamma = 1);
* ``wanda``: ||W_:,j||_1 * ||X_:,j||_2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .grid import GridSpec, fake_quantize, fit_rows

__all__ = ["GAMMAS", "NORMS", "PRESETS", "MetricSpec", "column_scores", "parse_metric", "perturbation",
           "select_salient"]

NORMS = ("1", "2", "inf")
GAMMAS = (0.0, 0.5, 1.0, 2.0)


@dataclass(frozen=True)
class MetricSpec:
    """tau: norm over the perturbation column; rho: norm over the input column; gamma: its power.

    ``perturbation`` is "quant" (D = W - Q_b(W)), "weight" (D = W) or "none" (D ignored, score is
    the input norm alone). ``square_tau`` squares the tau-norm (OWQ's ||D_j||_2^2).
    """

    tau: str = "inf"
    rho: str = "inf"
    gamma: float = 1.0
    perturbation: str = "quant"
    square_tau: bool = False
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.tau not in NORMS or self.rho not in NORMS:
            raise ValueError(f"tau and rho must be one of {NORMS} (got tau={self.tau}, rho={self.rho})")
        if float(self.gamma) not in GAMMAS:
            raise ValueError(f"gamma must be one of {GAMMAS} (got {self.gamma})")
        if self.perturbation not in ("quant", "weight", "none"):
            raise ValueError(f"perturbation must be quant, weight or none (got {self.perturbation!r})")


PRESETS = {
    "gift": MetricSpec(tau="inf", rho="inf", gamma=1.0, perturbation="quant", name="gift"),
    "owq": MetricSpec(tau="2", rho="2", gamma=2.0, perturbation="quant", square_tau=True, name="owq"),
    "quik": MetricSpec(tau="inf", rho="inf", gamma=1.0, perturbation="none", name="quik"),
    "wanda": MetricSpec(tau="1", rho="2", gamma=1.0, perturbation="weight", name="wanda"),
}


def parse_metric(text: str) -> MetricSpec:
    """A preset name, or free settings like ``tau=2,rho=inf,gamma=0.5,d=weight``."""
    if text in PRESETS:
        return PRESETS[text]
    fields = {}
    for part in text.split(","):
        if "=" not in part:
            raise ValueError(
                f"metric {text!r}: expected a preset ({', '.join(PRESETS)}) or key=value pairs "
                "like tau=inf,rho=2,gamma=1,d=quant")
        k, v = (s.strip() for s in part.split("=", 1))
        fields[k] = v
    known = {"tau", "rho", "gamma", "d"}
    if set(fields) - known:
        raise ValueError(f"metric {text!r}: unknown keys {sorted(set(fields) - known)}; use {sorted(known)}")
    return MetricSpec(tau=fields.get("tau", "inf"), rho=fields.get("rho", "inf"),
                      gamma=float(fields.get("gamma", 1.0)), perturbation=fields.get("d", "quant"),
                      name=text)


def _vec_norm(m: torch.Tensor, p: str, dim: int) -> torch.Tensor:
    if p == "inf":
        return m.abs().amax(dim=dim)
    return torch.linalg.vector_norm(m, ord=float(p), dim=dim)


def perturbation(weight: torch.Tensor, spec: MetricSpec, bits: int) -> torch.Tensor:
    """D for the metric: W - Q_b(W) on a symmetric per-row clip-searched grid, or W itself."""
    w = weight.float()
    if spec.perturbation == "weight":
        return w
    if spec.perturbation == "none":
        return torch.ones_like(w[:1])
    grid = GridSpec(bits=bits, sym=True, group_size=-1, clip="mse")
    scale, zero = fit_rows(w, grid)
    return w - fake_quantize(w, scale, zero, grid.maxq)


def column_scores(weight: torch.Tensor, input_norm: torch.Tensor, spec: MetricSpec, bits: int) -> torch.Tensor:
    """Score per input column (in,). ``input_norm`` is ||X_:,j||_rho computed by ColumnStats."""
    d_norm = _vec_norm(perturbation(weight, spec, bits), spec.tau, dim=0).double()
    if spec.square_tau:
        d_norm = d_norm * d_norm
    x = input_norm.double().to(d_norm.device)
    return d_norm * (x ** spec.gamma if spec.gamma != 0 else torch.ones_like(x))


def select_salient(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, sorted ascending (deterministic tie-break by index)."""
    if k < 0 or k >= scores.numel():
        raise ValueError(f"salient count k={k} must be in [0, {scores.numel()}) for {scores.numel()} input columns")
    if k == 0:
        return torch.zeros(0, dtype=torch.long)
    # stable sort on -score keeps lower indices first among ties
    order = torch.sort(-scores.cpu(), stable=True).indices
    return torch.sort(order[:k]).values
