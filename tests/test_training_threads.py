"""Training's thread plan (util/cpu_policy.training_plan): lanes on every core, intra-op threads on the idle
ones when the launch chose by the idle-core rule, else the user's count as the whole budget; always one line
saying which. Pure function."""

from __future__ import annotations

from gift_quant.util.cpu_policy import training_plan


def _never():
    raise AssertionError("measured although the user fixed the thread count")


def test_policy_uses_every_core_for_lanes_and_idle_ones_for_intra_op():
    workers, intra, line = training_plan(2, 1, 2, True, lambda: 0.3)  # a busy machine: lanes still use both
    assert (workers, intra) == (2, 1)
    assert line == ("gift-quant: training 2 lanes of each micro-batch in parallel, 1 thread each "
                    "(0 of 2 cores idle now; --threads N to change)")
    assert training_plan(2, 1, 16, True, lambda: 15.6)[:2] == (2, 8)  # idle cores shared between the lanes
    assert training_plan(1, 1, 2, True, lambda: 1.97)[:2] == (1, 2)  # one lane (GPU-like or cpu_lanes 1)
    assert training_plan(2, 2, 1, True, lambda: 1.0)[:2] == (1, 1)  # one core: the lanes take turns


def test_user_count_is_the_whole_budget_and_nothing_is_measured():
    assert training_plan(2, 1, 2, False, _never)[:2] == (1, 1)
    assert training_plan(2, 2, 2, False, _never)[:2] == (2, 1)
    workers, intra, line = training_plan(2, 8, 2, False, _never)
    assert (workers, intra) == (2, 4) and "--threads / OMP_NUM_THREADS" in line


def test_unreadable_idle_time_keeps_the_launch_count():
    workers, intra, line = training_plan(1, 2, 2, True, lambda: None)
    assert (workers, intra) == (1, 2) and "idle cores not readable" in line
