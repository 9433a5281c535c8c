"""The command line's thread defaults (gift_quant/cpu_policy.py): /proc/stat deltas -> idle cores, and the
precedence --threads > OMP_NUM_THREADS > idle-core policy. Pure functions only; nothing is timed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gift_quant.cli import flags as cli_flags
from gift_quant.util.cpu_policy import decide, idle_cores, parse_proc_stat, scan_argv, threads_for

STAT_A = """cpu  1000 0 500 8000 100 0 0 0 0 0
cpu0 500 0 250 4000 50 0 0 0 0 0
cpu1 500 0 250 4000 50 0 0 0 0 0
intr 12345 0 0
ctxt 999
"""
# cpu0 busy for 20 jiffies (user), cpu1 idle for 18 and in iowait for 2
STAT_B = """cpu  1020 0 500 8018 102 0 0 0 0 0
cpu0 520 0 250 4000 50 0 0 0 0 0
cpu1 500 0 250 4018 52 0 0 0 0 0
intr 12399 0 0
"""


def test_parse_proc_stat_per_cpu_idle_counts_iowait():
    stat = parse_proc_stat(STAT_A)
    assert set(stat) == {0, 1}  # the aggregate "cpu" line is skipped
    assert stat[0] == (4050, 4800)


def test_idle_cores_from_deltas():
    a, b = parse_proc_stat(STAT_A), parse_proc_stat(STAT_B)
    assert idle_cores(a, b, [0, 1]) == pytest.approx(1.0)
    assert idle_cores(a, b, [1]) == pytest.approx(1.0)  # affinity: only the allowed cores count
    assert idle_cores(a, b, [0]) == pytest.approx(0.0)
    assert idle_cores(a, a, [0, 1]) is None  # no time elapsed
    assert idle_cores(a, b, [7]) is None


def test_threads_for_rounds_to_whole_cores_at_least_one():
    assert threads_for(0.0, 2) == 1
    assert threads_for(0.96, 2) == 1
    assert threads_for(1.4, 2) == 1
    assert threads_for(1.6, 2) == 2
    assert threads_for(2.0, 2) == 2
    assert threads_for(7.9, 4) == 4


def test_scan_argv():
    assert scan_argv(["eval", "--max-windows", "3"]) == ("eval", None)
    assert scan_argv(["recover", "--out", "x", "--threads", "3"]) == ("recover", "3")
    assert scan_argv(["recover", "--threads=2"]) == ("recover", "2")
    assert scan_argv(["--version"]) == (None, None)
    assert scan_argv(["eval", "--", "--threads", "2"]) == ("eval", None)


def _never():
    raise AssertionError("measured although the policy did not need it")


def test_flag_beats_env_and_skips_measuring():
    d = decide(["eval", "--threads", "2"], {"OMP_NUM_THREADS": "1"}, 2, _never)
    assert d.env == {"OMP_NUM_THREADS": "2"} and d.message is None


def test_bad_flag_is_left_to_argparse():
    assert decide(["eval", "--threads", "0"], {}, 2, _never).env == {}


def test_user_env_is_never_changed():
    d = decide(["recover", "--out", "x"], {"OMP_NUM_THREADS": "2"}, 2, _never)
    assert d.env == {} and d.message is None


def test_policy_busy_machine():
    d = decide(["eval"], {}, 2, lambda: 1.02)
    assert d.env == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    assert d.message == "gift-quant: 1 of 2 cores idle: using 1 thread (--threads N to override)"


def test_policy_idle_machine_is_silent_and_keeps_user_wait_policy():
    d = decide(["quantize", "--out", "x"], {"OMP_WAIT_POLICY": "ACTIVE"}, 2, lambda: 1.97)
    assert d.env == {"OMP_NUM_THREADS": "2"} and d.message is None


def test_policy_unmeasurable_leaves_thread_count():
    assert decide(["eval"], {}, 2, lambda: None).env == {"OMP_WAIT_POLICY": "PASSIVE"}


@pytest.mark.parametrize("argv", [["export", "ckpt", "--out", "x"], ["inspect", "x"], ["clean", "x"], ["--help"],
                                  ["eval", "--help"]])
def test_commands_that_do_not_compute_are_untouched(argv):
    assert decide(argv, {}, 2, _never).env == {}


def test_threads_flag_type():
    import argparse

    p = argparse.ArgumentParser()
    cli_flags.add_common(p)
    assert p.parse_args(["--threads", "3"]).threads == 3
    assert p.parse_args([]).threads is None
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit):
            p.parse_args(["--threads", bad])


def test_importing_the_cli_keeps_the_callers_settings():
    """Library use: importing gift_quant.cli.app in a process that is not the gift-quant command changes nothing."""
    code = ("import os, gift_quant.cli.app, torch; "
            "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('OMP_NUM_THREADS'))")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OMP_")}
    out = subprocess.run([sys.executable, "-c", code, "eval"], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["None", "None"]
