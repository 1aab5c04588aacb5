"""The kcat runbook in docs/operations.md, run as written against the local broker.

Each ```sh kcat-runbook NAME block is extracted and its commands run in bash with BOOTSTRAP,
JOB_ID and GROUP set, after producing known records: two events of a fresh job to its
scan.events partition, one dead letter of that job to scan.dlq, and a committed offset for a
fresh consumer group. Each block's output is checked against what was produced.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from contract.events import DeadLetter, ScanJob, make_event, now
from contract.settings import Settings
from contract.topics import DLQ, EVENTS, TOPICS, shard_of
from eco2 import install, kafka_tools

REPO = Path(__file__).resolve().parent.parent
OPERATIONS = REPO / "docs" / "operations.md"
BLOCK = re.compile(r"^```sh kcat-runbook (?P<name>[\w-]+)\n(?P<body>.*?)^```", re.M | re.S)
MARK = "@@runbook-command"


def runbook_blocks() -> dict[str, list[str]]:
    """Block name -> its commands (comment-only lines dropped, `\\` continuations joined)."""
    out: dict[str, list[str]] = {}
    for m in BLOCK.finditer(OPERATIONS.read_text()):
        text = m.group("body").replace("\\\n", " ")
        lines = [ln for ln in text.splitlines() if ln.strip()]
        out[m.group("name")] = [ln for ln in lines if not ln.lstrip().startswith("#")]
    return out


def run_block(commands: list[str], env: dict[str, str]) -> list[str]:
    """Run a block's commands in one bash (variables carry over); the output of each command."""
    script = "set -euo pipefail\n" + "".join(f"echo {MARK}\n{c}\n" for c in commands)
    proc = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO, env=env
    )
    assert proc.returncode == 0, f"runbook block failed ({proc.returncode}):\n{script}\n{proc.stderr}"
    parts = proc.stdout.split(MARK + "\n")
    assert parts[0] == "" and len(parts) == len(commands) + 1, proc.stdout
    return parts[1:]


# --- unit: the block parser and the kafka-tool wrapper ----------------------------------------


def test_runbook_has_the_four_checked_blocks() -> None:
    blocks = runbook_blocks()
    assert set(blocks) == {"list-topics", "job-events", "dead-letters", "group-lag"}
    assert all(blocks.values())
    text = OPERATIONS.read_text()
    assert kafka_tools.TOOLS["consumer-groups"] in text, "the runbook names the real class"


def test_kafka_tool_argv_adds_bootstrap_and_security_only_when_needed(tmp_path: Path) -> None:
    s = Settings(kafka_bootstrap="k:9093", local_dir=tmp_path)
    argv = kafka_tools.argv(s, "consumer-groups", ["--describe", "--group", "g"])
    cls = "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand"
    assert argv[argv.index(cls) :] == [cls, "--bootstrap-server", "k:9093", "--describe", "--group", "g"]
    assert kafka_tools.argv(s, "topics", ["--bootstrap-server", "x:1"]).count("--bootstrap-server") == 1
    assert kafka_tools.client_properties(s) == ""
    with pytest.raises(kafka_tools.UnknownTool):
        kafka_tools.argv(s, "consumer-group", [])


def test_kafka_tool_command_config_for_a_secured_cluster(tmp_path: Path) -> None:
    s = Settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_username="eco2-ops",
        kafka_sasl_password='p"w',
        kafka_ssl_cafile="/etc/ca.crt",
        local_dir=tmp_path,
    )
    props = dict(line.split("=", 1) for line in kafka_tools.client_properties(s).splitlines() if line)
    assert props["security.protocol"] == "SASL_SSL"
    assert props["sasl.mechanism"] == "SCRAM-SHA-512"
    assert props["sasl.jaas.config"] == (
        "org.apache.kafka.common.security.scram.ScramLoginModule required "
        'username="eco2-ops" password="p\\"w";'
    )
    assert props["ssl.truststore.location"] == "/etc/ca.crt"
    argv = kafka_tools.argv(s, "acls", ["--list"], tmp_path / "c.properties")
    assert argv[argv.index("--command-config") + 1] == str(tmp_path / "c.properties")


# --- integration: the runbook against the local broker -----------------------------------------


@pytest.mark.integration
def test_kafka_tool_classes_exist_in_the_installed_jars(settings: Settings, stack_status: dict) -> None:
    libs = install.kafka_home(settings) / "libs"
    classes: set[str] = set()
    for jar in libs.glob("kafka*.jar"):
        with zipfile.ZipFile(jar) as z:
            classes |= {n[: -len(".class")].replace("/", ".") for n in z.namelist() if n.endswith(".class")}
    for name, cls in kafka_tools.TOOLS.items():
        assert cls in classes, f"{name}: {cls} not in {libs}"


