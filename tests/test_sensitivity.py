"""Sensitivity scores of each preset against numbers computed by hand, and top-k selection order and ties.

The weights are chosen so that the clip search of the metric's quantizer Q_b has an obvious answer:
in every row the largest magnitude ``alpha`` is a positive entry and every other entry lies on the
full-range grid. A symmetric b-bit grid with clip alpha has step ``s = 2 alpha / (2^b - 1)`` and levels
``-2^(b-1) s .. (2^(b-1) - 1) s``, so the largest entry rounds to the top level ``(2^(b-1) - 1) s`` and
is the only one with an error. Any smaller clip lowers the top level and makes that one error larger,
so the full range (no clipping) wins and D = W - Q_b(W) is zero except at each row's largest entry.
Steps are powers of two, exact in float16 (how scales are stored).
"""

from __future__ import annotations

import math

import pytest
import torch

from gift_quant.quant.sensitivity import PRESETS, MetricSpec, column_scores, parse_metric, perturbation, select_salient
from gift_quant.quant.stats import ColumnStats

# 2 bits: levels {-2s, -s, 0, s}; a row's largest entry is alpha = 1.5 s and rounds to s (error s / 2).
W = torch.tensor([
    [3.0, -2.0, 2.0, 0.0],  # s = 2:   3 -> 2
    [1.0, -1.0, 0.0, 1.5],  # s = 1:   1.5 -> 1
    [0.5, 0.75, -0.5, 0.5],  # s = 0.5: 0.75 -> 0.5
])
D_2BIT = torch.tensor([
    [1.0, 0.0, 0.0, 0.0],
    [0.0, 0.0, 0.0, 0.5],
    [0.0, 0.25, 0.0, 0.0],
])

# Calibration inputs (tokens x in) and their column norms, by hand.
X = torch.tensor([
    [1.0, -2.0, 0.0, 3.0],
    [-4.0, 1.0, 2.0, 0.0],
    [2.0, 0.0, -1.0, -1.0],
])
X_INF = [4.0, 2.0, 2.0, 3.0]  # max_t |X_tj|
X_ONE = [7.0, 3.0, 3.0, 4.0]  # sum_t |X_tj|
X_TWO = [math.sqrt(21), math.sqrt(5), math.sqrt(5), math.sqrt(10)]  # sqrt(sum_t X_tj^2): 1+16+4, 4+1, 4+1, 9+1
NORMS = {"inf": X_INF, "1": X_ONE, "2": X_TWO}


def scores(spec: MetricSpec, bits: int = 2, weight: torch.Tensor = W) -> torch.Tensor:
    """What the quantization engine computes for one linear: the input norm the metric asks for, then the score."""
    return column_scores(weight, torch.tensor(NORMS[spec.rho], dtype=torch.float64), spec, bits)


