"""Recovery v2 (issue 21): the learnable grid in the block stage and end to end, mixed training text, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny import QUIET_CPU, WORDS, corpus, make_model_dir

from gift_quant.cli.app import main
from gift_quant.config.settings import EvalConfig, NoiseSpec, QuantizeConfig, QuantSpec, RecoverConfig
from gift_quant.model.capture import run_block
from gift_quant.model.loading import load_model, load_tokenizer
from gift_quant.packed.checkpoint import load
from gift_quant.packed.qlinear import QuantLinear
from gift_quant.quant.gptq import gptq_quantize
from gift_quant.quant.grid import GridSpec
from gift_quant.recover import blockwise
from gift_quant.recover.grid_params import GridLinear
from gift_quant.recover.layer import SalientLinear
from gift_quant.recover.scaled_layer import ScaledSalientLinear
from gift_quant.util.errors import GiftQuantError
from gift_quant.workflows.commands import run_eval_ppl, run_quantize, run_recover

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("v2")
    src = make_model_dir("llama", root / "src")
    (root / "calib.txt").write_text(corpus(3000, seed=1))
    (root / "train.txt").write_text(corpus(3000, seed=2))
    (root / "eval.txt").write_text(corpus(2000, seed=3))
    qcfg = QuantizeConfig(bits=2, salient=8, calib_data=str(root / "calib.txt"), calib_samples=16, seq_len=32,
                          calib_batch_size=4, salient_dtype="float16")
    return {"root": root, "src": src, "qcfg": qcfg}


def _layer_and_hessian(src, name="model.layers.0.mlp.down_proj"):
    """A real linear weight of the tiny model and the Hessian of inputs drawn for it (seeded)."""
    model = load_model(src)
    w = dict(model.named_modules())[name].weight.detach().float()
    x = torch.randn(512, w.shape[1], generator=torch.Generator().manual_seed(0))
    return w, 2 * x.T @ x / x.shape[0]


# ---------------------------------------------------------------- the block stage's layer


@pytest.mark.parametrize("layout", ["per-row", "g32", "g32-act-order", "asym-g32"])
def test_grid_linear_starts_at_gptq_codes_and_packs_back_unchanged(world, layout):
    w, h = _layer_and_hessian(world["src"])
    spec = GridSpec(bits=3, sym=not layout.startswith("asym"), group_size=-1 if layout == "per-row" else 32)
    salient = torch.tensor([3, 17, 40, 41])
    res = gptq_quantize(w, h, spec, salient, act_order="act-order" in layout)
    q = QuantLinear.from_parts(res.codes, res.scales, res.zeros, res.g_idx, res.salient_idx, res.salient_weight,
                               QuantSpec(spec.bits, spec.sym, spec.group_size, salient_dtype="float32"), None)
    grid = GridLinear(q, res.prerounded, {"salient", "scales", "rounding"})
    assert torch.equal(grid.codes().long(), res.codes.long())  # step 0: GPTQ's codes, salient zeros included
    assert torch.equal(grid.weight().detach(), res.dequantized())
    back = grid.to_quant()
    for b in ("qweight", "scales", "g_idx", "salient_idx", "salient_weight", *(() if spec.sym else ("qzeros",))):
        assert torch.equal(getattr(back, b), getattr(q, b)), b


def test_rounding_offsets_move_the_codes_and_scales_only_the_step(world):
    w, h = _layer_and_hessian(world["src"])
    spec = GridSpec(bits=3, sym=True, group_size=32)
    res = gptq_quantize(w, h, spec, torch.tensor([1, 2]))
    q = QuantLinear.from_parts(res.codes, res.scales, res.zeros, res.g_idx, res.salient_idx, res.salient_weight,
                               QuantSpec(spec.bits, spec.sym, spec.group_size, salient_dtype="float32"), None)
    grid = GridLinear(q, res.prerounded, {"rounding"})
    with torch.no_grad():
        grid.round_offset.fill_(0.5)  # round(p + 0.5) is p's code or the next: never lower, some higher
    moved = grid.codes().long() - res.codes.long()
    assert moved.min() >= 0 and moved.max() == 1
    assert torch.equal(moved[:, res.salient_idx], torch.zeros_like(moved[:, res.salient_idx]))
    # the STE gradient of the offsets is the weight gradient times the scale, where the code is not clipped
    grid = GridLinear(q, res.prerounded, {"rounding"})
    grid.base_weight().sum().backward()
    s = res.scales[:, res.g_idx.long()]
    inside = (res.codes > 0) & (res.codes < spec.maxq)
    nonsal = torch.ones_like(inside)
    nonsal[:, res.salient_idx] = False
    torch.testing.assert_close(grid.round_offset.grad[inside & nonsal], s[inside & nonsal])
    # a trained scale is a step size over the codes: the codes stay GPTQ's, the weight scales with it
    grid = GridLinear(q, res.prerounded, {"scales"})
    with torch.no_grad():
        grid.scale_mult.fill_(1.25)
    assert torch.equal(grid.codes().long(), res.codes.long())
    g = res.g_idx.long()
    expected = (res.codes.float() - res.zeros[:, g]) * (res.scales * 1.25).half().float()[:, g]
    cols = nonsal[0]
    torch.testing.assert_close(grid.base_weight().detach()[:, cols], expected[:, cols], rtol=0, atol=0)


def _spy(recorded: dict):
    """A stand-in for reconstruct_block recording each trained block's outputs before it is packed."""
    def reconstruct(index, block, fp_block, inputs, targets, kwargs, **settings):
        metrics = blockwise.train_block(index, block, fp_block, inputs, targets, kwargs, **settings)
        recorded[index] = (inputs[:2], kwargs, [o.clone() for o in run_block(block, inputs[:2], kwargs)],
                           [m.changes() for m in block.modules() if isinstance(m, GridLinear)])
        blockwise.pack_block(block)
        return metrics
    return reconstruct


