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
    stats = pytest.importorskip("scipy.stats")
    study = _tool()
    values = [0.30, 0.35, 0.41, 0.28]
    mean, lo, hi = study.t_interval(values)
    ref = stats.t.interval(0.95, len(values) - 1, loc=stats.tmean(values), scale=stats.sem(values))
    assert (mean, lo, hi) == pytest.approx((stats.tmean(values), *ref), rel=1e-12)
    assert math.isnan(study.t_interval([0.3])[1])


def test_report_gives_t_intervals_and_paired_differences_on_both_domains(tmp_path):
    """Three starts of bw2+kd and of one ablation: every interval against scipy's Student t on the gaps and
    on their start-by-start differences, on Wikipedia and on the held-out speeches."""
    stats = pytest.importorskip("scipy.stats")
    study = _tool()
    jobs = tmp_path / "runs" / "jobs"
    jobs.mkdir(parents=True)

    def job(name, **row):
        (jobs / f"{name}.json").write_text(json.dumps(row))

    fp, fp2 = 20.0, 10.0
    job("fp", config="fp", bits=3, seed=0, ppl=fp, ppl_2=fp2)
    start = {0: (40.0, 30.0), 1: (44.0, 31.0), 2: (38.0, 29.0)}
    final = {0: (28.0, 24.0), 1: (30.0, 23.5), 2: (27.0, 23.0)}  # bw2+kd
    frozen = {0: (31.0, 25.0), 1: (33.5, 26.0), 2: (29.0, 24.2)}  # bw2+kd-frozen
    for seed, (p1, p2) in start.items():
        job(f"start-s{seed}", config="start", bits=3, seed=seed, ppl=p1, ppl_2=p2)
        job(f"ref-s{seed}", config="bw2+kd", base="bw2+kd", tag="", bits=3, seed=seed, ppl=final[seed][0],
            ppl_2=final[seed][1])
        job(f"frozen-s{seed}", config="bw2+kd-frozen", base="bw2+kd-frozen", tag="", bits=3, seed=seed,
            ppl=frozen[seed][0], ppl_2=frozen[seed][1])
    rows = {r["config"]: r for r in study.report(tmp_path / "runs", tmp_path / "results")}

    def gaps(rec, d):
        return [(start[s][d] - rec[s][d]) / (start[s][d] - (fp, fp2)[d]) for s in range(3)]

    def interval(values):
        return stats.t.interval(0.95, len(values) - 1, loc=sum(values) / len(values), scale=stats.sem(values))

    for d, key in ((0, ""), (1, "2")):
        ref_gaps, frozen_gaps = gaps(final, d), gaps(frozen, d)
        row = rows["bw2+kd-frozen"]
        assert row[f"gap{key}_closed"] == pytest.approx(frozen_gaps)
        assert (row[f"gap{key}_low"], row[f"gap{key}_high"]) == pytest.approx(interval(frozen_gaps), rel=1e-9)
        diffs = [a - b for a, b in zip(frozen_gaps, ref_gaps)]
        assert row[f"diff{key}"] == pytest.approx(diffs) and row[f"diff{key}_seeds"] == [0, 1, 2]
        assert (row[f"diff{key}_low"], row[f"diff{key}_high"]) == pytest.approx(interval(diffs), rel=1e-9)
        assert f"diff{key}_mean" not in rows["bw2+kd"]  # no difference of the reference to itself
    # the paired interval is narrower than the unpaired one here: the starts move both configs together
    assert row["diff_high"] - row["diff_low"] < row["gap_high"] - row["gap_low"]
    md = (tmp_path / "results" / "study.md").read_text()
    header = next(ln for ln in md.splitlines() if ln.startswith("| config"))
    assert "boolq-passages:test" in header and "sotu:test" in header and "minus bw2+kd" in header
    line = next(ln for ln in md.splitlines() if ln.startswith("| bw2+kd-frozen |"))
    lo, hi = interval(diffs)  # sotu:test, the last domain above
    assert f"{100 * sum(diffs) / 3:.1f} % ({100 * lo:.1f} to {100 * hi:.1f}), 3 starts" in line
    assert (tmp_path / "results" / "gap_closed.png").stat().st_size > 1000
    csv = (tmp_path / "results" / "study.csv").read_text().splitlines()
    assert "diff2_low" in csv[0] and len(csv) == 3


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
    md = (tmp_path / "results" / "study.md").read_text().splitlines()
    line = next(ln for ln in md if ln.startswith("| bw2+kd |"))
    assert "25.0 % (windows: 25.0 to 25.0)" in line and "50.0 %" in line
