"""Issue 20's proof: a fifth stage is one line in contract/ plus one agent, nothing else.

On a scratch copy of the tracked tree, the test adds the line to `contract/pipeline.py` and an
agent (with its output model) to the end of `streams/agents.py`, regenerates (`eco2 deploy all`,
`eco2 contract`) and finds the stage in every derived artefact. Then it runs a job through the
five-stage pipeline of that copy on the real Kafka, with topics of its own (ECO2_TOPIC_PREFIX)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from contract.events import QUEUED, ScanJob, is_terminal, make_event, now
from contract.settings import Settings
from contract.topics import partition_for

from .conftest import REPO
from .gateway_support import free_port

NEW = "audit"
STAGE_LINE = f'    Stage("{NEW}", "rewarded jobs waiting for the audit"),\n'
AGENT = f'''

class AuditOutput(BaseModel):
    audit: dict[str, Any] | None = None


@stage("{NEW}", AuditOutput)
async def {NEW}(ctx: Context, job: ScanJob) -> AuditOutput:
    """Check the reward against the rules (no model call)."""
    return AuditOutput(audit={{"granted": bool((job.reward or {{}}).get("granted")), "rules": job.rules_key}})
'''
GENERATED = {
    "deploy/strimzi/topics.yaml",
    "deploy/app/stages.yaml",
    "deploy/strimzi/users.yaml",
    "docs/contracts/asyncapi.yaml",
    "docs/contracts/openapi-gateway.json",
    "docs/contracts/openapi-scan-api.json",
}


def tracked_copy(dest: Path) -> None:
    """The tracked files of the checkout as they are now (benchmark reports left out: big, unread)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in files.decode().split("\0"):
        if not rel or rel.startswith("bench/reports/") or not (REPO / rel).is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel)
    if (REPO / ".eco2.env").is_file():  # the same stack (ports) as this test process
        shutil.copy2(REPO / ".eco2.env", dest / ".eco2.env")


def add_stage(tree: Path) -> None:
    """The whole change: one line in contract/pipeline.py's SPEC, one agent at the end of agents.py."""
    pipeline = tree / "contract" / "pipeline.py"
    text = pipeline.read_text()
    start = text.index("SPEC: tuple[Stage, ...] = (\n")
    end = text.index("\n)\n", start) + 1
    pipeline.write_text(text[:end] + STAGE_LINE + text[end:])
    with open(tree / "streams" / "agents.py", "a") as f:
        f.write(AGENT)


def run_in(tree: Path, code: str, env: dict[str, str] | None = None) -> str:
    """Python `code` run with the scratch tree's packages (not this checkout's)."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree), "ECO2_LOCAL_DIR": str(tree / ".local"), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def snapshot(tree: Path) -> dict[str, bytes]:
    return {str(p.relative_to(tree)): p.read_bytes() for p in tree.rglob("*") if p.is_file()}


DERIVED = """
import json
from contract import events, topics
from contract.settings import Settings
from fastapi.testclient import TestClient
from gateway.app import create_app
from persistence import store
from streams import registry

