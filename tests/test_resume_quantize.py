"""Interrupted and repeated ``gift-quant quantize`` runs: finished blocks are reused, the result is
identical to an uninterrupted run, and a run with different settings is refused unless --overwrite."""

from __future__ import annotations

import json
import shutil

import pytest
from tiny import corpus, make_model_dir

from gift_quant.cli.app import main
from gift_quant.quant import engine

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SMALL = ["--calib-samples", "4", "--seq-len", "32", "--no-progress"]
N_BLOCKS = 2  # tiny.py builds two decoder layers


class CountingGPTQ:
    """Wraps the GPTQ core: counts calls, optionally raises on call number ``fail_at`` (1-based)."""

    def __init__(self, fail_at: int | None = None, exc: type[BaseException] = KeyboardInterrupt):
        self.calls, self.fail_at, self.exc = 0, fail_at, exc

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise self.exc(f"GPTQ call {self.calls}")
        return _REAL_GPTQ(*args, **kwargs)


_REAL_GPTQ = engine.gptq_quantize


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = make_model_dir("llama", root / "llama")
    calib = root / "calib.txt"
    calib.write_text(corpus(), encoding="utf-8")
    return {"root": root, "model": model, "calib": calib}


def _args(setup, out, *extra):
    return ["quantize", str(setup["model"]), "--out", str(out), "--calib-data", str(setup["calib"]), *SMALL,
            *[str(e) for e in extra]]


@pytest.fixture(scope="module")
def reference(setup):
    """One uninterrupted run; records how many linears each block has (GPTQ calls / blocks)."""
    out = setup["root"] / "reference"
    counter = CountingGPTQ()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "gptq_quantize", counter)
        assert main(_args(setup, out)) == 0
    assert counter.calls % N_BLOCKS == 0 and counter.calls > 0
    return {"out": out, "per_block": counter.calls // N_BLOCKS,
            "weights": (out / "model.safetensors").read_bytes(),
            "gift_config": json.loads((out / "gift_quant_config.json").read_text())}


def _copy(reference, dst):
    shutil.copytree(reference["out"], dst)
    return dst


def test_rerun_reuses_finished_blocks(setup, reference, tmp_path, monkeypatch, capsys):
    out = _copy(reference, tmp_path / "out")
    counter = CountingGPTQ(fail_at=1, exc=AssertionError)  # any GPTQ call fails the test
    monkeypatch.setattr(engine, "gptq_quantize", counter)
    assert main(_args(setup, out)) == 0
    assert counter.calls == 0
    assert "resuming" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == reference["weights"]
    assert json.loads((out / "gift_quant_config.json").read_text()) == reference["gift_config"]


def test_interrupted_run_resumes_to_the_same_model(setup, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    per_block = reference["per_block"]
    # interrupt at the first linear of block 1: block 0 is finished, block 1 is not
    monkeypatch.setattr(engine, "gptq_quantize", CountingGPTQ(fail_at=per_block + 1))
    assert main(_args(setup, out)) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err
    assert (out / "run" / "run.json").is_file()
    assert (out / "run" / "blocks" / "block_000.json").is_file()
    assert not (out / "run" / "blocks" / "block_001.json").exists()
    assert not (out / "gift_quant_config.json").exists()

    # an unfinished run is not a checkpoint
    rc = main(["eval", str(out), "--ppl-data", str(setup["calib"]), "--seq-len", "32", "--no-progress"])
    assert rc == 2
    assert "unfinished gift-quant run" in capsys.readouterr().err

    counter = CountingGPTQ()
    monkeypatch.setattr(engine, "gptq_quantize", counter)
    assert main(_args(setup, out)) == 0
    assert "resuming" in capsys.readouterr().err
    assert counter.calls == per_block  # only block 1 was quantized
    assert (out / "model.safetensors").read_bytes() == reference["weights"]
    assert json.loads((out / "gift_quant_config.json").read_text()) == reference["gift_config"]


def test_changed_setting_is_refused_then_overwrite(setup, reference, tmp_path, capsys):
    out = _copy(reference, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    rc = main(_args(setup, out, "--bits", "4"))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("gift-quant: error:")]
    assert str(out) in line and "different settings" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # checkpoint untouched

    assert main(_args(setup, out, "--bits", "4", "--overwrite")) == 0
    doc = json.loads((out / "gift_quant_config.json").read_text())
    assert doc["spec"]["bits"] == 4 and "bits" not in doc and "bits" not in doc["quantize"]  # written once
    assert json.loads((out / "run" / "run.json").read_text())["identity"]["settings"]["bits"] == 4


def test_changed_calibration_data_is_refused(setup, reference, tmp_path, capsys):
    out = _copy(reference, tmp_path / "out")
    other = tmp_path / "other.txt"
    other.write_text(corpus(seed=7), encoding="utf-8")
    args = _args(setup, out)
    args[args.index("--calib-data") + 1] = str(other)
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("gift-quant: error:")]
    assert "calibration" in line


def test_changed_setting_message_names_the_setting(setup, reference, tmp_path, capsys):
    out = _copy(reference, tmp_path / "out")
    assert main(_args(setup, out, "--bits", "4")) == 2
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("gift-quant: error:")]
    assert "bits" in line


def test_quantizing_a_checkpoint_is_refused(setup, reference, tmp_path, monkeypatch, capsys):
    def accepted(*_a, **_k):
        raise AssertionError("a gift-quant checkpoint was accepted as the source model")

    monkeypatch.setattr("gift_quant.workflows.stages.quantize_model", accepted)
    args = _args(setup, tmp_path / "out")
    args[1] = str(reference["out"])
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("gift-quant: error:")]
    assert str(reference["out"]) in line
