"""`gift-quant compare` smoke run on a tiny model: every requested method gets a row, failures included."""

import csv
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from tiny import corpus, make_model_dir, write_instruction_jsonl


def test_compare_smoke_reports_every_method(tmp_path):
    src = make_model_dir("llama", tmp_path / "src")
    text = tmp_path / "text.txt"
    text.write_text(corpus(3000, seed=2))
    train = write_instruction_jsonl(tmp_path / "train.jsonl")
    out = tmp_path / "report"
    # make rtn fail inside its subprocess: a sitecustomize on PYTHONPATH swaps its table entry at start-up
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import dataclasses\n"
        "import gift_quant.compare.methods as m\n"
        "def _boom(job):\n"
        "    raise RuntimeError('rtn failed on purpose (injected by the test)')\n"
        "m.METHODS['rtn'] = dataclasses.replace(m.METHODS['rtn'], build=_boom)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(inject), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "gift_quant.cli", "compare", str(src), "--out", str(out), "--bits", "3",
           "--recipe", "recipes/tiny-debug.yaml", "--calib-data", str(text), "--train-data", str(train),
           "--eval-data", str(text), "--ppl-data", str(text), "--methods", "fp,rtn,gptq,gift-post", "--no-progress",
           "--loss", "kd+ce"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["method"]: r for r in csv.DictReader(open(out / "report.csv"))}
    # owq is added because gift-post starts from its checkpoint
    assert set(rows) == {"fp", "rtn", "gptq", "owq", "gift-post"}
    assert "failed on purpose" in rows["rtn"]["failed"] and "rtn" in proc.stderr
    for m in ("fp", "gptq", "owq", "gift-post"):
        assert not rows[m]["failed"] and float(rows[m]["ppl"]) > 1
    assert float(rows["gptq"]["effective_bits"]) < float(rows["owq"]["effective_bits"])
    report = json.loads((out / "report.json").read_text())
    gift = next(r for r in report["rows"] if r["method"] == "gift-post")
    assert len(gift["loss_curve"]) == 4 and report["versions"]["torch"]
    assert (out / "ppl_vs_bits.png").stat().st_size > 1000 and (out / "loss_curves.png").is_file()
    assert (out / "ppl_by_method.png").stat().st_size > 1000 and "ppl_by_method.png" in (out / "report.md").read_text()
    assert "| 3 | gift-post |" in (out / "report.md").read_text()
    fp, start, trained = (float(rows[m]["ppl"]) for m in ("fp", "owq", "gift-post"))
    assert float(rows["gift-post"]["gap_closed"]) == pytest.approx((start - trained) / (start - fp))
    assert rows["owq"]["gap_closed"] == ""  # untrained rows have none
    # another bit width into the same report: the settings are shared, the bits are per job (fp is cached)
    again = [c if c != "3" else "2" for c in cmd]
    again[again.index("--methods") + 1] = "fp"
    root = os.path.dirname(os.path.dirname(__file__))
    proc = subprocess.run(again, capture_output=True, text=True, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_compare_peft_mode_picks_lr_on_validation_and_trains_every_method(tmp_path):
    src = make_model_dir("llama", tmp_path / "src")
    text = tmp_path / "text.txt"
    text.write_text(corpus(3000, seed=2))
    train = write_instruction_jsonl(tmp_path / "train.jsonl")
    out = tmp_path / "peft"
    cmd = [sys.executable, "-m", "gift_quant.cli", "compare", str(src), "--mode", "peft", "--out", str(out),
           "--recipe", "recipes/tiny-debug.yaml", "--calib-data", str(text), "--train-data", str(train),
           "--eval-data", str(text), "--methods", "gift,lora,full", "--lr-grid", "1e-3,1e-2", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((out / "report_peft.json").read_text())["rows"]
    finals = {r["method"]: r for r in rows if r.get("final")}
    assert set(finals) == {"base", "gift", "lora", "full"}
    untrained = finals.pop("base")  # the reference row: evaluated, never trained
    assert untrained["trainable_params"] == 0 and untrained["loss_curve"] == []
    assert all(f["test_loss"] != untrained["test_loss"] for f in finals.values())
    assert (out / "peft_results.png").stat().st_size > 1000
    assert "| base | 0 | - |" in (out / "report_peft.md").read_text()
    base = None
    for method, final in finals.items():
        search = {r["lr"]: r["validation_loss"] for r in rows if r["method"] == method and not r.get("final")}
        assert final["lr"] == min(search, key=search.get)  # picked on validation
        assert len(final["loss_curve"]) == 4
        base = final["lora_rank"]
    # LoRA's rank is matched to GIFT-SW's trainable parameter count (within one rank's worth)
    assert abs(finals["lora"]["trainable_params"] - finals["gift"]["trainable_params"]) <= 2 * 64 * 2 * 7 * base
    assert finals["full"]["trainable_params"] > 10 * finals["gift"]["trainable_params"]
    # every method really trained: test losses differ from one another
    assert len({round(f["test_loss"], 7) for f in finals.values()}) == 3


def test_lr_grid_parsing():
    from gift_quant.cli.app import parse_lr_grid
    from gift_quant.util.errors import GiftQuantError

    methods = ["gift", "lora", "full"]
    assert parse_lr_grid("1e-4,3e-4", methods) == [1e-4, 3e-4]
    assert parse_lr_grid("gift=3e-4,1e-3; full=3e-5", methods) == {"gift": (3e-4, 1e-3), "full": (3e-5,)}
    for bad, needle in [("dora=1e-3", "'dora'"), ("gift=", "positive"), ("1e-3,x", "positive"), ("-1", "positive")]:
        with pytest.raises(GiftQuantError, match=needle):
            parse_lr_grid(bad, methods)


@pytest.mark.parametrize("dora", [False, True])
def test_peft_baselines_are_peft_layers_seeded_and_alone_trainable(tmp_path, dora):
    from peft.tuners.lora import LoraLayer

    from gift_quant.compare.peft import peft_baseline
    from gift_quant.model.loading import load_model

    src = make_model_dir("llama", tmp_path / "src")
    targets = ["q_proj", "v_proj", "down_proj"]
    a = peft_baseline(load_model(src), 4, targets, dora=dora, seed=3)
    b = peft_baseline(load_model(src), 4, targets, dora=dora, seed=3)
    layers = [m for m in a.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 3 * a.config.num_hidden_layers and all(m.r["default"] == 4 for m in layers)
    assert all(bool(m.lora_magnitude_vector) == dora for m in layers)  # DoRA is peft's own use_dora
    trainable = [n for n, p in a.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if "lora_A" in k)  # same seed, same init


def test_gift_pre_injects_noise_at_the_target_bits_whatever_the_post_setting(tmp_path, monkeypatch):
    """The committed 3-bit gift-pre row was trained with the post variant's 4-bit noise: never again."""
    import gift_quant.workflows.commands as pipeline
    from gift_quant.compare.recovery import run_method
    from gift_quant.config.settings import EvalConfig, QuantizeConfig, RecoverConfig

    seen = {}

    def fake_recover(model_dir, out, qcfg, rcfg, ecfg, **kw):
        seen["variant"], seen["noise_bits"] = rcfg.variant, rcfg.resolved_noise_bits(qcfg.bits)
        raise RuntimeError("stop here")

    monkeypatch.setattr(pipeline, "run_recover", fake_recover)
    src = make_model_dir("llama", tmp_path / "src")
    with pytest.raises(RuntimeError, match="stop here"):
        run_method("gift-pre", str(src), tmp_path / "root", QuantizeConfig(bits=3, device="cpu"),
                   RecoverConfig(noise_bits=4), EvalConfig(), [], None)
    assert seen == {"variant": "pre", "noise_bits": 3}


def test_both_pre_variant_paths_inject_the_same_noise_under_the_paper_recipe():
    """`recover --variant pre` and compare's gift-pre resolve one NoiseSpec: the target bits, whatever the recipe."""
    from pathlib import Path

    from gift_quant.config.settings import NoiseSpec, RecoverConfig, build, read_recipe

    recipe = read_recipe(Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m-w3-paper.yaml")
    assert recipe["recover"]["noise_bits"] == 4  # the paper's post-variant noise, set in the recipe
    cli_pre = build(RecoverConfig, recipe, "recover", {"variant": "pre"})
    compare_pre = dataclasses.replace(build(RecoverConfig, recipe, "recover", {}), variant="pre")
    assert cli_pre.noise_spec(3) == compare_pre.noise_spec(3) == NoiseSpec("normal", 3)
    assert build(RecoverConfig, recipe, "recover", {}).noise_spec(3) == NoiseSpec("normal", 4)  # post: the recipe's
