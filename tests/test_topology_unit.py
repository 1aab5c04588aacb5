"""Issue 15 without a cluster: replication from one definition, the stack's layout for several
Kafka nodes and processes, idempotent stage producers, stage-group overlap detection."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import yaml

from contract.events import PIPELINE
from contract.settings import REPO_ROOT, Settings
from contract.topics import MIN_INSYNC_REPLICAS, REPLICATION_FACTOR, TOPICS, replication, stage_group
from eco2 import infra, services, stack
from eco2.topics_yaml import TOPICS_YAML
from streams import groups


def test_replication_follows_the_node_count() -> None:
    assert replication(1) == stack_rep(1, 1)
    assert replication(2) == stack_rep(2, 1)
    assert replication(3) == replication(5) == stack_rep(REPLICATION_FACTOR, MIN_INSYNC_REPLICAS)


def stack_rep(factor: int, min_insync: int):  # type: ignore[no-untyped-def]
    from contract.topics import Replication

    return Replication(factor, min_insync)


def test_strimzi_manifests_use_the_contract_replication() -> None:
    docs = [d for d in yaml.safe_load_all(TOPICS_YAML.read_text()) if d]
    assert len(docs) == len(TOPICS)
    for d in docs:
        assert d["spec"]["replicas"] == REPLICATION_FACTOR
        assert d["spec"]["config"]["min.insync.replicas"] == str(MIN_INSYNC_REPLICAS)
    kafka = next(
        d
        for d in yaml.safe_load_all((REPO_ROOT / "deploy/strimzi/kafka.yaml").read_text())
        if d and d["kind"] == "Kafka"
    )
    cfg = kafka["spec"]["kafka"]["config"]
    assert cfg["default.replication.factor"] == cfg["offsets.topic.replication.factor"] == REPLICATION_FACTOR
    assert cfg["min.insync.replicas"] == cfg["transaction.state.log.min.isr"] == MIN_INSYNC_REPLICAS


def _settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings.model_validate(
        {"local_dir": tmp_path, "kafka_bootstrap": "127.0.0.1:19000", "kafka_controller_port": 19001, **kw}
    )


def test_three_nodes_listen_two_ports_apart_and_clients_know_all(tmp_path: Path) -> None:
    s = _settings(tmp_path, kafka_nodes=3)
    assert s.kafka_bootstrap == "127.0.0.1:19000,127.0.0.1:19002,127.0.0.1:19004"
    table = services.services({"kafka"}, s)
    assert [svc.name for svc in table] == ["kafka-1", "kafka-2", "kafka-3"]
    assert [svc.url(s) for svc in table] == s.kafka_bootstrap.split(",")
    assert [n.controller_port(s) for n in infra.kafka_nodes(s)] == [19001, 19003, 19005]
    # Only the last node runs the topic creation, once the whole cluster answers.
    assert [svc.after_ready is not None for svc in table] == [False, False, True]
    assert [svc.name for svc in services.services({"kafka"}, _settings(tmp_path))] == ["kafka"]


def test_node_config_carries_the_replication(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    s = _settings(tmp_path, kafka_nodes=3)
    monkeypatch.setattr(infra.install, "ensure_kafka", lambda s: tmp_path)
    monkeypatch.setattr(infra.subprocess, "run", lambda *a, **k: SimpleNamespace(returncode=0))
    node = infra.kafka_nodes(s)[1]
    infra._kafka_prepare(s, node)
    cfg = dict(
        line.split("=", 1)
        for line in (tmp_path / "data/kafka-2/server.properties").read_text().splitlines()
        if line
    )
    assert cfg["node.id"] == "2"
    assert cfg["controller.quorum.voters"] == "1@127.0.0.1:19001,2@127.0.0.1:19003,3@127.0.0.1:19005"
    assert cfg["listeners"] == "PLAINTEXT://127.0.0.1:19002,CONTROLLER://127.0.0.1:19003"
    assert cfg["min.insync.replicas"] == cfg["transaction.state.log.min.isr"] == "2"
    assert cfg["default.replication.factor"] == cfg["offsets.topic.replication.factor"] == "3"


def test_a_cluster_id_that_starts_with_a_dash_formats(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The id is random base64: about one in 64 starts with "-", which the storage tool read as an
    option after `-t` ("expected one argument"; a private test stack then failed to start)."""
    s = _settings(tmp_path)
    calls: list[list[str]] = []
    monkeypatch.setattr(infra.install, "ensure_kafka", lambda s: tmp_path)
    monkeypatch.setattr(infra, "_kafka_cluster_id", lambda s: "-dashFirst0123456789ab")

    def run(argv: list[str], **kw: object) -> SimpleNamespace:
        calls.append(argv)
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(infra.subprocess, "run", run)
    infra._kafka_prepare(s, infra.kafka_nodes(s)[0])
    (argv,) = calls
    assert "--cluster-id=-dashFirst0123456789ab" in argv and "-t" not in argv


