"""Salient-aware GPTQ against a float64 column-by-column OBS oracle written here, and against RTN."""

import pytest
import torch

from gift_quant.packed.bits import dequantize
from gift_quant.quant.gptq import gptq_quantize, layer_error
from gift_quant.quant.grid import GridSpec, fake_quantize, fit_rows, quantize_codes, quantize_rtn


def correlated_problem(out_f=48, in_f=96, n=2048, seed=0):
    """Weights and a Hessian from inputs with strong cross-column correlation and a few outlier columns."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, in_f, generator=g, dtype=torch.float64)
    noise = torch.randn(in_f, in_f, generator=g, dtype=torch.float64)
    mix = torch.eye(in_f, dtype=torch.float64) + 0.6 * noise / in_f**0.5
    x = z @ mix
    x[:, :4] *= 8.0  # outlier input channels, the kind the sensitivity metric looks for
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64) * 0.05
    h = 2 * x.T @ x / n
    return w, h


def oracle_gptq(w, h, spec, salient, act_order, static_groups, damp=0.01, layout="compact"):
    """Optimal Brain Quantization one column at a time with an explicit inverse Hessian (float64).

    Independent of the library's Cholesky / lazy-batch formulation: after rounding column i, every
    remaining column moves by -err * Hinv[i, :] / Hinv[i, i] and column i is removed from Hinv.
    ``layout`` "natural": column c is in group c // group_size; grids are fitted on a group's
    non-salient columns, upfront under act-order, else when the group's first column is reached.
    """
    if layout == "natural" and spec.group_size > 0:
        return _oracle_natural(w, h, spec, salient, act_order, damp)
    w, h = w.double().clone(), h.double().clone()
    n = w.shape[1]
    sal = sorted(int(s) for s in salient)
    rest = [j for j in range(n) if j not in sal]
    if act_order:
        diag = torch.diag(h)
        rest = sorted(rest, key=lambda j: (-float(diag[j]), j))
    order = rest + sal
    w, h = w[:, order], h[order][:, order]
    h = h + damp * torch.mean(torch.diag(h)) * torch.eye(n, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    n_r = len(rest)
    gs = n_r if spec.group_size <= 0 else spec.group_size
    codes = torch.zeros(w.shape[0], n_r, dtype=torch.float64)
    params = {}
    if spec.group_size <= 0 or static_groups:
        natural = sorted(rest)
        for g in range(-(-n_r // gs)):
            cols = natural[g * gs:(g + 1) * gs]
            p = fit_rows(w[:, [order.index(c) for c in cols]], spec)
            for c in cols:
                params[order.index(c)] = p
    for i in range(n_r):
        if not (spec.group_size <= 0 or static_groups) and i % gs == 0:
            p = fit_rows(w[:, i:min(i + gs, n_r)], spec)
            for j in range(i, min(i + gs, n_r)):
                params[j] = p
        s, z = (t.double().squeeze(1) for t in params[i])
        c = quantize_codes(w[:, i], s, z, spec.maxq)
        q = dequantize(c, s, z)
        codes[:, i] = c
        err = (w[:, i] - q) / hinv[i, i]
        w[:, i:] -= err.unsqueeze(1) * hinv[i, i:].unsqueeze(0)
        w[:, i] = q
        hinv = hinv - torch.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    full_codes = torch.zeros(w.shape[0], n, dtype=torch.float64)
    full_codes[:, rest] = codes
    dense = torch.empty_like(w)
    dense[:, order] = w
    return full_codes, dense


def _oracle_natural(w, h, spec, salient, act_order, damp):
    w, h = w.double().clone(), h.double().clone()
    n, gs = w.shape[1], spec.group_size
    sal = sorted(int(s) for s in salient)
    rest = [j for j in range(n) if j not in sal]
    if act_order:
        rest = sorted(rest, key=lambda j: (-float(torch.diag(h)[j]), j))
    order = rest + sal
    members = {g: [c for c in rest if c // gs == g] for g in range(n // gs)}
    params = {}
    if act_order:  # upfront from the original weights
        params = {g: fit_rows(w[:, cols], spec) for g, cols in members.items() if cols}
    w, h = w[:, order], h[order][:, order]
    hinv = torch.linalg.inv(h + damp * torch.mean(torch.diag(h)) * torch.eye(n, dtype=torch.float64))
    codes = torch.zeros(w.shape[0], n, dtype=torch.float64)
    for i, col in enumerate(rest):
        g = col // gs
        if g not in params:  # lazily, from the current values of the group's columns
            params[g] = fit_rows(w[:, [order.index(c) for c in members[g]]], spec)
        s, z = (t.double().squeeze(1) for t in params[g])
        c = quantize_codes(w[:, i], s, z, spec.maxq)
        q = dequantize(c, s, z)
        codes[:, col] = c
        err = (w[:, i] - q) / hinv[i, i]
        w[:, i:] -= err.unsqueeze(1) * hinv[i, i:].unsqueeze(0)
        w[:, i] = q
        hinv = hinv - torch.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    dense = torch.empty_like(w)
    dense[:, order] = w
    return codes, dense


CASES = [
    dict(bits=3, sym=True, group_size=-1, act_order=False, static_groups=False, k=0),
    dict(bits=3, sym=True, group_size=-1, act_order=False, static_groups=False, k=6),
    dict(bits=4, sym=False, group_size=32, act_order=False, static_groups=False, k=0),
    dict(bits=2, sym=False, group_size=32, act_order=True, static_groups=False, k=5),
    dict(bits=4, sym=True, group_size=32, act_order=True, static_groups=True, k=7),
    dict(bits=8, sym=True, group_size=-1, act_order=True, static_groups=False, k=3),
]
CASES = [dict(c, layout=layout) for c in CASES for layout in ("natural", "compact")
         if layout == "natural" or c["group_size"] > 0]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_matches_float64_oracle(case):
    w, h = correlated_problem(seed=case["bits"] + case["k"])
    spec = GridSpec(bits=case["bits"], sym=case["sym"], group_size=case["group_size"], clip="minmax")
    salient = torch.arange(0, 3 * case["k"], 3)  # spread out, includes the outlier channels
    res = gptq_quantize(w, h, spec, salient, act_order=case["act_order"], static_groups=case["static_groups"],
                        block_size=16, dtype=torch.float64, group_layout=case["layout"])
    ref_codes, ref_dense = oracle_gptq(w, h, spec, salient, case["act_order"], case["static_groups"],
                                       layout=case["layout"])
    rest = [j for j in range(w.shape[1]) if j not in set(salient.tolist())]
    same = (res.codes[:, rest].double() == ref_codes[:, rest]).double().mean().item()
    err_lib = layer_error(w, res.dequantized().double(), h)
    err_ref = layer_error(w, ref_dense, h)
    assert same == 1.0 or abs(err_lib - err_ref) <= 1e-6 * err_ref, (same, err_lib, err_ref)
    # the salient columns carry the same compensated full-precision values as the oracle's
    torch.testing.assert_close(res.salient_weight.double(), ref_dense[:, salient], rtol=1e-7, atol=1e-9)


def test_salient_columns_are_not_rounded_and_absorb_compensation():
    w, h = correlated_problem(seed=3)
    spec = GridSpec(bits=3, sym=True, group_size=-1)
    salient = torch.tensor([0, 1, 2, 3, 40, 41])
    res = gptq_quantize(w, h, spec, salient, dtype=torch.float64)
    # salient codes are the zero point: the quantized part is exactly 0 there
    assert torch.all(res.codes[:, salient] == 2 ** (spec.bits - 1))
    base = res.dequantized()
    base[:, salient] = 0
    assert torch.all(base[:, salient] == 0)
    # compensated salient values differ from the originals and give a lower error than keeping them
    assert not torch.allclose(res.salient_weight.double(), w[:, salient])
    uncompensated = res.dequantized().double()
    uncompensated[:, salient] = w[:, salient]
    assert layer_error(w, res.dequantized(), h) < layer_error(w, uncompensated, h)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_and_salient_beats_plain(bits):
    w, h = correlated_problem(seed=10 + bits)
    spec = GridSpec(bits=bits, sym=True, group_size=-1)
    rtn = quantize_rtn(w, spec)
    plain = gptq_quantize(w, h, spec)
    salient = gptq_quantize(w, h, spec, torch.arange(4))
    e_rtn, e_plain, e_sal = (layer_error(w, x, h) for x in (rtn, plain.dequantized(), salient.dequantized()))
    assert e_plain < e_rtn
    assert e_sal < e_plain


def test_k0_has_no_salient_and_natural_groups():
    w, h = correlated_problem(seed=5)
    res = gptq_quantize(w, h, GridSpec(bits=4, sym=True, group_size=32))
    assert res.salient_idx.numel() == 0 and res.salient_weight.shape == (w.shape[0], 0)
    assert torch.equal(res.g_idx.long(), torch.arange(w.shape[1]) // 32)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_natural_groups_keep_column_order_and_zero_salient_positions(sym, act_order):
    """Column j is in group j // g, salient or not; a group of only salient columns gets the grid of 0."""
    w, h = correlated_problem(seed=7)
    salient = torch.cat([torch.arange(32, 64), torch.tensor([1, 70, 95])])  # group 1 entirely salient
    res = gptq_quantize(w, h, GridSpec(bits=3, sym=sym, group_size=32), salient, act_order=act_order)
    assert torch.equal(res.g_idx.long(), torch.arange(w.shape[1]) // 32)
    assert res.scales.shape == (w.shape[0], 3)
    base = res.dequantized()
    base[:, res.salient_idx] = 0
    codes_only = torch.zeros_like(base)
    for g in range(3):
        cols = torch.arange(32 * g, 32 * g + 32)
        codes_only[:, cols] = (res.scales[:, g:g + 1] * (res.codes[:, cols] - res.zeros[:, g:g + 1]))
    assert torch.equal(codes_only, base)  # dequantizing the stored codes gives exactly 0 at salient positions
    assert (res.codes[:, 32:64] == res.zeros[:, 1:2]).all()
    if sym:
        assert (res.zeros == 4).all()
    compact = gptq_quantize(w, h, GridSpec(bits=3, sym=sym, group_size=32), salient, act_order=act_order,
                            group_layout="compact")
    assert compact.scales.shape[1] == 2  # 61 rounded columns in runs of 32


def test_dead_columns_are_zeroed():
    w, h = correlated_problem(seed=6)
    h[7, :] = 0
    h[:, 7] = 0
    res = gptq_quantize(w, h, GridSpec(bits=4, sym=True))
    assert torch.all(res.dequantized()[:, 7] == 0)


def test_grid_fp16_scales_and_clip_search():
    w = torch.randn(16, 64, dtype=torch.float64)
    w[:, 0] *= 20  # an outlier the mse clip should partly give up on
    for sym in (True, False):
        mm = GridSpec(bits=3, sym=sym, clip="minmax")
        mse = GridSpec(bits=3, sym=sym, clip="mse")
        s1, z1 = fit_rows(w, mm)
        s2, z2 = fit_rows(w, mse)
        assert torch.equal(s2, s2.half().float())
        assert torch.all(z2 == z2.round())
        e1 = ((fake_quantize(w.float(), s1, z1, mm.maxq) - w.float()) ** 2).sum(1)
        e2 = ((fake_quantize(w.float(), s2, z2, mse.maxq) - w.float()) ** 2).sum(1)
        assert torch.all(e2 <= e1 + 1e-6)
    _, z = fit_rows(w, GridSpec(bits=4, sym=True))
    assert torch.all(z == 8)


def test_rtn_baseline_matches_grid_rtn_and_keeps_salient_columns():
    from gift_quant.quant.rtn import rtn_quantize

    w, h = correlated_problem(seed=8)
    spec = GridSpec(bits=3, sym=False, group_size=32)
    torch.testing.assert_close(rtn_quantize(w, spec).dequantized(), quantize_rtn(w, spec).float())
    sal = torch.tensor([2, 50, 77])
    rest = torch.tensor([j for j in range(w.shape[1]) if j not in (2, 50, 77)])
    res = rtn_quantize(w, spec, sal, group_layout="compact")
    torch.testing.assert_close(res.dequantized(), quantize_rtn(w, spec, columns=rest).float())
    torch.testing.assert_close(res.salient_weight, w[:, sal].float())
    natural = rtn_quantize(w, spec, sal)  # each natural group of 32 rounded on its own non-salient columns
    expect = torch.cat([quantize_rtn(w[:, g:g + 32], spec, columns=torch.tensor(
        [j - g for j in range(g, g + 32) if j not in (2, 50, 77)])) for g in range(0, w.shape[1], 32)], dim=1)
    torch.testing.assert_close(natural.dequantized(), expect.float())
