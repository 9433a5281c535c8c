"""SIGINT and SIGTERM stop every stage with exit 130 / 143 and the one-line resume message, never swallowed,
and a run stopped at every stage in turn resumes to the very model an uninterrupted run writes.

In process (``cli.main``): a stage function raises KeyboardInterrupt (what Python's SIGINT handler raises)
or ``cli.Terminated`` (what main's SIGTERM handler raises) at a chosen point. In subprocesses: the real
signals, delivered while ``recover`` trains, and a Ctrl-C that lands inside a ``__del__`` (where Python
swallows it) is delivered again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import cli_world

from gift_quant.cli.app import Terminated, main
from gift_quant.quant import engine
from gift_quant.recover import blockwise
from gift_quant.recover import loop as train_mod
from gift_quant.workflows import commands as pipeline
from gift_quant.workflows import stages

pytestmark = pytest.mark.usefixtures("torch_single_thread")

QSMALL = ["--calib-samples", "4", "--seq-len", "32", "--salient", "4", "--device", "cpu", "--no-progress"]
RSMALL = [*QSMALL, "--steps", "6", "--save-every", "2", "--batch-size", "2", "--max-windows", "2",
          "--ppl-seq-len", "32", "--blockwise-steps", "2", "--keep-intermediate"]
INTERRUPTED = "gift-quant: interrupted; rerun the same command to resume"
TERMINATED = "gift-quant: terminated (SIGTERM); rerun the same command to resume"
LINEARS_PER_BLOCK = 7  # q, k, v, o, gate, up, down of the tiny llama


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    w = cli_world(root, n_train=60)
    return w


def quantize_args(w, out: Path) -> list[str]:
    return ["quantize", str(w["src"]), "--out", str(out), "--calib-data", str(w["calib"]), *QSMALL]


def recover_args(w, out: Path, *extra: str) -> list[str]:
    return ["recover", str(w["src"]), "--out", str(out), "--calib-data", str(w["calib"]), "--train-data",
            str(w["train"]), "--ppl-data", str(w["ppl"]), *RSMALL, *extra]


def raise_at(real, exc: type[BaseException], call: int = 1, when=None):
    """``real`` wrapped: raises ``exc`` at its ``call``-th call (1-based) for which ``when(*args)`` holds."""
    seen = {"n": 0}

    def wrapper(*args, **kwargs):
        if when is None or when(*args, **kwargs):
            seen["n"] += 1
            if seen["n"] == call:
                raise exc()
        return real(*args, **kwargs)
    return wrapper


def assert_stopped(rc: int, err: str, exc: type[BaseException]) -> None:
    assert "Traceback" not in err and "Exception ignored" not in err, err
    if exc is KeyboardInterrupt:
        assert rc == 130 and INTERRUPTED in err, err
    else:
        assert rc == 143 and TERMINATED in err, err


def run(capsys, args: list[str]) -> tuple[int, str]:
    rc = main(args)
    return rc, capsys.readouterr().err


# ---------------------------------------------------------------- quantize and eval, stage by stage

QUANTIZE_POINTS = {
    "calibration": (stages, "calibration_set", 1),
    "sensitivity": (engine, "score_layer", 3),
    "GPTQ (block 1)": (engine, "gptq_quantize", LINEARS_PER_BLOCK + 2),
    "writing the per-block results": (engine, "_save_block", 1),
    "packing": (stages, "save_checkpoint", 1),
}


@pytest.mark.parametrize("exc", [KeyboardInterrupt, Terminated], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("point", sorted(QUANTIZE_POINTS))
def test_quantize_stops_at_every_stage(world, tmp_path, capsys, monkeypatch, point, exc):
    module, name, call = QUANTIZE_POINTS[point]
    monkeypatch.setattr(module, name, raise_at(getattr(module, name), exc, call))
    rc, err = run(capsys, quantize_args(world, tmp_path / "out"))
    assert_stopped(rc, err, exc)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, Terminated], ids=["SIGINT", "SIGTERM"])
def test_eval_stops(world, capsys, monkeypatch, exc):
    from gift_quant.eval import perplexity as ppl_mod

    monkeypatch.setattr(stages, "perplexity", raise_at(ppl_mod.perplexity, exc))
    rc, err = run(capsys, ["eval", str(world["src"]), "--ppl-data", str(world["ppl"]), "--seq-len", "32",
                           "--max-windows", "2", "--device", "cpu", "--no-progress"])
    assert_stopped(rc, err, exc)


def test_ctrl_c_inside_a_del_is_not_swallowed(world, tmp_path, capsys, monkeypatch):
    """Python swallows an exception raised in ``__del__`` ("Exception ignored in"); a Ctrl-C landing there
    must still stop the run."""
    real = engine.gptq_quantize

    class Group:
        def __del__(self):
            raise KeyboardInterrupt  # what Python's SIGINT handler raises when the signal lands here

    def gptq(*args, **kwargs):
        Group()  # collected at once: its __del__ runs (and its KeyboardInterrupt is swallowed) right here
        for _ in range(1000):  # the re-delivered interrupt is raised at the next bytecode boundaries
            time.sleep(0)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "gptq_quantize", gptq)
    rc, err = run(capsys, quantize_args(world, tmp_path / "out"))
    assert rc == 130 and INTERRUPTED in err, err


# ---------------------------------------------------------------- recover: stopped at every stage, then resumed


@pytest.fixture(scope="module")
def reference(world):
    out = world["root"] / "reference"
    assert main(recover_args(world, out)) == 0
    return out


def test_recover_stopped_at_every_stage_resumes_to_the_same_model(world, reference, capsys):
    out = world["root"] / "chain"
    is_pack = lambda model, path, *a, **k: Path(path) == out  # noqa: E731 - the final checkpoint, not run/...
    points = [  # (what, module, attribute, exception, call, when)
        ("calibration", stages, "calibration_set", KeyboardInterrupt, 1, None),
        ("GPTQ of block 1", engine, "gptq_quantize", Terminated, LINEARS_PER_BLOCK + 2, None),
        ("block-wise reconstruction of block 1", blockwise, "reconstruct_block", KeyboardInterrupt, 1, None),
        ("evaluation before training", pipeline, "evaluate_perplexity", Terminated, 1, None),
        ("training step 3", train_mod._Loop, "step", KeyboardInterrupt, 1,
         lambda self, step, *a: step == 3),
        ("training step 5", train_mod._Loop, "step", Terminated, 1, lambda self, step, *a: step == 5),
        ("packing", pipeline, "save_checkpoint", Terminated, 1, is_pack),
        ("evaluation after training", pipeline, "evaluate_perplexity", KeyboardInterrupt, 1, None),
    ]
    for what, module, name, exc, call, when in points:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(module, name, raise_at(getattr(module, name), exc, call, when))
            rc, err = run(capsys, recover_args(world, out))
        assert_stopped(rc, err, exc)
        assert not (out / "summary.json").exists(), f"stopped at {what}, yet the run finished"
    metrics = out / "run" / "recover" / "metrics.jsonl"
    assert metrics.is_file()
    rc, err = run(capsys, recover_args(world, out))
    assert rc == 0, err
    a, b = load_file(str(out / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"
    steps = [json.loads(ln)["step"] for ln in metrics.read_text().splitlines()]
    assert steps == list(range(1, 7)), "every step logged once, in order"
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (out, reference))
    assert (sa["ppl_before"], sa["ppl_after"]) == (sb["ppl_before"], sb["ppl_after"])


# ---------------------------------------------------------------- real signals while recover trains


def test_real_signals_during_training_stop_with_the_resume_message(world, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        out = tmp_path / sig.name
        args = recover_args(world, out)
        args[args.index("--steps") + 1] = "100000"
        procs[sig] = (out, subprocess.Popen([sys.executable, "-m", "gift_quant.cli", *args], env=env,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.monotonic() + 240
        pending = dict(procs)
        while pending and time.monotonic() < deadline:
            for sig, (out, p) in list(pending.items()):
                assert p.poll() is None, p.stderr.read()[-3000:]
                metrics = out / "run" / "recover" / "metrics.jsonl"
                if metrics.is_file() and metrics.read_bytes().count(b"\n") >= 2:  # well inside training
                    p.send_signal(sig)
                    del pending[sig]
            time.sleep(0.05)
        assert not pending, "the runs never reached training"
        for sig, (_, p) in procs.items():
            _, err = p.communicate(timeout=120)
            want = (130, INTERRUPTED) if sig == signal.SIGINT else (143, TERMINATED)
            assert p.returncode == want[0] and want[1] in err, err[-3000:]
            assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    finally:
        for _, p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