@pytest.fixture(scope="module")
def v2_run(world, tmp_path_factory):
    """recover --steps 0 --blockwise-steps 6 (all three trainable), recording each trained block before packing."""
    recorded: dict = {}
    out = tmp_path_factory.mktemp("v2run") / "out"
    # no hold-out: the final trained state is kept whatever it scores, so the grid has surely moved
    rcfg = RecoverConfig(steps=0, blockwise_steps=6, noise="none", blockwise_lr=3e-3, blockwise_holdout=0.0,
                         blockwise_train="salient,scales,rounding", train_data=str(world["root"] / "train.txt"))
    ecfg = EvalConfig(ppl_data=str(world["root"] / "eval.txt"), seq_len=32, max_windows=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(blockwise, "reconstruct_block", _spy(recorded))
        run_recover(str(world["src"]), out, world["qcfg"], rcfg, ecfg, runtime=QUIET_CPU)
    return out, recorded


def test_packed_checkpoint_reproduces_the_trained_blocks(v2_run):
    """The checkpoint computes what the trained GridLinear blocks computed (fp16 scales and salient columns)."""
    out, recorded = v2_run
    model = load(out)
    assert sorted(recorded) == [0, 1]
    for i, (inputs, kwargs, outs, changes) in recorded.items():
        assert any(c["codes_changed"] > 0 for c in changes) and any(c["scale_shift"] > 0 for c in changes)
        again = run_block(model.model.layers[i], inputs, kwargs)
        for a, b in zip(again, outs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_v2_checkpoint_exports_to_gptq_lora_and_runs_in_transformers_peft(v2_run, tmp_path):
    """Learned codes and scales are ordinary GPTQ tensors: the export's logits are the native checkpoint's."""
    pytest.importorskip("optimum")
    pytest.importorskip("gptqmodel")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GPTQConfig

    from gift_quant.export import ADAPTER_DIR, export_gptq_lora

    out, _ = v2_run
    export_gptq_lora(out, tmp_path / "export")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32, device_map="cpu",
                                                quantization_config=GPTQConfig(bits=2, backend="torch"))
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "export" / ADAPTER_DIR))
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = load(out)(ids).logits
        got = peft_model(ids).logits
    assert ((got - ref).norm() / ref.norm()) < 1e-3


