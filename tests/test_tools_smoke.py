"""Every tool under tools/ runs its main path end to end at tiny size, so none can rot (issue #23, req 7).

Tools with their own test module are covered there: bench_decode (test_bench_decode), bench_memory
(test_bench_memory), gpu_check (test_gpu_check), layout_study (test_layout_study). The rest run here on a
tiny random Llama and local text files: the benchmarks' numbers mean nothing at this size, so each test
checks that the tool finishes, writes what it promises, and that what it reports is consistent with its
own raw data (a ratio recomputed from the per-layer or per-window values it wrote).
"""

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
from tiny import QUIET_CPU, cli_world, corpus

from gift_quant.config.settings import QuantizeConfig
from gift_quant.workflows.stages import quantize_to_checkpoint

TOOLS = Path(__file__).resolve().parents[1] / "tools"
pytestmark = pytest.mark.usefixtures("torch_single_thread")


def tool(name: str):
    """tools/NAME.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Llama, its calibration / perplexity / instruction files, a 3-bit checkpoint and a tiny recipe."""
    root = tmp_path_factory.mktemp("tools")
    w = cli_world(root)
    w["ckpt"] = root / "ckpt"
    quantize_to_checkpoint(str(w["src"]), w["ckpt"], QuantizeConfig(bits=3, salient=4, calib_data=str(w["calib"]),
                                                                     calib_samples=4, seq_len=32),
                           runtime=QUIET_CPU)
    w["text"] = root / "train.txt"  # plain training text, disjoint from the calibration file
    w["text"].write_text(corpus(3000, seed=11), encoding="utf-8")
    w["recipe"] = root / "tiny.yaml"
    w["recipe"].write_text(
        f"quantize:\n  calib_data: {w['calib']}\n  calib_samples: 4\n  seq_len: 32\n  salient: 4\n"
        f"recover:\n  train_data: {w['text']}\n  eval_data: {w['ppl']}\n  steps: 2\n  batch_size: 1\n  seq_len: 32\n"
        f"  eval_every: 0\n  save_every: 1\n"
        f"eval:\n  ppl_data: {w['ppl']}\n  seq_len: 32\n  max_windows: 4\n"
        f"runtime:\n  device: cpu\n")
    return w


def test_bench_gptq_against_gptqmodel(world, tmp_path, monkeypatch):
    pytest.importorskip("gptqmodel")
    monkeypatch.setenv("TORCH_COMPILE_DISABLE", "1")
    out = tmp_path / "out"
    tool("bench_gptq").main(["--model", str(world["src"]), "--calib-data", str(world["calib"]),
                             "--ppl-data", str(world["ppl"]), "--bits", "4", "--group-size", "32", "--clip", "minmax",
                             "--calib-samples", "4", "--seq-len", "32", "--eval-seq-len", "32", "--max-windows", "3",
                             "--threads", "1", "--out-dir", str(out), "--work-dir", str(tmp_path / "work")])
    doc = json.loads((out / "bench_gptq.json").read_text())
    assert [(r["tool"], r["bits"]) for r in doc["runs"]] == [("gift-quant", 4), ("gptqmodel", 4)]
    (c,) = doc["comparisons"]
    gift, peer = doc["runs"]
    assert c["layers"] == 14 and set(gift["layer_rel_err"]) == set(peer["layer_rel_err"])
    ratios = [gift["layer_rel_err"][n] / peer["layer_rel_err"][n] for n in gift["layer_rel_err"]]
    assert c["mean_ratio"] == pytest.approx(statistics.fmean(ratios))
    assert all(0 < e < 1 for r in (gift, peer) for e in r["layer_rel_err"].values())
    assert all(math.isfinite(r["ppl"]) and r["quantize_cpu_seconds"] > 0 for r in (gift, peer))
    # both are GPTQ with the same settings on the same windows: per-layer errors of the same size
    assert 0.5 < c["mean_ratio"] < 2.0
    assert "| 4 | minmax | gift-quant |" in (out / "bench_gptq.md").read_text()


