"""benchmarks/run.py (the one benchmark entry point) and benchmarks/write_docs.py, on stand-in
benchmark scripts: a missing script stops everything, a failing one is reported, figures and
the docs page come from the scripts' JSON."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import run as bench_run  # noqa: E402
import write_docs  # noqa: E402

GOOD = """
import argparse, json
p = argparse.ArgumentParser(); p.add_argument("--out")
p.add_argument("--quick", action="store_true")
a = p.parse_args()
json.dump({"figures": [{"name": "speedup", "value": 123.4, "unit": "x", "goal": ">= 100",
                        "met": True}], "quick": a.quick}, open(a.out, "w"))
"""
NO_FIGURES = """
import argparse, json
p = argparse.ArgumentParser(); p.add_argument("--out"); a = p.parse_args()
json.dump({"step_ms": 12.5, "nested": {"peak_mib": 300}}, open(a.out, "w"))
"""
FAILS = "import sys; sys.exit(4)\n"


@pytest.fixture
def bench_dir(tmp_path, monkeypatch):
    scripts = tmp_path / "benchmarks"
    scripts.mkdir()
    for name, body in (("good", GOOD), ("plain", NO_FIGURES), ("fails", FAILS)):
        (scripts / f"bench_{name}.py").write_text(textwrap.dedent(body))
    benches = (bench_run.Benchmark("good", "bench_good.py", "a good one", quick_args=("--quick",)),
               bench_run.Benchmark("plain", "bench_plain.py", "numbers only"),
               bench_run.Benchmark("fails", "bench_fails.py", "exits 4"),
               bench_run.Benchmark("gone", "bench_gone.py", "not there"))
    monkeypatch.setattr(bench_run, "BENCH", scripts)
    monkeypatch.setattr(bench_run, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(bench_run, "BENCHMARKS", benches)
    monkeypatch.setattr(bench_run, "BY_NAME", {b.name: b for b in benches})
    return tmp_path


def test_a_missing_script_stops_the_run_before_anything_runs(bench_dir, capsys):
    assert bench_run.main(["--only", "good,gone"]) == 2
    err = capsys.readouterr().err
    assert "bench_gone.py" in err and "--skip gone" in err
    assert not (bench_dir / "results").exists()
    assert bench_run.main(["--only", "nosuch"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
    # A script's own arguments go through only when one script runs.
    assert bench_run.main(["--only", "good,plain", "--repeats", "3"]) == 2
    assert "single --only NAME" in capsys.readouterr().err
    assert not (bench_dir / "results").exists()


def test_figures_failures_and_the_docs_page(bench_dir, capsys):
    out = bench_dir / "all.json"
    assert bench_run.main(["--skip", "gone", "--out", str(out)]) == 1  # "fails" failed
    data = json.loads(out.read_text())
    assert data["complete"] and data["machine"]["logical_cpus"] >= 1 and data["date_utc"]
    by_name = {b["name"]: b for b in data["benchmarks"]}
    assert by_name["good"]["figures"][0]["value"] == 123.4 and by_name["good"]["error"] is None
    assert "bench_good.py --out" in by_name["good"]["command"]
    assert by_name["good"]["peak_rss_mib"] > 0 and by_name["good"]["wall_s"] > 0
    # Without a figures list every number is a figure, named by its key path.
    assert {f["name"]: f["value"] for f in by_name["plain"]["figures"]} == {
        "step_ms": 12.5, "nested.peak_mib": 300}
    assert by_name["fails"]["error"] == "exit status 4" and by_name["fails"]["figures"] == []
    assert "1 benchmark(s) failed: fails" in capsys.readouterr().err

    page = write_docs.render([data])
    assert "| speedup | 123 x | >= 100 | yes |" in page
    assert "**FAILED**: exit status 4" in page
    assert data["machine"]["cpu_model"] in page and by_name["good"]["command"] in page


def test_quick_runs_pass_quick_arguments_and_never_write_the_docs(bench_dir):
    assert bench_run.main(["--quick", "--docs"]) == 2
    assert bench_run.main(["--quick", "--only", "good"]) == 0
    data = json.loads((bench_dir / "results" / "quick" / "all.json").read_text())
    assert data["quick"] and data["benchmarks"][0]["results"]["quick"] is True
    assert "smoke run" in write_docs.render([data])
