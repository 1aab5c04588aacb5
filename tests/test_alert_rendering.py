"""The Prometheus that `eco2 chaos --alerts` and test_alerts_live.py run: the rule file rendered
from deploy/monitoring/rules.yaml (caps explicit and reported), its scrape targets from the stack
table, the dashboard's queries with Grafana's variables substituted, and the alert watch."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench import alerts
from bench import prometheus as prom
from contract.settings import Settings

RULES_DOC = yaml.safe_load((prom.MONITORING / "rules.yaml").read_text())


def test_rule_groups_are_the_deployed_prometheusrule_spec() -> None:
    assert prom.rule_groups() == RULES_DOC["spec"]["groups"]
    rendered, changes = prom.render_rules(prom.rule_groups())
    assert rendered == {"groups": RULES_DOC["spec"]["groups"]} and changes == []


def test_caps_cut_only_what_is_longer_and_say_so() -> None:
    groups: list[dict[str, Any]] = [
        {
            "name": "g",
            "rules": [
                {
                    "alert": "Long",
                    "expr": "sum(rate(x_total[15m])) > 0 and delta(y[5m:30s]) > 0",
                    "for": "15m",
                },
                {"alert": "Short", "expr": "max(z) > 0", "for": "20s"},
                {"alert": "NoFor", "expr": "increase(w_total[10s]) > 0"},
                {"record": "r", "expr": "rate(v_total[1h])"},
            ],
        }
    ]
    rendered, changes = prom.render_rules(groups, prom.Caps(for_s=30, window_s=60))
    rules = {r.get("alert") or r.get("record"): r for r in rendered["groups"][0]["rules"]}
    assert rules["Long"]["for"] == "30s"
    assert rules["Long"]["expr"] == "sum(rate(x_total[60s])) > 0 and delta(y[60s:30s]) > 0"
    assert rules["Short"] == groups[0]["rules"][1], "already below the caps: untouched"
    assert rules["NoFor"] == groups[0]["rules"][2] and "for" not in rules["NoFor"]
    assert rules["r"]["expr"] == "rate(v_total[60s])"
    assert [(c.alert, c.what, c.real, c.rendered) for c in changes] == [
        ("Long", "for", "15m", "30s"),
        ("Long", "window", "15m", "60s"),
        ("Long", "window", "5m", "60s"),
        ("r", "window", "1h", "60s"),
    ]
    assert groups[0]["rules"][0]["for"] == "15m", "the input is not modified"
    assert prom.alert_fors(rendered) == {"Long": 30.0, "Short": 20.0, "NoFor": 0.0}
    tight, changes = prom.render_rules(groups, prom.Caps(for_s=30, for_by_alert={"Short": 5}))
    assert prom.alert_fors(tight) == {"Long": 30.0, "Short": 5.0, "NoFor": 0.0}
    assert [(c.alert, c.real, c.rendered) for c in changes] == [
        ("Long", "15m", "30s"),
        ("Short", "20s", "5s"),
    ]


def test_the_deployed_rules_capped_keep_every_alert_and_threshold() -> None:
    rendered, changes = prom.render_rules(prom.rule_groups(), prom.Caps(for_s=30, window_s=60))
    real = {r["alert"]: r for g in RULES_DOC["spec"]["groups"] for r in g["rules"]}
    fors = prom.alert_fors(rendered)
    assert set(fors) == set(real)
    for g in rendered["groups"]:
        for r in g["rules"]:
            assert fors[r["alert"]] <= 30
            windows = re.findall(r"\[([0-9a-z]+)\]", r["expr"])
            assert all(prom.seconds(w) <= 60 for w in windows), r["expr"]
            # Only durations changed: the same expression with the windows put back.
            back = r["expr"]
            for c in (c for c in changes if c.alert == r["alert"] and c.what == "window"):
                back = back.replace(f"[{c.rendered}]", f"[{c.real}]", 1)
            assert back == real[r["alert"]]["expr"]
    assert {c.alert for c in changes if c.what == "for"} == {
        a for a, r in real.items() if "for" in r and prom.seconds(r["for"]) > 30
    }


@pytest.mark.parametrize(("text", "secs"), [("90s", 90), ("15m", 900), ("1h30m", 5400), ("500ms", 0.5)])
def test_durations(text: str, secs: float) -> None:
    assert prom.seconds(text) == secs
    assert prom.seconds(prom.duration(secs)) == secs


def test_a_bad_duration_is_refused() -> None:
    with pytest.raises(ValueError):
        prom.seconds("5 minutes")


def test_targets_are_the_stack_tables_metrics_endpoints() -> None:
    s = Settings(api_port=21080, gateway_port=21081, workers_metrics_port=22101, router_metrics_port=22102,
                 writer_metrics_port=22103, worker_processes=2, router_processes=1)  # fmt: skip
    got = {t.pod: t for t in prom.targets(s)}
    assert set(got) == {"api", "gateway", "workers", "workers-2", "router", "writer"}, (
        "the model exports nothing"
    )
    assert got["api"].address == "127.0.0.1:21080" and got["api"].job == "eco2-http"
    assert got["workers-2"].address == "127.0.0.1:22111" and got["workers-2"].component == "workers"
    assert got["writer"] == prom.Target("eco2-consumers", "127.0.0.1:22103", "writer", "writer")


def test_the_config_labels_targets_as_the_pod_monitors_do() -> None:
    tgts = [prom.Target("eco2-consumers", "127.0.0.1:1", "router", "router"),
            prom.Target("eco2-http", "127.0.0.1:2", "api", "api")]  # fmt: skip
    config = prom.render_config(tgts, "rules.yaml", 1.0)
    assert config["global"] == {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"}
    assert config["rule_files"] == ["rules.yaml"]
    jobs = {j["job_name"]: j["static_configs"] for j in config["scrape_configs"]}
    assert jobs["eco2-consumers"] == [
        {"targets": ["127.0.0.1:1"], "labels": {"pod": "router", "component": "router"}}
    ]
    # Eco2ConsumerDown selects the consumers' job by the PodMonitor's name (namespace/ prefix or not).
    (down,) = [r for g in prom.rule_groups() for r in g["rules"] if r["alert"] == "Eco2ConsumerDown"]
    selector = re.search(r'job=~"([^"]+)"', down["expr"])
    assert selector is not None
    assert re.fullmatch(selector.group(1), "eco2-consumers") and re.fullmatch(
        selector.group(1), "eco2/eco2-consumers"
    )
    assert not re.fullmatch(selector.group(1), "eco2-http")


@pytest.mark.skipif(
    not shutil.which("promtool"), reason="no promtool (eco2 stack up installs Debian's prometheus)"
)
def test_promtool_accepts_the_rendered_config_and_rules(tmp_path: Path) -> None:
    rendered, _ = prom.render_rules(prom.rule_groups(), prom.Caps(for_s=30, window_s=60))
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rendered))
    config = prom.render_config(prom.targets(Settings()), "rules.yaml", 1.0)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    run = subprocess.run(["promtool", "check", "config", "prometheus.yml"], cwd=tmp_path, capture_output=True,
                         text=True)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout + run.stderr


def test_dashboard_queries_substitute_grafanas_variables(tmp_path: Path) -> None:
    real = prom.dashboard_queries()
    assert len(real) >= 10 and not any("$" in q for q in real.values())
    board: dict[str, Any] = {"panels": [{"title": "P", "targets": [
        {"refId": "A", "expr": "rate(x_total[$__rate_interval])"},
        {"refId": "B", "expr": "rate(y_total[${__rate_interval}])"},
    ]}]}  # fmt: skip
    path = tmp_path / "d.json"
    path.write_text(json.dumps(board))
    assert prom.dashboard_queries(path, "30s") == {"P A": "rate(x_total[30s])", "P B": "rate(y_total[30s])"}
    board["panels"][0]["targets"][0]["expr"] = 'x{pod=~"$pod"}'
    path.write_text(json.dumps(board))
    with pytest.raises(ValueError, match="unsubstituted"):
        prom.dashboard_queries(path)


class FakeProm:
    """/api/v1/alerts answers from a script, one answer per sample."""

    def __init__(self, script: list[list[dict[str, Any]]]) -> None:
        self.script = script

    async def alerts(self) -> list[dict[str, Any]]:
        return self.script.pop(0)


def _alert(name: str, state: str, **labels: str) -> dict[str, Any]:
    return {"labels": {"alertname": name, "severity": "warning", **labels}, "state": state}


async def test_the_watch_records_pending_firing_and_resolved() -> None:
    fake = FakeProm([
        [],
        [_alert("A", "pending", pod="p1")],
        [_alert("A", "pending", pod="p1")],
        [_alert("A", "firing", pod="p1"), _alert("B", "firing")],
        [_alert("B", "firing")],
        [],
    ])  # fmt: skip
    watch = prom.Watch(fake)  # type: ignore[arg-type]
    times = iter([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    watch.now = lambda: next(times)  # type: ignore[method-assign]
    for _ in range(6):
        await watch.sample()
    a, b = watch.seen["A"], watch.seen["B"]
    assert (a.pending_s, a.firing_s, a.resolved_s) == (1.0, 3.0, 4.0)
    assert a.labels == [{"pod": "p1"}]
    assert (b.pending_s, b.firing_s, b.resolved_s) == (3.0, 3.0, 5.0), "no `for`: firing at once"
    assert watch.active == set() and watch.ever == {"A", "B"}


def test_the_verdict_needs_firing_within_for_plus_two_scrapes_and_a_resolve() -> None:
    fors = {"A": 30.0}
    ok = alerts.judge(fors, 1.0, "A", prom.Seen(2.0, 33.0, 50.0), repaired=40.0)
    assert (ok.verdict, ok.pending_to_firing_s, ok.resolved_after_repair_s) == ("PASS", 31.0, 10.0)
    late = alerts.judge(fors, 1.0, "A", prom.Seen(2.0, 35.0, 50.0), repaired=40.0)
    assert late.verdict == "MISS", "33 s from pending to firing > 30 s + 2 scrapes"
    unresolved = alerts.judge(fors, 1.0, "A", prom.Seen(2.0, 33.0, None), repaired=40.0)
    assert unresolved.verdict == "MISS"
    assert alerts.judge(fors, 1.0, "A", None, repaired=40.0).verdict == "MISS"


def test_every_fault_names_alerts_of_the_rules() -> None:
    names = {r["alert"] for g in prom.rule_groups() for r in g["rules"]}
    for spec in alerts.FAULTS.values():
        assert set(spec.expect) <= names, spec
    assert "Eco2RedisViewRebuilding" in names  # judged by the flush fault against the rebuild's time
