"""tools/gpu_check.py runs on a CPU at tiny shapes, without the packages a bare GPU machine lacks, so it cannot rot.

The script is what a session lent a GPU for a few minutes runs once; this runs the same code on the CPU
in a subprocess where ``datasets``, ``gguf``, ``lm_eval`` and ``gptqmodel`` cannot be imported, and
checks that the JSON has every section, finite numbers and passing equivalences.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("datasets", "gguf", "lm_eval", "gptqmodel")
SECTIONS = ("pytest_cuda", "equivalence", "build", "gptq", "prepare", "train_step", "decode")


def _without_optional_packages(tmp_path: Path) -> dict:
    """An environment whose Python sees the blocked packages as not installed.

    A None entry in sys.modules makes ``import X`` raise ImportError and ``importlib.util.find_spec(X)``
    return None, which is how transformers and peft probe for optional packages; sitecustomize puts it
    there before anything else runs, in every Python started with this environment (pytest's too).
    """
    site = tmp_path / "blocker"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import sys\n\nfor _name in {BLOCKED!r}:\n    sys.modules[_name] = None\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]), CUDA_VISIBLE_DEVICES="",
                OMP_NUM_THREADS="1")


def _numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)


def test_cpu_mode_writes_every_section_with_passing_equivalences(tmp_path):
    env = _without_optional_packages(tmp_path)
    for name in BLOCKED:  # the blocker itself works
        probe = subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True)
        assert probe.returncode != 0, name
    out = tmp_path / "check.json"
    res = subprocess.run([sys.executable, "tools/gpu_check.py", "--device", "cpu", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    doc = json.loads(out.read_text())
    assert doc["mode"] == "cpu" and "aborted" not in doc
    for name in SECTIONS:
        assert doc["sections"][name]["status"] == "ok", (name, doc["sections"][name])
    assert "skipped" in doc["sections"]["pytest_cuda"]["summary"]  # collected, skipped without CUDA

    eq = doc["sections"]["equivalence"]
    assert "float64" in eq["reference"]  # no GPU: the CPU is compared with float64 / unfused references
    assert [c["name"] for c in eq["checks"]] == ["packed_linear", "salient_matmul", "kd_loss", "checkpoint_load"]
    for check in eq["checks"]:
        assert check["passed"] and check["comparisons"], check
        assert all(c["passed"] for c in check["comparisons"]), check

    gptq = doc["sections"]["gptq"]
    assert len(gptq["seconds_per_block"]) == doc["shapes"]["layers"] and gptq["whole_7b_seconds_estimate"] > 0
    train = doc["sections"]["train_step"]
    assert {(r["method"], r["depth"]) for r in train["rows"]} == {
        (m, d) for m in ("gift-ce", "gift-kd", "lora-ce", "lora-kd") for d in (1, 2)}
    assert all(r["tokens_per_s"] > 0 for r in train["rows"])
    assert all(v["tokens_per_s_at_32"] > 0 for v in train["methods"].values())
    decode = doc["sections"]["decode"]
    assert {r["model"] for r in decode["rows"]} == {"packed", "bf16"}
    assert all(v["tokens_per_s_at_32"] > 0 for v in decode["models"].values())

    targets = {t["name"]: t for t in doc["targets"]}
    assert len(targets) == 6 and not any(t["meaningful"] for t in targets.values())
    for t in targets.values():
        # on a CPU, memory is the process's peak-RSS high-water mark: a row can read 0 and a ratio be undefined
        if "memory" not in t["name"]:
            assert t["measured"] is not None and isinstance(t["met"], bool), t
    assert all(math.isfinite(x) for x in _numbers(doc))
    assert "target: GPTQ whole 7B seconds" in res.stdout  # the table was printed


def test_time_guard_skips_what_does_not_fit_and_still_writes_the_json(tmp_path):
    out = tmp_path / "check.json"
    res = subprocess.run([sys.executable, "tools/gpu_check.py", "--device", "cpu", "--budget-s", "1", "--no-pytest",
                          "--out", str(out)], cwd=ROOT, env=_without_optional_packages(tmp_path),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert "time guard" in doc["sections"]["equivalence"]["reason"]
    assert all(doc["sections"][name]["status"] == "skipped" for name in SECTIONS)
    assert all(t["met"] is None for t in doc["targets"])


def test_watchdog_writes_the_json_and_exits_when_a_measurement_overruns(tmp_path):
    out = tmp_path / "check.json"
    script = (
        "import sys, time\n"
        f"sys.path.insert(0, {str(ROOT / 'tools')!r})\n"
        "import gpu_check as m\n"
        f"report = m.Report(m.Path({str(out)!r}), {{'sections': {{}}}})\n"
        "report.stage = 'gptq'\n"
        "m.start_watchdog(report, 0.5)\n"
        "time.sleep(60)\n")  # a measurement that would never end
    res = subprocess.run([sys.executable, "-c", script], env=_without_optional_packages(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 3, res.stderr[-3000:]
    assert json.loads(out.read_text())["aborted"]["stage"] == "gptq"
