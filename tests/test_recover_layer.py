"""SalientLinear: simulated equals packed, gradients only on gift_ parameters, noise statistics."""

import pytest
import torch

from gift_quant.config.settings import NoiseSpec, QuantSpec
from gift_quant.packed.qlinear import QuantLinear
from gift_quant.quant.gptq import gptq_quantize
from gift_quant.quant.grid import GridSpec, step_sizes
from gift_quant.recover.layer import SalientLinear
from gift_quant.recover.model import convert_to_quant, freeze_all_but_gift, prepare_quantized


def _quant_linear(out_f=64, in_f=96, k=6, bits=3, sym=True, group_size=-1, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    x = torch.randn(512, in_f, generator=g)
    h = 2 * x.T @ x / 512
    res = gptq_quantize(w, h, GridSpec(bits=bits, sym=sym, group_size=group_size), torch.arange(0, 2 * k, 2))
    res.salient_weight = res.salient_weight.half().float()
    return QuantLinear.from_parts(res.codes, res.scales, res.zeros, res.g_idx, res.salient_idx,
                                  res.salient_weight, QuantSpec(bits=bits, sym=sym, group_size=group_size),
                                  torch.randn(out_f, generator=g)).eval(), w


class Wrap(torch.nn.Module):
    """A minimal 'model' holding one linear inside a block list, as arch.find_blocks expects."""

    def __init__(self, lin):
        super().__init__()
        self.config = type("C", (), {"num_hidden_layers": 1, "get_text_config": lambda self: self})()
        self.layers = torch.nn.ModuleList([torch.nn.ModuleDict({"proj": lin})])

    def forward(self, x):
        return self.layers[0]["proj"](x)


def _salient(q, **kw):
    return SalientLinear(q.in_features, q.out_features, q.salient_idx.long(), codes=q.codes(),
                         scales=q.scales.T.float(), zeros=q.zero_points().T, g_idx=q.g_idx,
                         salient_weight=q.salient_weight.float(), bias=q.bias, **kw)


@pytest.mark.parametrize("sym,group_size", [(True, -1), (False, 32)])
def test_noise_off_equals_packed_layer(sym, group_size):
    q, _ = _quant_linear(sym=sym, group_size=group_size)
    x = torch.randn(3, 5, q.in_features)
    s = _salient(q, noise=NoiseSpec("normal")).eval()
    torch.testing.assert_close(s(x), q(x), rtol=1e-6, atol=1e-6)
    s_train_no_noise = _salient(q, noise=NoiseSpec("none")).train()
    torch.testing.assert_close(s_train_no_noise(x), q(x), rtol=1e-6, atol=1e-6)
    # convert back: identical buffers, identical outputs
    model = prepare_quantized(Wrap(q))
    convert_to_quant(model)  # the spec each layer carries from its packed layer
    back = model.layers[0]["proj"]
    assert isinstance(back, QuantLinear)
    for name in ("qweight", "scales", "g_idx", "salient_idx", "salient_weight"):
        assert torch.equal(getattr(back, name), getattr(q, name)), name
    assert torch.equal(back(x), q(x))


def test_gradients_reach_only_gift_parameters():
    q, _ = _quant_linear()
    model = prepare_quantized(Wrap(q))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.split(".")[-1].startswith("gift_") for n in names)
    model.train()
    model(torch.randn(4, q.in_features)).pow(2).sum().backward()
    layer = model.layers[0]["proj"]
    assert layer.gift_salient.grad is not None and layer.gift_salient.grad.abs().sum() > 0
    assert all(b.grad is None for b in layer.buffers() if b.dtype.is_floating_point)
    assert freeze_all_but_gift(model) == [layer.gift_salient]


def test_noise_statistics():
    q, _ = _quant_linear(out_f=64, in_f=96, k=6)
    s = _salient(q, noise=NoiseSpec("normal", 4), seed=3).train()
    base = s.base_weight()
    expected_delta = step_sizes(base[:, s.nonsalient_mask], GridSpec(bits=4, sym=True))
    torch.testing.assert_close(s.delta, expected_delta)
    draws = torch.stack([s.sample_noise() for _ in range(300)])  # (300, out, in)
    assert torch.all(draws[:, :, s.salient_idx] == 0), "noise must never touch salient columns"
    ns = draws[:, :, s.nonsalient_mask]
    per_row_std = ns.permute(1, 0, 2).reshape(q.out_features, -1).std(dim=1)
    torch.testing.assert_close(per_row_std, s.delta / 2, rtol=0.03, atol=0)
    n = ns[:, 0].numel()
    assert ns.mean().abs() < 4 * (s.delta.max() / 2) / (ns.numel() ** 0.5) + 1e-12
    assert abs(float(ns[:, 0].mean())) < 4 * float(s.delta[0] / 2) / n**0.5
    assert not torch.equal(draws[0], draws[1]), "noise must be fresh on each pass"
    x = torch.randn(2, q.in_features)
    assert not torch.equal(s(x), s(x))
    s.eval()
    assert torch.equal(s(x), s(x)) and torch.allclose(s(x), q(x), atol=1e-6)


