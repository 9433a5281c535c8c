"""Training's speed settings change nothing but speed: the same seed trains the same checkpoint (sha256 of
model.safetensors) with the noisy weights kept or rebuilt, with or without the dense base cache, with one
thread or two, and across a resume that changes both. Plus the layer-level rules the caches rely on.

The model is a 2-block Llama with the default model's MLP ratio, wide enough (hidden 384, intermediate 1152,
64 salient columns) that the matmuls and the gradient norm are split between threads when there are two.
"""

from __future__ import annotations

import pytest
import torch
from tiny import rtn_llama_world

from gift_quant.config.settings import NoiseSpec, RecoverConfig
from gift_quant.model.loading import load_model
from gift_quant.packed.checkpoint import load, read_gift_config, save_checkpoint
from gift_quant.recover import loop
from gift_quant.recover.caches import plan_caches
from gift_quant.recover.layer import SalientLinear
from gift_quant.recover.model import convert_to_quant, prepare_quantized, salient_layers
from gift_quant.recover.objective import Teacher
from gift_quant.util.files import sha256_file

STEPS = 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return rtn_llama_world(tmp_path_factory.mktemp("caches"), hidden=384, intermediate=1152, heads=6, head_dim=64,
                           tied=True,
                           salient=64, ids_len=48)


def _train(world, run, *, cache_mb, threads=1, seed=0, stop_at=None, lanes=2) -> str | None:
    """Train (KD, noise on) into ``run``; the sha256 of the packed result, or None when stopped at ``stop_at``."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = prepare_quantized(load(world["root"] / "q"), noise=NoiseSpec("normal", 4), seed=seed)
        # fp32 pinned: thread counts are compared here; bf16's own repeatability is in tests/test_precision.py
        settings = RecoverConfig(loss="kd", steps=STEPS, lr=1e-2, batch_size=2, save_every=2, warmup_ratio=0.0,
                                 eval_every=0, seed=seed, cache_mb=cache_mb, cpu_lanes=lanes, precision="fp32")
        teacher = Teacher(load_model(world["src"]), "cpu")
        real_step = loop._Loop.step
        if stop_at is not None:
            def step(self, s, *a):
                if s == stop_at:
                    raise KeyboardInterrupt
                return real_step(self, s, *a)
            loop._Loop.step = step
        try:
            loop.train(model, world["ids"], world["ids"].clone(), settings, run, progress=False, teacher=teacher)
        except KeyboardInterrupt:
            return None
        finally:
            loop._Loop.step = real_step
        convert_to_quant(model)
        out = run / "ckpt"
        save_checkpoint(model, out, world["src"], read_gift_config(world["root"] / "q"))
        return sha256_file(out / "model.safetensors")
    finally:
        torch.set_num_threads(before)


def test_caches_threads_and_resume_give_the_same_checkpoint(world, tmp_path, capsys):
    plain = _train(world, tmp_path / "plain", cache_mb=0)
    assert "training caches off" in capsys.readouterr().err
    cached = _train(world, tmp_path / "cached", cache_mb=None)
    err = capsys.readouterr().err
    assert "noisy weights kept for backward in 14/14 layers" in err and "dense base in 14/14 layers" in err, err
    assert cached == plain
    # two threads: both lanes of each micro-batch at once (one thread above: one after the other)
    assert _train(world, tmp_path / "two-threads", cache_mb=None, threads=2) == plain
    assert "training 2 lanes of each micro-batch in parallel" in capsys.readouterr().err
    # resume: the first half without caches on one thread, the rest with both caches on two
    assert _train(world, tmp_path / "resumed", cache_mb=0, stop_at=3) is None
    assert (tmp_path / "resumed" / "state" / "step.json").is_file()
    assert _train(world, tmp_path / "resumed", cache_mb=None, threads=2) == plain
    # the comparison can fail: another seed trains another checkpoint
    assert _train(world, tmp_path / "seed1", cache_mb=0, seed=1) != plain


def test_budget_fills_kept_weights_first_then_the_base(world):
    model = prepare_quantized(load(world["root"] / "q"), noise=NoiseSpec("normal", 4), seed=0)
    layers = list(salient_layers(model).values())
    total_mb = sum(m.weight_bytes() for m in layers) / 2**20
    plan = plan_caches(model, int(total_mb) + 1, "cpu")  # room for the kept weights, not for the base too
    assert plan["kept_layers"] == len(layers) and 0 < plan["base_layers"] < len(layers)
    assert plan["kept_mb"] + plan["base_mb"] <= int(total_mb) + 1
    plan = plan_caches(model, 0, "cpu")
    assert plan["kept_layers"] == plan["base_layers"] == 0
    assert all(not m.keep_weight and m._base_cache is None for m in layers)


def _layer(keep: bool, base: bool, seed=5) -> SalientLinear:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 8, (48, 64), generator=g)
    layer = SalientLinear(64, 48, torch.tensor([3, 9, 20]), codes=codes, scales=torch.rand(48, 1, generator=g) / 50,
                          zeros=torch.full((48, 1), 4.0), g_idx=torch.zeros(64, dtype=torch.long),
                          salient_weight=torch.randn(48, 3, generator=g), noise=NoiseSpec("normal", 2), seed=seed)
    layer.keep_weight = keep
    layer.cache_base(base)
    return layer.train()


@pytest.mark.parametrize("keep,base", [(True, False), (False, True), (True, True)])
def test_layer_caches_are_bit_identical(keep, base):
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    results = []
    for layer in (_layer(False, False), _layer(keep, base)):
        xi = x.clone().requires_grad_(True)
        outs = []
        for key in (1, 2):  # two passes: the kept buffer is rewritten by the second
            layer.noise_key = key
            y = layer(xi)
            y.pow(2).sum().backward()
            outs.append(y.detach())
        results.append((outs, xi.grad.clone(), layer.gift_salient.grad.clone()))
    (o0, gx0, gs0), (o1, gx1, gs1) = results
    assert all(torch.equal(a, b) for a, b in zip(o0, o1))
    assert torch.equal(gx0, gx1) and torch.equal(gs0, gs1)


def test_kept_weight_of_an_overwritten_pass_is_rebuilt():
    """Two forwards before one backward: the first pass's backward must not read the second pass's weight."""
    layer, ref = _layer(True, False), _layer(False, False)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    grads = []
    for m in (layer, ref):
        xa = x.clone().requires_grad_(True)
        m.noise_key = 1
        ya = m(xa)
        m.noise_key = 2
        yb = m(x.clone().requires_grad_(True))  # overwrites the kept buffer of ``layer``
        ya.sum().backward()
        grads.append(xa.grad)
        del yb
    assert torch.equal(grads[0], grads[1])
    # the check can fail: the buffer now holds the second pass's weight, and the first pass's differs
    layer.noise_key = 1
    first = layer.effective_weight(layer._pass_seed(), layer.gift_salient).clone()
    x_grad_from_kept = torch.ones(4, 48) @ layer._kept
    assert not torch.equal(first, layer._kept) and not torch.equal(x_grad_from_kept, grads[0])
