"""Faults of the environment and of the resumable state (issue #13).

* run/ is verified on resume: a finished block, training state or stage checkpoint whose file was
  flipped, truncated or never recorded is discarded and recomputed with a one-line warning, and the
  final checkpoint is identical to an uninterrupted run's (never silently different).
* Disk full, read-only file system, permission denied at the write sites of every command: exit 2, one
  line naming the path and the cause (and, for a full disk, what the step writes), no traceback.
* A killed export's ``.tmp-*`` folder is removed by the next export to the same --out.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import cli_world

from gift_quant.cli.app import main
from gift_quant.export import folder
from gift_quant.packed import checkpoint
from gift_quant.quant import engine
from gift_quant.recover import loop as train_mod
from gift_quant.workflows import commands, stages

pytestmark = pytest.mark.usefixtures("torch_single_thread")

QSMALL = ["--calib-samples", "4", "--seq-len", "32", "--salient", "4", "--device", "cpu", "--no-progress"]
RSMALL = [*QSMALL, "--steps", "4", "--save-every", "2", "--batch-size", "2", "--max-windows", "2",
          "--ppl-seq-len", "32", "--keep-intermediate"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    w = cli_world(root, n_train=40)
    w["q"] = root / "q"
    assert main(quantize_args(w, w["q"])) == 0
    return w


def quantize_args(w, out: Path, *extra) -> list[str]:
    return ["quantize", str(w["src"]), "--out", str(out), "--calib-data", str(w["calib"]), *QSMALL,
            *[str(e) for e in extra]]


def recover_args(w, out: Path) -> list[str]:
    return ["recover", str(w["src"]), "--out", str(out), "--calib-data", str(w["calib"]), "--train-data",
            str(w["train"]), "--ppl-data", str(w["ppl"]), *RSMALL]


def flip_byte(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x10
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"


def warnings_in(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [ln for ln in err.splitlines() if ln.startswith("gift-quant: warning:")]


class GPTQCalls:
    def __init__(self):
        self.n, self.real = 0, engine.gptq_quantize

    def __call__(self, *a, **k):
        self.n += 1
        return self.real(*a, **k)


# ---------------------------------------------------------------- run/ verified on resume


def _stopped_after_the_blocks(world, out: Path, capsys) -> None:
    """A quantize run stopped (Ctrl-C) after both blocks were saved, before the checkpoint was written."""
    with pytest.MonkeyPatch.context() as mp:
        def stop(*a, **k):
            raise KeyboardInterrupt
        mp.setattr(stages, "save_checkpoint", stop)
        assert main(quantize_args(world, out)) == 130
    capsys.readouterr()
    assert sorted(p.name for p in (out / "run" / "blocks").glob("*.json")) == ["block_000.json", "block_001.json"]
    assert (out / "run" / "files.json").is_file()


def test_corrupt_blocks_are_recomputed_and_the_result_is_identical(world, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    _stopped_after_the_blocks(world, out, capsys)
    flip_byte(out / "run" / "blocks" / "block_000.safetensors")
    truncate(out / "run" / "sensitivity" / "block_001.safetensors")
    calls = GPTQCalls()
    monkeypatch.setattr(engine, "gptq_quantize", calls)
    assert main(quantize_args(world, out)) == 0
    warned = warnings_in(capsys.readouterr().err)
    assert len(warned) == 2, warned
    assert "block_000.safetensors does not match the sha256" in warned[0] and "recomputing block 0" in warned[0]
    assert "block_001.safetensors" in warned[1] and "recomputing block 1" in warned[1]
    assert calls.n > 0
    same_tensors(out / checkpoint.WEIGHTS_NAME, world["q"] / checkpoint.WEIGHTS_NAME)


def test_intact_blocks_are_reused_and_unrecorded_ones_recomputed(world, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    _stopped_after_the_blocks(world, out, capsys)
    files = json.loads((out / "run" / "files.json").read_text())
    # block 1 as a SIGKILL leaves it: finished on disk, its record never written
    files = {k: v for k, v in files.items() if "block_001" not in k}
    (out / "run" / "files.json").write_text(json.dumps(files))
    calls = GPTQCalls()
    monkeypatch.setattr(engine, "gptq_quantize", calls)
    assert main(quantize_args(world, out)) == 0
    warned = warnings_in(capsys.readouterr().err)
    assert len(warned) == 1 and "no recorded sha256" in warned[0] and "recomputing block 1" in warned[0], warned
    assert calls.n == 7, "block 0 reused (no GPTQ), block 1 recomputed (7 linears)"
    same_tensors(out / checkpoint.WEIGHTS_NAME, world["q"] / checkpoint.WEIGHTS_NAME)


def test_blocks_are_recorded_as_written_so_a_sigkill_loses_none(world, tmp_path, capsys, monkeypatch):
    """A SIGKILL runs no cleanup: with the stop-time record disabled, each block is still recorded."""
    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as mp:
        def stop(*a, **k):
            raise KeyboardInterrupt
        mp.setattr(stages, "record_blocks", lambda run_dir: None)  # what a killed process never runs
        mp.setattr(stages, "save_checkpoint", stop)
        assert main(quantize_args(world, out)) == 130
    capsys.readouterr()
    recorded = json.loads((out / "run" / "files.json").read_text())
    assert {f"blocks/block_00{i}.{ext}" for i in (0, 1) for ext in ("safetensors", "json")} <= set(recorded)
    calls = GPTQCalls()
    monkeypatch.setattr(engine, "gptq_quantize", calls)
    assert main(quantize_args(world, out)) == 0
    assert warnings_in(capsys.readouterr().err) == [] and calls.n == 0  # both blocks reused
    same_tensors(out / checkpoint.WEIGHTS_NAME, world["q"] / checkpoint.WEIGHTS_NAME)


@pytest.fixture(scope="module")
def recover_reference(world):
    out = world["root"] / "recover-reference"
    assert main(recover_args(world, out)) == 0
    return out


def test_corrupt_training_state_and_stage_checkpoint_are_recomputed(world, recover_reference, tmp_path, capsys):
    """Stopped at training step 3 (state saved at 2); then the optimizer state and the quantized stage
    checkpoint are damaged. The resume retrains from step 0 and re-quantizes: the same final model."""
    out = tmp_path / "out"
    real = train_mod._Loop.step

    def step(self, s, *a, **k):
        if s == 3:
            raise KeyboardInterrupt
        return real(self, s, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod._Loop, "step", step)
        assert main(recover_args(world, out)) == 130
    capsys.readouterr()
    state = out / "run" / "recover" / "state"
    assert json.loads((state / "step.json").read_text())["step"] == 2
    flip_byte(state / "optimizer.pt")
    flip_byte(out / "run" / "quantized" / checkpoint.WEIGHTS_NAME)
    assert main(recover_args(world, out)) == 0
    warned = warnings_in(capsys.readouterr().err)
    assert any("quantized" in w and "recomputing the quantized stage" in w for w in warned), warned
    assert any("optimizer.pt" in w and "training from step 0" in w for w in warned), warned
    same_tensors(out / checkpoint.WEIGHTS_NAME, recover_reference / checkpoint.WEIGHTS_NAME)
    steps = [json.loads(ln)["step"] for ln in (out / "run" / "recover" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


# ---------------------------------------------------------------- environment faults at the write sites

ERRNOS = {errno.ENOSPC: "no space left", errno.EROFS: "read-only", errno.EACCES: "permission denied",
          errno.EPERM: "not permitted"}


def _fault(code: int, path: str | None = None):
    def fail(*a, **k):
        if code == errno.ENOSPC and path is None:  # how torch.save reports a full disk
            raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing "
                               "file data/0: file write failed")
        raise OSError(code, os.strerror(code), path)
    return fail


def _assert_one_line(rc: int, err: str, *needles: str) -> str:
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("gift-quant: error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


@pytest.mark.parametrize("code", sorted(ERRNOS), ids=[errno.errorcode[c] for c in sorted(ERRNOS)])
def test_quantize_writing_the_checkpoint(world, tmp_path, capsys, monkeypatch, code):
    monkeypatch.setattr(checkpoint, "save_model", _fault(code))
    rc = main(quantize_args(world, tmp_path / "out"))
    line = _assert_one_line(rc, capsys.readouterr().err, str(tmp_path / "out" / checkpoint.WEIGHTS_NAME),
                            ERRNOS[code])
    if code == errno.ENOSPC:
        assert "this step writes about" in line and "MB free" in line
    assert not list((tmp_path / "out").glob(".*.tmp")), "no partial weights file is left behind"


@pytest.mark.parametrize("code", sorted(ERRNOS), ids=[errno.errorcode[c] for c in sorted(ERRNOS)])
def test_quantize_into_an_unwritable_out(world, tmp_path, capsys, monkeypatch, code):
    import builtins

    real_open = builtins.open
    lock = ".out.gift-quant.lock"

    def fake_open(file, *a, **k):
        if str(file).endswith(lock):
            raise OSError(code, os.strerror(code), str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    rc = main(quantize_args(world, tmp_path / "out"))
    _assert_one_line(rc, capsys.readouterr().err, "--out", ERRNOS[code])


def test_out_under_a_file_is_one_line(world, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    rc = main(quantize_args(world, tmp_path / "a-file" / "out"))
    _assert_one_line(rc, capsys.readouterr().err, "a-file")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["ENOSPC", "EROFS"])
def test_quantize_writing_the_per_block_results(world, tmp_path, capsys, monkeypatch, code):
    import safetensors.torch  # every safetensors write goes through util.files.atomic_save_tensors -> save_file

    monkeypatch.setattr(safetensors.torch, "save_file", _fault(code))
    rc = main(quantize_args(world, tmp_path / "out"))
    _assert_one_line(rc, capsys.readouterr().err, str(tmp_path / "out" / "run"), ERRNOS[code])


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES], ids=["ENOSPC", "EACCES"])
def test_recover_saving_the_training_state(world, tmp_path, capsys, monkeypatch, code):
    monkeypatch.setattr(torch, "save", _fault(code))
    rc = main(recover_args(world, tmp_path / "out"))
    line = _assert_one_line(rc, capsys.readouterr().err, str(tmp_path / "out" / "run" / "recover" / "state"),
                            ERRNOS[code])
    if code == errno.ENOSPC:
        assert "this step writes about" in line
    assert not list((tmp_path / "out" / "run" / "recover").glob(".tmp-*")), "the temporary folder is removed"


@pytest.mark.parametrize("code", sorted(ERRNOS), ids=[errno.errorcode[c] for c in sorted(ERRNOS)])
def test_export_writing_the_folder(world, tmp_path, capsys, monkeypatch, code):
    monkeypatch.setattr(folder, "save_file", _fault(code))
    rc = main(["export", str(world["q"]), "--out", str(tmp_path / "exported")])
    line = _assert_one_line(rc, capsys.readouterr().err, str(tmp_path / "exported"), ERRNOS[code])
    if code == errno.ENOSPC:
        assert "this step writes about" in line
    assert not (tmp_path / "exported").exists() and not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("code", sorted(ERRNOS), ids=[errno.errorcode[c] for c in sorted(ERRNOS)])
def test_eval_writing_its_json(world, tmp_path, capsys, monkeypatch, code):
    import tempfile

    monkeypatch.setattr(tempfile, "mkstemp", _fault(code, str(tmp_path)))
    rc = main(["eval", str(world["q"]), "--ppl-data", str(world["ppl"]), "--seq-len", "32", "--max-windows", "2",
               "--device", "cpu", "--no-progress", "--json", str(tmp_path / "result.json")])
    _assert_one_line(rc, capsys.readouterr().err, str(tmp_path), ERRNOS[code])


def test_recover_summary_on_a_full_disk(world, recover_reference, tmp_path, capsys, monkeypatch):
    """The last write of a run (summary.json), on a resumed finished run: one line, the run stays resumable."""
    out = tmp_path / "out"
    shutil.copytree(recover_reference, out)
    (out / "summary.json").unlink()
    real = commands.atomic_write_text

    def full(path, text):
        if Path(path).name == "summary.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, text)

    monkeypatch.setattr(commands, "atomic_write_text", full)
    rc = main(recover_args(world, out))
    _assert_one_line(rc, capsys.readouterr().err, "no space left")


# ---------------------------------------------------------------- a killed export's temporary folder


def test_next_export_removes_a_killed_exports_temporary_folder(world, tmp_path, capsys):
    out = tmp_path / "exported"
    stale = tmp_path / ".tmp-exported-k1ll3d_x"  # what cache.atomic_dir leaves when the export is killed
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 100_000)
    other = tmp_path / ".tmp-exported-2-abcdefgh"  # another folder's (exported-2) export: not ours to remove
    other.mkdir()
    assert main(["export", str(world["q"]), "--out", str(out)]) == 0
    assert not stale.exists() and other.exists()
    assert (out / folder.EXPORT_INFO).is_file()
