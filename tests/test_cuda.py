"""CUDA equivalences: the GPU computes what the CPU computes, within fp32 / bf16 tolerances.

The packed layer's forward, the fused salient matmul with noise (forward and both gradients), the KD
loss and a checkpoint loaded onto the GPU. Skipped without CUDA; tools/gpu_check.py runs them first
(``python -m pytest -q -m cuda tests/test_cuda.py``). Each case is written against a ``device`` so the
same body can be exercised on a CPU by hand.

Tolerances, as in tools/gpu_check.py: an fp32 dot product of length n <= 256 is within
n * 2^-24 < 2e-5 of its absolute-value bound sum|a_i b_i|, so two fp32 results are within twice that of
each other; bf16 operands and output add 2^-8 + 2^-9 < 2^-7. Whole models get 1e-4 of their largest
magnitude per side, ~100x the fp32 error seen against float64 oracles (tests/test_objective.py).
"""

import copy

import pytest
import torch
from tiny import tiny_config

from gift_quant.config.settings import NoiseSpec, QuantSpec
from gift_quant.packed.qlinear import QuantLinear
from gift_quant.quant.gptq import gptq_quantize
from gift_quant.quant.grid import GridSpec

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

FP32 = 2e-5
BF16 = 2.0**-7
MODEL = 1e-4


def _packed(seed=0, sym=False, group_size=32, out_f=96, in_f=128, k=8):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    x = torch.randn(4 * in_f, in_f, generator=g)
    res = gptq_quantize(w, 2 * x.T @ x / len(x), GridSpec(bits=3, sym=sym, group_size=group_size),
                        torch.arange(5, in_f, in_f // k)[:k])
    return QuantLinear.from_parts(res.codes, res.scales, res.zeros, res.g_idx, res.salient_idx, res.salient_weight,
                                  QuantSpec(bits=3, sym=sym, group_size=group_size),
                                  torch.randn(out_f, generator=g) * 0.1).eval()


def _within(got, want, tol):
    err = (got.detach().double().cpu() - want.detach().double().cpu()).abs()
    assert torch.isfinite(got).all()
    assert (err <= tol + 1e-12).all(), f"worst error / tolerance {float((err / (tol + 1e-12)).max()):.3g}"


def _packed_layer_case(device):
    q = _packed()
    x = torch.randn(3, 16, q.in_features, generator=torch.Generator().manual_seed(1))
    bound = x.abs() @ q.dense_weight(torch.float32).abs().T + q.bias.abs()
    moved = copy.deepcopy(q).to(device)
    with torch.no_grad():
        _within(moved(x.to(device)), q(x), 2 * FP32 * bound)
        _within(moved(x.to(device, torch.bfloat16)), q(x.bfloat16()), 2 * BF16 * bound)


def _salient_case(device):
    from gift_quant.recover.model import salient_from_quant

    q = _packed(seed=2, sym=True, group_size=-1)
    layer = salient_from_quant(q, NoiseSpec("normal", 4), seed=3).to(device).train()
    layer.noise_key = 7
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 24, q.in_features, generator=g)
    gy = torch.randn(2, 24, q.out_features, generator=g)
    # CPU and CUDA generators draw different numbers for one seed: the reference takes the device's draw
    w = (q.dense_weight(torch.float32).double() + layer.sample_noise().double().cpu())
    s = q.salient_idx.long()
    fx, fgy = x.double().reshape(-1, q.in_features), gy.double().reshape(-1, q.out_features)
    want = (x.double() @ w.T + q.bias.double(), gy.double() @ w, fgy.T @ fx[:, s])
    bounds = (x.abs().double() @ w.abs().T + q.bias.abs().double(), gy.abs().double() @ w.abs(),
              fgy.abs().T @ fx[:, s].abs())
    for bf16, rel in ((False, FP32), (True, BF16)):
        layer.gift_salient.grad = None
        xd = x.detach().clone().to(device).requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            y = layer(xd)
            y.backward(gy.to(device, y.dtype))
        for got, ref, bound in zip((y, xd.grad, layer.gift_salient.grad), want, bounds):
            _within(got, ref, rel * bound)


def _tiny_pair(seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config("llama")).eval()


def _kd_case(device):
    from gift_quant.recover.model import prepare_dense
    from gift_quant.recover.objective import Objective, Teacher, objective_loss

    teacher = _tiny_pair()
    student = copy.deepcopy(teacher)
    salient = {n: torch.arange(0, m.in_features, 5) for n, m in student.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n}
    prepare_dense(student, salient, noise=NoiseSpec("none"))
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[0, :4] = -100
    obj = Objective("kd+ce", chunk_tokens=7)

    def run(dev):
        s = copy.deepcopy(student).to(dev)
        loss, _ = objective_loss(s, ids.to(dev), labels.to(dev), obj, Teacher(copy.deepcopy(teacher), dev), check=True)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in s.named_parameters() if p.requires_grad}

    (loss, grads), (ref, ref_grads) = run(device), run(torch.device("cpu"))
    _within(loss, ref, 2 * MODEL * max(1.0, abs(float(ref))))
    for name, g in ref_grads.items():
        _within(grads[name], g, 2 * MODEL * float(g.abs().max()))


def _load_case(device, tmp_path):
    import dataclasses

    from gift_quant.config.settings import QuantizeConfig
    from gift_quant.packed.checkpoint import load, save_checkpoint
    from gift_quant.quant.engine import quantize_model

    model = _tiny_pair(seed=1)
    cfg = QuantizeConfig(bits=3, calib_samples=4, seq_len=32)
    windows = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(6))
    report = quantize_model(model, windows, cfg, torch.device("cpu"), None, progress=False)
    (tmp_path / "src").mkdir()
    save_checkpoint(model, tmp_path / "ckpt", tmp_path / "src",
                    {"dtype": "float32", "quantize": dataclasses.asdict(cfg), "layers": report.layers})
    loaded = load(tmp_path / "ckpt", device=device)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got, want = loaded(input_ids=ids.to(device)).logits, model(input_ids=ids).logits
    _within(got, want, 2 * MODEL * float(want.abs().max()))


def test_packed_layer_forward_cuda_equals_cpu():
    _packed_layer_case(torch.device("cuda"))


def test_fused_salient_matmul_with_noise_cuda_matches_unfused_reference():
    _salient_case(torch.device("cuda"))


def test_kd_loss_and_gradients_cuda_equal_cpu():
    _kd_case(torch.device("cuda"))


def test_checkpoint_loaded_on_cuda_gives_the_same_logits(tmp_path):
    _load_case(torch.device("cuda"), tmp_path)
