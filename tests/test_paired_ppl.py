"""tools/paired_ppl.py's numeric core: the paired perplexity ratio and its interval."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from paired_ppl import paired_summary  # noqa: E402


def test_constant_shift_is_an_exact_ratio_with_no_spread():
    ref = [2.0, 3.0, 2.5, 4.0]
    s = paired_summary(ref, [x - 0.1 for x in ref])
    assert s["ppl_ratio"] == pytest.approx(math.exp(-0.1)) and s["se"] == pytest.approx(0.0, abs=1e-12)
    assert s["windows_better"] == 4 and s["ci95"][0] == pytest.approx(s["ci95"][1])


def test_matches_a_float64_computation_and_brackets_the_ratio():
    g = torch.Generator().manual_seed(0)
    ref = (3 + torch.rand(40, generator=g, dtype=torch.float64)).tolist()
    other = [r + d for r, d in zip(ref, (0.02 * torch.randn(40, generator=g, dtype=torch.float64) + 0.01).tolist())]
    d = torch.tensor(other, dtype=torch.float64) - torch.tensor(ref, dtype=torch.float64)
    se = float(d.std(unbiased=True)) / math.sqrt(40)
    s = paired_summary(ref, other)
    assert s["ppl_ratio"] == pytest.approx(math.exp(float(d.mean())), rel=1e-12)
    assert s["se"] == pytest.approx(se, rel=1e-9)
    assert s["ci95"][0] < s["ppl_ratio"] < s["ci95"][1]
    assert s["windows_better"] == int((d < 0).sum())


def test_refuses_unpaired_input():
    with pytest.raises(ValueError, match="same windows"):
        paired_summary([1.0, 2.0], [1.0])
