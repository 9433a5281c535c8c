"""GGUF quantized blocks of a packed layer, bit for bit, or a refusal saying why none fits. Pure tensor code.

A GGUF quantized tensor is a sequence of rows (output features), each cut into blocks of 32 consecutive
input columns; every block carries its own float16 scale. The block layouts (GGUF spec, ggml's block
structs), all little-endian:

* ``Q4_0`` (18 bytes): float16 ``d``, then 16 bytes of 4-bit values ``q``; byte i holds column i of the
  block in its low nibble and column i + 16 in its high nibble. Weight = ``d * (q - 8)``.
* ``Q4_1`` (20 bytes): float16 ``d``, float16 ``m``, then the 16 nibble bytes as in Q4_0. Weight =
  ``d * q + m``.
* ``Q8_0`` (34 bytes): float16 ``d``, then 32 int8 values ``q``. Weight = ``d * q``.

gift-quant's weight is ``scale * (code - zero)`` with float16 scales, unsigned codes and one (scale, zero)
per row and group. So a layer maps exactly when every 32-column block lies inside one group (its
non-salient columns, that is: a salient column's code is re-filed to the block's zero, so the base stays
exactly 0 there) and the grid fits the type:

* symmetric 4-bit (zero 8): Q4_0 with ``d = scale``, ``q = code``;
* symmetric 8-bit (zero 128): Q8_0 with ``d = scale``, ``q = code - 128``;
* asymmetric 4-bit: Q4_1 with ``d = scale``, ``q = code``, ``m = -scale * zero``, only when every block's
  ``m`` is a float16 (checked; it usually is not, as scale * zero needs up to 15 significant bits).

Everything else is refused (``GiftQuantError``) with the layer, the setting and what to do instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from ..packed.qlinear import QuantLinear
from ..util.errors import GiftQuantError
from .native import layer_codes, layer_zeros

__all__ = ["BLOCK", "GGUFLayer", "gguf_layer", "rope_row_order"]

BLOCK = 32  # input columns per GGUF block, for each of Q4_0, Q4_1 and Q8_0
_ADVICE = ("export with --format compressed-tensors (or gptq-lora / dense), or quantize with --bits 4 or 8 "
           "--group-size 32 (or a multiple of 32, or -1) symmetric for --format gguf")


@dataclass
class GGUFLayer:
    """One layer as GGUF blocks: ``d`` and ``m`` (out, blocks) float16, ``q`` (out, in) the stored values."""

    qtype: QT
    d: torch.Tensor
    q: torch.Tensor
    m: torch.Tensor | None = None

    def dequantized(self) -> torch.Tensor:
        """(out, in) float32, the weight the block formula gives (float16 times a small integer: exact)."""
        d = self.d.float().repeat_interleave(BLOCK, dim=1)
        if self.qtype == QT.Q4_0:
            return d * (self.q.float() - 8)
        if self.qtype == QT.Q4_1:
            return d * self.q.float() + self.m.float().repeat_interleave(BLOCK, dim=1)
        return d * self.q.float()

    def to_bytes(self) -> np.ndarray:
        """uint8 (out, blocks * block bytes): the rows exactly as they lie in the GGUF file."""
        rows, n_blocks = self.d.shape
        halves = [self.d] + ([self.m] if self.m is not None else [])
        parts = [h.numpy().astype("<f2").view(np.uint8).reshape(rows, n_blocks, 2) for h in halves]
        q = self.q.numpy().reshape(rows, n_blocks, BLOCK)
        if self.qtype == QT.Q8_0:
            parts.append(q.astype(np.int8).view(np.uint8))
        else:  # nibbles: column i low, column i + 16 high
            parts.append((q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8))
        return np.concatenate(parts, axis=-1).reshape(rows, -1)


def _refuse(name: str, q: QuantLinear, why: str) -> GiftQuantError:
    kind = "symmetric" if q.sym else "asymmetric"
    return GiftQuantError(f"{name}: {kind} {q.bits}-bit has no exact GGUF type ({why}); {_ADVICE}")


def _block_groups(name: str, q: QuantLinear) -> torch.Tensor:
    """(blocks,) the native group of each 32-column block (-1: only salient columns), or a refusal.

    The non-salient columns of a block must share one group (the salient ones are re-filed, see the
    module docstring). Works for any g_idx: natural groups, groups that skip salient columns, act-order.
    """
    if q.in_features % BLOCK:
        raise _refuse(name, q, f"in_features {q.in_features} is not a multiple of GGUF's {BLOCK}-column blocks")
    block = torch.arange(q.in_features) // BLOCK
    keep = torch.ones(q.in_features, dtype=torch.bool)
    keep[q.salient_idx.long()] = False
    g_idx = q.g_idx.long()
    group_of = torch.full((q.in_features // BLOCK,), -1, dtype=torch.long)
    group_of[block[keep]] = g_idx[keep]  # one write per column: a block with two groups keeps either
    if not torch.equal(group_of[block[keep]], g_idx[keep]):
        raise _refuse(name, q, f"its {q.n_groups} groups do not cover whole {BLOCK}-column blocks "
                               "(group size not a multiple of 32, groups that skip salient columns, or act-order)")
    return group_of


def _block_params(q: QuantLinear, group_of: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float16, zero int64), each (out, blocks); blocks without a group get scale 0 and the middle zero."""
    used = group_of >= 0
    scale = torch.zeros(q.out_features, group_of.numel(), dtype=torch.float16)
    zero = torch.full((q.out_features, group_of.numel()), 2 ** (q.bits - 1), dtype=torch.int64)
    scale[:, used] = q.scales[group_of[used]].T.to(torch.float16)
    zero[:, used] = layer_zeros(q)[group_of[used]].T
    return scale, zero


