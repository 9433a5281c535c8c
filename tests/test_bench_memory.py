"""tools/bench_memory.py runs at tiny shapes (so it cannot rot), and docs/scaling.md's table is the memory model's.

The memory model (gift_quant/memory_model.py) is pure arithmetic; the document's table is printed by
``tools/bench_memory.py --table`` from it, and this test fails when the two differ.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from gift_quant.workflows import memory_model as mm

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")


def test_tiny_run_writes_json_and_table(tmp_path):
    cmd = [sys.executable, "tools/bench_memory.py", "--widths", "128", "--depths", "1,2", "--depth-width", "128",
           "--base-depth", "1", "--samples", "4", "--seq", "32", "--step-widths", "128", "--step-depth", "1",
           "--step-seq", "32", "--k", "4", "--out", str(tmp_path)]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    doc = json.loads((tmp_path / "bench_memory.json").read_text())
    assert [(r["hidden"], r["layers"]) for r in doc["quantize"]] == [(128, 1), (128, 2)]
    for r in doc["quantize"]:
        assert r["peak_beyond_mb"] >= 0 and r["predicted_beyond_mb"] > 0 and r["seconds"] > 0
    depth = doc["depth"]["128"]
    assert depth["depths"] == [1, 2] and math.isfinite(depth["seconds_per_block"])
    assert {(r["loss"], r["hidden"]) for r in doc["step"]} == {("ce", 128), ("kd", 128)}
    for r in doc["step"]:
        # the static part is exact tensor arithmetic: the model's formula must give the prepared model's bytes
        assert abs(r["static_mb"] - r["predicted_static_mb"]) <= 0.02 * r["static_mb"], r
        assert r["step_growth_mb"] >= 0 and r["predicted_growth_mb"] > 0
    assert "measured / predicted" in res.stdout
    assert (tmp_path / "bench_memory.md").read_text() == res.stdout.rstrip("\n") + "\n"


def test_scaling_doc_table_is_the_models():
    res = subprocess.run([sys.executable, "tools/bench_memory.py", "--table"], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout == mm.scaling_table()
    assert mm.scaling_table() in (ROOT / "docs" / "scaling.md").read_text(), \
        "docs/scaling.md's table is stale: paste `python tools/bench_memory.py --table` into it"


def test_formulas():
    s7 = mm.LLAMA2["7B"]
    assert abs(s7.params - 6.738e9) < 1e7  # Llama-2-7B's parameter count
    assert abs(mm.LLAMA2["70B"].params - 68.98e9) < 1e8
    # quantize beyond the weights depends on the block, not on the depth
    deep = mm.Shape("deep", 4096, 11008, 64, 32, 32)
    a = mm.quantize_memory(s7, 128, 2048, on_gpu=False)["beyond_weights"]
    assert a == mm.quantize_memory(deep, 128, 2048, on_gpu=False)["beyond_weights"]
    # checkpointing saves activation memory; a packed base is smaller than uint8 codes; a GPU teacher costs weights
    with_ckpt = mm.recover_memory(s7, batch=2, seq=2048, checkpointing=True)["device"]
    assert with_ckpt < mm.recover_memory(s7, batch=2, seq=2048, checkpointing=False)["device"]
    assert mm.recover_memory(s7, batch=2, seq=2048, base="packed")["device"] < with_ckpt
    kd = mm.recover_memory(s7, batch=2, seq=2048, teacher="gpu")
    assert kd["terms"]["teacher_weights"] == 2 * s7.params
    # K = 128 on every linear of 7B: 32 blocks x 128 x (the outputs of q, k, v, o, gate, up, down)
    assert mm.salient_params(s7, 128) == 32 * 128 * (4 * 4096 + 2 * 11008 + 4096)