def test_ab_gptq_layer_same_hessian(world, tmp_path):
    pytest.importorskip("gptqmodel")
    out = tool("ab_gptq_layer").main(["--model", str(world["src"]), "--calib-data", str(world["calib"]),
                                      "--windows", "4", "--heldout", "2", "--seq-len", "32", "--blocks", "0",
                                      "--group-size", "128", "--out", str(tmp_path / "ab.json")])
    assert json.loads((tmp_path / "ab.json").read_text())["summary"] == out["summary"]
    assert len(out["layers"]) == 7
    # the tool's finding at its setting (one group per GPTQ block of 128 columns), at tiny size too: with float32
    # scales during the fit gift-quant's codes are GPTQModel's (at groups of 32, four per block, they are not)
    assert all(r["gift_fp32fit"]["codes_equal_peer"] == 1.0 for r in out["layers"])
    assert out["summary"]["gift"]["calib"]["n"] == 7


def test_bench_train_every_method(world, tmp_path):
    out = tmp_path / "out"
    tool("bench_train").main(["--model", str(world["src"]), "--ckpt", str(world["ckpt"]), "--steps", "1",
                              "--batch-size", "1", "--seq-len", "16", "--repeats", "1", "--out", str(out)])
    doc = json.loads((out / "bench_train.json").read_text())
    assert [r["method"] for r in doc["rows"]] == ["gift", "gift-kd", "gift-blockwise", "gift-dense", "lora", "lora-kd"]
    assert all("failed" not in r and r["tokens_per_s"] > 0 for r in doc["rows"]), doc["rows"]
    by = {r["method"]: r for r in doc["rows"]}
    ratio = doc["ratios_vs_lora"]["gift-kd"]
    assert ratio["vs"] == "lora-kd"
    assert ratio["tokens_per_s_ratio"] == pytest.approx(by["gift-kd"]["tokens_per_s"] / by["lora-kd"]["tokens_per_s"])


def test_bench_threads_runs_both_commands(world, tmp_path):
    rc = tool("bench_threads").main(["--model", str(world["src"]), "--recipe", str(world["recipe"]), "--variants", "D",
                                     "--repeats", "1", "--wait-max-min", "0", "--eval-windows", "2",
                                     "--calib-samples", "2", "--steps", "2", "--recover-windows", "2",
                                     "--json", str(tmp_path / "threads.json"), "--prepared", str(tmp_path / "prep")])
    assert rc == 0
    doc = json.loads((tmp_path / "threads.json").read_text())
    assert {(r["command"], r["variant"]) for r in doc["runs"]} == {("eval", "D"), ("recover", "D")}
    assert all(r["rc"] == 0 and r["wall_s"] > 0 for r in doc["runs"])
    assert "now training" in doc["recover_prepared"]["line"]


def test_paired_ppl_main(world, tmp_path, capsys):
    out = tmp_path / "paired.json"
    tool("paired_ppl").main([str(world["src"]), str(world["ckpt"]), "--ppl-data", str(world["ppl"]), "--seq-len", "32",
                             "--max-windows", "4", "--out", str(out)])
    doc = json.loads(out.read_text())
    (row,) = doc["rows"]
    ref, other = doc["window_nll"][str(world["src"])], doc["window_nll"][str(world["ckpt"])]
    assert len(ref) == len(other) == 4
    assert row["ppl_ratio"] == pytest.approx(math.exp(statistics.fmean(b - a for a, b in zip(ref, other))))
    assert row["ci95"][0] <= row["ppl_ratio"] <= row["ci95"][1]
    assert f"| {world['ckpt']} |" in capsys.readouterr().out


