"""Noise annealed to zero (issue 21 req 4): ``--noise-schedule anneal`` / ``--blockwise-noise-schedule``.

The factor on the noise runs linearly from 1 to 0 (numpy's linspace is the reference); at the last step every
training layer's forward is bit for bit its noise-free forward; a kept noisy weight is never reused under another
scale; the constant schedule trains exactly what the code without schedules trained; a run interrupted mid-way
and resumed trains what an uninterrupted annealed run trains; bad values are one-line errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import QUIET_CPU, corpus, make_model_dir

from gift_quant.cli.app import main
from gift_quant.config.settings import NoiseSpec, QuantizeConfig, QuantSpec, RecoverConfig
from gift_quant.model.loading import load_model
from gift_quant.packed.checkpoint import load, read_gift_config, save_checkpoint
from gift_quant.packed.qlinear import QuantLinear
from gift_quant.quant.gptq import gptq_quantize
from gift_quant.quant.grid import GridSpec
from gift_quant.recover import loop
from gift_quant.recover.grid_params import GridLinear
from gift_quant.recover.layer import SalientLinear
from gift_quant.recover.model import convert_to_quant, prepare_quantized
from gift_quant.recover.noise_schedule import noise_factor, set_noise_progress
from gift_quant.recover.objective import Teacher
from gift_quant.recover.scaled_layer import ScaledSalientLinear, enable_scale_training
from gift_quant.util.errors import GiftQuantError
from gift_quant.util.files import sha256_file
from gift_quant.workflows.commands import run_quantize

pytestmark = pytest.mark.usefixtures("torch_single_thread")

ANNEAL = NoiseSpec("normal", 2, "anneal")  # 2-bit noise: large, so any leftover shows


@pytest.mark.parametrize("steps", [2, 5, 64])
def test_anneal_runs_linearly_from_one_to_zero(steps):
    got = [noise_factor("anneal", s, steps) for s in range(steps)]
    np.testing.assert_allclose(got, np.linspace(1.0, 0.0, steps), rtol=0, atol=1e-15)
    assert got[0] == 1.0 and got[-1] == 0.0  # exactly: the last step adds no noise at all
    assert all(noise_factor("constant", s, steps) == 1.0 for s in range(steps))


def test_a_one_step_stage_is_its_own_last_step():
    assert noise_factor("anneal", 0, 1) == 0.0 and noise_factor("constant", 0, 1) == 1.0
    with pytest.raises(ValueError, match="unknown noise schedule 'cosine'"):
        noise_factor("cosine", 0, 4)


def _packed(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 64, generator=g) * 0.05
    x = torch.randn(256, 64, generator=g)
    res = gptq_quantize(w, 2 * x.T @ x / 256, GridSpec(bits=3, sym=True, group_size=32), torch.tensor([1, 7, 30]))
    return QuantLinear.from_parts(res.codes, res.scales, res.zeros, res.g_idx, res.salient_idx, res.salient_weight,
                                  QuantSpec(bits=3, sym=True, group_size=32, salient_dtype="float32"), None).eval()


def _layer(kind: str, noise: NoiseSpec, seed: int = 3):
    q = _packed()
    if kind == "grid":
        return GridLinear(q, None, {"salient", "scales"}, noise, seed)
    layer = SalientLinear(q.in_features, q.out_features, q.salient_idx.long(), codes=q.codes(),
                          scales=q.scales.T.float(), zeros=q.zero_points().T, g_idx=q.g_idx,
                          salient_weight=q.salient_weight.float(), noise=noise, seed=seed)
    return ScaledSalientLinear.adopt(layer) if kind == "scaled" else layer


@pytest.mark.parametrize("kind", ["salient", "scaled", "grid"])
def test_the_last_annealed_step_trains_the_noise_free_forward(kind):
    steps = 6
    layer = _layer(kind, ANNEAL)
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(4))
    clean = layer.eval()(x).detach()
    layer.train()
    layer.noise_key = 11
    set_noise_progress(layer, 0, steps)
    assert layer.noise_scale == 1.0 and not torch.allclose(layer(x), clean, atol=1e-3)  # full noise at step 0
    set_noise_progress(layer, steps - 1, steps)
    assert layer.noise_scale == 0.0
    y = layer(x)
    assert torch.equal(y.detach(), clean)
    # and the gradient is the noise-free one too (the backward pass rebuilds the weight without noise)
    ref = _layer(kind, NoiseSpec("none")).train()
    ref.noise_key = 11
    y.sum().backward()
    ref(x).sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}
    for n, p in ref.named_parameters():
        if p.requires_grad:
            assert torch.equal(grads[n], p.grad), n


@pytest.mark.parametrize("kind", ["salient", "grid"])
def test_an_intermediate_step_scales_the_same_noise(kind):
    """Mid-way the noise is the constant schedule's draw (same seed, same key) times the factor."""
    steps, step = 5, 2
    const, anneal = _layer(kind, NoiseSpec("normal", 2)), _layer(kind, ANNEAL)
    for m in (const, anneal):
        m.train().noise_key = 9
        set_noise_progress(m, step, steps)
    draw = (lambda m: m.sample_noise()) if kind == "salient" else (lambda m: m._noise())
    factor = noise_factor("anneal", step, steps)
    assert factor == pytest.approx(0.5)
    torch.testing.assert_close(draw(anneal), factor * draw(const), rtol=1e-6, atol=0)


