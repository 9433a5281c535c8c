"""``gift-quant recover`` killed with SIGKILL and rerun finishes to the very model an uninterrupted run
writes: killed mid-training (resumes from the last saved state, metrics logged after it dropped) and
killed inside the quantize stage (resumes from the finished blocks). A changed setting is refused.

Real subprocesses (``python -m gift_quant.cli.app recover``) on a tiny llama. Start-up (imports) dominates
their cost, so the module fixture runs them side by side in two phases: the reference, the
killed-in-training and the killed-in-quantize runs; then the two resumes. The refusals of a changed
setting run in process (``cli.main``, whose return value is the console script's exit status).

The quantize-stage kill needs a deterministic point (that stage takes well under a second here), so that
run goes through this file as a wrapper (``python tests/test_recover_resume.py pause-in-gptq ...``)
which parks the process inside GPTQ of block 1 until it is killed; the command line it runs is the same.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()
# killed once step 4 is logged: the last saved state is step 3 (unless the kill lands late), so the
# resume must also drop metrics lines logged after that state
STEPS, SAVE_EVERY, KILL_AT_LINES = 30, 3, 4
SMALL = ["--calib-samples", "4", "--seq-len", "32", "--salient", "4", "--steps", str(STEPS),
         "--save-every", str(SAVE_EVERY), "--batch-size", "2", "--max-windows", "4", "--ppl-seq-len", "32",
         "--device", "cpu", "--no-progress", "--keep-intermediate"]
TIMEOUT = 300


# ------------------------------------------------------------------------------ wrapper (subprocess)


def _pause_in_gptq(argv: list[str]) -> int:
    """Run the CLI with ``argv``; at the first GPTQ call after block 0 is saved, touch ``ready`` and wait."""
    ready, args = Path(argv[0]), argv[1:]
    from gift_quant.cli.app import main
    from gift_quant.quant import engine

    blocks = Path(args[args.index("--out") + 1]) / "run" / "quantized" / "run" / "blocks"
    real = engine.gptq_quantize

    def gptq(*a, **k):
        if (blocks / "block_000.json").is_file():
            ready.write_text(str(os.getpid()))
            time.sleep(TIMEOUT)
        return real(*a, **k)

    engine.gptq_quantize = gptq
    return main(args)


# ------------------------------------------------------------------------------ helpers


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=_env(), stdout=f, stderr=subprocess.STDOUT, text=True)


def _metric_lines(out: Path) -> list[dict]:
    p = out / "run" / "recover" / "metrics.jsonl"
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.is_file() else []


def _complete_lines(out: Path) -> int:
    """Lines of metrics.jsonl written so far, without parsing one that is being written right now."""
    p = out / "run" / "recover" / "metrics.jsonl"
    return p.read_bytes().count(b"\n") if p.is_file() else 0


def _stages(out: Path) -> dict:
    p = out / "run" / "stages.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def _state_step(out: Path) -> int | None:
    p = out / "run" / "recover" / "state" / "step.json"
    return json.loads(p.read_text())["step"] if p.is_file() else None


def _log(root: Path, name: str) -> str:
    return (root / f"{name}.log").read_text()


# ------------------------------------------------------------------------------ the runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tiny import WORDS, corpus, make_model_dir

    root = tmp_path_factory.mktemp("recover-resume")
    model = make_model_dir("llama", root / "llama")
    (root / "calib.txt").write_text(corpus(), encoding="utf-8")
    (root / "ppl.txt").write_text(corpus(2000, seed=3), encoding="utf-8")
    rng = random.Random(5)
    with open(root / "train.jsonl", "w", encoding="utf-8") as f:
        for _ in range(60):
            f.write(json.dumps({"prompt": " ".join(rng.choices(WORDS, k=6)),
                                "response": " ".join(rng.choices(WORDS, k=14))}) + "\n")

    def cli(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "gift_quant.cli", "recover", str(model), "--out", str(out),
                "--calib-data", str(root / "calib.txt"), "--train-data", str(root / "train.jsonl"),
                "--ppl-data", str(root / "ppl.txt"), *SMALL, *extra]

    ref, mid_train, mid_quant = root / "reference", root / "killed-in-training", root / "killed-in-quantize"
    ready = root / "paused"
    deadline = time.monotonic() + TIMEOUT
    t0 = time.perf_counter()

    procs: dict[str, subprocess.Popen] = {}
    try:
        # phase 1: the reference run, one to kill mid-training, one to kill inside the quantize stage
        procs["reference"] = _start(cli(ref), root / "reference.log")
        procs["train-kill"] = _start(cli(mid_train), root / "train-kill.log")
        procs["quant-kill"] = _start([sys.executable, str(HERE), "pause-in-gptq", str(ready), *cli(mid_quant)[3:]],
                                     root / "quant-kill.log")
        to_kill, killed = {"train-kill", "quant-kill"}, {}
        while to_kill:
            if time.monotonic() > deadline:
                pytest.fail("runs to kill never reached their kill points")
            for name in sorted(to_kill):
                p = procs[name]
                if p.poll() is not None:
                    pytest.fail(f"{name} exited (status {p.returncode}) before it was killed:\n"
                                f"{_log(root, name)[-3000:]}")
                due = _complete_lines(mid_train) >= KILL_AT_LINES if name == "train-kill" else ready.is_file()
                if due:
                    os.kill(p.pid, signal.SIGKILL)
                    killed[name] = p.wait()
                    to_kill.discard(name)
            time.sleep(0.005)

        after_kill = {
            "train": {"metrics": _metric_lines(mid_train), "state_step": _state_step(mid_train),
                      "stages": _stages(mid_train)},
            "quant": {"stages": _stages(mid_quant),
                      "blocks": sorted(p.name for p in (mid_quant / "run/quantized/run/blocks").glob("*.json"))},
        }
        partial = root / "partly-run"  # a copy of the killed-in-training folder, for the refusal tests
        shutil.copytree(mid_train, partial, symlinks=True)
        partial_files = {str(p.relative_to(partial)): p.read_bytes() for p in partial.rglob("*") if p.is_file()}

        # phase 2: rerun both killed folders with the same command
        procs["train-resume"] = _start(cli(mid_train), root / "train-resume.log")
        procs["quant-resume"] = _start(cli(mid_quant), root / "quant-resume.log")
        for name in ("reference", "train-resume", "quant-resume"):
            try:
                rc = procs[name].wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} did not finish within {TIMEOUT} s")
            assert rc == 0, f"{name} failed:\n{_log(root, name)[-4000:]}"
    finally:  # nothing this fixture started outlives it
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    yield {"root": root, "cli": cli, "ref": ref, "mid_train": mid_train, "mid_quant": mid_quant,
           "partial": partial, "partial_files": partial_files, "after_kill": after_kill, "killed": killed,
           "seconds": time.perf_counter() - t0}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_same_model(out: Path, ref: Path) -> None:
    a, b = _tensors(out / "model.safetensors"), _tensors(ref / "model.safetensors")
    assert set(a) == set(b)
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:5]}"
    assert any(k.endswith(".salient_weight") for k in a)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (out, ref))
    assert (sa["ppl_before"], sa["ppl_after"]) == (sb["ppl_before"], sb["ppl_after"])


def _assert_steps_once(out: Path) -> list[dict]:
    lines = _metric_lines(out)
    assert [m["step"] for m in lines] == list(range(1, STEPS + 1))
    return lines


# ------------------------------------------------------------------------------ tests


def test_reference_run_trained(runs):
    ref = runs["ref"]
    _assert_steps_once(ref)
    assert set(_stages(ref)) == {"quantized", "eval_before", "eval_fp", "recover", "pack", "eval_after"}
    assert _state_step(ref) == STEPS
    # training changed the salient columns: a resume bug could not hide behind an untrained model
    before, after = _tensors(ref / "run/quantized/model.safetensors"), _tensors(ref / "model.safetensors")
    moved = [k for k in after if k.endswith(".salient_weight") and not torch.equal(after[k], before[k])]
    assert moved


def test_killed_mid_training_resumes_to_the_same_model(runs):
    kill = runs["after_kill"]["train"]
    assert runs["killed"]["train-kill"] == -signal.SIGKILL
    # it really died inside training, with metrics logged after the last saved state
    assert "recover" not in kill["stages"] and {"quantized", "eval_before"} <= set(kill["stages"])
    assert kill["state_step"] is not None and kill["state_step"] % SAVE_EVERY == 0 and kill["state_step"] < STEPS
    assert kill["state_step"] <= len(kill["metrics"]) < STEPS
    assert "resuming the run" in _log(runs["root"], "train-resume")
    out = runs["mid_train"]
    _assert_same_model(out, runs["ref"])
    lines, ref_lines = _assert_steps_once(out), _metric_lines(runs["ref"])
    for got, want in zip(lines, ref_lines):  # the same losses, learning rates and gradient norms, bit for bit
        got.pop("tokens_per_s")
        want.pop("tokens_per_s")
        assert got == want, f"step {got['step']} differs from the uninterrupted run"
    assert not list((out / "run" / "recover").glob(".tmp-*"))


def test_killed_in_quantize_stage_resumes_to_the_same_model(runs):
    kill = runs["after_kill"]["quant"]
    assert runs["killed"]["quant-kill"] == -signal.SIGKILL
    assert kill["stages"] == {} and kill["blocks"] == ["block_000.json"]  # inside block 1 of the quantize stage
    assert "resuming the run" in _log(runs["root"], "quant-resume")
    out = runs["mid_quant"]
    _assert_same_model(out, runs["ref"])
    _assert_steps_once(out)


@pytest.mark.parametrize("flag,value,shown", [("--lr", "0.001", ("lr", "0.0003", "0.001")),
                                              ("--steps", str(STEPS + 6), ("steps", str(STEPS), str(STEPS + 6)))])
def test_changed_setting_into_partly_run_folder_is_refused(runs, capsys, torch_single_thread, flag, value, shown):
    """In process: ``main`` is what the console script runs; its return value is the exit status."""
    from gift_quant.cli.app import main

    partial = runs["partial"]
    cmd = runs["cli"](partial)[3:]
    if flag in cmd:
        cmd[cmd.index(flag) + 1] = value
    else:
        cmd += [flag, value]
    assert main(cmd) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("gift-quant: error:")]
    assert str(partial) in line and "different recover" in line and "--overwrite" in line
    detail = line.split("different", 1)[1].split(";")[0]  # after the folder path, before the advice
    assert all(s in detail for s in shown), f"the message should name the changed setting: {line}"
    now = {str(p.relative_to(partial)): p.read_bytes() for p in partial.rglob("*") if p.is_file()}
    assert now == runs["partial_files"], "a refused run must leave the partly-run folder untouched"


if __name__ == "__main__" and sys.argv[1:2] == ["pause-in-gptq"]:
    sys.exit(_pause_in_gptq(sys.argv[2:]))
