"""SalientLinear: frozen non-salient weights plus a trainable ``out x K`` salient block (GIFT-SW).

``y = (B + noise) x + gift_salient x[S] (+ bias)`` where ``B`` is the frozen non-salient part (zero on
the salient columns). ``B`` is held either as quantization codes (uint8, one byte per weight) with
scales/zeros -- the post-training case, no full-precision copy of the layer is kept -- or as a frozen
dense weight when there is no quantization yet (pre-GIFT-SW and PEFT fine-tuning).

In training mode every forward pass draws ``Omega`` fresh from the layer's own seeded generator and
adds ``0.5 * Delta_i * Omega`` (normal) or ``Delta_i * U(-1/2, 1/2)`` (uniform) to the non-salient
columns; ``Delta_i`` is the per-row step of a clip-searched grid at ``noise_bits`` fitted once on the
non-salient weights. No noise in eval mode.

Memory and speed: the forward pass is a custom autograd Function (``_SalientMatmul``). It builds the
effective weight ``B + noise`` with the salient columns inserted in a scratch buffer shared by all
layers, runs one matmul, and keeps only ``x[..., S]`` (tokens x K) for the backward pass. The backward
pass rebuilds the same weight from the codes and the pass's noise seed (the noise is a pure function of
an integer seed, so the rebuild is exact) to compute ``grad_x``, and computes ``grad_salient`` from
``x[..., S]``. Autograd would otherwise keep a dequantized fp32 copy of every layer's weight alive until
the backward pass -- the whole model again, in full precision, which is what GIFT-SW on packed codes
is meant to avoid. No library offers a linear layer whose frozen weight is regenerated in backward from
codes plus keyed noise, hence the hand-written Function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config.settings import NoiseSpec, QuantSpec
from ..quant.grid import GridSpec, step_sizes
from ..util.threads import cpu_threads


class SalientLinear(nn.Module):
    is_gift_linear = True  # recognized by arch.block_linears like an nn.Linear

    def __init__(self, in_features: int, out_features: int, salient_idx: torch.Tensor, *,
                 codes: torch.Tensor | None = None, scales: torch.Tensor | None = None,
                 zeros: torch.Tensor | None = None, g_idx: torch.Tensor | None = None,
                 dense: torch.Tensor | None = None, salient_weight: torch.Tensor,
                 bias: torch.Tensor | None = None, noise: str | NoiseSpec = "normal", noise_bits: int = 4,
                 seed: int = 0, param_dtype: torch.dtype = torch.float32,
                 noise_reference: torch.Tensor | None = None):
        super().__init__()
        # the layer carries its noise settings and (when built from a packed layer, model.salient_from_quant)
        # its storage settings, so converting it back needs nothing re-passed
        self.noise_spec = noise if isinstance(noise, NoiseSpec) else NoiseSpec(noise, noise_bits)
        noise, noise_bits = self.noise_spec.kind, self.noise_spec.bits
        self.spec: QuantSpec | None = None  # the storage spec of the packed layer it was built from, if any
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
        # Delta_i is fitted on the non-salient weights of ``noise_reference`` (the full-precision layer, as the
        # paper's code does) when given, else on the base itself. Fitting on already-quantized weights locks
        # the grid search onto a sub-grid of the codes and gives 20-33 % smaller steps.
        # The reference may live on the GPU (stages.prepare_recovery puts it there): the fit runs where it is.
        ref = self.base_weight() if noise_reference is None else noise_reference.detach().float()
        with cpu_threads(1, ref.device.type == "cpu"):  # clip search: small ops (threads.py)
            delta = step_sizes(ref[:, mask.to(ref.device)], GridSpec(bits=noise_bits, sym=True))
        self.register_buffer("delta", delta.to(mask.device))
        self._generator: torch.Generator | None = None
        # Set by the training loop before each micro-batch: the noise then depends only on
        # (seed, noise_key), so data-parallel ranks, gradient-checkpoint recomputation and a resumed
        # run all draw exactly the noise an uninterrupted single-process run draws.
        self.noise_key: int | None = None

    # ------------------------------------------------------------------ numerics

    def base_weight(self) -> torch.Tensor:
        """The frozen non-salient part B (out, in), float32, zero on the salient columns."""
        return self._write_base(torch.empty(self.out_features, self.in_features, device=self.salient_idx.device))

    def _write_base(self, out: torch.Tensor) -> torch.Tensor:
        """Write B into ``out`` (out_features, in_features) without temporaries the size of the layer."""
        if self.dense is not None:
            return out.copy_(self.dense)
        out.copy_(self.codes)  # uint8 -> float32
        groups = self.scales.shape[1]
        if groups == 1:  # per-row grid: broadcast, no gather
            return out.sub_(self.zeros).mul_(self.scales)
        size = self.in_features // groups
        if self.in_features % groups == 0 and torch.equal(self.g_idx, self._contiguous_g_idx(size)):
            view = out.view(self.out_features, groups, size)  # groups are runs of columns: broadcast per group
            view.sub_(self.zeros.unsqueeze(2)).mul_(self.scales.unsqueeze(2))
            return out
        return out.sub_(self.zeros[:, self.g_idx]).mul_(self.scales[:, self.g_idx])  # act-order g_idx: gather

    def _contiguous_g_idx(self, size: int) -> torch.Tensor:
        return torch.arange(self.in_features, device=self.g_idx.device) // size

    @property
    def generator(self) -> torch.Generator:
        dev = self.delta.device
        if self._generator is None or self._generator.device != dev:
            self._generator = torch.Generator(device=dev).manual_seed(self.seed)
        return self._generator

    def _pass_seed(self) -> int:
        """Seed of this pass's noise: from ``noise_key`` when the training loop sets it, else fresh."""
        if self.noise_key is not None:
            return (self.seed * 1_000_003 + self.noise_key * 7_919) % (2**63 - 1)
        return int(torch.randint(0, 2**62, (1,), generator=self.generator, device=self.delta.device))

    def _add_noise(self, w: torch.Tensor, seed: int, scratch: torch.Tensor) -> torch.Tensor:
        """w += 0.5 * Delta_i * Omega (normal) or Delta_i * U(-1/2, 1/2) on the non-salient columns."""
        gen = torch.Generator(device=w.device).manual_seed(seed)
        if self.noise == "normal":
            scratch.normal_(generator=gen)
            w.addcmul_(scratch, self.delta.unsqueeze(1), value=0.5)
        else:
            scratch.uniform_(-0.5, 0.5, generator=gen)
            w.addcmul_(scratch, self.delta.unsqueeze(1))
        return w

    def sample_noise(self) -> torch.Tensor:
        """One pass's noise (out, in), zero on the salient columns; what training adds to B."""
        shape = (self.out_features, self.in_features)
        noise = torch.zeros(shape, device=self.delta.device)
        self._add_noise(noise, self._pass_seed(), torch.empty(shape, device=self.delta.device))
        return noise.index_fill_(1, self.salient_idx, 0.0)

    def effective_weight(self, noise_seed: int | None, salient: torch.Tensor) -> torch.Tensor:
        """B (+ noise) with ``salient`` in the salient columns, in a scratch buffer reused by every layer.

        The result is only valid until the next layer's call: use it at once, never keep it.
        """
        shape = (self.out_features, self.in_features)
        w = self._write_base(_scratch("weight", shape, self.delta.device))
        if noise_seed is not None:
            self._add_noise(w, noise_seed, _scratch("noise", shape, self.delta.device))
        return w.index_copy_(1, self.salient_idx, salient.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seed = self._pass_seed() if self.training and self.noise != "none" else None
        y = _SalientMatmul.apply(x, self.gift_salient, self, seed)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
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


# ------------------------------------------------------------------ fused matmul and its scratch buffers

_SCRATCH: dict[tuple[str, torch.device], torch.Tensor] = {}


def _scratch(name: str, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """A (rows, cols) float32 view of a buffer shared by all layers, grown to the largest layer seen.

    Reusing one buffer matters on CPU: a fresh allocation of a layer-sized tensor is fresh pages from the
    kernel on every pass, which costs about as much as the dequantization itself.
    """
    key = (name, torch.device(device))
    numel = shape[0] * shape[1]
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH[key] = torch.empty(numel, device=device)
    return buf[:numel].view(shape)


class _SalientMatmul(torch.autograd.Function):
    """y = x (B + noise, salient columns = W_s)^T, saving only x[..., S]; the weight is rebuilt in backward."""

    @staticmethod
    def forward(ctx, x, salient, layer: SalientLinear, noise_seed):
        w = layer.effective_weight(noise_seed, salient)
        y = F.linear(x, w.to(x.dtype))
        ctx.layer, ctx.noise_seed = layer, noise_seed
        ctx.save_for_backward(x[..., layer.salient_idx] if ctx.needs_input_grad[1] else None, salient)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        layer = ctx.layer
        x_salient, salient = ctx.saved_tensors
        grad_x = grad_salient = None
        if ctx.needs_input_grad[0]:
            w = layer.effective_weight(ctx.noise_seed, salient)
            grad_x = grad_y @ w.to(grad_y.dtype)
        if ctx.needs_input_grad[1]:
            gy = grad_y.reshape(-1, grad_y.shape[-1])
            grad_salient = (gy.T @ x_salient.reshape(-1, x_salient.shape[-1]).to(gy.dtype))
            grad_salient = grad_salient.to(salient.dtype)
        return grad_x, grad_salient, None, None
