"""The recovery study's arithmetic: gap closed per start, t-interval over starts, window bootstrap."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "recovery_study.py"


def _tool():
    spec = importlib.util.spec_from_file_location("recovery_study", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_t_interval_matches_student_t():
    study = _tool()
    mean, lo, hi = study.t_interval([0.30, 0.35, 0.40])
    sd = 0.05  # sample standard deviation of the three values
    assert mean == pytest.approx(0.35)
    assert hi - mean == pytest.approx(4.303 * sd / math.sqrt(3), rel=1e-4)
    assert math.isnan(study.t_interval([0.3])[1])


def test_report_computes_gap_closed_against_each_start(tmp_path):
    study = _tool()
    jobs = tmp_path / "runs" / "jobs"
    jobs.mkdir(parents=True)
    nll = [math.log(40.0)] * 4

    def job(name, **row):
        (jobs / f"{name}.json").write_text(json.dumps(row))

    job("fp", config="fp", bits=3, seed=0, ppl=20.0)
    for seed, start in ((0, 40.0), (1, 50.0)):
        job(f"start-s{seed}", config="start", bits=3, seed=seed, ppl=start, window_nll=nll)
    job("kd-s0", config="kd-text", bits=3, seed=0, ppl=30.0)  # closes 50 % of 40 -> 20
    job("kd-s1", config="kd-text", bits=3, seed=1, ppl=35.0)  # closes 50 % of 50 -> 20
    job("one-s0", config="paper", bits=3, seed=0, ppl=38.0, window_nll=[math.log(38.0)] * 4)
    rows = {r["config"]: r for r in study.report(tmp_path / "runs", tmp_path / "results")}
    assert rows["kd-text"]["gap_closed"] == pytest.approx([0.5, 0.5])
    assert rows["kd-text"]["gap_low"] == pytest.approx(0.5) and rows["kd-text"]["gap_high"] == pytest.approx(0.5)
    assert rows["paper"]["gap_mean"] == pytest.approx(0.1)
    assert rows["paper"]["window_low"] == pytest.approx(0.1)  # identical windows: no spread
    assert (tmp_path / "results" / "gap_closed.png").stat().st_size > 1000
    assert "kd-text" in (tmp_path / "results" / "study.md").read_text()


def test_report_scores_the_second_domain_against_its_own_start_and_fp(tmp_path):
    study = _tool()
    jobs = tmp_path / "runs" / "jobs"
    jobs.mkdir(parents=True)

    def job(name, **row):
        (jobs / f"{name}.json").write_text(json.dumps(row))

    job("fp", config="fp", bits=3, seed=0, ppl=20.0, ppl_2=10.0)
    job("start", config="start", bits=3, seed=0, ppl=40.0, ppl_2=30.0, window_nll=[math.log(40.0)] * 4,
        window_nll_2=[math.log(30.0)] * 4)
    # Wikipedia: 40 -> 30 closes 50 %; speeches: 30 -> 25 closes 25 % of 30 -> 10
    job("bw2", config="bw2+kd", bits=3, seed=0, ppl=30.0, ppl_2=25.0, window_nll=[math.log(30.0)] * 4,
        window_nll_2=[math.log(25.0)] * 4)
    row = study.report(tmp_path / "runs", tmp_path / "results")[0]
    assert row["gap_mean"] == pytest.approx(0.5) and row["gap2_mean"] == pytest.approx(0.25)
    assert row["window2_low"] == pytest.approx(0.25)
    line = next(ln for ln in (tmp_path / "results" / "study.md").read_text().splitlines() if "bw2+kd" in ln)
    assert "25.0 % (windows: 25.0 to 25.0)" in line and "50.0 %" in line
