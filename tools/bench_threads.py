"""Wall time of the command line's CPU thread defaults against torch's old default and the hand-tuned setting.

Issue #15 asks that the default run on a machine with other busy processes is not several times slower
than the tuned one (``OMP_NUM_THREADS=1``). This runs ``gift-quant eval`` and a scaled-down ``gift-quant
recover`` on the default model, interleaved (ABCDE ABCDE ...), under these settings:

    A  old default   OMP_NUM_THREADS=<cores> (what torch picked before)   + a competing CPU-bound process
    B  tuned         OMP_NUM_THREADS=1                                    + competitor
    C  new default   no OMP_* variables (gift_quant/util/cpu_policy.py)  + competitor
    D  new default, no competitor
    E  old default, no competitor                                        (D vs E: free cores still used)
    F  (--variants F) OMP_NUM_THREADS=<cores> OMP_WAIT_POLICY=PASSIVE     + competitor (waiting policy alone)

The timed ``recover`` resumes a copy of one prepared output folder whose quantize and first evaluation
stages are done (prepared once, one thread, stopped with SIGTERM when training starts; --prepared keeps it):
it times what follows quantization (loading, --steps of training, packing, the final perplexity). GPTQ's
column loop, most of the quantize stage, already runs single-threaded (gift_quant/util/threads.py).

The competitor is ``python -c "while True: pass"``, started before and killed after each run that wants it.
Before measuring it waits (polling every --poll s, at most --wait-max-min) for the 1-minute load average to
drop below --quiet-load, and records the load before and after. Prints a table (median wall time, ratio to
B) and writes every run to --json.

    python tools/bench_threads.py --repeats 2 --json results/bench-threads/bench_threads.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-135m-w3.yaml"
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

VARIANTS = {
    "A": (f"old default (OMP_NUM_THREADS={CORES})", {"OMP_NUM_THREADS": str(CORES)}, True),
    "B": ("tuned (OMP_NUM_THREADS=1)", {"OMP_NUM_THREADS": "1"}, True),
    "C": ("new default (no variables)", {}, True),
    "D": ("new default, no competitor", {}, False),
    "E": (f"OMP_NUM_THREADS={CORES}, no competitor", {"OMP_NUM_THREADS": str(CORES)}, False),
    "F": (f"OMP_NUM_THREADS={CORES} + OMP_WAIT_POLICY=PASSIVE",
          {"OMP_NUM_THREADS": str(CORES), "OMP_WAIT_POLICY": "PASSIVE"}, True),
}


def gift_quant_exe() -> str:
    exe = Path(sys.executable).with_name("gift-quant")
    return str(exe) if exe.exists() else (shutil.which("gift-quant") or "gift-quant")


def commands(args, out_dir: Path) -> dict[str, list[str]]:
    exe = gift_quant_exe()
    model = [args.model] if args.model else []
    recipe = str(args.recipe)
    return {
        "eval": [exe, "eval", *model, "--recipe", recipe, "--max-windows", str(args.eval_windows), "--no-progress"],
        "recover": [exe, "recover", *model, "--recipe", recipe, "--bits", "3", "--calib-samples",
                    str(args.calib_samples), "--steps", str(args.steps), "--max-windows", str(args.recover_windows),
                    "--out", str(out_dir), "--no-progress"],
    }


def prepare_recover(cmd: list[str], out: Path) -> dict:
    """Run ``cmd`` (a recover into ``out``) until training starts, then stop it (SIGTERM: resumable)."""
    if (out / "run").exists() and (out / ".prepared").exists():
        return json.loads((out / ".prepared").read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_"))}
    env["OMP_NUM_THREADS"] = "1"
    t0 = time.perf_counter()
    proc = subprocess.Popen([*cmd, "--overwrite"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    seen = []
    for line in proc.stderr:
        seen.append(line.rstrip())
        if "now training" in line:
            proc.send_signal(signal.SIGTERM)
            break
    proc.communicate()
    if not any("now training" in x for x in seen):
        raise SystemExit("preparing the recover folder failed:\n" + "\n".join(seen[-10:]))
    info = {"seconds": round(time.perf_counter() - t0, 1), "line": next(x for x in seen if "now training" in x)}
    (out / ".prepared").write_text(json.dumps(info))
    return info


def load1() -> float:
    return os.getloadavg()[0]


def wait_quiet(args) -> dict:
    start = time.time()
    polls = [round(load1(), 2)]
    while polls[-1] >= args.quiet_load and time.time() - start < args.wait_max_min * 60:
        print(f"load {polls[-1]:.2f} >= {args.quiet_load}: waiting {args.poll:.0f} s "
              f"({(time.time() - start) / 60:.0f}/{args.wait_max_min:.0f} min)", flush=True)
        time.sleep(args.poll)
        polls.append(round(load1(), 2))
    quiet = polls[-1] < args.quiet_load
    return {"waited_s": round(time.time() - start), "load_polls": polls, "quiet": quiet}


def run_once(cmd: list[str], env_extra: dict, competitor: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_"))}
    env.update(env_extra)
    comp = None
    if competitor:
        comp = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(1.0)  # let it take its core (the new default samples the load at start)
    try:
        load_before = load1()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            stdout, stderr = proc.communicate()
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
        wall = time.perf_counter() - t0
    finally:
        if comp is not None:
            comp.kill()
            comp.wait()
    policy_line = next((ln for ln in stderr.splitlines() if "cores idle" in ln), None)
    return {"wall_s": round(wall, 2), "rc": proc.returncode, "load1_before": round(load_before, 2),
            "load1_after": round(load1(), 2), "policy_line": policy_line,
            # the temporary output folder is this machine's path: recorded as OUT, as a user would type it
            "last_line": re.sub(r"\S*/bench-threads-[^/\s]+/", "OUT/", (stdout.strip().splitlines() or [""])[-1]),
            "stderr_tail": stderr.strip().splitlines()[-3:] if proc.returncode else None}


def _stage_seconds(out: Path) -> dict | None:
    try:
        return json.loads((out / "summary.json").read_text()).get("seconds")
    except (OSError, ValueError):
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="ABCDE", help="letters of the settings to run, in order (default ABCDE)")
    ap.add_argument("--recover-variants", default=None, help="recover runs only these (default: --variants)")
    ap.add_argument("--commands", default="eval,recover", help="eval, recover or both (default)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--eval-windows", type=int, default=20, help="eval: perplexity windows of 512 tokens")
    ap.add_argument("--calib-samples", type=int, default=16, help="recover: calibration windows")
    ap.add_argument("--steps", type=int, default=10, help="recover: training steps")
    ap.add_argument("--recover-windows", type=int, default=4, help="recover: perplexity windows")
    ap.add_argument("--quiet-load", type=float, default=1.5, help="wait until the 1-min load average is below")
    ap.add_argument("--wait-max-min", type=float, default=40.0)
    ap.add_argument("--poll", type=float, default=60.0)
    ap.add_argument("--json", default="results/bench-threads/bench_threads.json")
    ap.add_argument("--prepared", default=str(Path(tempfile.gettempdir()) / "bench-threads-prepared"),
                    help="the recover folder stopped where training starts (made once, then reused)")
    ap.add_argument("--prepare-only", action="store_true", help="make --prepared and stop")
    ap.add_argument("--model", default=None, help="model folder for both commands (default: the embedded model)")
    ap.add_argument("--recipe", default=str(RECIPE), help="recipe of both commands (default: %(default)s)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the competitor and the run are stopped

    names = [c.strip() for c in args.commands.split(",") if c.strip()]
    prepared = Path(args.prepared)
    prep = None
    if "recover" in names or args.prepare_only:
        prep = prepare_recover(commands(args, prepared)["recover"], prepared)
        print(f"prepared {prepared} ({prep['line']})", flush=True)
        if args.prepare_only:
            return 0
    wait = wait_quiet(args)
    print(f"load {wait['load_polls'][-1]:.2f} after {wait['waited_s']} s "
          f"({'quiet' if wait['quiet'] else 'never got quiet: measuring anyway'})", flush=True)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as tmp:
        warm = commands(args, Path(tmp) / "warm")["eval"][:]
        warm[warm.index("--max-windows") + 1] = "1"
        subprocess.run(warm, cwd=ROOT, capture_output=True, check=False)  # data and model caches, page cache
        for r in range(args.repeats):
            for v in args.variants:
                label, env_extra, competitor = VARIANTS[v]
                for name in names:
                    if name == "recover" and v not in (args.recover_variants or args.variants):
                        continue
                    out_dir = Path(tmp) / f"{name}-{v}-{r}"
                    cmd = commands(args, out_dir)[name]
                    if name == "recover":
                        shutil.copytree(prepared, out_dir, ignore=shutil.ignore_patterns(".prepared"))
                    res = run_once(cmd, env_extra, competitor)
                    res.update({"variant": v, "label": label, "command": name, "repeat": r,
                                "competitor": competitor, "env": env_extra})
                    if name == "recover" and res["rc"] == 0:
                        res["stage_seconds"] = _stage_seconds(out_dir)
                        shutil.rmtree(out_dir, ignore_errors=True)
                    runs.append(res)
                    flag = "" if res["rc"] == 0 else f"  FAILED rc={res['rc']}: {res['stderr_tail']}"
                    print(f"[{r}] {v} {name:8s} {res['wall_s']:8.1f} s  load {res['load1_before']:.2f}"
                          f"{'  ' + res['policy_line'] if res['policy_line'] else ''}{flag}", flush=True)
    table = []
    for name in names:
        ok = {v: [x["wall_s"] for x in runs if x["command"] == name and x["variant"] == v and x["rc"] == 0]
              for v in args.variants}
        ok = {v: x for v, x in ok.items() if x}
        tuned = statistics.median(ok["B"]) if ok.get("B") else None
        for v in ok:
            med = statistics.median(ok[v])
            table.append({"command": name, "variant": v, "label": VARIANTS[v][0], "competitor": VARIANTS[v][2],
                          "median_s": round(med, 1), "runs_s": ok[v],
                          "vs_tuned": round(med / tuned, 2) if tuned else None})
    print()
    print("| command | setting | competitor | median wall s (runs) | vs tuned (B) |")
    print("|---|---|---|---|---|")
    for row in table:
        runs_s = ", ".join(f"{x:.1f}" for x in row["runs_s"])
        ratio = f"{row['vs_tuned']:.2f}x" if row["vs_tuned"] is not None else "-"
        print(f"| {row['command']} | {row['variant']}: {row['label']} | {'yes' if row['competitor'] else 'no'} | "
              f"{row['median_s']:.1f} ({runs_s}) | {ratio} |")
    meds = {(row["command"], row["variant"]): row["median_s"] for row in table}
    free_cores = {name: round(meds[(name, "D")] / meds[(name, "E")], 2)
                  for name in names if (name, "D") in meds and (name, "E") in meds}
    for name, ratio in free_cores.items():
        print(f"{name}: new default / OMP_NUM_THREADS={CORES}, both without competitor (D / E): {ratio:.2f}x")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "argv": ["python", "tools/bench_threads.py", *sys.argv[1:]], "cores": CORES,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
        "date": time.strftime("%Y-%m-%d %H:%M"), "wait": wait, "recover_prepared": prep, "load1_end": round(load1(), 2),
        "table": table, "d_over_e": free_cores, "runs": runs}, indent=1))
    print(f"\nwrote {out}")
    return 0 if all(x["rc"] == 0 for x in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