def test_uniform_noise_range_and_keyed_noise_repeats():
    q, _ = _quant_linear()
    s = _salient(q, noise=NoiseSpec("uniform", 4)).train()
    d = torch.stack([s.sample_noise() for _ in range(50)])
    bound = (s.delta / 2).view(1, -1, 1)
    assert torch.all(d.abs() <= bound + 1e-7)
    s.noise_key = 17
    assert torch.equal(s.sample_noise(), s.sample_noise())  # keyed: reproducible (checkpoint recompute)
    s.noise_key = 18
    a = s.sample_noise()
    s.noise_key = 17
    assert not torch.equal(a, s.sample_noise())


def test_dense_base_keeps_no_quantized_state_and_merges():
    w = torch.randn(32, 64)
    idx = torch.tensor([1, 5, 9])
    s = SalientLinear(64, 32, idx, dense=w, salient_weight=w[:, idx]).eval()
    torch.testing.assert_close(s.merged_weight(), w)
    x = torch.randn(4, 64)
    torch.testing.assert_close(s(x), x @ w.T, rtol=1e-5, atol=1e-5)


def test_qat_layer_starts_at_the_quantized_layer_and_converts_back():
    from gift_quant.recover.qat import convert_qat, prepare_qat

    q, _ = _quant_linear(sym=False, group_size=32)
    model = prepare_qat(Wrap(q))
    layer = model.layers[0]["proj"]
    x = torch.randn(3, q.in_features)
    torch.testing.assert_close(layer(x), q(x), rtol=1e-5, atol=1e-5)
    layer(x).pow(2).sum().backward()
    assert layer.gift_weight.grad is not None and layer.gift_weight.grad.abs().sum() > 0  # STE passes gradients
    convert_qat(model)  # back to the spec the layer carries
    back = model.layers[0]["proj"]
    assert isinstance(back, QuantLinear) and torch.equal(back.qweight, q.qweight)
    torch.testing.assert_close(back(x), q(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sym,group_size,act_order", [(True, -1, False), (False, 32, False), (True, 32, True)])
def test_fused_matmul_matches_plain_autograd(sym, group_size, act_order):
    """The memory-lean Function (weight rebuilt in backward) equals autograd on the explicit weight."""
    q, _ = _quant_linear(sym=sym, group_size=group_size)
    s = _salient(q, noise=NoiseSpec("normal", 4), seed=5).train()
    if act_order:  # a permuted g_idx exercises the gather path of the dequantization
        perm = torch.randperm(q.in_features, generator=torch.Generator().manual_seed(0))
        s.g_idx = s.g_idx[perm].clone()
    base = s.scales[:, s.g_idx] * (s.codes.float() - s.zeros[:, s.g_idx])  # the oracle's own dequantization
    base[:, s.salient_idx] = 0
    torch.testing.assert_close(s.base_weight(), base, rtol=0, atol=1e-6)
    s.noise_key = 11
    noise = s.sample_noise()
    x = torch.randn(2, 7, q.in_features, dtype=torch.float64).float().requires_grad_(True)
    y = s(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    xr = x.detach().clone().requires_grad_(True)
    wr = s.gift_salient.detach().clone().requires_grad_(True)
    yr = xr @ (base + noise).T + xr[..., s.salient_idx] @ wr.T + s.bias
    yr.backward(gy)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.gift_salient.grad, wr.grad, rtol=1e-5, atol=1e-5)


def test_fused_matmul_rebuilds_the_forward_noise_in_backward():
    """Unkeyed noise: backward must use the pass's own noise, not a fresh draw (grad_x would be wrong)."""
    q, _ = _quant_linear()
    s = _salient(q, noise=NoiseSpec("normal", 2), seed=1).train()  # 2-bit noise: large, so a mix-up shows
    x = torch.randn(4, q.in_features, requires_grad=True)
    seeds = []
    orig = s._pass_seed
    s._pass_seed = lambda: seeds.append(orig()) or seeds[-1]
    y = s(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    s._pass_seed = orig
    w = s.effective_weight(seeds[0], s.gift_salient).clone()
    torch.testing.assert_close(x.grad, gy @ w, rtol=1e-5, atol=1e-5)
    assert len(seeds) == 1
