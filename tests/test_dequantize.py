"""The one dequantization (pack.dequantize_codes / dequantize_packed) against a float64 reference.

The reference is written here column by column in numpy float64, independently of the library's gather:
``w[:, j] = scale[:, g[j]] * (code[:, j] - zero[:, g[j]])``. With float16-representable scales the product
is exact in float32 (11-bit significand times a code difference below 2^8), so every path must equal the
reference bit for bit: the unpacked codes, the packed ``qweight``, ``QuantLinear``, the GPTQ result and the
GPTQModel peer's decoder (GPTQ v1 stores ``zero - 1``).
"""

import numpy as np
import pytest
import torch

from gift_quant.compare.gptqmodel_peer import dense_from_gptq
from gift_quant.config.settings import QuantSpec
from gift_quant.packed.bits import dequantize_codes, dequantize_packed, pack_cols, pack_rows
from gift_quant.packed.qlinear import QuantLinear
from gift_quant.quant.gptq import GPTQResult

OUT, IN, GROUP = 6, 70, 16  # 70 columns: the packed runs of 32 end in padding


def layer(bits: int, sym: bool, grouping: str, seed: int = 0):
    """codes (out, in), scales and zeros (out, G), g_idx (in,), as a GPTQ result stores them."""
    g = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    if grouping == "row":
        g_idx = torch.zeros(IN, dtype=torch.int32)
    else:
        order = torch.randperm(IN, generator=g) if grouping == "act_order" else torch.arange(IN)
        g_idx = torch.empty(IN, dtype=torch.int32)
        g_idx[order] = (torch.arange(IN) // GROUP).to(torch.int32)
    n_groups = int(g_idx.max()) + 1
    codes = torch.randint(0, maxq + 1, (OUT, IN), generator=g, dtype=torch.int32)
    # scales over several octaves, rounded to float16 as the grid stores them
    scales = torch.rand(OUT, n_groups, generator=g) * 2.0 ** torch.randint(-12, 2, (OUT, n_groups), generator=g)
    scales = (scales + 2.0**-14).half().float()
    if sym:
        zeros = torch.full((OUT, n_groups), float(2 ** (bits - 1)))
    else:
        zeros = torch.randint(0, maxq + 1, (OUT, n_groups), generator=g).float()
    return codes, scales, zeros, g_idx


def reference(codes, scales, zeros, g_idx) -> np.ndarray:
    c, s, z, gi = (t.numpy().astype(np.float64) for t in (codes, scales, zeros, g_idx))
    w = np.empty(c.shape, dtype=np.float64)
    for j in range(c.shape[1]):
        k = int(gi[j])
        w[:, j] = s[:, k] * (c[:, j] - z[:, k])
    return w


CASES = [(b, sym, grouping) for b in (2, 3, 4, 8) for sym in (True, False) for grouping in ("row", "grouped",
                                                                                              "act_order")]


@pytest.mark.parametrize("bits,sym,grouping", CASES)
def test_dequantize_codes_and_packed_equal_float64_reference(bits, sym, grouping):
    codes, scales, zeros, g_idx = layer(bits, sym, grouping)
    ref = torch.from_numpy(reference(codes, scales, zeros, g_idx))
    got = dequantize_codes(codes.T, scales.T, zeros.T, g_idx)  # the GPTQ layout: (in, out), (G, out)
    assert got.dtype == torch.float32 and got.shape == (OUT, IN) and got.is_contiguous()
    assert torch.equal(got.double(), ref)
    # computed in float16 (compressed-tensors dequantizes in its scale dtype): one rounding of the exact value
    assert torch.equal(dequantize_codes(codes.T, scales.T, zeros.T, g_idx, dtype=torch.float16), ref.half())

    qweight = pack_rows(codes.T, bits)
    assert torch.equal(dequantize_packed(qweight, scales.T.half(), zeros.T.long(), g_idx, bits).double(), ref)
    cols = torch.tensor([69, 0, 33, 5])
    assert torch.equal(dequantize_packed(qweight, scales.T, zeros.T, g_idx, bits, cols).double(), ref[:, cols])


@pytest.mark.parametrize("bits,sym,grouping", CASES)
def test_packed_layer_gptq_result_and_peer_use_the_same_numbers(bits, sym, grouping):
    codes, scales, zeros, g_idx = layer(bits, sym, grouping, seed=1)
    salient = torch.tensor([3, 40, 64])
    codes[:, salient] = zeros[:, g_idx[salient].long()].to(torch.int32)  # salient columns hold their group's zero
    salient_weight = torch.randn(OUT, 3, generator=torch.Generator().manual_seed(2))
    ref = torch.from_numpy(reference(codes, scales, zeros, g_idx))
    assert not ref[:, salient].any()
    dense = ref.clone()
    dense[:, salient] = salient_weight.double()

    spec = QuantSpec(bits=bits, sym=sym, salient_dtype="float32")
    q = QuantLinear.from_parts(codes, scales, zeros, g_idx, salient, salient_weight, spec)
    assert torch.equal(q.dequantized_base().double(), ref)
    assert torch.equal(q.dense_weight(torch.float32).double(), dense)
    res = GPTQResult(codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, salient_idx=salient,
                     salient_weight=salient_weight, loss=0.0)
    assert torch.equal(res.dequantized().double(), dense)
    # the same buffers loaded into an empty layer, and held as stored
    empty = QuantLinear.empty_like(torch.nn.Linear(IN, OUT, bias=False), spec, q.n_groups, 3)
    empty.load_state_dict(q.state_dict())
    assert torch.equal(empty.dense_weight(torch.float32), q.dense_weight(torch.float32))
    held = QuantLinear.from_buffers(dict(q.state_dict()), spec)
    assert held.qweight.data_ptr() == q.qweight.data_ptr()
    assert torch.equal(held.dense_weight(torch.float32), q.dense_weight(torch.float32))
    if not sym and int(zeros.min()) >= 1:  # GPTQ v1 stores zero - 1
        qzeros = pack_cols(zeros.T.long() - 1, bits)
        assert torch.equal(dense_from_gptq(q.qweight, qzeros, q.scales, g_idx, bits, 1).double(), ref)
    qzeros = pack_cols(zeros.T.long(), bits)  # v2: the zero itself
    assert torch.equal(dense_from_gptq(q.qweight, qzeros, q.scales, g_idx, bits, 0).double(), ref)