def _codes_refiled(q: QuantLinear, zero: torch.Tensor) -> torch.Tensor:
    """(out, in) codes with every salient column set to its block's zero (the base is exactly 0 there)."""
    codes = layer_codes(q).T.contiguous()
    s = q.salient_idx.long()
    codes[:, s] = zero[:, s // BLOCK]
    return codes


def _q4_1_min(name: str, q: QuantLinear, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Q4_1's ``m = -scale * zero`` per block in float16, refused unless float16 holds every one exactly."""
    m = -(scale.double() * zero.double())
    m16 = m.to(torch.float16)
    bad = m16.double() != m
    if bad.any():
        row, blk = (int(i) for i in bad.nonzero()[0])
        raise _refuse(name, q, f"Q4_1 needs -scale*zero in float16, and {int(bad.sum())} of {bad.numel()} blocks "
                               f"do not fit (row {row}, block {blk}: {float(m[row, blk])!r})")
    return m16


def gguf_layer(name: str, q: QuantLinear) -> GGUFLayer:
    """The GGUF blocks of one packed layer, exact, or a ``GiftQuantError`` naming what does not fit."""
    if (q.bits, q.sym) not in ((4, True), (8, True), (4, False)):
        why = ("GGUF's 8-bit type Q8_0 is symmetric" if q.bits == 8 else
               f"GGUF's 2/3-bit types (Q2_K, Q3_K) are k-quants with 256-column super-blocks and "
               f"quantized scales, not a {q.bits}-bit uniform grid")
        raise _refuse(name, q, why)
    scale, zero = _block_params(q, _block_groups(name, q))
    codes = _codes_refiled(q, zero)
    if q.bits == 8:
        return GGUFLayer(QT.Q8_0, scale, codes - 128)
    if q.sym:
        return GGUFLayer(QT.Q4_0, scale, codes)
    return GGUFLayer(QT.Q4_1, scale, codes, _q4_1_min(name, q, scale, zero))


def rope_row_order(rows: int, n_heads: int) -> torch.Tensor:
    """Row permutation of a Llama Q or K projection for llama.cpp: ``new = old[perm]``.

    Hugging Face's rotary embedding pairs dimension i of a head with i + head_dim/2 (rotate_half);
    llama.cpp's llama graph rotates adjacent pairs (2i, 2i+1). Interleaving each head's two halves makes
    both compute the same attention. Only rows move, so blocks along the input columns stay whole.
    """
    head_dim = rows // n_heads
    half = torch.arange(head_dim // 2)
    within = torch.stack([half, half + head_dim // 2], dim=1).reshape(-1)  # 0, h/2, 1, h/2+1, ...
    return (torch.arange(n_heads)[:, None] * head_dim + within).reshape(-1)