def test_a_kept_noisy_weight_is_rebuilt_when_the_scale_changes():
    layer = _layer("salient", ANNEAL)
    layer.keep_weight = True
    # x needs a gradient: only a pass whose backward needs the weight keeps it
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(5)).requires_grad_()
    layer.train().noise_key = 7  # the same key at both scales: only the scale tells the passes apart
    set_noise_progress(layer, 0, 3)
    layer(x).sum().backward()
    set_noise_progress(layer, 1, 3)
    y = layer(x)
    assert layer._kept_content[:2] == (layer._pass_seed(), 0.5)  # it did keep this pass's weight
    fresh = _layer("salient", ANNEAL)  # no kept weight: built from the seed at this scale
    fresh.train().noise_key = 7
    set_noise_progress(fresh, 1, 3)
    assert torch.equal(y, fresh(x))


# ---------------------------------------------------------------- whole training runs (tiny Llama)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("anneal")
    src = make_model_dir("llama", root / "src")
    (root / "calib.txt").write_text(corpus(2000, seed=1))
    run_quantize(str(src), root / "q", QuantizeConfig(bits=3, salient=8, algorithm="rtn", calib_data=str(
        root / "calib.txt"), calib_samples=4, seq_len=32), runtime=QUIET_CPU)
    ids = torch.randint(0, 200, (12, 32), generator=torch.Generator().manual_seed(3))
    return {"root": root, "src": src, "ids": ids}


def _train(world, run, noise: NoiseSpec, *, stop_at=None, schedules=True, **settings) -> str | None:
    """KD training of the salient columns and scales into ``run``: sha256 of the packed result (None if stopped)."""
    model = prepare_quantized(load(world["root"] / "q"), noise=noise, seed=1)
    enable_scale_training(model)
    rcfg = RecoverConfig(loss="kd", steps=6, lr=1e-2, batch_size=2, save_every=2, warmup_ratio=0.0, eval_every=0,
                         seed=1, cache_mb=None, train="salient,scales", **settings)
    teacher = Teacher(load_model(world["src"]), "cpu")
    real_step, real_progress = loop._Loop.step, loop.set_noise_progress

    def step(self, s, *a):
        if s == stop_at:
            raise KeyboardInterrupt
        return real_step(self, s, *a)

    loop._Loop.step = step
    if not schedules:  # the code as it was before schedules existed: no layer's scale is ever touched
        loop.set_noise_progress = lambda *a: None
    try:
        loop.train(model, world["ids"], world["ids"].clone(), rcfg, run, progress=False, teacher=teacher)
    except KeyboardInterrupt:
        return None
    finally:
        loop._Loop.step, loop.set_noise_progress = real_step, real_progress
    convert_to_quant(model)
    save_checkpoint(model, run / "ckpt", world["src"], read_gift_config(world["root"] / "q"))
    return sha256_file(run / "ckpt" / "model.safetensors")


def test_constant_is_the_old_noise_and_anneal_resumes_exactly(world, tmp_path):
    constant = _train(world, tmp_path / "constant", NoiseSpec("normal", 4), noise_schedule="constant")
    assert _train(world, tmp_path / "default", NoiseSpec("normal", 4)) == constant  # the default is constant
    # bit for bit what training without any schedule trained
    assert _train(world, tmp_path / "unscheduled", NoiseSpec("normal", 4), schedules=False) == constant
    annealed = _train(world, tmp_path / "anneal", NoiseSpec("normal", 4, "anneal"), noise_schedule="anneal")
    assert annealed != constant
    # killed after the state of step 2 was saved (step 3 is never finished), then resumed: the same model
    spec = NoiseSpec("normal", 4, "anneal")
    assert _train(world, tmp_path / "resumed", spec, stop_at=3, noise_schedule="anneal") is None
    assert _train(world, tmp_path / "resumed", spec, noise_schedule="anneal") == annealed


def test_the_run_noise_spec_carries_each_stage_schedule():
    rcfg = RecoverConfig(noise_schedule="anneal", blockwise_steps=4, blockwise_noise="normal")
    assert rcfg.noise_spec(3).schedule == "anneal" and rcfg.blockwise_noise_spec(3).schedule == "anneal"
    rcfg = RecoverConfig(blockwise_noise_schedule="anneal", blockwise_steps=4)
    assert rcfg.noise_spec(3).schedule == "constant" and rcfg.blockwise_noise_spec(3).schedule == "anneal"


SMALL = ["--calib-samples", "4", "--seq-len", "32", "--salient", "4", "--device", "cpu", "--no-progress"]


@pytest.mark.parametrize("flag,value", [("--noise-schedule", "cosine"), ("--blockwise-noise-schedule", "linear")])
def test_bad_schedules_are_one_line_errors(world, tmp_path, capsys, flag, value):
    calib = str(world["root"] / "calib.txt")
    with pytest.raises(SystemExit) as exit_:  # argparse refuses a value outside its choices, as for every choice flag
        main(["recover", str(world["src"]), "--out", str(tmp_path / "out"), "--calib-data", calib, *SMALL,
              flag, value])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and f"argument {flag}: invalid choice: '{value}'" in last and "'anneal'" in last
    assert not (tmp_path / "out").exists()
    # the same value from a recipe or the API: one clear line naming the setting
    key = flag.lstrip("-").replace("-", "_")
    with pytest.raises(GiftQuantError, match=f"^{flag} must be one of constant, anneal \\(got '{value}'\\)$"):
        RecoverConfig(**{key: value})
    from gift_quant.config.settings import build, read_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"recover:\n  {key}: {value}\n")
    with pytest.raises(GiftQuantError, match=flag):
        build(RecoverConfig, read_recipe(recipe), "recover", {})
    with pytest.raises(GiftQuantError, match="--noise-schedule must be one of"):
        NoiseSpec("normal", 4, value)
