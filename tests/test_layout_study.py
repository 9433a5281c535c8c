"""tools/layout_study.py's arithmetic on made-up numbers (the runs themselves are long)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import layout_study  # noqa: E402


def fake_run(root: Path, name: str, ppl: float, bits_per_weight: float = 3.5):
    (root / name).mkdir(parents=True)
    (root / name / "gift_quant_config.json").write_text(json.dumps({"effective_bits": bits_per_weight}))
    (root / f"{name}.eval.json").write_text(json.dumps({"perplexity": ppl}))


def test_pairs_by_seed_and_interval(tmp_path):
    fake_run(tmp_path, "w3-g32-natural-s0", 40.0)
    fake_run(tmp_path, "w3-g32-compact-s0", 41.0)
    fake_run(tmp_path, "w3-g32-natural-s1", 42.0)
    fake_run(tmp_path, "w3-g32-compact-s1", 42.5)
    fake_run(tmp_path, "w4-g64-natural-s0", 30.0)  # no partner: listed, no difference
    fake_run(tmp_path, "w4-g64-compact-s1", 30.0)
    assert layout_study.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    doc = json.loads((tmp_path / "out" / "layout.json").read_text())
    w3 = next(p for p in doc["paired"] if p["bits"] == 3)
    assert w3["diffs"] == [-1.0, -0.5] and w3["mean"] == pytest.approx(-0.75)
    half = 12.706 * 0.3535533905932738 / 2 ** 0.5  # t(1) * stdev / sqrt(n)
    assert w3["ci95"] == pytest.approx([-0.75 - half, -0.75 + half])
    w4 = next(p for p in doc["paired"] if p["bits"] == 4)
    assert w4["diffs"] == [] and "ci95" not in w4
    text = (tmp_path / "out" / "layout.md").read_text()
    assert f"| 3 | 32 | 2 | -1.000, -0.500 | -0.750 | {-0.75 - half:+.3f} .. {-0.75 + half:+.3f} | - |" in text
    assert "| 4 | 64 | 0 |  | - | no seed run with both layouts | - |" in text