registry.check()
print(json.dumps({
    "pipeline": events.PIPELINE,
    "stages": events.STAGES,
    "success_seqs": events.SUCCESS_SEQS,
    "progress": events.PROGRESS,
    "stage_topics": topics.STAGE_TOPICS,
    "topics": {t.name: t.partitions for t in topics.TOPICS},
    "settings_stages": Settings(_env_file=None).stages,
    "columns": [c.name for c in store.columns()],
    "config": TestClient(create_app()).get("/config.json").json(),
}))
"""


@pytest.fixture(scope="module")
def five_stage_tree(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, set[str], dict[str, Any]]]:
    """(scratch tree with the fifth stage, files regeneration changed, derived values)."""
    tree = tmp_path_factory.mktemp("five-stages")
    tracked_copy(tree)
    before = snapshot(tree)
    add_stage(tree)
    edited = {p for p, b in snapshot(tree).items() if before.get(p) != b}
    assert edited == {"contract/pipeline.py", "streams/agents.py"}
    regenerate = "import sys\nfrom eco2.cli import app\nsys.argv = ['eco2', *sys.argv[1:]]\napp()\n"
    run_in(tree, regenerate.replace("sys.argv[1:]", "['deploy', 'all']"))
    run_in(tree, regenerate.replace("sys.argv[1:]", "['contract']"))
    after = snapshot(tree)
    changed = {p for p, b in after.items() if before.get(p) != b and not p.startswith(".local/")}
    derived = json.loads(run_in(tree, DERIVED))
    yield tree, changed, derived


def test_regeneration_touches_only_generated_files(
    five_stage_tree: tuple[Path, set[str], dict[str, Any]],
) -> None:
    _, changed, _ = five_stage_tree
    assert changed - {"contract/pipeline.py", "streams/agents.py"} == GENERATED


def test_every_derived_artefact_has_the_new_stage(
    five_stage_tree: tuple[Path, set[str], dict[str, Any]],
) -> None:
    tree, _, d = five_stage_tree
    topic, group = f"scan.{NEW}", f"eco2-stage-{NEW}"
    prev = d["pipeline"][-2]

    # The contract: stage list, seqs (done moves from 51 to 61), progress, topics, settings.
    assert d["pipeline"][-1] == NEW and len(d["pipeline"]) == 5
    assert d["stages"][-2:] == [NEW, "done"]
    assert d["success_seqs"][-3:] == [50, 51, 61]
    assert d["progress"][NEW] == 100 and d["progress"][prev] == 80
    assert d["stage_topics"][NEW] == topic and d["topics"][topic] == 12
    assert d["settings_stages"].split(",") == d["pipeline"]
    assert NEW in d["columns"]  # the agent's output model's field: a scans column
    # The page draws its steps from /config.json.
    assert d["config"]["stages"] == d["stages"]
    page = (tree / "gateway" / "static" / "index.html").read_text()
    assert "config.stages.map(" in page and "[...config.stages, config.failed]" in page

    # Strimzi topics, stage Deployments and ScaledObjects, KafkaUsers with their ACLs.
    docs = {}
    for rel in ("deploy/strimzi/topics.yaml", "deploy/app/stages.yaml", "deploy/strimzi/users.yaml"):
        for doc in yaml.safe_load_all((tree / rel).read_text()):
            if doc:
                docs[(doc["kind"], doc["metadata"]["name"])] = doc
    assert (
        docs[("KafkaTopic", topic.replace(".", "-"))]["spec"] | {"topicName": topic, "partitions": 12}
        == docs[("KafkaTopic", topic.replace(".", "-"))]["spec"]
    )
    deployment = docs[("Deployment", group)]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"][-2:] == ["--stages", NEW]
    scaler = docs[("ScaledObject", group)]["spec"]
    assert scaler["scaleTargetRef"]["name"] == group
    assert (
        scaler["triggers"][0]["metadata"] | {"consumerGroup": group, "topic": topic}
        == scaler["triggers"][0]["metadata"]
    )

    def acls(user: str) -> set[tuple[str, str, str]]:
        return {
            (a["resource"]["type"], a["resource"]["name"], op)
            for a in docs[("KafkaUser", user)]["spec"]["authorization"]["acls"]
            for op in a["operations"]
        }

    assert {("topic", topic, "Read"), ("group", group, "Read"), ("topic", "scan.events", "Write")} <= acls(
        group
    )
    assert ("topic", topic, "Write") in acls(f"eco2-stage-{prev}")  # the stage before hands jobs on
    assert ("topic", topic, "Write") in acls("eco2-dlq-replay")

    # The PodMonitors select by label: the new stage's pods carry what the consumers' one selects.
    monitors = [d for d in yaml.safe_load_all((tree / "deploy/monitoring/podmonitors.yaml").read_text()) if d]
    consumers = next(m for m in monitors if m["metadata"]["name"] == "eco2-consumers")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert consumers["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert consumers["spec"]["podMetricsEndpoints"][0]["port"] in {p["name"] for p in container["ports"]}

    # Both API documents.
    asyncapi = yaml.safe_load((tree / "docs/contracts/asyncapi.yaml").read_text())
    assert asyncapi["channels"]["ScanAudit"]["address"] == topic
    sse = asyncapi["channels"]["ScanEventStream"]["messages"]
    assert sse[NEW] == {"$ref": f"#/components/messages/Sse{NEW.capitalize()}"}
    assert f"Sse{NEW.capitalize()}" in asyncapi["components"]["messages"]
    assert f"{NEW}WorkerReceives" in asyncapi["operations"]
    assert "done 61" in json.dumps(asyncapi)
    gateway = (tree / "docs/contracts/openapi-gateway.json").read_text()
    assert f"`{NEW}`" in gateway and "id: 61" in gateway


# --- the five stages, run on the real Kafka -----------------------------------------------------


async def _wait_done(
    s: Settings, events_topic: str, partition: int, job_id: str, timeout_s: float
) -> list[dict]:
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    events: list[dict[str, Any]] = []
    try:
        tp = TopicPartition(events_topic, partition)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batch = await consumer.getmany(tp, timeout_ms=500)
            for m in batch.get(tp, []):
                if m.key == job_id.encode():
                    events.append(json.loads(m.value))
            if any(is_terminal(e["stage"], e["status"]) for e in events):
                return events
        raise AssertionError(
            f"no terminal event in {timeout_s} s; saw {[(e['stage'], e['status']) for e in events]}"
        )
    finally:
        await consumer.stop()


@pytest.mark.integration
async def test_a_job_runs_through_the_five_stage_pipeline(
    five_stage_tree: tuple[Path, set[str], dict[str, Any]], settings: Settings, zero_latency_model: str
) -> None:
    tree, _, d = five_stage_tree
    prefix = f"t{uuid.uuid4().hex[:8]}."
    names = {f"{prefix}{name}": parts for name, parts in d["topics"].items()}
    first, events_topic = f"{prefix}{d['stage_topics'][d['pipeline'][0]]}", f"{prefix}scan.events"
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(n, p, 1) for n, p in names.items()])
    port = free_port()
    log = open(tree / f"worker-{prefix}log", "wb")  # noqa: SIM115  (closed below)
    worker = subprocess.Popen(
        [sys.executable, "-m", "streams", "worker"],  # every stage of the scratch tree's pipeline
        cwd=tree,
        env={
            **os.environ,
            "PYTHONPATH": str(tree),
            "ECO2_LOCAL_DIR": str(tree / ".local"),
            "ECO2_TOPIC_PREFIX": prefix,
            "ECO2_STAGE_OVERLAP_OK": "1",  # a private group beside the stack's workers
            "ECO2_METRICS_PORT": str(port),
            "ECO2_STAGE_CONCURRENCY": "8",
        },
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        async with httpx.AsyncClient() as http:  # joined its group once /ready answers 200
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                assert worker.poll() is None, (tree / f"worker-{prefix}log").read_text()[-3000:]
                try:
                    if (await http.get(f"http://127.0.0.1:{port}/ready")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.5)
        job = ScanJob(
            job_id=uuid.uuid4().hex,
            user_id="user-five",
            image_url=f"https://images.example.com/scans/clear_pet-five.jpg?u={prefix}",
            created_at=now(),
        )
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
        await producer.start()
        try:  # what the scan API writes: the job on the first stage's topic, `queued` on the events
            key = job.job_id.encode()
            await producer.send_and_wait(
                first,
                job.model_dump_json().encode(),
                key=key,
                partition=partition_for(job.job_id, names[first]),
            )
            queued = make_event(job, QUEUED, "completed").model_dump_json().encode()
            shard = partition_for(job.job_id, names[events_topic])
            await producer.send_and_wait(events_topic, queued, key=key, partition=shard)
        finally:
            await producer.stop()

        events = await _wait_done(settings, events_topic, shard, job.job_id, 120)
        expected = [("queued", "completed")]
        expected += [(st, status) for st in d["pipeline"] for status in ("started", "completed")]
        expected += [("done", "completed")]
        assert [(e["stage"], e["status"]) for e in events] == expected
        assert [e["seq"] for e in events] == d["success_seqs"]
        assert [e["progress"] for e in events if e["status"] == "completed"][-2:] == [100, 100]
        result = events[-1]["result"]
        assert result["status"] == "completed" and result[NEW] == {
            "granted": result["reward"]["granted"],
            "rules": result["rules_key"],
        }
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)
        log.close()
        try:
            await admin.delete_topics(list(names))
        finally:
            await admin.close()
