"""One writer per output folder: a second process is refused with the holder named; stale temp folders go."""

import subprocess
import sys
import time

import pytest

from gift_quant.errors import GiftQuantError
from gift_quant.rundir import prepare_output


def test_second_writer_is_refused_and_lock_released_when_holder_dies(tmp_path):
    out = tmp_path / "out"
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, pathlib\n"
        "from gift_quant.rundir import prepare_output\n"
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
