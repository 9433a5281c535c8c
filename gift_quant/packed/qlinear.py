"""QuantLinear: the packed, deployable form of a salient-aware quantized linear layer.

Computes ``dequant(codes) x + W_s x[S]``. Because salient columns store their group's zero point the
dequantized part is exactly zero there, so the layer equals ``F.linear(x, dequant(codes) with the
salient columns scattered in)``; by default that dense weight is built once and cached on first use
(inference on CPU or GPU through plain matmuls, no custom kernels: as fast as the full-precision model,
and as large plus the packed buffers). With ``cache_dense = False`` (``gift_quant.load(..., dense_cache=False)``)
nothing is cached: each forward pass dequantizes the layer's base into a temporary, multiplies, and adds
``x[S] W_s^T`` for the salient columns, so resident memory is the packed buffers (slower: see BENCHMARKS.md).

Buffers use the GPTQ layout (qweight packed along in-features, scales (groups, out) in float16, qzeros
packed along out-features) so exporting to GPTQ is a relabelling, not a recomputation.

The one model of a stored layer: ``load``, the quantization engine's resume (``empty_like``) and the
exports (``from_buffers``) all build this class, and it dequantizes with ``pack.dequantize_packed``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config.settings import QuantSpec
from ..model.loading import parse_dtype
from .bits import dequantize_packed, pack_cols, pack_rows, packed_length, unpack_cols, unpack_rows

__all__ = ["QuantLinear", "effective_bits"]


class QuantLinear(nn.Module):
    is_gift_linear = True  # recognized by arch.block_linears like an nn.Linear

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, n_groups: int, n_salient: int,
                 bias: bool, bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.spec, self.n_groups, self.n_salient = spec, n_groups, n_salient
        bits, sym, salient_dtype = spec.bits, spec.sym, parse_dtype(spec.salient_dtype)
        self.register_buffer("qweight", torch.zeros(packed_length(in_features, bits), out_features, dtype=torch.int32))
        self.register_buffer("scales", torch.ones(n_groups, out_features, dtype=torch.float16))
        if not sym:
            self.register_buffer("qzeros", torch.zeros(n_groups, packed_length(out_features, bits), dtype=torch.int32))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.register_buffer("salient_idx", torch.zeros(n_salient, dtype=torch.int32))
        self.register_buffer("salient_weight", torch.zeros(out_features, n_salient, dtype=salient_dtype))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype))
        else:
            self.bias = None
        self._dense: torch.Tensor | None = None
        self.cache_dense = True  # False: dequantize at every forward pass, keep only the packed buffers
        self._contiguous: bool | None = None  # g_idx == j // group_size (known after loading)

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def sym(self) -> bool:
        return self.spec.sym

    # ------------------------------------------------------------------ construction

    @classmethod
    def empty_like(cls, linear: nn.Module, spec: QuantSpec, n_groups: int, n_salient: int) -> QuantLinear:
        """An empty packed layer with ``linear``'s shape and bias (its dtype kept), to load stored buffers into."""
        bias = linear.bias
        return cls(linear.in_features, linear.out_features, spec, n_groups, n_salient, bias is not None,
                   bias.dtype if bias is not None else torch.float32)

    @classmethod
    def from_buffers(cls, buffers: dict[str, torch.Tensor], spec: QuantSpec) -> QuantLinear:
        """The layer holding these stored buffers themselves (no copy; shapes and dtypes as stored).

        ``buffers``: qweight, scales, g_idx, salient_idx, salient_weight, qzeros (asymmetric only) and
        bias (if any). A shape that does not fit the others raises RuntimeError (load_state_dict's check).
        """
        bias = buffers.get("bias")
        with torch.device("meta"):  # the constructor's placeholder buffers are replaced below: allocate nothing
            m = cls(buffers["g_idx"].numel(), buffers["scales"].shape[1], spec, buffers["scales"].shape[0],
                    buffers["salient_idx"].numel(), bias is not None, bias.dtype if bias is not None else torch.float32)
        m.load_state_dict(buffers, assign=True)
        return m

    @classmethod
    def from_parts(cls, codes, scales, zeros, g_idx, salient_idx, salient_weight, spec: QuantSpec,
                   bias: torch.Tensor | None = None) -> QuantLinear:
        """From a GPTQResult's tensors: codes (out, in), scales/zeros (out, G)."""
        out_f, in_f = codes.shape
        m = cls(in_f, out_f, spec, scales.shape[1], salient_idx.numel(), bias is not None,
                bias.dtype if bias is not None else torch.float32)
        m.qweight.copy_(pack_rows(codes.T.cpu(), spec.bits))
        m.scales.copy_(scales.T.to(torch.float16))
        if not spec.sym:
            m.qzeros.copy_(pack_cols(zeros.T.round().to(torch.int64).cpu(), spec.bits))
        m.g_idx.copy_(g_idx.to(torch.int32))
        m.salient_idx.copy_(salient_idx.to(torch.int32))
        m.salient_weight.copy_(salient_weight.to(m.salient_weight.dtype))
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m

    # ------------------------------------------------------------------ numerics

    def codes(self) -> torch.Tensor:
        """Integer codes (out, in)."""
        return unpack_rows(self.qweight, self.bits, self.in_features).T

    def zero_points(self) -> torch.Tensor:
        """Zero points (G, out) as float."""
        if self.sym:
            return torch.full_like(self.scales, 2 ** (self.bits - 1), dtype=torch.float32)
        return unpack_cols(self.qzeros, self.bits, self.out_features).float()

    def dequantized_base(self) -> torch.Tensor:
        """dequant(codes) (out, in) float32, zero on salient columns."""
        return dequantize_packed(self.qweight, self.scales, self.zero_points(), self.g_idx, self.bits)

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = self.dequantized_base()
        w[:, self.salient_idx.long()] = self.salient_weight.float()
        return w.to(dtype or self.salient_weight.dtype)

    def base_in_out(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """dequant(codes) as (in, out) in ``dtype``, zero on salient columns; a fresh temporary.

        The same values as ``dequantized_base().T`` (scale * (code - zero) in float32, then cast), computed with
        broadcasting instead of per-column gathers when the groups are contiguous runs (per-row or natural)."""
        if self._contiguous is None:
            gs = -(-self.in_features // self.n_groups)
            self._contiguous = bool(self.in_features % gs == 0 and torch.equal(
                self.g_idx.long(), torch.arange(self.in_features, device=self.g_idx.device) // gs))
        if not self._contiguous:
            return self.dequantized_base().T.to(dtype)
        g = self.n_groups
        w = unpack_rows(self.qweight, self.bits, self.in_features).view(g, -1, self.out_features).float()
        w.sub_(self.zero_points().view(g, 1, -1)).mul_(self.scales.float().view(g, 1, -1))
        return w.view(self.in_features, self.out_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cache_dense:  # memory-lean: the base exists only during this call
            y = x @ self.base_in_out(x.dtype)
            if self.n_salient:
                y = y + x[..., self.salient_idx.long()] @ self.salient_weight.to(x.dtype).T
            return y if self.bias is None else y + self.bias.to(x.dtype)
        # buffers only change through load_state_dict / _apply, which drop the cache
        if self._dense is None or self._dense.dtype != x.dtype or self._dense.device != x.device:
            self._dense = self.dense_weight(x.dtype).to(x.device)
        w = self._dense
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, bias)

    def _apply(self, fn, recurse=True):
        self._dense, self._contiguous = None, None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._dense, self._contiguous = None, None
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, groups={self.n_groups}, "
                f"salient={self.n_salient}, sym={self.sym}")


def effective_bits(in_features: int, out_features: int, bits: int, n_groups: int, n_salient: int,
                   sym: bool, salient_bits: int = 16) -> float:
    """Stored bits per weight of one QuantLinear, everything on disk counted.

    Packed codes (salient columns included), fp16 scales, packed zeros (asymmetric only), int32 g_idx,
    the salient columns at ``salient_bits`` and their int32 indices; this is docs/method.md's [Bits],
    ``b + 16 k / in + overhead``.
    """
    stored = (packed_length(in_features, bits) * out_features * 32
              + n_groups * out_features * 16
              + (0 if sym else n_groups * packed_length(out_features, bits) * 32)
              + in_features * 32
              + n_salient * out_features * salient_bits + n_salient * 32)
    return stored / (in_features * out_features)
