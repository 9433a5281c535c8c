"""SalientLinear: frozen non-salient weights plus a trainable ``out x K`` salient block (GIFT-SW).

``y = (B + noise) x + gift_salient x[S] (+ bias)`` where ``B`` is the frozen non-salient part (zero on
the salient columns). ``B`` is held either as quantization codes (uint8, one byte per weight) with
scales/zeros -- the post-training case, no full-precision copy of the layer is kept -- or as a frozen
dense weight when there is no quantization yet (pre-GIFT-SW and PEFT fine-tuning).

In training mode every forward pass draws ``Omega`` fresh from the layer's own seeded generator and
adds ``0.5 * Delta_i * Omega`` (normal) or ``Delta_i * U(-1/2, 1/2)`` (uniform) to the non-salient
columns; ``Delta_i`` is the per-row step of a clip-searched grid at ``noise_bits`` fitted once on the
non-salient weights. No noise in eval mode. Two matmuls rather than one: the backward pass then
computes a weight gradient only for the small salient block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..grid import GridSpec, step_sizes
from ..threads import cpu_threads

NOISE_TYPES = ("normal", "uniform", "none")


class SalientLinear(nn.Module):
    is_gift_linear = True  # recognized by arch.block_linears like an nn.Linear

    def __init__(self, in_features: int, out_features: int, salient_idx: torch.Tensor, *,
                 codes: torch.Tensor | None = None, scales: torch.Tensor | None = None,
                 zeros: torch.Tensor | None = None, g_idx: torch.Tensor | None = None,
                 dense: torch.Tensor | None = None, salient_weight: torch.Tensor,
                 bias: torch.Tensor | None = None, noise: str = "normal", noise_bits: int = 4,
                 seed: int = 0, param_dtype: torch.dtype = torch.float32):
        super().__init__()
        if noise not in NOISE_TYPES:
            raise ValueError(f"noise must be one of {NOISE_TYPES} (got {noise!r})")
        if (codes is None) == (dense is None):
            raise ValueError("give either codes/scales/zeros/g_idx (quantized base) or dense (full-precision base)")
        self.in_features, self.out_features = in_features, out_features
        self.noise, self.noise_bits, self.seed = noise, noise_bits, seed
        self.register_buffer("salient_idx", salient_idx.long().clone())
        mask = torch.ones(in_features, dtype=torch.bool)
        mask[self.salient_idx] = False
        self.register_buffer("nonsalient_mask", mask)
        if codes is not None:
            self.register_buffer("codes", codes.to(torch.uint8))  # (out, in)
            self.register_buffer("scales", scales.float())  # (out, G)
            self.register_buffer("zeros", zeros.float())  # (out, G)
            self.register_buffer("g_idx", g_idx.long())
            self.dense = None
        else:
            base = dense.detach().clone()
            base[:, self.salient_idx] = 0
            self.register_buffer("dense", base)
            self.codes = None
        self.gift_salient = nn.Parameter(salient_weight.detach().to(param_dtype).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        with cpu_threads(1, self.base_weight().device.type == "cpu"):  # clip search: small ops (threads.py)
            delta = step_sizes(self.base_weight()[:, mask], GridSpec(bits=noise_bits, sym=True))
        self.register_buffer("delta", delta)
        self._generator: torch.Generator | None = None
        # Set by the training loop before each micro-batch: the noise then depends only on
        # (seed, noise_key), so data-parallel ranks, gradient-checkpoint recomputation and a resumed
        # run all draw exactly the noise an uninterrupted single-process run draws.
        self.noise_key: int | None = None

    # ------------------------------------------------------------------ numerics

    def base_weight(self) -> torch.Tensor:
        """The frozen non-salient part B (out, in), float32, zero on the salient columns."""
        if self.dense is not None:
            return self.dense.float()
        g = self.g_idx
        return self.scales[:, g] * (self.codes.float() - self.zeros[:, g])

    @property
    def generator(self) -> torch.Generator:
        dev = self.delta.device
        if self._generator is None or self._generator.device != dev:
            self._generator = torch.Generator(device=dev).manual_seed(self.seed)
        return self._generator

    def sample_noise(self) -> torch.Tensor:
        """0.5 * Delta_i * Omega on the non-salient columns (out, in)."""
        shape = (self.out_features, self.in_features)
        if self.noise_key is None:
            gen = self.generator  # advances: fresh noise on every pass
        else:
            gen = torch.Generator(device=self.delta.device).manual_seed(
                (self.seed * 1_000_003 + self.noise_key * 7_919) % (2**63 - 1))
        if self.noise == "normal":
            omega = torch.randn(shape, generator=gen, device=self.delta.device) * 0.5
        else:
            omega = torch.rand(shape, generator=gen, device=self.delta.device) - 0.5
        return omega * self.delta.unsqueeze(1) * self.nonsalient_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.base_weight()
        if self.training and self.noise != "none":
            w = w + self.sample_noise()
        y = F.linear(x, w.to(x.dtype))
        y = y + F.linear(x[..., self.salient_idx], self.gift_salient.to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    def merged_weight(self) -> torch.Tensor:
        """B with the (trained) salient columns inserted, float32, no noise."""
        w = self.base_weight().clone()
        w[:, self.salient_idx] = self.gift_salient.detach().float()
        return w

    def extra_repr(self) -> str:
        base = "quantized" if self.codes is not None else "dense"
        return (f"in={self.in_features}, out={self.out_features}, salient={self.salient_idx.numel()}, "
                f"base={base}, noise={self.noise}@{self.noise_bits}b")
