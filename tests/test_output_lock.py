"""One writer per output folder: a second process is refused with the holder named; stale temp folders go."""

import subprocess
import sys
import time

import pytest

from gift_quant.packed.run_folder import prepare_output
from gift_quant.util.errors import GiftQuantError


def test_second_writer_is_refused_and_lock_released_when_holder_dies(tmp_path):
    out = tmp_path / "out"
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, pathlib\n"
        "from gift_quant.packed.run_folder import prepare_output\n"
        f"prepare_output(pathlib.Path({str(out)!r}), False)\n"
        f"pathlib.Path({str(ready)!r}).write_text('x')\n"
        "time.sleep(60)\n")])
    try:
        deadline = time.time() + 60
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.1)
        assert ready.exists(), "the holder never took the lock"
        with pytest.raises(GiftQuantError, match=f"being written by gift-quant process {holder.pid}"):
            prepare_output(out, False)
    finally:
        holder.kill()
        holder.wait()
    prepare_output(out, False)  # the OS released the killed holder's lock


def test_stale_temporary_folders_are_removed_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    (out / "run" / ".tmp-state-abc").mkdir(parents=True)
    (out / "run" / "run.json").write_text("{}")
    (out / "run" / ".tmp-stages.json-x").write_text("partial")
    prepare_output(out, False)
    assert not list(out.rglob(".tmp-*")) and (out / "run" / "run.json").is_file()


def test_sigterm_stops_with_143_and_the_resume_message(tmp_path):
    """SIGTERM during a run: exit 143, one line saying how to resume, no traceback."""
    import os
    import signal

    from tiny import corpus, make_model_dir

    src = make_model_dir("llama", tmp_path / "src")
    (tmp_path / "calib.txt").write_text(corpus(3000, seed=1))
    ready = tmp_path / "ready"
    # park the quantize command inside GPTQ (deterministically) and signal it there
    code = (
        "import sys, time, pathlib\n"
        "from gift_quant.quant import engine\n"
        "real = engine.gptq_quantize\n"
        "def parked(*a, **k):\n"
        f"    pathlib.Path({str(ready)!r}).write_text('x'); time.sleep(60)\n"
        "engine.gptq_quantize = parked\n"
        "from gift_quant.cli.app import main\n"
        f"sys.exit(main(['quantize', {str(src)!r}, '--out', {str(tmp_path / 'out')!r}, '--calib-data', "
        f"{str(tmp_path / 'calib.txt')!r}, '--calib-samples', '4', '--seq-len', '32', '--salient', '4', "
        "'--device', 'cpu', '--no-progress']))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ready.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert ready.exists(), proc.stderr.read() if proc.poll() is not None else "never reached GPTQ"
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert "terminated (SIGTERM); rerun the same command to resume" in err and "Traceback" not in err


def test_written_folders_and_files_get_ordinary_permissions(tmp_path):
    """mkdtemp/mkstemp make temp folders/files private; what is published must be readable like a mkdir/open."""
    import os
    import stat

    from gift_quant.util.files import atomic_dir, atomic_write_text

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "export") as d:
            (d / "model.safetensors").write_bytes(b"x")
        atomic_write_text(tmp_path / "export" / "config.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "export").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "export" / "config.json").stat().st_mode) == 0o644
