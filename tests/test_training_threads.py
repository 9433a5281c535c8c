"""Training's thread count (util/cpu_policy.training_threads): the cores idle when training starts when the
launch chose by the idle-core rule, else what the user set; always one line saying which. Pure function."""

from __future__ import annotations

from gift_quant.util.cpu_policy import training_threads


def _never():
    raise AssertionError("measured although the user fixed the thread count")


def test_policy_reapplied_at_training_start():
    assert training_threads(1, 2, True, lambda: 1.97) == (
        2, "gift-quant: training with 2 threads in one process (2 of 2 cores idle; --threads N to override)")
    n, line = training_threads(2, 2, True, lambda: 0.4)
    assert n == 1 and "0 of 2 cores idle" in line and "1 thread in" in line


def test_user_setting_is_kept_and_not_measured():
    n, line = training_threads(3, 2, False, _never)
    assert n == 3 and "--threads / OMP_NUM_THREADS" in line


def test_unreadable_idle_time_keeps_the_launch_choice():
    n, line = training_threads(2, 2, True, lambda: None)
    assert n == 2 and "set at launch" in line
