"""`eco2 bench ab`'s arithmetic and order, and the box reference every report carries (no stack)."""

from __future__ import annotations

import pytest

from bench import ab, ab_report, boxref
from bench.harness import BenchError


def test_sides_alternate_so_drift_hits_both() -> None:
    assert ab_report.order(3) == [("A", 1), ("B", 1), ("A", 2), ("B", 2), ("A", 3), ("B", 3)]


def test_flatten_keeps_numbers_by_dotted_path_and_skips_the_rest() -> None:
    got = ab_report.flatten({"a": {"b": 1, "c": [1, 2], "d": True, "e": "x"}, "f": 2.5})
    assert got == {"a.b": 1.0, "f": 2.5}


def test_compare_gives_medians_ratio_of_medians_and_the_spread_of_pair_ratios() -> None:
    runs = [
        {"side": "A", "index": 1, "figures": {"cpu_per_job.total_ms": 40.0}},
        {"side": "B", "index": 1, "figures": {"cpu_per_job.total_ms": 20.0}},
        {"side": "A", "index": 2, "figures": {"cpu_per_job.total_ms": 60.0}},
        {"side": "B", "index": 2, "figures": {"cpu_per_job.total_ms": 45.0}},
        {"side": "A", "index": 3, "figures": {"cpu_per_job.total_ms": 50.0}},
        {"side": "B", "index": 3, "figures": {"cpu_per_job.total_ms": 25.0}},
    ]
    f = ab_report.compare(runs)["cpu_per_job.total_ms"]
    assert f["A"] == {"n": 3, "min": 40.0, "median": 50.0, "max": 60.0}
    assert f["B"]["median"] == 25.0
    assert f["ratio"] == 0.5
    assert f["pair_ratios"] == {"n": 3, "min": 0.5, "median": 0.5, "max": 0.75}


def test_a_figure_only_one_side_has_gets_no_ratio() -> None:
    f = ab_report.compare([{"side": "A", "index": 1, "figures": {"x": 1.0}}])["x"]
    assert f["B"] is None and f["ratio"] is None and f["pair_ratios"] is None


def test_cpu_per_job_in_box_units_divides_by_the_loops_cpu() -> None:
    ref = {"loop_cpu_s": 2.0, "json_cpu_s": 1.0}
    norm = boxref.normalised_cpu({"total_ms": 60.0, "by_process_ms": {"workers": 30.0}}, ref)
    assert norm is not None and norm["total"] == 30.0 and norm["by_process"] == {"workers": 15.0}
    figures = ab_report.figures({"cpu_per_job": {"total_ms": 60.0}}, ref)
    assert figures["cpu_per_job_box.total"] == 30.0 and figures["box.loop_cpu_s"] == 2.0
    assert boxref.normalised_cpu(None, ref) is None


def test_stamp_keeps_a_measured_reference_and_adds_box_units() -> None:
    report = {"box_ref": {"loop_cpu_s": 4.0, "json_cpu_s": 1.0}, "cpu_per_job": {"total_ms": 8.0}}
    boxref.stamp(report)
    assert report["cpu_per_job_box"]["total"] == 2.0


def test_the_reference_loops_really_measure_cpu() -> None:
    ref = boxref.measure(loop_n=200_000, json_n=2_000)
    assert ref["loop_cpu_s"] > 0 and ref["json_cpu_s"] > 0


@pytest.mark.parametrize("args", [[], ["nosuch"], ["load", "--out", "x"]])
def test_ab_refuses_what_it_cannot_compare(args: list[str]) -> None:
    with pytest.raises(BenchError, match="bench|--out"):
        ab.check_args(args)


