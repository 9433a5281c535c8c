"""Block-wise reconstruction and distillation through the whole recover pipeline on a tiny llama."""

import dataclasses
import json

import pytest
import torch
from tiny import QUIET_CPU, corpus, make_model_dir

from gift_quant.config.settings import EvalConfig, QuantizeConfig, RecoverConfig
from gift_quant.model.loading import load_model, load_tokenizer
from gift_quant.packed.checkpoint import load
from gift_quant.packed.qlinear import QuantLinear
from gift_quant.quant.engine import quantize_model
from gift_quant.workflows.commands import blockwise_reconstructor, run_recover


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bw")
    src = make_model_dir("llama", root / "src")
    (root / "calib.txt").write_text(corpus(3000, seed=1))
    (root / "train.txt").write_text(corpus(3000, seed=2))
    (root / "eval.txt").write_text(corpus(2000, seed=3))
    qcfg = QuantizeConfig(bits=2, salient=8, calib_data=str(root / "calib.txt"), calib_samples=8, seq_len=32,
                          calib_batch_size=4, salient_dtype="float32")
    return root, src, qcfg


def _quantize(src, qcfg, rcfg, run_dir):
    from gift_quant.data.sources import load_documents
    from gift_quant.data.windows import calibration_windows

    model = load_model(src)
    tok = load_tokenizer(src)
    windows = calibration_windows(tok, load_documents(qcfg.calib_data), qcfg.calib_samples, qcfg.seq_len, 0)
    rec = blockwise_reconstructor(rcfg, rcfg.noise_spec(qcfg.bits)) if rcfg is not None else None
    report = quantize_model(model, windows, qcfg, torch.device("cpu"), run_dir, progress=False, reconstruct=rec,
                            reconstruct_target=rcfg.blockwise_target if rcfg else "fp-prefix")
    return model, report


@pytest.mark.parametrize("target", ["fp-prefix", "quant-prefix"])
def test_blockwise_lowers_every_block_error_and_only_moves_salient_columns(setup, tmp_path, target):
    root, src, qcfg = setup
    # two calibration batches: nothing held out (one held batch would leave one to train on)
    rcfg = RecoverConfig(steps=0, blockwise_steps=12, blockwise_lr=3e-3, blockwise_target=target,
                         blockwise_train="salient", blockwise_holdout=0.0)
    plain, _ = _quantize(src, qcfg, None, None)
    model, report = _quantize(src, qcfg, rcfg, tmp_path / "run")
    recs = {json.dumps(m["blockwise"], sort_keys=True): m["blockwise"] for m in report.layers.values()}
    assert len(recs) == 2  # one record per block, shared by its linears
    for r in recs.values():
        assert r["relative_mse_after"] < r["relative_mse_before"], r
    q_plain = dict((n, m) for n, m in plain.named_modules() if isinstance(m, QuantLinear))
    q_rec = dict((n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear))
    first = [n for n in q_plain if ".layers.0." in n]
    for n in first:  # block 0 sees the same inputs: identical GPTQ codes, only the salient columns changed
        assert torch.equal(q_plain[n].qweight, q_rec[n].qweight)
        assert torch.equal(q_plain[n].salient_idx, q_rec[n].salient_idx)
    assert any(not torch.equal(q_plain[n].salient_weight, q_rec[n].salient_weight) for n in first)
    # resume: a rerun into the same run folder loads every finished block and gives the same model
    again, _ = _quantize(src, qcfg, rcfg, tmp_path / "run")
    for n, m in again.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(m.salient_weight, q_rec[n].salient_weight)


