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

Two caches trade memory for that rebuild, each per layer and each bit-identical to the path without it
(recover/caches.py decides them from a memory budget):

* ``keep_weight``: the forward pass writes ``B + noise`` into a buffer the layer owns and the backward
  pass reads it back, so the noise is drawn once per pass instead of twice (drawing it is ~8x the cost of
  the dequantization: BENCHMARKS.md). The buffer is tagged with the pass; a backward whose pass's weight
  was overwritten meanwhile (two forwards before one backward) rebuilds it from the seed as before.
  Lanes (recover/loop.py: parts of one micro-batch in parallel threads, all with the micro-batch's noise)
  find the weight already built for the same seed and salient values, and share it.
* ``cache_base``: ``B`` dequantized once and kept in float32 instead of recomputed from the codes.
"""

from __future__ import annotations

import itertools
import threading

import torch
import torch.nn.functional as F
from torch import nn

from ..config.settings import NoiseSpec, QuantSpec
from ..quant.grid import GridSpec, step_sizes
from ..util.seeds import derive_seed
from ..util.threads import cpu_threads

__all__ = ["PAPER_NOISE", "SalientLinear", "compute_dtype", "release_scratch"]

PAPER_NOISE = NoiseSpec()  # 0.5 * Delta_i * N(0, 1) at 4 bits: the post variant's default


class SalientLinear(nn.Module):
    is_gift_linear = True  # recognized by arch.block_linears like an nn.Linear

    def __init__(self, in_features: int, out_features: int, salient_idx: torch.Tensor, *,
                 codes: torch.Tensor | None = None, scales: torch.Tensor | None = None,
                 zeros: torch.Tensor | None = None, g_idx: torch.Tensor | None = None,
                 dense: torch.Tensor | None = None, salient_weight: torch.Tensor,
                 bias: torch.Tensor | None = None, noise: NoiseSpec = PAPER_NOISE, seed: int = 0,
                 param_dtype: torch.dtype = torch.float32, noise_reference: torch.Tensor | None = None):
        super().__init__()
        # speed caches (module docstring); plain attributes, not buffers: never saved, dropped on a move
        self.keep_weight = False
        self._kept: torch.Tensor | None = None
        self._kept_pass: int | None = None
        self._kept_content: tuple | None = None
        self._base_cache: torch.Tensor | None = None
        # the layer carries the run's noise spec (built once from the settings: RecoverConfig.noise_spec) and,
        # when built from a packed layer (model.salient_from_quant), its storage settings, so converting it
        # back needs nothing re-passed
        if not isinstance(noise, NoiseSpec):
            raise TypeError(f"noise must be a NoiseSpec (RecoverConfig.noise_spec), got {noise!r}")
        self.noise_spec = noise
        self.spec: QuantSpec | None = None  # the storage spec of the packed layer it was built from, if any
        if (codes is None) == (dense is None):
            raise ValueError("give either codes/scales/zeros/g_idx (quantized base) or dense (full-precision base)")
        self.in_features, self.out_features = in_features, out_features
        self.seed = seed
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
            delta = step_sizes(ref[:, mask.to(ref.device)], GridSpec(bits=noise.bits, sym=True))
        self.register_buffer("delta", delta.to(mask.device))
        self._generator: torch.Generator | None = None
        # Set by the training loop before each micro-batch: the noise then depends only on
        # (seed, noise_key), so data-parallel ranks, gradient-checkpoint recomputation and a resumed
        # run all draw exactly the noise an uninterrupted single-process run draws.
        self.noise_key: int | None = None
        # the noise's scale factor of the current step (recover/noise_schedule.py; 1: the paper's noise, 0: none)
        self.noise_scale = 1.0

    # ------------------------------------------------------------------ caches

    CACHEABLE = True  # recover/caches.py may keep this layer's noisy weight and dense base

    def cache_base(self, on: bool = True) -> None:
        """Keep B dequantized in float32 (on: computed now, where the layer is) or drop it."""
        self._base_cache = None
        if on and self.codes is not None:
            self._base_cache = self._dequantize_into(torch.empty(self.out_features, self.in_features,
                                                                 device=self.codes.device))

    def weight_bytes(self) -> int:
        """Bytes of one float32 copy of the layer's weight: what each cache costs."""
        return 4 * self.out_features * self.in_features

    def _apply(self, fn, recurse=True):
        # a move (``.to(device)``) would leave the caches behind: drop them (recover/caches.py plans them
        # after the model is where it trains)
        self._base_cache = self._kept = self._kept_pass = self._kept_content = None
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------------ numerics

    def base_weight(self) -> torch.Tensor:
        """The frozen non-salient part B (out, in), float32, zero on the salient columns."""
        return self._write_base(torch.empty(self.out_features, self.in_features, device=self.salient_idx.device))

    def _write_base(self, out: torch.Tensor) -> torch.Tensor:
        """Write B into ``out`` (out_features, in_features) without temporaries the size of the layer."""
        if self.dense is not None:
            return out.copy_(self.dense)
        if self._base_cache is not None:  # the same numbers, computed once (cache_base)
            return out.copy_(self._base_cache)
        return self._dequantize_into(out)

    def _dequantize_into(self, out: torch.Tensor) -> torch.Tensor:
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
            self._generator = torch.Generator(device=dev).manual_seed(derive_seed(self.seed, "fresh-noise"))
        return self._generator

    def _pass_seed(self) -> int:
        """Seed of this pass's noise: from ``noise_key`` when the training loop sets it, else fresh."""
        if self.noise_key is not None:
            return derive_seed(self.seed, "pass-noise", self.noise_key)
        return int(torch.randint(0, 2**62, (1,), generator=self.generator, device=self.delta.device))

    def _add_noise(self, w: torch.Tensor, seed: int, scratch: torch.Tensor) -> torch.Tensor:
        """w += noise_scale * (0.5 * Delta_i * Omega (normal) or Delta_i * U(-1/2, 1/2)) on the non-salient columns."""
        gen = torch.Generator(device=w.device).manual_seed(seed)
        if self.noise_spec.kind == "normal":
            scratch.normal_(generator=gen)
            w.addcmul_(scratch, self.delta.unsqueeze(1), value=0.5 * self.noise_scale)
        else:
            scratch.uniform_(-0.5, 0.5, generator=gen)
            w.addcmul_(scratch, self.delta.unsqueeze(1), value=self.noise_scale)
        return w

    def sample_noise(self) -> torch.Tensor:
        """One pass's noise (out, in), zero on the salient columns; what training adds to B."""
        shape = (self.out_features, self.in_features)
        noise = torch.zeros(shape, device=self.delta.device)
        self._add_noise(noise, self._pass_seed(), torch.empty(shape, device=self.delta.device))
        return noise.index_fill_(1, self.salient_idx, 0.0)

    def effective_weight(self, noise_seed: int | None, salient: torch.Tensor,
                         out: torch.Tensor | None = None) -> torch.Tensor:
        """B (+ noise) with ``salient`` in the salient columns, in ``out`` or a scratch buffer reused by every layer.

        Without ``out`` the result is only valid until the next layer's call: use it at once, never keep it.
        """
        shape = (self.out_features, self.in_features)
        w = self._write_base(_scratch("weight", shape, self.delta.device) if out is None else out)
        if noise_seed is not None:
            self._add_noise(w, noise_seed, _scratch("noise", shape, self.delta.device))
        return w.index_copy_(1, self.salient_idx, salient.detach().float())

    def kept_weight(self, noise_seed: int | None, salient: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``effective_weight`` in the layer's own buffer for the backward pass, and the tag of its content.

        Built once per content: a pass with the same noise seed and the same salient values (another lane
        of the micro-batch) reuses it. Lanes only build between their micro-batches' backward passes and the
        next forward, so a built weight is never rewritten while a lane still reads it.
        """
        content = (noise_seed, self.noise_scale, salient._version, salient.data_ptr())  # a new scale: rebuilt
        with _KEPT_LOCK:
            if self._kept is not None and self._kept_content == content and self._kept.device == self.delta.device:
                return self._kept, self._kept_pass
            if self._kept is None or self._kept.device != self.delta.device:
                self._kept = torch.empty(self.out_features, self.in_features, device=self.delta.device)
            self._kept_pass, self._kept_content = next(_PASSES), content
            return self.effective_weight(noise_seed, salient, out=self._kept), self._kept_pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seed = self._pass_seed() if self.noisy() else None
        y = _SalientMatmul.apply(x, self.gift_salient, self, seed)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def noisy(self) -> bool:
        """Whether this forward pass adds noise: training, a noise kind, and a non-zero scale this step."""
        return self.training and self.noise_spec.kind != "none" and self.noise_scale > 0

    def merged_weight(self) -> torch.Tensor:
        """B with the (trained) salient columns inserted, float32, no noise."""
        w = self.base_weight().clone()
        w[:, self.salient_idx] = self.gift_salient.detach().float()
        return w

    def extra_repr(self) -> str:
        base = "quantized" if self.codes is not None else "dense"
        return (f"in={self.in_features}, out={self.out_features}, salient={self.salient_idx.numel()}, "
                f"base={base}, noise={self.noise_spec.kind}@{self.noise_spec.bits}b")


# ------------------------------------------------------------------ fused matmul and its scratch buffers

_LOCAL = threading.local()  # each thread (lane) its own scratch buffers
_PASSES = itertools.count()  # tags of kept weights: a backward uses a kept weight only if it is its pass's
_KEPT_LOCK = threading.Lock()


def _scratch(name: str, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """A (rows, cols) float32 view of a buffer shared by all layers, grown to the largest layer seen; one per thread.

    Reusing one buffer matters on CPU: a fresh allocation of a layer-sized tensor is fresh pages from the
    kernel on every pass, which costs about as much as the dequantization itself.
    """
    buffers = _LOCAL.__dict__.setdefault("buffers", {})
    key = (name, torch.device(device))
    numel = shape[0] * shape[1]
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = buffers[key] = torch.empty(numel, device=device)
    return buf[:numel].view(shape)


def release_scratch() -> None:
    """Free this thread's scratch buffers (they outlive the models that used them)."""
    _LOCAL.__dict__.pop("buffers", None)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a custom Function's matmuls on ``x`` run in: autocast's, when it is on for x's device, else x's.

    Autocast casts the operands of the ops it sees, but a Function's backward runs outside it (training's
    backward pass is outside autocast, util/precision.py), so the Functions below cast explicitly to this dtype
    in both passes and hand back each gradient in its input's dtype (float32 for the trained columns).
    """
    dev = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class _SalientMatmul(torch.autograd.Function):
    """y = x (B + noise, salient columns = W_s)^T, saving only x[..., S]; the weight is rebuilt in backward.

    Under bf16 autocast (``--precision bf16``) both matmuls run in bf16 on the float32 weight rounded to bf16;
    the weight is built and kept in float32 either way, so the caches do not depend on the precision.
    """

    @staticmethod
    def forward(ctx, x, salient, layer: SalientLinear, noise_seed):
        ctx.kept = None
        if layer.keep_weight and ctx.needs_input_grad[0]:  # only a pass whose backward needs the weight keeps it
            w, ctx.kept = layer.kept_weight(noise_seed, salient)
        else:
            w = layer.effective_weight(noise_seed, salient)
        dt = ctx.compute_dtype = compute_dtype(x)
        ctx.x_dtype = x.dtype
        xc = x.to(dt)
        y = F.linear(xc, w.to(dt))
        ctx.layer, ctx.noise_seed = layer, noise_seed
        ctx.save_for_backward(xc[..., layer.salient_idx] if ctx.needs_input_grad[1] else None, salient)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        layer = ctx.layer
        x_salient, salient = ctx.saved_tensors
        grad_y = grad_y.to(ctx.compute_dtype)
        grad_x = grad_salient = None
        if ctx.needs_input_grad[0]:
            if ctx.kept is not None and layer._kept_pass == ctx.kept:
                w = layer._kept  # this pass's own weight, noise included: nothing redrawn
            else:
                w = layer.effective_weight(ctx.noise_seed, salient)
            grad_x = (grad_y @ w.to(grad_y.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            gy = grad_y.reshape(-1, grad_y.shape[-1])
            grad_salient = (gy.T @ x_salient.reshape(-1, x_salient.shape[-1]).to(gy.dtype))
            grad_salient = grad_salient.to(salient.dtype)
        return grad_x, grad_salient, None, None
