"""The noise's scale over a training stage: constant (GIFT-SW), or annealed to zero by the last step.

``noise_factor(schedule, step, steps)`` multiplies the injected noise (its standard deviation: the
noise is ``factor * 0.5 * Delta_i * Omega``) at optimizer step ``step`` (0-based) of ``steps``:

* ``constant``: 1 at every step, the paper's noise (and exactly today's numbers: the factor 1 leaves every
  floating-point operation as it was).
* ``anneal``: ``1 - step / (steps - 1)``, linear from 1 at the first step to exactly 0 at the last, where
  the layer adds no noise at all, so its training forward is the noise-free forward of the weights as
  they will be served (a one-step stage is its own last step: no noise).

Why linear and not cosine: the learning rate already follows warm-up + cosine decay (loop.py,
blockwise.py). A cosine noise ramp would sit above 90 % for the first fifth of the steps and below 10 %
for the last fifth, exactly where the cosine learning rate is also below 10 %: the noise-free steps
would barely train. Linear is the plainest ramp that reaches 0 at the last step, has no shape parameter,
and spends half the constant schedule's noise (its mean factor is 1/2).

The factor is a pure function of (schedule, step, steps), like the noise itself is of (seed, noise key):
a resumed run, lanes, data-parallel ranks and gradient-checkpoint recomputation all see the same noise.
The training loops set it once per step, before any forward pass of that step, with ``set_noise_progress``;
a layer reads it in forward and when it rebuilds the pass's noisy weight in backward (same step).
"""

from __future__ import annotations

from torch import nn

from ..config.settings import NOISE_SCHEDULES, NoiseSpec

__all__ = ["noise_factor", "set_noise_progress"]


def noise_factor(schedule: str, step: int, steps: int) -> float:
    """The noise's scale factor at 0-based ``step`` of ``steps`` (see the module docstring)."""
    if schedule not in NOISE_SCHEDULES:
        raise ValueError(f"unknown noise schedule {schedule!r}; use one of {', '.join(NOISE_SCHEDULES)}")
    if schedule == "constant":
        return 1.0
    if steps <= 1:
        return 0.0
    return max(0.0, 1.0 - step / (steps - 1))


def set_noise_progress(model: nn.Module, step: int, steps: int) -> None:
    """Set every noisy layer's ``noise_scale`` for ``step`` of ``steps``, by its own NoiseSpec's schedule."""
    for m in model.modules():
        spec = getattr(m, "noise_spec", None)
        if isinstance(spec, NoiseSpec) and hasattr(m, "noise_scale"):
            m.noise_scale = noise_factor(spec.schedule, step, steps)