def expect(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_hand_computed_input_norms_match_column_stats():
    stats = ColumnStats(4, hessian=False)
    stats.update(X[:2])
    stats.update(X[2:])  # two batches: the running norms must equal the one-pass ones
    for p, values in NORMS.items():
        torch.testing.assert_close(stats.column_norm(p), expect(values))


def test_perturbation_is_the_rounding_error_of_the_full_range_grid():
    torch.testing.assert_close(perturbation(W, PRESETS["gift"], bits=2), D_2BIT, rtol=0, atol=0)
    torch.testing.assert_close(perturbation(W, PRESETS["wanda"], bits=2), W, rtol=0, atol=0)


def test_gift_preset_is_max_perturbation_times_max_input():
    # max_i |D_ij| = [1, 0.25, 0, 0.5] times max_t |X_tj| = [4, 2, 2, 3]
    torch.testing.assert_close(scores(PRESETS["gift"]), expect([4.0, 0.5, 0.0, 1.5]))


def test_gift_preset_uses_the_metric_bits():
    # 3 bits: levels -4s .. 3s; a row's largest entry alpha = 3.5 s rounds to 3 s (error s / 2).
    w3 = torch.tensor([
        [3.5, -3.0, 1.0, 0.0],  # s = 1:   3.5 -> 3
        [0.5, 1.75, -1.5, 0.0],  # s = 0.5: 1.75 -> 1.5
    ])
    torch.testing.assert_close(perturbation(w3, PRESETS["gift"], bits=3),
                               torch.tensor([[0.5, 0.0, 0.0, 0.0], [0.0, 0.25, 0.0, 0.0]]), rtol=0, atol=0)
    # max_i |D_ij| = [0.5, 0.25, 0, 0] times [4, 2, 2, 3]
    torch.testing.assert_close(scores(PRESETS["gift"], bits=3, weight=w3), expect([2.0, 0.5, 0.0, 0.0]))
    assert not torch.equal(perturbation(w3, PRESETS["gift"], bits=2), perturbation(w3, PRESETS["gift"], bits=3))


def test_owq_preset_is_squared_perturbation_norm_times_hessian_diagonal():
    # ||D_j||_2^2 = [1, 0.0625, 0, 0.25] times ||X_j||_2^2 = sum_t X_tj^2 = [21, 5, 5, 10]
    torch.testing.assert_close(scores(PRESETS["owq"]), expect([21.0, 0.3125, 0.0, 2.5]))


def test_quik_preset_is_the_input_maximum_alone():
    torch.testing.assert_close(scores(PRESETS["quik"]), expect([4.0, 2.0, 2.0, 3.0]))
    # the weights do not matter
    torch.testing.assert_close(scores(PRESETS["quik"], weight=-7 * W), expect([4.0, 2.0, 2.0, 3.0]))


def test_wanda_preset_is_weight_l1_times_input_l2():
    # ||W_j||_1 = [3 + 1 + 0.5, 2 + 1 + 0.75, 2 + 0 + 0.5, 0 + 1.5 + 0.5] = [4.5, 3.75, 2.5, 2]
    want = [4.5 * math.sqrt(21), 3.75 * math.sqrt(5), 2.5 * math.sqrt(5), 2.0 * math.sqrt(10)]
    torch.testing.assert_close(scores(PRESETS["wanda"]), expect(want))


def test_custom_spec_norms_and_square_root_power():
    spec = parse_metric("tau=1,rho=1,gamma=0.5,d=quant")
    assert (spec.tau, spec.rho, spec.gamma, spec.perturbation, spec.square_tau) == ("1", "1", 0.5, "quant", False)
    # ||D_j||_1 = [1, 0.25, 0, 0.5] times sqrt(sum_t |X_tj|) = sqrt([7, 3, 3, 4])
    torch.testing.assert_close(scores(spec), expect([math.sqrt(7), 0.25 * math.sqrt(3), 0.0, 1.0]))


def test_custom_spec_gamma_zero_scores_the_weights_alone():
    spec = parse_metric("tau=2,rho=inf,gamma=0,d=weight")
    # ||W_j||_2 = sqrt([9 + 1 + 0.25, 4 + 1 + 0.5625, 4 + 0 + 0.25, 0 + 2.25 + 0.25]); the inputs do not count
    want = expect([math.sqrt(10.25), math.sqrt(5.5625), math.sqrt(4.25), math.sqrt(2.5)])
    torch.testing.assert_close(scores(spec), want)
    zero_inputs = column_scores(W, torch.zeros(4, dtype=torch.float64), spec, 2)
    torch.testing.assert_close(zero_inputs, want)


def test_presets_rank_columns_differently():
    picks = {name: select_salient(scores(spec), 2).tolist() for name, spec in PRESETS.items()}
    assert picks == {"gift": [0, 3], "owq": [0, 3], "quik": [0, 3], "wanda": [0, 1]}
    assert select_salient(scores(PRESETS["gift"]), 3).tolist() == [0, 1, 3]  # 0.5 beats 0
    assert select_salient(scores(PRESETS["wanda"]), 3).tolist() == [0, 1, 3]  # 2 sqrt(10) > 2.5 sqrt(5)


def test_metric_parsing_rejects_bad_settings():
    assert parse_metric("owq") is PRESETS["owq"]
    for bad in ("tau=3", "gamma=3", "d=grad", "rho=inf,beta=1", "gift-ish"):
        with pytest.raises(ValueError):
            parse_metric(bad)


# ------------------------------------------------------------------ top-k selection


def test_selection_returns_the_top_k_in_ascending_column_order():
    s = torch.tensor([0.0, 1.0, 2.0, 3.0, 9.0], dtype=torch.float64)
    assert select_salient(s, 2).tolist() == [3, 4]  # not [4, 3]: ascending, not by score
    assert select_salient(torch.tensor([9.0, 0.0, 8.0, 1.0]), 2).tolist() == [0, 2]
    assert select_salient(s, 2).dtype == torch.long


def test_ties_go_to_the_lower_column_index():
    assert select_salient(torch.tensor([2.0, 7.0, 7.0, 7.0, 1.0]), 2).tolist() == [1, 2]
    assert select_salient(torch.tensor([0.1, 5.0, 3.0, 5.0, 0.2]), 1).tolist() == [1]
    assert select_salient(torch.ones(6), 3).tolist() == [0, 1, 2]
    # quik's scores tie at columns 1 and 2 (both 2): the third pick is column 1
    assert select_salient(scores(PRESETS["quik"]), 3).tolist() == [0, 1, 3]


def test_selection_bounds():
    s = torch.arange(4, dtype=torch.float64)
    assert select_salient(s, 0).tolist() == []
    assert select_salient(s, 3).tolist() == [1, 2, 3]
    for k in (-1, 4, 5):
        with pytest.raises(ValueError, match="salient count"):
            select_salient(s, k)