def test_block_stage_v2_resumes_per_block_and_reports_held_out_loss(world, tmp_path):
    from gift_quant.data.sources import load_documents
    from gift_quant.data.windows import calibration_windows
    from gift_quant.quant.engine import quantize_model
    from gift_quant.workflows.stages import blockwise_reconstructor

    qcfg = world["qcfg"]
    tok = load_tokenizer(world["src"])
    windows = calibration_windows(tok, load_documents(qcfg.calib_data), qcfg.calib_samples, qcfg.seq_len, 0)
    rcfg = RecoverConfig(steps=0, blockwise_steps=4, noise="normal", blockwise_holdout=0.25)

    def quantize():
        model = load_model(world["src"])
        report = quantize_model(model, windows, qcfg, torch.device("cpu"), tmp_path / "run", progress=False,
                                reconstruct=blockwise_reconstructor(rcfg, rcfg.blockwise_noise_spec(qcfg.bits)))
        return model, report

    first, report = quantize()
    rec = next(iter(report.layers.values()))["blockwise"]
    assert rec["holdout_batches"] == 1 and rec["train_batches"] == 3  # 16 windows / 4 per batch, a quarter held
    assert [s for s, _ in rec["holdout_curve"]] == [0, 1, 2, 3, 4]
    assert math.isfinite(rec["holdout_after"]) and rec["holdout_before"] == rec["holdout_curve"][0][1]
    # the kept checkpoint is the curve's minimum, and the packed block scores exactly that
    assert rec["holdout_after"] == min(v for _, v in rec["holdout_curve"])
    assert (rec["kept_step"], rec["holdout_after"]) in [tuple(c) for c in rec["holdout_curve"]]
    again, _ = quantize()  # every block is loaded from the run folder: the same packed tensors
    a, b = dict(first.named_modules()), dict(again.named_modules())
    for n, m in a.items():
        if isinstance(m, QuantLinear):
            for buf in ("qweight", "scales", "salient_weight"):
                assert torch.equal(getattr(m, buf), getattr(b[n], buf)), (n, buf)


def test_a_block_stage_that_only_hurts_returns_gptqs_block(world, tmp_path):
    """Signed steps of half a code at once scramble the rounding: the held-out check keeps GPTQ's state."""
    from gift_quant.data.sources import load_documents
    from gift_quant.data.windows import calibration_windows
    from gift_quant.quant.engine import quantize_model
    from gift_quant.workflows.stages import blockwise_reconstructor

    qcfg = world["qcfg"]
    windows = calibration_windows(load_tokenizer(world["src"]), load_documents(qcfg.calib_data),
                                  qcfg.calib_samples, qcfg.seq_len, 0)
    rcfg = RecoverConfig(steps=0, blockwise_steps=4, noise="none", blockwise_train="rounding",
                         blockwise_rounding_lr=0.5, blockwise_holdout=0.25)
    plain = load_model(world["src"])
    quantize_model(plain, windows, qcfg, torch.device("cpu"), None, progress=False)
    model = load_model(world["src"])
    report = quantize_model(model, windows, qcfg, torch.device("cpu"), None, progress=False,
                            reconstruct=blockwise_reconstructor(rcfg, rcfg.blockwise_noise_spec(qcfg.bits)))
    rec = report.layers["model.layers.0.self_attn.q_proj"]["blockwise"]
    assert rec["kept_step"] == 0 and max(v for _, v in rec["holdout_curve"]) > rec["holdout_before"], rec
    a, b = dict(plain.named_modules()), dict(model.named_modules())
    for n in a:
        if n.startswith("model.layers.0.") and isinstance(a[n], QuantLinear):
            assert torch.equal(a[n].qweight, b[n].qweight) and torch.equal(a[n].scales, b[n].scales)


def test_summary_before_is_the_untrained_gptq_model_and_the_block_share_has_its_own_line(world, tmp_path):
    root, qcfg = world["root"], world["qcfg"]
    ecfg = EvalConfig(ppl_data=str(root / "eval.txt"), seq_len=32, max_windows=4)
    rcfg = RecoverConfig(loss="kd", steps=2, batch_size=2, seq_len=32, train_data=str(root / "train.txt"),
                         blockwise_steps=3, save_every=2, train="salient,scales", blockwise_holdout=0.0)
    summary = run_recover(str(world["src"]), tmp_path / "rec", qcfg, rcfg, ecfg, runtime=QUIET_CPU)
    run_quantize(str(world["src"]), tmp_path / "plain", qcfg, runtime=QUIET_CPU)
    plain = run_eval_ppl(str(tmp_path / "plain"), ecfg, QUIET_CPU)["perplexity"]
    assert summary["ppl_before"] == pytest.approx(plain, rel=1e-6)  # a plain quantize of the same settings
    fp, before, block = summary["ppl_fp"], summary["ppl_before"], summary["ppl_after_blockwise"]
    assert block != before
    assert summary["gap_closed_blockwise"] == pytest.approx((before - block) / (before - fp))
    md = (tmp_path / "rec" / "summary.md").read_text()
    assert "| after the block stage |" in md and "closed by the block stage alone" in md


