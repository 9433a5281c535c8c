"""The command line's CPU thread defaults, chosen once at launch, before torch (and its OpenMP) loads.

Why: torch starts one OpenMP thread per core, and OpenMP threads spin while they wait for each other. On a
2-core machine with one other busy process that made ``gift-quant eval`` 3.2x slower than one thread, and
README used to ask users to set ``OMP_NUM_THREADS=1`` by hand (BENCHMARKS.md, "CPU threads by default").

Policy, for the commands that compute (quantize, recover, finetune, compare, eval), in this order:

1. ``--threads N``: N threads.
2. ``OMP_NUM_THREADS`` set by the user: nothing is changed (nor ``OMP_WAIT_POLICY``).
3. Otherwise ``OMP_WAIT_POLICY=PASSIVE`` unless the user set it (waiting threads sleep instead of spinning),
   and as many threads as cores are idle right now: sampled from /proc/stat over 0.2 s on the cores this
   process may run on (sched_getaffinity), at least 1. One line on stderr says so when that is fewer
   than the cores. Where /proc/stat cannot be read the thread count is left to torch.

Training plans its threads again when it starts (``training_plan``), minutes after the launch measured, and
says so in one line: on a CPU the sequences of each micro-batch are split into lanes trained in parallel
threads (recover/lanes.py), one per core by default, each with the intra-op threads rule 3 allows. Lanes
measured faster than both intra-op threads and data-parallel processes on a shared 2-core machine
(BENCHMARKS.md), and the trained result depends neither on how many lanes run at once nor on the thread
count (tests/test_train_caches.py), so a resumed run may get another plan.

Everything goes through the environment, so OpenMP, MKL and the subprocesses of ``compare`` read the same
settings. Only the ``gift-quant`` command applies it: importing gift_quant (or calling cli.main from
Python) keeps the caller's settings, except that an explicit ``--threads`` is honoured there too.
This module imports nothing heavy; the parsing and the decision are pure functions (tests/test_cpu_policy.py).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Decision", "apply_at_launch", "apply_for_training", "decide", "idle_cores", "launched_as_command",
           "parse_proc_stat", "scan_argv", "threads_for", "training_plan"]

_COMPUTE_COMMANDS = frozenset({"quantize", "recover", "finetune", "compare", "eval"})
_SAMPLE_SECONDS = 0.2


def parse_proc_stat(text: str) -> dict[int, tuple[int, int]]:
    """Per-CPU (idle, total) jiffies from the text of /proc/stat; idle counts iowait too."""
    out: dict[int, tuple[int, int]] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit():
            continue
        fields = [int(x) for x in rest.split()]
        # user nice system idle iowait irq softirq steal [guest guest_nice: already inside user/nice]
        main = fields[:8]
        idle = main[3] + (main[4] if len(main) > 4 else 0)
        out[int(name[3:])] = (idle, sum(main))
    return out


def idle_cores(before: Mapping[int, tuple[int, int]], after: Mapping[int, tuple[int, int]],
               cpus: Sequence[int]) -> float | None:
    """How many of ``cpus`` were idle between two /proc/stat samples (sum of idle fractions); None when no
    CPU of ``cpus`` shows any elapsed time."""
    total = 0.0
    seen = False
    for cpu in cpus:
        if cpu not in before or cpu not in after:
            continue
        d_idle = after[cpu][0] - before[cpu][0]
        d_total = after[cpu][1] - before[cpu][1]
        if d_total <= 0:
            continue
        seen = True
        total += min(1.0, max(0.0, d_idle / d_total))
    return total if seen else None


def threads_for(idle: float, cores: int) -> int:
    """Threads to use with ``idle`` idle cores out of ``cores``: the nearest whole core, at least 1."""
    return max(1, min(cores, int(idle + 0.5)))


def _allowed_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def _measure_idle(cpus: Sequence[int], seconds: float = _SAMPLE_SECONDS) -> float | None:
    """Idle cores among ``cpus`` over the next ``seconds`` (None where /proc/stat is not readable)."""
    stat = Path("/proc/stat")
    try:
        before = parse_proc_stat(stat.read_text())
        time.sleep(seconds)
        after = parse_proc_stat(stat.read_text())
    except (OSError, ValueError):
        return None
    return idle_cores(before, after, cpus)


def scan_argv(argv: Sequence[str]) -> tuple[str | None, str | None]:
    """(subcommand, raw --threads value) from the command line, before argparse sees it (argparse validates
    it later). The top-level parser has no option that takes a value, so the first word is the command."""
    command = None
    threads = None
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if command is None and not arg.startswith("-"):
            command = arg
        elif arg == "--threads":
            threads = argv[i + 1] if i + 1 < len(argv) else ""
        elif arg.startswith("--threads="):
            threads = arg.split("=", 1)[1]
    return command, threads


@dataclass
class Decision:
    env: dict[str, str] = field(default_factory=dict)  # variables to set
    message: str | None = None  # one line for stderr


def decide(argv: Sequence[str], env: Mapping[str, str], cores: int,
           measure: Callable[[], float | None]) -> Decision:
    """What the launch sets: flag over the user's OMP_NUM_THREADS over the idle-core policy. ``measure``
    (idle cores right now) is called only when the policy needs it."""
    command, flag = scan_argv(argv)
    if command not in _COMPUTE_COMMANDS or "-h" in argv or "--help" in argv:
        return Decision()
    if flag is not None:
        if flag.isdigit() and int(flag) >= 1:
            return Decision({"OMP_NUM_THREADS": str(int(flag))})
        return Decision()  # argparse reports the bad value
    if "OMP_NUM_THREADS" in env:
        return Decision()
    out = Decision()
    if "OMP_WAIT_POLICY" not in env:
        out.env["OMP_WAIT_POLICY"] = "PASSIVE"
    idle = measure()
    if idle is None:
        return out
    n = threads_for(idle, cores)
    out.env["OMP_NUM_THREADS"] = str(n)
    if n < cores:
        s = "" if n == 1 else "s"
        out.message = (f"gift-quant: {int(idle + 0.5)} of {cores} cores idle: using {n} thread{s} "
                       f"(--threads N to override)")
    return out


# True once apply_at_launch chose the thread count by rule 3 (neither --threads nor the user's OMP_NUM_THREADS)
_CHOSEN_BY_POLICY = False


def training_plan(lanes: int, current: int, cores: int, chosen_by_policy: bool,
                  measure: Callable[[], float | None]) -> tuple[int, int, str]:
    """(lane threads, intra-op threads each, the one line saying so) for training (recover/lanes.py).

    Lanes meet once per micro-batch, so they may share cores with other processes; intra-op threads meet at
    every operation, so they keep rule 3 (the cores idle now). ``current``: the process's thread count;
    with the user's setting (not ``chosen_by_policy``) that count is the whole budget and nothing is measured.
    """
    if chosen_by_policy:
        idle = measure()
        threads = current if idle is None else threads_for(idle, cores)  # intra-op: the idle cores (rule 3)
        workers = max(1, min(lanes, cores))  # lanes: every core
        why = ("idle cores not readable" if idle is None else f"{int(idle + 0.5)} of {cores} cores idle now") + \
            "; --threads N to change"
    else:  # the user's count is the budget of everything
        threads = current
        workers = max(1, min(lanes, current))
        why = "--threads / OMP_NUM_THREADS or the caller's setting"
    intra = max(1, threads // workers)
    s = "" if intra == 1 else "s"
    if workers > 1:
        return workers, intra, (f"gift-quant: training {workers} lanes of each micro-batch in parallel, "
                                f"{intra} thread{s} each ({why})")
    return 1, intra, f"gift-quant: training with {intra} thread{s} in one process ({why})"


def apply_for_training(lanes: int) -> tuple[int, str]:
    """Set torch's intra-op threads for the training loop; (lane threads, the line to show)."""
    import torch

    cpus = _allowed_cpus()
    workers, intra, line = training_plan(lanes, torch.get_num_threads(), len(cpus), _CHOSEN_BY_POLICY,
                                         lambda: _measure_idle(cpus))
    torch.set_num_threads(intra)
    return workers, line


def launched_as_command() -> bool:
    """True in the ``gift-quant`` console script and in ``python -m gift_quant.cli``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name in ("gift_quant.cli", "gift_quant.cli.__main__", "gift_quant.cli.app"):
        return True
    return Path(sys.argv[0]).name in ("gift-quant", "gift-quant.exe")


def apply_at_launch() -> None:
    """Set the thread environment for this command line; a no-op unless this process is the command and
    before torch is imported (OpenMP reads its variables once, when it loads)."""
    if not launched_as_command() or "torch" in sys.modules:
        return
    cpus = _allowed_cpus()
    d = decide(sys.argv[1:], os.environ, len(cpus), lambda: _measure_idle(cpus))
    global _CHOSEN_BY_POLICY
    _CHOSEN_BY_POLICY = "OMP_NUM_THREADS" in d.env and scan_argv(sys.argv[1:])[1] is None
    os.environ.update(d.env)
    if d.message:
        print(d.message, file=sys.stderr)