def test_several_processes_per_component(tmp_path: Path) -> None:
    s = _settings(tmp_path, worker_processes=3, router_processes=2, gateway_processes=2)
    names = [svc.name for svc in services.services({"app"}, s)]
    assert names == [
        "model",
        "api",
        "workers",
        "workers-2",
        "workers-3",
        "writer",
        "router",
        "router-2",
        "gateway",
        "gateway-2",
    ]
    workers = services.services({"workers"}, s)
    assert [svc.port(s) for svc in workers] == [s.workers_metrics_port + 10 * i for i in range(3)]
    assert [svc.env(s)["ECO2_METRICS_PORT"] for svc in workers] == [str(svc.port(s)) for svc in workers]
    gateways = services.services({"gateway"}, s)
    assert {svc.port(s) for svc in gateways} == {s.gateway_port} and all(g.shared_port for g in gateways)
    # One process each by default, under the historical names.
    assert [svc.name for svc in services.services({"workers", "router", "gateway"}, _settings(tmp_path))] == [
        "workers",
        "router",
        "gateway",
    ]


def test_down_stops_processes_of_another_layout(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    run = stack.run_dir(s)
    run.mkdir(parents=True)
    for name in ("kafka-1", "kafka-3", "workers-4", "redis"):
        (run / f"{name}.pid").write_text("999999\n")
    table = services.services(None, s)
    assert [svc.name for svc in stack._strays(s, table, None)] == ["kafka-1", "kafka-3", "workers-4"]
    assert [svc.name for svc in stack._strays(s, table, {"infra"})] == ["kafka-1", "kafka-3"]
    assert [svc.name for svc in stack._strays(s, table, {"workers"})] == ["workers-4"]
    lines: list[str] = []
    stack.down(s, echo=lines.append)  # every pid above is dead: their stale files go
    assert "kafka-3    was not running (not in this layout)" in lines
    assert list(run.iterdir()) == []


def test_stage_producers_are_idempotent_with_acks_all(tmp_path: Path) -> None:
    """Faust enables idempotence only in its own transactions; streams.app asks for it always.
    Fails when upstream renames the hook this relies on."""
    from streams.app import create_app

    async def build():  # type: ignore[no-untyped-def]
        app = create_app("eco2-test-idempotence", _settings(tmp_path))
        producer = app.producer._new_producer()  # type: ignore[attr-defined]
        await producer.stop()
        return producer

    # aiokafka keeps a transaction manager only with idempotence on, which also forces acks=all.
    assert asyncio.run(build())._txn_manager is not None


def test_stage_groups_name_their_stages() -> None:
    assert groups.stages_of(stage_group(PIPELINE)) == set(PIPELINE)
    assert groups.stages_of("eco2-stage-vision") == {"vision"}
    assert groups.stages_of("eco2-router") == set()

    resp = SimpleNamespace(
        groups=[
            (0, "eco2-stage-vision", "Stable", "consumer", "faust", [("m1", "c", "h", b"", b"")]),
            (0, "eco2-stage-rule", "Empty", "consumer", "", []),
            # A deliberate private group (ECO2_STAGE_OVERLAP_OK): its member ids start with the marker.
            (
                0,
                "eco2-stage-answer",
                "Stable",
                "consumer",
                "faust",
                [(f"{groups.OVERLAP_OK_CLIENT_ID}-1a2b", "c")],
            ),
        ]
    )
    assert groups._live_groups([resp]) == {"eco2-stage-vision"}


def test_overlap_check_never_blocks_a_worker_when_groups_cannot_be_listed(tmp_path: Path) -> None:
    """Kubernetes KafkaUsers may not describe other groups: the check must not stop the worker."""
    s = _settings(tmp_path, kafka_bootstrap="127.0.0.1:1")  # nothing listens there
    asyncio.run(asyncio.wait_for(groups.refuse_overlap(s, ["vision"]), 60))


def test_listens_tells_which_process_holds_a_port() -> None:
    import os
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        assert not stack.listens(os.getpid(), port)  # bound, not listening
        sock.listen()
        assert stack.listens(os.getpid(), port)
        assert not stack.listens(1, port)


def _app_docs() -> list[dict]:  # type: ignore[type-arg]
    return [
        d
        for f in sorted((REPO_ROOT / "deploy/app").glob("*.yaml"))
        for d in yaml.safe_load_all(f.read_text())
        if d
    ]


def test_shipped_autoscaling_matches_the_capacity_model() -> None:
    """docs/operations.md "Capacity model": the manifests' numbers are the model's."""
    from contract.topics import EVENTS_PARTITIONS, STAGE_PARTITIONS
    from eco2 import capacity

    docs = _app_docs()
    scaled = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ScaledObject"}
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    hpas = {d["metadata"]["name"]: d for d in docs if d["kind"] == "HorizontalPodAutoscaler"}
    for stage in PIPELINE:
        so = scaled[f"eco2-stage-{stage}"]
        env = {
            e["name"]: e.get("value")
            for c in deployments[f"eco2-stage-{stage}"]["spec"]["template"]["spec"]["containers"]
            for e in c.get("env", [])
        }
        c = int(env["ECO2_STAGE_CONCURRENCY"])
        threshold = int(so["spec"]["triggers"][0]["metadata"]["lagThreshold"])
        assert so["spec"]["maxReplicaCount"] == STAGE_PARTITIONS
        assert threshold * 2 == c, "lagThreshold = half the per-pod concurrency (headroom while pods start)"
    p = capacity.plan(30, 7.5, 10_000, c, threshold)
    assert (p.model_stage_pods, p.routers, p.gateways, p.feasible) == (3, 2, 2, True)
    assert deployments["eco2-router"]["spec"]["replicas"] == p.routers <= EVENTS_PARTITIONS
    assert scaled["eco2-writer"]["spec"]["maxReplicaCount"] <= EVENTS_PARTITIONS
    for name in ("eco2-api", "eco2-gateway"):
        assert hpas[name]["spec"]["minReplicas"] >= capacity.MIN_REPLICAS_FOR_FAILOVER
    # The provider limit the shipped 12 pods x C assume, as docs/operations.md states it.
    rpm = capacity.provider_rpm_for(STAGE_PARTITIONS, 7.5, c)
    assert f"{rpm:,.0f}" in (REPO_ROOT / "docs/operations.md").read_text()
    assert capacity.plan(30, 7.5, rpm, c, threshold).max_model_stage_pods_for_provider == STAGE_PARTITIONS


def test_a_running_worker_stops_when_an_overlapping_group_appears(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Two workers with different stage sets started at once both pass the start-up check; the
    periodic re-check stops them."""
    answers = iter([[], [], ["eco2-stage-vision"]])

    async def fake(s, stages):  # type: ignore[no-untyped-def]
        return next(answers)

    monkeypatch.setattr(groups, "overlapping_groups", fake)
    stopped: list[str] = []
    s = _settings(tmp_path)
    asyncio.run(asyncio.wait_for(groups.watch_overlap(s, ["vision", "rule"], stopped.append, 0.01), 10))
    assert len(stopped) == 1
    assert stopped[0].startswith("stopping: consumer group(s) eco2-stage-vision already run vision;")


def test_settled_after_reads_a_group_timeline() -> None:
    from bench.cluster import settled_after

    # A worker killed at t=5: its member stays until the session times out (t=15), then the
    # group rebalances; the worker added at t=12 joins within the same rebalance.
    timeline = [(4.0, "Stable", 3), (6.0, "Stable", 3), (15.0, "PreparingRebalance", 3), (18.0, "Stable", 3)]
    assert settled_after(timeline, 5.0, None) == 13.0
    assert settled_after(timeline, 12.0, 3) == 6.0
    assert settled_after(timeline, 5.0, 2) is None
    # A scale-out that rebalances between two samples still shows as the member count changing.
    assert settled_after([(1.0, "Stable", 2), (2.0, "Stable", 2), (3.0, "Stable", 3)], 1.5, 3) == 1.5


# Broker settings the local stack deliberately sets apart from the Kubernetes cluster's (each with
# its reason); every other key of the Strimzi Kafka CR's config must hold on the local brokers too.
LOCAL_ONLY = {
    "group.initial.rebalance.delay.ms": "0: a test's or benchmark's fresh group starts at once",
}


def test_every_strimzi_broker_setting_holds_on_the_local_stack(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A broker setting added to (or changed in) one of deploy/strimzi/kafka.yaml and eco2/infra.py
    alone fails here, so what the benchmarks measure is what production runs."""
    monkeypatch.setattr(infra.install, "ensure_kafka", lambda s: tmp_path)
    monkeypatch.setattr(infra.subprocess, "run", lambda *a, **k: SimpleNamespace(returncode=0))
    s = _settings(tmp_path, kafka_nodes=3)  # the cluster's replication, as the CR sets it
    infra._kafka_prepare(s, infra.kafka_nodes(s)[0])
    local = dict(
        line.split("=", 1)
        for line in (tmp_path / "data/kafka-1/server.properties").read_text().splitlines()
        if line
    )
    kafka = next(
        d
        for d in yaml.safe_load_all((REPO_ROOT / "deploy/strimzi/kafka.yaml").read_text())
        if d and d["kind"] == "Kafka"
    )
    strimzi = {k: str(v).lower() for k, v in kafka["spec"]["kafka"]["config"].items()}
    assert LOCAL_ONLY.keys() <= strimzi.keys()
    assert {k: local.get(k) for k in strimzi if k not in LOCAL_ONLY} == {
        k: v for k, v in strimzi.items() if k not in LOCAL_ONLY
    }