# ---------------------------------------------------------------- end to end: trainable scales


def test_scaled_layer_gradients_match_a_float64_autograd_oracle(world):
    w, h = _layer_and_hessian(world["src"])
    spec = GridSpec(bits=3, sym=False, group_size=32)
    res = gptq_quantize(w, h, spec, torch.tensor([5, 9, 60]))
    layer = SalientLinear(w.shape[1], w.shape[0], res.salient_idx, codes=res.codes, scales=res.scales.clone(),
                          zeros=res.zeros, g_idx=res.g_idx, salient_weight=res.salient_weight, noise=NoiseSpec("none"))
    ScaledSalientLinear.adopt(layer)
    with torch.no_grad():
        layer.gift_scales.uniform_(0.9, 1.1, generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, 7, w.shape[1], generator=torch.Generator().manual_seed(2))
    gy = torch.randn(3, 7, w.shape[0], generator=torch.Generator().manual_seed(3))
    (layer(x) * gy).sum().backward()
    # oracle: the same layer written with plain autograd in float64, the float16 rounding of the scales as identity
    m = layer.gift_scales.detach().double().requires_grad_()
    ws = res.salient_weight.double().requires_grad_()
    g = res.g_idx.long()
    s16 = (res.scales.double() * m.detach()).half().double()
    s = s16 + (res.scales.double() * m - (res.scales.double() * m).detach())
    base = (res.codes.double() - res.zeros.double()[:, g]) * s[:, g]
    full = base.index_copy(1, res.salient_idx, ws)
    (F.linear(x.double(), full) * gy.double()).sum().backward()
    torch.testing.assert_close(layer.gift_scales.grad.double(), m.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.gift_salient.grad.double(), ws.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer(x).double(), F.linear(x.double(), full.detach()), rtol=1e-5, atol=1e-5)


def test_recover_trains_the_scales_end_to_end_at_their_own_lr_and_packs_them(world, tmp_path):
    root, qcfg = world["root"], world["qcfg"]
    ecfg = EvalConfig(ppl_data=str(root / "eval.txt"), seq_len=32, max_windows=4)
    common = dict(loss="kd", steps=3, batch_size=2, seq_len=32, train_data=str(root / "train.txt"), save_every=3,
                  lr=1e-3)
    run_recover(str(world["src"]), tmp_path / "plain", qcfg, RecoverConfig(**common), ecfg, runtime=QUIET_CPU)
    run_recover(str(world["src"]), tmp_path / "scaled", qcfg, RecoverConfig(**common, train="salient,scales",
                                                                              scales_lr=1e-2), ecfg, runtime=QUIET_CPU)
    plain, scaled = load(tmp_path / "plain"), load(tmp_path / "scaled")
    pq = {n: m for n, m in plain.named_modules() if isinstance(m, QuantLinear)}
    moved = 0
    for n, m in scaled.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(m.qweight, pq[n].qweight)  # end to end, the codes stay GPTQ's
            moved += int(not torch.equal(m.scales, pq[n].scales))
    assert moved == len(pq)
    # the optimizer sees the scale multipliers as their own group at --scales-lr
    from gift_quant.recover.scaled_layer import param_groups
    from gift_quant.workflows.stages import prepare_recovery

    model = prepare_recovery(tmp_path / "plain", world["src"], NoiseSpec("none"), 0,
                             train=frozenset({"salient", "scales"}))
    groups = param_groups(model, 1e-3, 1e-2)
    # its base moves with the scales every step: the speed caches (kept noisy weight, dense base) must not hold it
    from gift_quant.recover.caches import plan_caches

    assert plan_caches(model, 10**6, "cpu") is None
    n_layers = len(pq)
    assert [g["lr"] for g in groups] == [1e-3, 1e-2] and [len(g["params"]) for g in groups] == [n_layers, n_layers]
    assert all(p.shape == pq[n].scales.T.shape for p, n in zip(groups[1]["params"], pq))


# ---------------------------------------------------------------- training text


def _docs_file(path, words, n_docs, seed):
    import random

    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=60))}) + "\n" for _ in range(n_docs)))
    return path