@pytest.fixture
async def known_records(settings: Settings, stack_status: dict, uid: str) -> dict[str, object]:
    """Produce a job's two events, one dead letter for it, and a group with a committed offset."""
    job_id = f"runbook-{uid}"
    job = ScanJob(
        job_id=job_id,
        user_id=f"user-{uid}",
        image_url="https://example.com/a.jpg",
        model="gpt-4o-mini",
        created_at=now(),
    )
    events = [make_event(job, "queued", "completed"), make_event(job, "vision", "started")]
    dead = DeadLetter(
        source="pipeline",
        topic="scan.vision",
        key=job_id,
        value=job.model_dump(),
        stage="vision",
        reason=f"runbook_check_{uid}",
        error="produced by test_runbook",
    )
    header = [("traceparent", f"00-{uid:0>32}-{uid:0>16}-01".encode())]
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        part = shard_of(job_id)
        offsets = []
        for e in events:
            md = await producer.send_and_wait(
                EVENTS, e.model_dump_json().encode(), key=job_id.encode(), partition=part, headers=header
            )
            offsets.append(md.offset)
        # A record of another job on the same partition: the key filter must leave it out.
        await producer.send_and_wait(EVENTS, b"{}", key=f"other-{uid}".encode(), partition=part)
        dlq_md = await producer.send_and_wait(
            DLQ, dead.model_dump_json().encode(), key=job_id.encode(), partition=0, headers=header
        )
    finally:
        await producer.stop()

    group = f"runbook-{uid}"
    committed = max(dlq_md.offset, 1)  # leaves at least the dead letter above as lag
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tp = TopicPartition(DLQ, 0)
        consumer.assign([tp])
        await consumer.commit({tp: committed})
    finally:
        await consumer.stop()
    return {
        "job_id": job_id,
        "events": events,
        "offsets": offsets,
        "dead": dead,
        "group": group,
        "committed": committed,
    }


@pytest.fixture
def runbook_env(settings: Settings, known_records: dict[str, object]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KCAT_CONFIG"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # python, eco2
    env.update(
        BOOTSTRAP=settings.kafka_bootstrap,
        JOB_ID=str(known_records["job_id"]),
        GROUP=str(known_records["group"]),
    )
    return env


@pytest.mark.integration
def test_list_topics_shows_every_topic_with_its_partitions(runbook_env: dict[str, str]) -> None:
    topics, events = run_block(runbook_blocks()["list-topics"], runbook_env)
    for t in TOPICS:
        assert f'topic "{t.name}" with {t.partitions} partitions' in topics
    assert set(re.findall(r"partition (\d+), leader", events)) == {"0", "1", "2", "3"}


@pytest.mark.integration
def test_job_events_reads_exactly_that_jobs_events(
    runbook_env: dict[str, str], known_records: dict[str, object]
) -> None:
    _, out = run_block(runbook_blocks()["job-events"], runbook_env)
    rows = [line.split("\t") for line in out.splitlines()]
    assert [int(r[0]) for r in rows] == known_records["offsets"]
    assert {r[1] for r in rows} == {known_records["job_id"]}
    got = [json.loads(r[2]) for r in rows]
    assert got == [e.model_dump() for e in known_records["events"]]  # type: ignore[attr-defined]


@pytest.mark.integration
def test_dead_letter_commands_find_the_known_record(
    runbook_env: dict[str, str], known_records: dict[str, object]
) -> None:
    dead = known_records["dead"]
    assert isinstance(dead, DeadLetter)
    tail, one_job, by_reason = run_block(runbook_blocks()["dead-letters"], runbook_env)
    tail_rows = [line.split("\t", 2) for line in tail.splitlines()]
    assert 1 <= len(tail_rows) <= 10
    assert all(r[0].isdigit() for r in tail_rows)  # %T: the record timestamp (ms)
    ours = [r for r in tail_rows if r[1] == known_records["job_id"]]
    assert ours or len(tail_rows) == 10, "the record just produced is among the last 10"
    for r in ours:
        assert DeadLetter.model_validate_json(r[2]) == dead
    (line,) = one_job.splitlines()
    assert DeadLetter.model_validate_json(line) == dead
    # The printed Counter: "Counter({'reason': n, ...})"
    assert re.search(rf"'{re.escape(dead.reason)}': 1\b", by_reason), by_reason


@pytest.mark.integration
def test_group_lag_lists_and_describes_the_group(
    runbook_env: dict[str, str], known_records: dict[str, object]
) -> None:
    _, listed, described = run_block(runbook_blocks()["group-lag"], runbook_env)
    group = known_records["group"]
    assert group in listed.split()
    header, *rows = [line.split() for line in described.splitlines() if line.strip()]
    assert header[:6] == ["GROUP", "TOPIC", "PARTITION", "CURRENT-OFFSET", "LOG-END-OFFSET", "LAG"]
    (row,) = [r for r in rows if r[:3] == [group, DLQ, "0"]]
    current, end, lag = int(row[3]), int(row[4]), int(row[5])
    assert current == known_records["committed"]
    assert lag == end - current >= 1


def test_readme_install_list_names_every_debian_package_the_stack_installs() -> None:
    quick_start = (REPO / "README.md").read_text().split("## The local stack")[0]
    missing = [name for name in install.APT_PACKAGES if f"`{name}`" not in quick_start]
    assert not missing, f"README's install list omits {missing}"


def test_docs_describe_consumer_groups_only_with_a_group() -> None:
    """`consumer-groups --describe` alone fails: Kafka's tool wants --group or --all-groups."""
    for doc in (REPO / "README.md", OPERATIONS):
        for m in re.finditer(r"consumer-groups --describe[^`\n]*", doc.read_text()):
            assert "--group" in m.group(0) or "--all-groups" in m.group(0), (doc.name, m.group(0))