def test_recovery_study_run_and_report(world, tmp_path):
    study = tool("recovery_study")
    common = ["--model", str(world["src"]), "--recipe", str(world["recipe"]), "--out", str(tmp_path / "runs")]
    for config in ("fp", "start", "kd-text"):
        assert study.main(["run", "--config", config, "--start", str(world["ckpt"]), "--steps", "2",
                           "--train-data", str(world["text"]), *common]) == 0
    jobs = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "runs" / "jobs").glob("*.json")}
    assert set(jobs) == {"fp-w3-s0", "start-w3-s0", "kd-text-w3-s0"}
    assert jobs["kd-text-w3-s0"]["recover"]["train_data"] == str(world["text"])
    assert study.main(["report", "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]) == 0
    rows = json.loads((tmp_path / "results" / "study.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    (kd,) = [r for r in rows if r["config"] == "kd-text"]
    fp, start, rec = jobs["fp-w3-s0"]["ppl"], jobs["start-w3-s0"]["ppl"], jobs["kd-text-w3-s0"]["ppl"]
    assert kd["gap_closed"][0] == pytest.approx((start - rec) / (start - fp))


V2_CONFIGS = ("bw2+kd", "bw2+kd-frozen", "bw2+kd-nonoise", "bw2+kd-anneal", "bw2+kd-bwnoise", "bw2+kd-bwanneal",
              "bw2+kd-actonly", "ste-bw2+kd", "quik-lora-bw2+kd")


def test_recovery_study_v2_configs_run_at_tiny_size(world, tmp_path):
    """Every issue-21 configuration through ``run`` (2 block steps, 2 KD steps), then the report."""
    study = tool("recovery_study")
    out = tmp_path / "runs"
    common = ["--model", str(world["src"]), "--recipe", str(world["recipe"]), "--out", str(out),
              "--start", str(world["ckpt"]), "--train-data", str(world["text"])]
    small = ["--blockwise-steps", "2", "--set", "steps=2", "--set", "seq_len=32", "--set", "batch_size=1"]
    for config in ("fp", "start"):
        assert study.main(["run", "--config", config, *common]) == 0
    for config in V2_CONFIGS:
        assert study.main(["run", "--config", config, *common, *small]) == 0, config
    tag = "-bw2~batch_size=1,seq_len=32,steps=2"
    jobs = {p.stem.removesuffix("-w3-s0"): json.loads(p.read_text()) for p in (out / "jobs").glob("*.json")}
    assert set(jobs) == {"fp", "start", "bw2-bw2~batch_size=1,seq_len=32", *(c + tag for c in V2_CONFIGS)}
    rec = {c: jobs[c + tag]["recover"] for c in V2_CONFIGS}
    assert all(r["steps"] == 2 and r["blockwise_steps"] == (0 if "-bw2+kd" in c else 2) for c, r in rec.items())
    assert (rec["bw2+kd-frozen"]["blockwise_train"], rec["bw2+kd-frozen"]["train"]) == ("scales,rounding", "scales")
    assert rec["bw2+kd-nonoise"]["noise"] == "none" and rec["bw2+kd-anneal"]["noise_schedule"] == "anneal"
    assert rec["bw2+kd-bwnoise"]["blockwise_noise"] == "normal" and rec["bw2+kd"]["blockwise_noise"] == "none"
    assert rec["bw2+kd-bwanneal"]["blockwise_noise_schedule"] == "anneal"
    # the metric ablation re-quantizes: another metric, another untrained start than the shared one
    act = jobs["bw2+kd-actonly" + tag]
    assert act["metric"] == "quik" and jobs["bw2+kd" + tag]["metric"] == "gift"
    assert act["ppl_run_start"] != jobs["bw2+kd" + tag]["ppl_run_start"] == jobs["start"]["ppl"]
    # the baselines start from bw2+kd's block stage and see the same first batch: the same first loss
    ref = jobs["bw2+kd" + tag]
    for base in ("ste-bw2+kd", "quik-lora-bw2+kd"):
        assert jobs[base + tag]["ppl_block_stage"] == ref["ppl_after_blockwise"], base
        assert jobs[base + tag]["recovery_seconds"] > jobs[base + tag]["seconds"]["train"]  # block stage counted
    assert jobs["ste-bw2+kd" + tag]["loss_curve"][0] == jobs["quik-lora-bw2+kd" + tag]["loss_curve"][0]
    assert "ppl_2" in jobs["quik-lora-bw2+kd" + tag]  # the adapter model is scored on the second domain too
    assert study.main(["report", "--out", str(out), "--results", str(tmp_path / "results")]) == 0
    md = (tmp_path / "results" / "study.md").read_text()
    for config in V2_CONFIGS:
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {config}{tag} |"))
        assert line.count("1 start") == (2 if config == "bw2+kd" else 4), line  # both domains, and the differences
    assert "(the same)" in md and "DIFFERENT" not in md


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