def test_training_windows_cover_all_documents_and_mix_sources_evenly(world, tmp_path):
    from gift_quant.recover.training import training_windows

    tok = load_tokenizer(world["src"])
    a = _docs_file(tmp_path / "a.jsonl", WORDS[:20], 40, 1)
    b = _docs_file(tmp_path / "b.jsonl", [str(n) for n in range(100, 999, 7)], 40, 2)  # numbers: no letter
    rcfg = RecoverConfig(train_data=f"{a}+{b}", seq_len=16, steps=1, eval_windows=2)
    (ids, labels), held = training_windows(tok, rcfg, 40, None)
    assert held is None and ids.shape == (40, 16) and torch.equal(ids, labels)
    text = [tok.decode(r, skip_special_tokens=True) for r in ids]
    from_a = [any(c.isalpha() for c in t) for t in text]
    assert all(from_a[k] != any(c.isdigit() for c in t) for k, t in enumerate(text))  # each from one source
    assert sum(from_a) == 20  # an even mix: half the windows from each source
    # random offsets across all documents: 20 windows of 16 tokens land in many of the 40 documents,
    # where consecutive packing of 320 tokens reads about 5 of them
    docs = [json.loads(line)["text"] for line in a.read_text().splitlines()]
    doc_ids = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    hit = {k for r in ids[:20].tolist() for k, d in enumerate(doc_ids)
           if any(d[i:i + 8] == r[:8] for i in range(len(d) - 7))}
    assert len(hit) >= 10, hit


# ---------------------------------------------------------------- bad input: one line, before any work


SMALL = ["--calib-samples", "4", "--seq-len", "32", "--salient", "4", "--device", "cpu", "--no-progress"]

BAD = {
    "unknown trainable": (["--blockwise-steps", "2", "--blockwise-train", "salient,grid"], ["--blockwise-train",
                                                                                              "'grid'"]),
    "empty trainable list": (["--train", ","], ["--train", "no trainable set"]),
    "unknown e2e trainable": (["--train", "rounding"], ["--train", "'rounding'"]),
    "nan lr": (["--blockwise-scales-lr", "nan"], ["--blockwise-scales-lr", "nan"]),
    "inf lr": (["--scales-lr", "inf"], ["--scales-lr", "inf"]),
    "zero rounding lr": (["--blockwise-rounding-lr", "0"], ["--blockwise-rounding-lr", "0"]),
    "negative lr": (["--blockwise-lr=-1e-3"], ["--blockwise-lr", "-0.001"]),
    "nan main lr": (["--lr", "nan"], ["--lr", "nan"]),
    "holdout too large": (["--blockwise-holdout", "0.9"], ["--blockwise-holdout", "0.9"]),
    "scales on the pre variant": (["--variant", "pre", "--train", "salient,scales"], ["--variant pre"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recovery_v2_settings_are_one_line_errors_before_any_work(world, tmp_path, capsys, case):
    extra, needles = BAD[case]
    calib = str(world["root"] / "calib.txt")
    rc = main(["recover", str(world["src"]), "--out", str(tmp_path / "out"), "--calib-data", calib, *SMALL, *extra])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("gift-quant: error:")]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source", ["kept", "gone"])
def test_block_stage_of_a_checkpoint_names_its_source_model(world, tmp_path, capsys, source):
    import shutil

    calib = str(world["root"] / "calib.txt")
    src = tmp_path / "src"
    shutil.copytree(world["src"], src)
    assert main(["quantize", str(src), "--out", str(tmp_path / "q"), "--calib-data", calib, *SMALL]) == 0
    if source == "gone":
        shutil.rmtree(src)
    capsys.readouterr()
    rc = main(["recover", str(tmp_path / "q"), "--out", str(tmp_path / "out"), "--calib-data", calib, *SMALL,
               "--blockwise-steps", "4"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("gift-quant: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "gift-quant checkpoint" in lines[0] and "--blockwise-steps 4" in lines[0] and str(src) in lines[0]
    assert ("no longer exists" in lines[0]) == (source == "gone")
    assert not (tmp_path / "out").exists()


def test_trainable_names_are_checked_in_recipes_too(tmp_path):
    from gift_quant.config.settings import build, read_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("recover:\n  blockwise_train: salient,scale\n")
    with pytest.raises(GiftQuantError, match="unknown trainable 'scale'"):
        build(RecoverConfig, read_recipe(recipe), "recover", {})
    recipe.write_text("recover:\n  blockwise_noise: gaussian\n")
    with pytest.raises(GiftQuantError, match="--blockwise-noise must be one of normal, uniform, none"):
        build(RecoverConfig, read_recipe(recipe), "recover", {})