def test_recover_with_kd_on_plain_text_and_blockwise_end_to_end(setup, tmp_path):
    root, src, qcfg = setup
    rcfg = RecoverConfig(loss="kd", steps=3, batch_size=2, seq_len=32, lr=1e-3, train_data=str(root / "train.txt"),
                         eval_data=str(root / "eval.txt"), eval_windows=2, eval_every=3, save_every=3,
                         blockwise_steps=2)
    ecfg = EvalConfig(ppl_data=str(root / "eval.txt"), seq_len=32, max_windows=4)
    out = tmp_path / "out"
    summary = run_recover(str(src), out, qcfg, rcfg, ecfg, runtime=QUIET_CPU)
    assert summary["ppl_after"] > 0 and summary["ppl_before"] > 0
    metrics = [json.loads(x) for x in (out / "run" / "recover" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["loss"] >= 0 for m in metrics)
    stages = json.loads((out / "run" / "stages.json").read_text())
    assert stages["recover"]["teacher_mb"] > 0
    fp, before, after = summary["ppl_fp"], summary["ppl_before"], summary["ppl_after"]
    # a random tiny model can score better quantized than in full precision: then there is no gap to close
    expected = pytest.approx((before - after) / (before - fp)) if before > fp else None
    assert fp > 0 and summary["gap_closed"] == expected
    md = (out / "summary.md").read_text()
    assert f"{summary['ppl_after']:.3f}" in md and "loss kd" in md and "block-wise 2 steps per block" in md
    model = load(out)  # the packed result loads like any checkpoint
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    # lean output: run/ keeps its record and training curve only; a rerun still finds everything finished
    kept = sorted(str(p.relative_to(out / "run")) for p in (out / "run").rglob("*") if p.is_file())
    assert kept == ["recover/metrics.jsonl", "run.json", "stages.json"], kept
    assert run_recover(str(src), out, qcfg, rcfg, ecfg, runtime=QUIET_CPU)["ppl_after"] == summary["ppl_after"]


def test_clean_command_removes_resumable_state(setup, tmp_path, capsys):
    from gift_quant.cli.app import main

    root, src, qcfg = setup
    rcfg = RecoverConfig(steps=1, batch_size=2, seq_len=32, train_data=str(root / "train.txt"), loss="ce")
    ecfg = EvalConfig(ppl_data=str(root / "eval.txt"), seq_len=32, max_windows=2)
    out = tmp_path / "out"
    run_recover(str(src), out, qcfg, rcfg, ecfg, runtime=QUIET_CPU, keep_intermediate=True)
    assert (out / "run" / "quantized" / "model.safetensors").is_file()
    assert main(["clean", str(out)]) == 0
    assert not (out / "run" / "quantized").exists() and (out / "run" / "stages.json").is_file()
    assert "removed" in capsys.readouterr().out
    load(out)  # the result itself is untouched


def test_blockwise_only_recover_skips_end_to_end_training(setup, tmp_path):
    root, src, qcfg = setup
    rcfg = RecoverConfig(steps=0, blockwise_steps=3, train_data=str(root / "train.txt"))
    ecfg = EvalConfig(ppl_data=str(root / "eval.txt"), seq_len=32, max_windows=4)
    summary = run_recover(str(src), tmp_path / "out", qcfg, rcfg, ecfg, runtime=QUIET_CPU)
    assert not (tmp_path / "out" / "run" / "recover" / "metrics.jsonl").exists()
    # the block stage's result is the final model (evaluated twice); "before" is the untrained GPTQ model
    assert summary["ppl_after"] == pytest.approx(summary["ppl_after_blockwise"], rel=1e-5)


def test_plain_text_training_leaves_out_calibration_documents(setup):
    from gift_quant.data.sources import load_documents
    from gift_quant.data.windows import calibration_documents
    from gift_quant.recover.training import training_windows

    root, src, _ = setup
    docs_file = root / "docs.jsonl"
    docs = [corpus(120, seed=10 + i) for i in range(30)]
    docs_file.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = load_tokenizer(src)
    qcfg = QuantizeConfig(calib_data=str(docs_file), calib_samples=2, seq_len=16, seed=5)
    rcfg = RecoverConfig(train_data=str(docs_file), seq_len=16, steps=1)
    used = calibration_documents(tok, load_documents(str(docs_file)), 2, 16, 5)
    assert 0 < len(used) < len(docs)
    (ids, _), _ = training_windows(tok, rcfg, 10_000, qcfg)
    (ids_all, _), _ = training_windows(tok, dataclasses.replace(rcfg), 10_000, None)

    def contains(stream: torch.Tensor, doc: str) -> bool:  # a 12-token run of the document in the stream
        probe = tok(doc, add_special_tokens=False)["input_ids"][20:32]
        flat = stream.flatten().tolist()
        return any(flat[i:i + len(probe)] == probe for i in range(len(flat) - len(probe) + 1))

    assert not any(contains(ids, d) for d in used)
    assert all(contains(ids_all, d) for d in used)  # control: without the calibration settings they are trained on
