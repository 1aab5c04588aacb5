"""What /health tells about a consumer after a Kafka outage, and how `eco2 chaos --kafka-down`
judges it (bench/resume.py). No broker: a Faust app that is created, not started."""

from __future__ import annotations

from typing import Any

from bench.resume import resumed
from contract.settings import Settings
from streams.app import create_app
from streams.watch import internals


def _health(**kw: Any) -> dict[str, Any]:
    consumer = {"flow_active": True, "rebalancing": False, "coordinator_generation": 3}
    consumer.update(kw.pop("consumer", {}))
    return {"assigned": 4, "pending": 0, "since_progress_s": 100.0, "consumer": consumer, **kw}


def test_a_consumer_with_its_flow_stopped_has_not_resumed() -> None:
    # The stalled router after a 150 s outage: pending work, Faust's flow stopped for good.
    stalled = _health(
        pending=129, since_progress_s=85.0, consumer={"flow_active": False, "rebalancing": True}
    )
    assert not resumed(stalled, fresh_s=10)
    assert not resumed(_health(pending=0, consumer={"flow_active": False}), fresh_s=10)


def test_idle_or_progressing_consumers_have_resumed() -> None:
    assert resumed(_health(pending=0), fresh_s=10)  # nothing to do
    assert resumed(_health(pending=50, since_progress_s=0.4), fresh_s=10)  # catching up
    assert not resumed(_health(pending=50, since_progress_s=30.0), fresh_s=10)  # stuck otherwise
    assert not resumed(_health(assigned=0), fresh_s=10)  # not in the group yet
    # The writer is plain aiokafka: no Faust flow to report, judged by progress alone.
    writer = {"assigned": 4, "pending": 3, "since_progress_s": 1.0}
    assert resumed(writer, fresh_s=10)


def test_internals_of_a_faust_app_name_every_field(tmp_path: Any) -> None:
    app = create_app("unit-internals", Settings(local_dir=tmp_path))
    state = internals(app)
    assert state["flow_active"] is True  # Faust's consumer starts with its flow on
    assert state["rebalancing"] is False
    assert state["fetcher"] == "init"  # its Fetcher service, not started here
    # aiokafka's consumer exists only once the consumer thread runs: missing, not an error
    assert state["coordinator_generation"] is None and state["fetch_idle_s"] is None
    assert set(state) == {
        "flow_active",
        "fetcher",
        "fetcher_tasks",
        "generation",
        "coordinator_generation",
        "coordinator_id",
        "rebalancing",
        "fetch_idle_s",
    }
