"""Bit packing is bit-exact for every width and shape, and matches GPTQ's 3-bit word layout."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gift_quant.packed.bits import pack_cols, pack_rows, packed_length, unpack_cols, unpack_rows


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), n=st.integers(1, 130), m=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_roundtrip_rows_and_cols(bits, n, m, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, m), generator=g)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (packed_length(n, bits), m)
    assert torch.equal(unpack_rows(packed, bits, n), codes.to(torch.int32))
    packed_c = pack_cols(codes.T, bits)
    assert torch.equal(unpack_cols(packed_c, bits, n), codes.T.to(torch.int32))


def _gptq_reference_pack3(values: np.ndarray) -> np.ndarray:
    """The 3-bit packing loop of the GPTQ reference implementation, for one run of 32 values."""
    q = np.zeros(3, dtype=np.uint64)
    i, row = 0, 0
    for j in range(i, i + 10):
        q[row] |= values[j] << (3 * (j - i))
    i += 10
    q[row] |= values[i] << 30
    row += 1
    q[row] |= (values[i] >> 2) & 1
    i += 1
    for j in range(i, i + 10):
        q[row] |= values[j] << (3 * (j - i) + 1)
    i += 10
    q[row] |= values[i] << 31
    row += 1
    q[row] |= (values[i] >> 1) & 0x3
    i += 1
    for j in range(i, i + 10):
        q[row] |= values[j] << (3 * (j - i) + 2)
    return (q & 0xFFFFFFFF).astype(np.uint32)


def test_three_bit_layout_matches_gptq():
    rng = np.random.default_rng(0)
    for _ in range(20):
        vals = rng.integers(0, 8, 32).astype(np.uint64)
        ours = pack_rows(torch.tensor(vals.astype(np.int64)).unsqueeze(1), 3)[:, 0].numpy().view(np.uint32)
        assert np.array_equal(ours, _gptq_reference_pack3(vals))


def test_four_bit_layout_is_eight_nibbles_per_word():
    vals = torch.arange(8).unsqueeze(1)  # 0..7 -> 0x76543210
    assert int(pack_rows(vals, 4)[0, 0]) == 0x76543210


def test_out_of_range_codes_are_refused():
    import pytest

    with pytest.raises(ValueError, match="out of range"):
        pack_rows(torch.tensor([[8]]), 3)
