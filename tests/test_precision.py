"""Training's compute precision (``--precision``, util/precision.py): what ``auto`` picks from the probes, how a
bad value is refused, the custom autograd Functions under bf16 autocast, a tiny recovery in bf16 against the
same run in fp32 (close losses; bf16 repeats bit for bit, with or without caches and across a resume), and a
resume on a machine where the precision resolves differently, refused in one line.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny import cli_world, rtn_llama_world

from gift_quant.config.settings import NoiseSpec, QuantizeConfig, RecoverConfig, build
from gift_quant.model.arch import model_linears
from gift_quant.packed.checkpoint import load, read_gift_config, save_checkpoint
from gift_quant.recover import loop
from gift_quant.recover.layer import SalientLinear
from gift_quant.recover.model import convert_to_quant, prepare_quantized
from gift_quant.recover.scaled_layer import ScaledSalientLinear
from gift_quant.recover.training import load_teacher
from gift_quant.util import precision as P
from gift_quant.util.errors import GiftQuantError
from gift_quant.util.files import sha256_file

ZEN3 = "fpu sse2 avx avx2 fma f16c bmi2 sha_ni vaes vpclmulqdq"  # AVX2 only: bf16 emulated
ZEN4 = ZEN3 + " avx512f avx512bw avx512vl avx512_bf16 avx512_vnni"
SAPPHIRE = ZEN3 + " avx512f avx512bw amx_tile amx_int8 amx_bf16"


# ---------------------------------------------------------------- the pure decision


@pytest.mark.parametrize("flags,onednn,want", [
    (ZEN4, True, "bf16"), (SAPPHIRE, True, "bf16"), (ZEN3, True, "fp32"),
    (ZEN4, False, "fp32"),  # torch's oneDNN without bf16 kernels: the flag alone is not enough
    ("avx512f avx512bw avx512_bf16x amx_bf16_extra", True, "fp32"),  # whole flags only
    ("", True, "fp32"),  # /proc/cpuinfo unreadable
])
def test_auto_on_cpu_is_bf16_only_with_native_bf16_matmul(flags, onednn, want):
    got = P.decide_precision("auto", "cpu", onednn_bf16=onednn, flags=flags)
    assert got.name == want
    assert got.reason.startswith("auto: this CPU has " + ("native" if want == "bf16" else "no native"))
    assert P.cpu_native_bf16(flags) == any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def test_auto_on_cuda_follows_the_gpu_and_explicit_settings_are_kept():
    assert P.decide_precision("auto", "cuda", cuda_bf16=True).name == "bf16"
    assert P.decide_precision("auto", "cuda", cuda_bf16=False).name == "fp32"
    assert P.decide_precision("fp32", "cuda", cuda_bf16=True).name == "fp32"
    assert P.decide_precision("fp32", "cpu", onednn_bf16=True, flags=ZEN4).name == "fp32"
    forced = P.decide_precision("bf16", "cpu", onednn_bf16=False, flags=ZEN3)
    assert forced.name == "bf16" and "emulated, likely slower" in forced.reason
    assert P.decide_precision("bf16", "cpu", onednn_bf16=True, flags=ZEN4).reason == "--precision bf16"
    with pytest.raises(GiftQuantError, match=r"--precision bf16: this GPU has no bf16 support"):
        P.decide_precision("bf16", "cuda", cuda_bf16=False)
    assert P.decide_precision("bf16", "cpu").dtype == torch.bfloat16
    assert P.decide_precision("fp32", "cpu").dtype == torch.float32


def test_start_lines_say_what_and_why():
    auto = P.decide_precision("auto", "cpu", onednn_bf16=True, flags=ZEN4)
    assert auto.line() == ("gift-quant: training computes in bf16 (auto: this CPU has native bf16 matmul; "
                           "--precision fp32 for full precision)")
    fp = P.decide_precision("auto", "cpu", onednn_bf16=True, flags=ZEN3)
    assert fp.line() == ("gift-quant: training computes in fp32 (auto: this CPU has no native bf16 matmul; "
                         "--precision bf16 to force it)")


def test_resolve_reads_the_probes(monkeypatch):
    monkeypatch.setattr(P, "_onednn_bf16", lambda: True)
    monkeypatch.setattr(P, "cpu_flags", lambda: ZEN4)
    assert P.resolve_precision("auto", "cpu").name == "bf16"
    assert RecoverConfig().identity("cpu")["precision"] == "bf16"  # the identity holds the resolved precision
    monkeypatch.setattr(P, "cpu_flags", lambda: ZEN3)
    assert P.resolve_precision("auto", torch.device("cpu")).name == "fp32"
    assert RecoverConfig().identity("cpu")["precision"] == "fp32"
    assert RecoverConfig(precision="bf16").identity("cpu")["precision"] == "bf16"
    assert "cache_mb" not in RecoverConfig().identity("cpu")


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize("value", ["fp16", "bfloat16", "BF16", ""])
def test_a_bad_precision_is_a_one_line_error_naming_the_value_and_the_choices(value):
    with pytest.raises(GiftQuantError) as err:
        RecoverConfig(precision=value)
    msg = str(err.value)
    assert "\n" not in msg and f"--precision {value!r}" in msg and "auto, fp32, bf16" in msg
    with pytest.raises(GiftQuantError, match="auto, fp32, bf16"):  # a recipe's recover.precision: the same check
        build(RecoverConfig, {"recover": {"precision": value}}, "recover", {})
    flag_wins = build(RecoverConfig, {"recover": {"precision": "fp32"}}, "recover", {"precision": "bf16"})
    assert flag_wins.precision == "bf16"


def test_the_flag_is_offered_by_recover_finetune_and_compare(capsys):
    from gift_quant.cli.app import make_parser

    parser = make_parser()
    for command in ("recover", "finetune", "compare"):
        args = parser.parse_args([command, "--out", "x", "--precision", "bf16"])
        assert args.precision == "bf16"
    with pytest.raises(SystemExit):
        parser.parse_args(["recover", "--out", "x", "--precision", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err


# ---------------------------------------------------------------- the custom autograd Functions under autocast


def _codes_layer(seed: int = 0, noise: str = "normal") -> SalientLinear:
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = 48, 80
    codes = torch.randint(0, 8, (out_f, in_f), generator=g)
    return SalientLinear(in_f, out_f, torch.tensor([3, 17, 40, 66]), codes=codes,
                         scales=torch.rand(out_f, 1, generator=g) * 0.02 + 0.01, zeros=torch.full((out_f, 1), 4.0),
                         g_idx=torch.zeros(in_f, dtype=torch.long), salient_weight=torch.randn(out_f, 4, generator=g),
                         bias=torch.randn(out_f, generator=g), noise=NoiseSpec(noise), seed=seed)


@pytest.mark.parametrize("scaled", [False, True])
def test_functions_compute_in_bf16_under_autocast_and_return_float32_gradients(scaled):
    x0 = torch.randn(2, 9, 80, generator=torch.Generator().manual_seed(5))
    gy = torch.randn(2, 9, 48, generator=torch.Generator().manual_seed(6))
    results = {}
    for name in ("fp32", "bf16"):
        layer = _codes_layer().train()
        if scaled:
            ScaledSalientLinear.adopt(layer)
        layer.noise_key = 3  # the same noise in both passes and both precisions
        x = x0.clone().requires_grad_()
        with P.autocast(P.decide_precision(name, "cpu"), "cpu"):
            y = layer(x)
        (y.float() * gy).sum().backward()  # backward outside autocast, as training runs it
        grads = {"x": x.grad, "salient": layer.gift_salient.grad}
        if scaled:
            grads["scales"] = layer.gift_scales.grad
        results[name] = (y, grads)
    (y32, g32), (y16, g16) = results["fp32"], results["bf16"]
    assert y32.dtype == torch.float32 and y16.dtype == torch.bfloat16  # the matmul did run in bf16
    for k in g32:  # every gradient in its input's dtype, and what a bf16 rounding explains
        assert g16[k].dtype == torch.float32, k
        scale = g32[k].abs().max().item()
        assert (g16[k] - g32[k]).abs().max().item() <= 3e-2 * scale, k
        assert not torch.equal(g16[k], g32[k]), k
    torch.testing.assert_close(y16.float(), y32, rtol=3e-2, atol=3e-2 * y32.abs().max().item())


# ---------------------------------------------------------------- a tiny recovery: bf16 against fp32

STEPS = 6


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return rtn_llama_world(tmp_path_factory.mktemp("precision"), hidden=128, intermediate=384, heads=4, head_dim=32,
                           tied=False,
                           salient=16, ids_len=40)


def _train(world, run, precision: str, cache_mb: int | None = 0, stop_at: int | None = None):
    """Distil (noise on, 2 lanes) into ``run``; (sha256 of the packed checkpoint or None when stopped, losses)."""
    model = prepare_quantized(load(world["root"] / "q"), noise=NoiseSpec("normal", 4), seed=0)
    settings = RecoverConfig(loss="kd", steps=STEPS, lr=3e-3, batch_size=2, save_every=2, warmup_ratio=0.0,
                             eval_every=0, seed=0, cache_mb=cache_mb, precision=precision)
    teacher = load_teacher(world["src"], settings, torch.device("cpu"))
    assert next(teacher.model.parameters()).dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
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
        return None, None
    finally:
        loop._Loop.step = real_step
    # what trains stays float32: the salient columns and AdamW's moments
    assert all(m.gift_salient.dtype == torch.float32 for m in model_linears(model).values())
    opt = torch.load(run / "state" / "optimizer.pt", weights_only=True)
    assert all(t.dtype == torch.float32 for s in opt["state"].values() for k, t in s.items() if k != "step")
    losses = [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    convert_to_quant(model)
    save_checkpoint(model, run / "ckpt", world["src"], read_gift_config(world["root"] / "q"))
    return sha256_file(run / "ckpt" / "model.safetensors"), losses


def test_bf16_trains_close_to_fp32_and_repeats_bit_for_bit(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(P, "_SAID", set())  # the start line is said once per process: let this test hear it
    ref, ref_losses = _train(world, tmp_path / "fp32", "fp32")
    assert "training computes in fp32 (--precision fp32; --precision bf16 to force it)" in capsys.readouterr().err
    got, losses = _train(world, tmp_path / "bf16", "bf16")
    assert "gift-quant: training computes in bf16 (--precision bf16" in capsys.readouterr().err
    assert len(losses) == len(ref_losses) == STEPS
    assert all(math.isfinite(v) for v in losses + ref_losses)
    # fp32 is the reference: each step's loss within what bf16 rounding explains
    rel = [abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)]
    assert max(rel) < 0.05, (losses, ref_losses)
    assert got != ref  # bf16 did compute something else
    # bf16 again: the same bits, with the caches on, and across a resume that turns them on
    assert _train(world, tmp_path / "bf16-cached", "bf16", cache_mb=None)[0] == got
    assert _train(world, tmp_path / "bf16-resumed", "bf16", stop_at=3) == (None, None)
    assert _train(world, tmp_path / "bf16-resumed", "bf16", cache_mb=None)[0] == got


# ---------------------------------------------------------------- resume across precisions


def test_resume_where_the_precision_resolves_differently_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    from gift_quant.cli.app import main

    w = cli_world(tmp_path)
    out = tmp_path / "out"
    cmd = ["recover", str(w["src"]), "--out", str(out), "--calib-data", str(w["calib"]), "--train-data",
           str(w["train"]), "--ppl-data", str(w["ppl"]), "--calib-samples", "4", "--seq-len", "32", "--salient", "4",
           "--steps", "2", "--batch-size", "2", "--max-windows", "2", "--ppl-seq-len", "32", "--device", "cpu",
           "--no-progress"]
    monkeypatch.setattr(P, "_SAID", set())
    monkeypatch.setattr(P, "_onednn_bf16", lambda: True)
    monkeypatch.setattr(P, "cpu_flags", lambda: ZEN4)  # a CPU with native bf16: auto trains in bf16
    assert main(cmd) == 0
    assert "training computes in bf16 (auto: this CPU has native bf16 matmul" in capsys.readouterr().err
    assert json.loads((out / "run" / "run.json").read_text())["identity"]["recover"]["precision"] == "bf16"
    assert read_gift_config(out)["recover"]["precision"] == "bf16"  # the checkpoint records what training used
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    monkeypatch.setattr(P, "cpu_flags", lambda: ZEN3)  # the same folder on a CPU where auto means fp32
    assert main(cmd) == 2
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("gift-quant: error:")]
    assert "Traceback" not in err and "different recover (precision: bf16 -> fp32)" in line
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # there, the precision it trained in resumes it (here: finds it finished)
    assert main([*cmd, "--precision", "bf16"]) == 0
    assert "resuming the run" in capsys.readouterr().err


def test_a_compare_report_continued_where_auto_means_another_precision_is_refused(tmp_path, monkeypatch):
    """compare's report folder records the resolved precision, not "auto": continuing it where auto resolves to
    another precision is refused before any job runs, instead of mixing bf16 and fp32 rows in one table."""
    from gift_quant.compare import recovery
    from gift_quant.config.settings import EvalConfig, Runtime

    ran = []
    monkeypatch.setattr(recovery, "run_cached_job", lambda job, work: ran.append(job["recover"]["precision"]))
    monkeypatch.setattr(recovery, "write_report", lambda report_dir, command: {})

    def compare_on(resolved: str):
        monkeypatch.setattr(recovery, "resolve_precision", lambda setting, device: P.Precision(resolved, "test"))
        recovery.run_compare(None, tmp_path / "report", [3], ["gptq"], QuantizeConfig(bits=3), RecoverConfig(),
                             EvalConfig(), [], None, Runtime(device="cpu", progress=False))

    compare_on("fp32")
    compare_on("fp32")  # the same machine: continues
    assert json.loads((tmp_path / "report" / "settings.json").read_text())["recover"]["precision"] == "fp32"
    with pytest.raises(GiftQuantError, match="different recover"):
        compare_on("bf16")
    assert len(ran) == 2
