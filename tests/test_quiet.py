"""``--no-progress`` silences every bar, the libraries' own included (transformers' "Loading weights")."""

import os
import subprocess
import sys

from tiny import corpus, make_model_dir


def test_no_progress_hides_every_bar(tmp_path):
    model = make_model_dir("llama", tmp_path / "m")
    text = tmp_path / "eval.txt"
    text.write_text(corpus(400, seed=3))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "gift_quant.cli", "eval", str(model), "--ppl-data", str(text), "--seq-len", "32",
           "--max-windows", "2", "--device", "cpu"]
    loud = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    quiet = subprocess.run(cmd + ["--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert loud.returncode == quiet.returncode == 0, quiet.stderr
    assert "it/s]" in loud.stderr  # the positive control: without the flag bars are drawn
    assert "it/s]" not in quiet.stderr and "Loading weights" not in quiet.stderr, quiet.stderr
    assert "perplexity" in quiet.stdout
