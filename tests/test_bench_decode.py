"""tools/bench_decode.py runs end to end at tiny size (the measurement itself is in BENCHMARKS.md)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from test_export_gguf import ckpt, src  # noqa: F401  (tiny Llama + its quantized checkpoints)

from gift_quant.export import export

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_decode  # noqa: E402


def test_bench_decode_tiny(src, ckpt, tmp_path):  # noqa: F811
    native = ckpt("w4g32")
    specs = ["fp32", f"ckpt:{native}", f"lean:{native}"]
    if importlib.util.find_spec("llama_cpp"):  # the [cpu-serve] extra
        export(native, tmp_path / "gguf", fmt="gguf")
        specs.append(f"gguf:{tmp_path / 'gguf'}")
    out = tmp_path / "decode.json"
    assert bench_decode.main(["--tokenizer", str(src), *sum((["--model", s] for s in specs), []),
                              "--tokens", "4", "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == specs
    for r in rows:
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0 and len(r["greedy_ids"]) == 4
    assert rows[0]["speed_vs_fp32"] == pytest.approx(1.0)
    assert rows[1]["greedy_ids"] == rows[2]["greedy_ids"]  # dense_cache=False decodes the same tokens
