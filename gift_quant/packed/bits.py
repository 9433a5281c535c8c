"""The GPTQ checkpoint layout: bit packing of integer codes into int32 words, and dequantization. Pure tensor code.

Codes are packed along one dimension as a little-endian bit stream: value k of a run of 32 occupies
bits ``[bits*k, bits*(k+1))`` of ``bits`` consecutive int32 words. For 2, 4 and 8 bits this is the
usual "32/bits values per word"; for 3 bits it is GPTQ's layout of 32 values in 3 words with values
10 and 21 straddling word boundaries. The packed dimension is zero-padded to a multiple of 32.
Written by hand (not imported from gptqmodel) because the core must not depend on the optional
peer extra, and the layout is small enough to state and test exhaustively.

``dequantize_codes`` is where a stored layer becomes a weight again: the packed layer
(qlinear.QuantLinear), the GPTQ result before packing (quant/gptq.py), every export format and the
GPTQModel peer all call it, so they cannot drift apart. (recover/layer.py's training layer rebuilds its
frozen base in place with the same formula, to keep no temporaries the size of the layer.)
"""

from __future__ import annotations

import torch

from ..config.settings import SUPPORTED_BITS

__all__ = ["dequantize", "dequantize_codes", "dequantize_packed", "pack_cols", "pack_rows", "packed_length",
           "packed_words", "unpack_cols", "unpack_rows"]


def packed_length(n: int, bits: int) -> int:
    return -(-n // 32) * bits


def packed_words(n: int, bits: int) -> int:
    """Words that ``n`` packed values fill without padding to whole runs of 32 (what gptqmodel allocates, and
    compressed-tensors' packed size): the exports cut the padded runs to this."""
    return -(-n * bits // 32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes`` (N, M) with values in [0, 2**bits) along dim 0 -> int32 (ceil(N/32)*bits, M)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes: supported widths are {SUPPORTED_BITS}")
    n, m = codes.shape
    c = codes.to(torch.int64).cpu()
    if c.numel() and (c.min() < 0 or c.max() >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits: [{int(c.min())}, {int(c.max())}]")
    pad = -n % 32
    if pad:
        c = torch.cat([c, c.new_zeros(pad, m)])
    c = c.view(-1, 32, m)  # (runs, 32, M)
    words = torch.zeros(c.shape[0], bits, m, dtype=torch.int64)
    for k in range(32):
        start = bits * k
        w, off = divmod(start, 32)
        words[:, w] |= (c[:, k] << off) & 0xFFFFFFFF
        if off + bits > 32:  # the value straddles into the next word
            words[:, w + 1] |= c[:, k] >> (32 - off)
    words = words.view(-1, m)
    # reinterpret unsigned 32-bit values as int32 (two's complement), as GPTQ stores them
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_rows: int32 (ceil(n/32)*bits, M) -> int32 codes (n, M)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"cannot unpack {bits}-bit codes: supported widths are {SUPPORTED_BITS}")
    m = packed.shape[1]
    if 32 % bits == 0:  # 2, 4, 8 bits: word r holds values r*per ... r*per+per-1, one shift each (vectorized)
        per = 32 // bits
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device).view(1, per, 1)
        # arithmetic shifts of negative words fill with ones above the value; the mask drops them
        return ((packed.to(torch.int32).unsqueeze(1) >> shifts) & (2**bits - 1)).reshape(-1, m)[:n]
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = words.view(-1, bits, m)
    mask = 2**bits - 1
    out = torch.empty(words.shape[0], 32, m, dtype=torch.int64, device=packed.device)
    for k in range(32):
        start = bits * k
        w, off = divmod(start, 32)
        v = words[:, w] >> off
        if off + bits > 32:
            v = v | (words[:, w + 1] << (32 - off))
        out[:, k] = v & mask
    return out.view(-1, m)[:n].to(torch.int32)


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack along dim 1 (GPTQ's qzeros layout): (G, M) -> (G, ceil(M/32)*bits)."""
    return pack_rows(codes.T, bits).T.contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, m: int) -> torch.Tensor:
    return unpack_rows(packed.T.contiguous(), bits, m).T.contiguous()


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``scale * (code - zero)``: the grid's one dequantization (quant/grid.py fits scale and zero)."""
    return scale * (codes - zero)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight (out, in) of unpacked codes in the GPTQ layout: ``scale * (code - zero)`` per group.

    ``codes`` (in, out) integers, ``scales`` and ``zeros`` (G, out), ``g_idx`` (in,) the group of each
    input column. Computed in ``dtype`` (float32: exact for float16 scales, as the product of an 11-bit
    significand and a code difference below 2^8 fits float32's 24 bits; a format that dequantizes in its
    scale dtype passes that dtype). Code minus zero is exact in every float dtype used here.
    """
    g = g_idx.long()
    return dequantize(codes.to(dtype), scales.to(dtype)[g], zeros.to(dtype)[g]).T.contiguous()


def dequantize_packed(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                      bits: int, columns: torch.Tensor | None = None) -> torch.Tensor:
    """``dequantize_codes`` of a packed ``qweight`` (ceil(in/32)*bits, out), in float32; in = len(g_idx).

    ``zeros`` are the zero points themselves (G, out), unpacked (a format storing ``zero - 1`` adds the
    1 back first). ``columns``: only these input columns, (out, len(columns)).
    """
    codes = unpack_rows(qweight, bits, g_idx.numel())  # (in, out)
    if columns is not None:
        codes, g_idx = codes[columns], g_idx[columns]
    return dequantize_codes(codes, scales, zeros.to(scales.device), g_idx)