def _recorded_run(monkeypatch, tmp_path, warmup_jobs: int, warmup_rc: int = 0):  # type: ignore[no-untyped-def]
    """one_run with the eco2 commands recorded instead of run; the bench writes a report."""
    import json
    from pathlib import Path

    calls: list[list[str]] = []

    def fake_eco2(side, env, args, log, timeout):  # type: ignore[no-untyped-def]
        calls.append(list(args))
        log.open("a").close()
        if args[:2] == ["bench", "pipeline"]:
            return warmup_rc
        if args[:1] == ["bench"]:
            out = Path(args[args.index("--out") + 1])
            (out / "r.json").write_text(json.dumps({"name": "load", "cpu_per_job": {"total_ms": 5.0}}))
        return 0

    monkeypatch.setattr(ab, "_eco2", fake_eco2)
    monkeypatch.setattr(ab.boxref, "measure", lambda: {"loop_cpu_s": 1.0, "json_cpu_s": 1.0})
    cfg = ab.AbConfig(base="main", bench_args=["load", "--vus", "5"], warmup_jobs=warmup_jobs)
    side = ab.Side("B", "f" * 40, tmp_path, "python", 20000)
    run = ab.one_run(cfg, side, 1, tmp_path, {}, tmp_path / "no-kafka", lambda m: None)
    return calls, run


def test_warmup_runs_an_untimed_pipeline_between_stack_up_and_the_benchmark(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    calls, run = _recorded_run(monkeypatch, tmp_path, warmup_jobs=300)
    assert [c[:2] for c in calls] == [
        ["stack", "up"],
        ["bench", "pipeline"],
        ["bench", "load"],
        ["stack", "down"],
    ]
    warm = calls[1]
    assert warm[warm.index("--jobs") + 1] == "300"
    # its report goes elsewhere than the measured run's, so the run's figures are the load's alone
    assert warm[warm.index("--out") + 1] != calls[2][calls[2].index("--out") + 1]
    assert run["warmup"]["jobs"] == 300 and run["warmup"]["returncode"] == 0
    assert "error" not in run and run["figures"]["cpu_per_job.total_ms"] == 5.0


def test_no_warmup_by_default_and_a_failed_warmup_fails_the_run(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    calls, run = _recorded_run(monkeypatch, tmp_path, warmup_jobs=0)
    assert [c[:2] for c in calls] == [["stack", "up"], ["bench", "load"], ["stack", "down"]]
    assert "warmup" not in run
    calls, run = _recorded_run(monkeypatch, tmp_path / "x", warmup_jobs=50, warmup_rc=1)
    assert [c[:2] for c in calls] == [["stack", "up"], ["bench", "pipeline"], ["stack", "down"]]
    assert "warm-up failed" in run["error"]


def test_the_cli_passes_warmup_jobs_to_the_ab_and_the_report_says_so(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from eco2.cli import app

    seen: list[ab.AbConfig] = []

    def fake_run_ab(s, cfg, echo, out):  # type: ignore[no-untyped-def]
        seen.append(cfg)
        raise BenchError("stop here")

    monkeypatch.setattr(ab, "run_ab", fake_run_ab)
    result = CliRunner().invoke(
        app, ["bench", "ab", "--base", "main", "--warmup-jobs", "400", "--", "load", "--vus", "5"]
    )
    assert (
        result.exit_code == 1 and seen[0].warmup_jobs == 400 and seen[0].bench_args == ["load", "--vus", "5"]
    )
    config = {
        "base_ref": "main",
        "base_sha": "a" * 40,
        "head_sha": "b" * 40,
        "runs": 1,
        "order": [["A", 1], ["B", 1]],
        "bench_args": ["bench", "load"],
        "base_env": "x",
        "warmup_jobs": 400,
    }
    report = {
        "title": "t",
        "config": config,
        "started_at": 0,
        "machine": {},
        "runs": [],
        "figures": {},
        "headline": [],
    }
    assert any("warm-up `eco2 bench pipeline --jobs 400`" in line for line in ab_report.markdown(report))


def test_each_side_gets_a_cluster_id_no_storage_tool_reads_as_an_option(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """140ab8c passes the id as its own argument: one starting with `-` stopped its stack."""
    for i in range(200):
        local = tmp_path / f"run{i}"
        local.mkdir()
        cluster_id = ab.seed_cluster_id(local)
        assert (local / "data" / "kafka" / "cluster.id").read_text() == cluster_id
        assert not cluster_id.startswith("-") and len(cluster_id) == 22
