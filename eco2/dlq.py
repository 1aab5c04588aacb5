"""`eco2 dlq`: what is on the dead-letter topics, why, and re-driving it (optionally fixed).

Where a replay goes:
- a writer dead letter (scan.persistence.dlq, source "writer"): its value, the original event,
  back to scan.events, keyed by job id, so the Postgres writer stores it;
- a pipeline dead letter (scan.dlq, source "pipeline"): a new attempt of its job (the ScanJob,
  `attempt` + 1) back to the first stage's topic, with the attempt's `queued` event on
  scan.events, in one Kafka transaction. The stages the job already completed pass it through
  (no model call); its seqs lie above the failed attempt's, so its state, stream and Postgres row
  reopen (contract.pipeline.ATTEMPT_SPAN). `--watch` follows the re-driven jobs to their end.
Replays are recorded in Postgres (table dlq_replays, one row per topic/partition/offset) in the
same transaction that waits for Kafka's ack, so a record is re-driven once unless --force.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from pydantic import ValidationError

from contract import trace
from contract.events import DONE, PIPELINE, QUEUED, DeadLetter, ScanJob, make_event
from contract.pipeline import ATTEMPT_SPAN, is_terminal
from contract.settings import Settings, get_settings
from contract.topics import (
    BY_NAME,
    DLQ,
    DLQ_REPLAY_TRANSACTIONAL_ID_PREFIX,
    EVENTS,
    PERSISTENCE_DLQ,
    STAGE_TOPICS,
    partition_for,
)

DLQ_TOPICS = (DLQ, PERSISTENCE_DLQ)

dlq_app = typer.Typer(
    help="Dead letters: list why records failed (scan.dlq: pipeline, scan.persistence.dlq: writer) "
    "and replay them, optionally fixed.",
    no_args_is_help=True,
)

TopicOpt = Annotated[str | None, typer.Option("--topic", help=f"one of {', '.join(DLQ_TOPICS)}")]


class ReplayError(Exception):
    pass


@dataclass
class Letter:
    """One record of a dead-letter topic, with the DeadLetter it holds (None if it holds junk)."""

    topic: str
    partition: int
    offset: int
    key: str | None
    headers: list[tuple[str, bytes]]
    letter: DeadLetter | None
    problem: str | None = None  # why it is not a DeadLetter

    @property
    def ref(self) -> str:
        """How --offset names it: the offset, or partition:offset beyond partition 0."""
        return str(self.offset) if self.partition == 0 else f"{self.partition}:{self.offset}"

    @property
    def job_id(self) -> str | None:
        if self.key:
            return self.key
        if self.letter is not None and self.letter.value.get("job_id") is not None:
            return str(self.letter.value["job_id"])
        return None


def _topic(topic: str | None) -> str:
    if topic is not None and topic not in DLQ_TOPICS:
        raise typer.BadParameter(f"{topic!r} is not a dead-letter topic ({', '.join(DLQ_TOPICS)})")
    return topic or PERSISTENCE_DLQ


def _parse_ref(ref: str) -> tuple[int, int]:
    part, _, off = ref.rpartition(":")
    try:
        return (int(part) if part else 0), int(off)
    except ValueError:
        raise typer.BadParameter(f"--offset {ref!r}: expected N or PARTITION:N") from None


# --- kafka -----------------------------------------------------------------------------------


async def read_letters(s: Settings, topic: str) -> list[Letter]:
    """Every record on `topic`, from the beginning to the end as of now."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=s.kafka_bootstrap,
        enable_auto_commit=False,
        isolation_level="read_committed",
        **s.kafka_client_kwargs(),
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(BY_NAME[topic].partitions)]
        consumer.assign(tps)
        end = await consumer.end_offsets(tps)
        for tp, first in (await consumer.beginning_offsets(tps)).items():
            consumer.seek(tp, first)  # (seek_to_beginning after end_offsets can land at the end)
        out: list[Letter] = []
        deadline = time.monotonic() + 60
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} took over 60 s")
            got = await consumer.getmany(*tps, timeout_ms=1000)
            for tp, msgs in got.items():
                out.extend(_letter(m) for m in msgs if m.offset < end[tp])
        return out
    finally:
        await consumer.stop()


def _letter(m: Any) -> Letter:
    key = m.key.decode(errors="replace") if m.key else None
    try:
        letter, problem = DeadLetter.model_validate_json(m.value or b""), None
    except ValidationError as exc:
        letter, problem = None, f"not a DeadLetter: {exc.errors()[0]['msg']}"
    return Letter(m.topic, m.partition, m.offset, key, list(m.headers or []), letter, problem)


# --- replay marks (Postgres) -----------------------------------------------------------------

MARKS_SQL = """
SELECT kafka_partition, kafka_offset, target_topic, edited, replays, replayed_at
FROM dlq_replays WHERE topic = $1
"""
MARK_SQL = """
INSERT INTO dlq_replays (topic, kafka_partition, kafka_offset, job_id, target_topic, edited)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (topic, kafka_partition, kafka_offset) DO {action}
RETURNING replays
"""
_AGAIN = (
    "UPDATE SET replays = dlq_replays.replays + 1, replayed_at = now(), job_id = EXCLUDED.job_id, "
    "target_topic = EXCLUDED.target_topic, edited = EXCLUDED.edited"
)


async def replay_marks(s: Settings, topic: str) -> dict[tuple[int, int], dict[str, Any]]:
    import asyncpg

    conn = await asyncpg.connect(s.postgres_dsn, timeout=5)
    try:
        rows = await conn.fetch(MARKS_SQL, topic)
    finally:
        await conn.close()
    return {
        (r["kafka_partition"], r["kafka_offset"]): {
            "target": r["target_topic"],
            "edited": r["edited"],
            "replays": r["replays"],
            "at": r["replayed_at"].timestamp(),
        }
        for r in rows
    }


# --- replay ----------------------------------------------------------------------------------


@dataclass
class Plan:
    target: str
    key: str
    value: dict[str, Any]
    event: str | None = None  # a re-drive's `queued` event of the new attempt (scan.events)
    attempt: int | None = None  # the new attempt of a re-driven job


def plan(letter: Letter, override: dict[str, Any] | None = None) -> Plan:
    """Where and what to re-produce for a dead letter; refuses what would only fail again."""
    from persistence.records import Bad, is_terminal, result_of

    dl = letter.letter
    if dl is None:
        raise ReplayError(letter.problem or "not a DeadLetter")
    value = override if override is not None else dl.value
    if dl.source == "writer":
        if not is_terminal(value):
            raise ReplayError("not a terminal event (stage done or status failed): the writer would skip it")
        checked = result_of(value)
        if isinstance(checked, Bad):
            raise ReplayError(f"still {checked.reason}: {checked.error}")
        return Plan(EVENTS, checked.job_id, value)
    if not dl.stage or dl.stage not in STAGE_TOPICS:
        raise ReplayError(f"pipeline dead letter of stage {dl.stage!r}: no stage topic to re-drive it to")
    try:
        job = ScanJob.model_validate(value)
    except ValidationError as exc:
        raise ReplayError(f"value is not a valid ScanJob: {exc.errors()[0]}") from None
    # A new attempt of the job: its memo and seqs are its own, so the failure is not replayed.
    attempt = job.attempt + 1
    value = {**value, "attempt": attempt}
    queued = make_event(job.model_copy(update={"attempt": attempt}), QUEUED, "completed")
    return Plan(STAGE_TOPICS[PIPELINE[0]], job.job_id, value, queued.model_dump_json(), attempt)


async def replay(
    s: Settings,
    topic: str,
    refs: list[tuple[int, int]] | None,
    override: dict[str, Any] | None,
    force: bool,
    echo: Any = typer.echo,
    watch_s: float = 0.0,
    since: float | None = None,
) -> int:
    """Re-drive the chosen dead letters (all when refs is None); returns how many could not be
    (and, with `watch_s`, how many re-driven jobs did not complete within it)."""
    import asyncpg
    from aiokafka import AIOKafkaProducer

    letters = await read_letters(s, topic)
    by_ref = {(x.partition, x.offset): x for x in letters}
    if refs is None:  # --all: every letter (of the outage: written at or after `since`)
        chosen = [x for x in letters if since is None or (x.letter is not None and x.letter.ts >= since)]
    else:
        missing = [f"{p}:{o}" if p else str(o) for p, o in refs if (p, o) not in by_ref]
        if missing:
            raise ReplayError(f"no record at offset {', '.join(missing)} on {topic}")
        chosen = [by_ref[r] for r in refs]
    if override is not None and len(chosen) != 1:
        raise ReplayError("--set-json/--edit replace one record's value: choose exactly one --offset")
    if not chosen:
        when = f" since {_when(since)} UTC" if since is not None else ""
        echo(f"{topic}: no dead letters{when}, nothing to replay")
        return 0
    failures = replayed = skipped = 0
    redriven: dict[str, int] = {}  # job id -> the attempt started
    conn = await asyncpg.connect(s.postgres_dsn, timeout=10)
    producer = AIOKafkaProducer(
        bootstrap_servers=s.kafka_bootstrap,
        enable_idempotence=True,
        acks="all",
        compression_type=s.kafka_compression_type,
        # A re-drive's job and its `queued` event are visible together or not at all.
        transactional_id=f"{DLQ_REPLAY_TRANSACTIONAL_ID_PREFIX}-{uuid.uuid4().hex}",
        **s.kafka_client_kwargs(),
    )
    await producer.start()
    try:
        for letter in chosen:
            try:
                p = plan(letter, override)
            except ReplayError as exc:
                echo(f"{topic}@{letter.ref}: cannot replay: {exc}")
                failures += 1
                continue
            sql = MARK_SQL.format(action=_AGAIN if force else "NOTHING")
            # The mark commits only once Kafka acknowledged the record: no mark without a replay.
            async with conn.transaction():
                replays = await conn.fetchval(
                    sql, topic, letter.partition, letter.offset, p.key, p.target, override is not None
                )
                if replays is None:
                    echo(f"{topic}@{letter.ref}: already replayed, skipped (--force replays it again)")
                    skipped += 1
                    continue
                tp = trace.headers(trace.child_of(trace.from_headers(letter.headers)))
                async with producer.transaction():
                    if p.event is not None:  # the attempt's first event, before its job
                        await producer.send(
                            EVENTS, p.event.encode(), key=p.key.encode(),
                            partition=partition_for(p.key, BY_NAME[EVENTS].partitions), headers=tp,
                        )
                    sent = await producer.send(
                        p.target,
                        json.dumps(p.value, ensure_ascii=False, separators=(",", ":")).encode(),
                        key=p.key.encode(),
                        partition=partition_for(p.key, BY_NAME[p.target].partitions),
                        headers=tp,
                    )
                md = await sent
            edited = " (edited)" if override is not None else ""
            again = f" attempt {p.attempt}" if p.attempt is not None else ""
            to = f"{p.target}[{md.partition}]@{md.offset}"
            echo(f"{topic}@{letter.ref}: job {p.key}{again} -> {to}{edited}")
            if p.attempt is not None:
                redriven[p.key] = p.attempt
            replayed += 1
    finally:
        await producer.stop()
        await conn.close()
    echo(f"{topic}: {replayed} replayed, {skipped} skipped, {failures} could not be")
    if watch_s and redriven:
        failures += await watch(s, redriven, watch_s, echo)
    return failures


async def watch(s: Settings, jobs: dict[str, int], timeout_s: float, echo: Any = typer.echo) -> int:
    """Follow re-driven jobs (job id -> attempt) in the Redis view until each attempt has ended:
    a progress line per change, then one line per job; returns how many did not complete."""
    import view

    client = view.client(s.redis_url, "eco2-dlq-watch")
    store = view.StateStore(client, s.state_ttl_s)
    left = dict(jobs)
    seen: dict[str, tuple[str, str]] = {}
    failed: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        while left and time.monotonic() < deadline:
            for job_id, attempt in list(left.items()):
                st = await store.state(job_id)
                if st is None or st["seq"] // ATTEMPT_SPAN < attempt:
                    continue  # the attempt has not reached the view yet
                now_at = (st["stage"], st["status"])
                if seen.get(job_id) != now_at:
                    seen[job_id] = now_at
                    echo(f"job {job_id} attempt {attempt}: {st['stage']} {st['status']} ({st['progress']}%)")
                if is_terminal(st["stage"], st["status"]):
                    del left[job_id]
                    if st["stage"] != DONE:
                        failed.append(job_id)
            if left:
                await asyncio.sleep(0.5)
    finally:
        await client.aclose()
    done = len(jobs) - len(left) - len(failed)
    echo(f"re-driven: {done} completed, {len(failed)} failed again, "
         f"{len(left)} still running after {timeout_s:.0f} s")
    return len(failed) + len(left)


# --- commands --------------------------------------------------------------------------------


def _row(letter: Letter, marks: dict[tuple[int, int], dict[str, Any]] | None) -> dict[str, Any]:
    dl = letter.letter
    mark = None if marks is None else marks.get((letter.partition, letter.offset))
    return {
        "topic": letter.topic,
        "partition": letter.partition,
        "offset": letter.offset,
        "job_id": letter.job_id,
        "source": dl.source if dl else None,
        "stage": dl.stage if dl else None,
        "reason": dl.reason if dl else "unreadable",
        "error": dl.error if dl else letter.problem,
        "attempts": dl.attempts if dl else None,
        "ts": dl.ts if dl else None,
        "replayed": mark if marks is not None else "unknown",
        "value": dl.value if dl else None,
    }


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


@dlq_app.command("list")
def dlq_list(
    topic: TopicOpt = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="newest N per topic (0 = all)")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="full records, values included, as JSON")] = False,
) -> None:
    """Show dead letters and why: offset, job id, source, stage, reason, error, time, replayed."""
    s = get_settings()
    topics = [_topic(topic)] if topic else list(DLQ_TOPICS)
    rows: list[dict[str, Any]] = []
    for t in topics:
        letters = asyncio.run(read_letters(s, t))
        if limit:
            letters = letters[-limit:]
        try:
            marks: dict[tuple[int, int], dict[str, Any]] | None = asyncio.run(replay_marks(s, t))
        except Exception as exc:  # Postgres down: still show the letters
            typer.secho(f"replay marks unavailable ({type(exc).__name__}: {exc})", fg="yellow", err=True)
            marks = None
        rows.extend(_row(x, marks) for x in letters)
    if as_json:
        print(json.dumps({"letters": rows}, ensure_ascii=False))
        return
    if not rows:
        typer.echo(f"no dead letters on {', '.join(topics)}")
        return
    head = f"{'TOPIC':<21} {'OFFSET':>7} {'JOB':<34} {'SOURCE':<8} {'STAGE':<7} {'REASON':<26} "
    typer.echo(head + f"{'TRIES':>5} {'TS (UTC)':<19} {'REPLAYED':<8} ERROR")
    for r in rows:
        ref = str(r["offset"]) if r["partition"] == 0 else f"{r['partition']}:{r['offset']}"
        rep = r["replayed"]
        replayed = "?" if rep == "unknown" else (f"yes x{rep['replays']}" if rep else "no")
        error = (r["error"] or "").replace("\n", " ")
        typer.echo(
            f"{r['topic']:<21} {ref:>7} {(r['job_id'] or '-')[:34]:<34} {r['source'] or '-':<8} "
            f"{r['stage'] or '-':<7} {r['reason'][:26]:<26} {r['attempts'] or '-':>5} {_when(r['ts']):<19} "
            f"{replayed:<8} {error[:100]}"
        )


@dlq_app.command("show")
def dlq_show(
    offset: Annotated[str, typer.Argument(help="N or PARTITION:N")],
    topic: TopicOpt = None,
    letter: Annotated[bool, typer.Option("--letter", help="the whole DeadLetter, not its value")] = False,
) -> None:
    """Print one dead letter's value as JSON: save it, fix it, replay it with --set-json."""
    t = _topic(topic)
    ref = _parse_ref(offset)
    found = [x for x in asyncio.run(read_letters(get_settings(), t)) if (x.partition, x.offset) == ref]
    if not found or found[0].letter is None:
        typer.secho(f"no dead letter at {offset} on {t}", fg="red", err=True)
        raise typer.Exit(1)
    dl = found[0].letter
    print(json.dumps(dl.model_dump() if letter else dl.value, indent=2, ensure_ascii=False))


REPLAY_HELP = (
    "Re-drive dead letters from --topic (default scan.persistence.dlq).\n\n"
    "A writer dead letter's value (the terminal event) goes back to scan.events. A pipeline dead "
    "letter (scan.dlq) is re-driven as a new attempt of its job (same job id, result URL and stream): "
    "the job, `attempt` + 1, goes to the first stage's topic with the attempt's `queued` event; "
    "the stages it already completed pass it through without calling the model. --watch N follows "
    "the re-driven jobs until each has ended.\n\n"
    "A value that would fail again (invalid event, result or job) is refused: fix it first, either "
    "`eco2 dlq show 7 > fix.json`, edit fix.json, `eco2 dlq replay --offset 7 --set-json fix.json`, "
    "or `eco2 dlq replay --offset 7 --edit` ($EDITOR).\n\n"
    "Each replay is recorded in Postgres (table dlq_replays) once Kafka acknowledged it; a recorded "
    "record is skipped unless --force. Exit status 1 when a chosen record could not be replayed."
)


@dlq_app.command("replay", help=REPLAY_HELP)
def dlq_replay(
    offsets: Annotated[
        list[str] | None, typer.Option("--offset", help="record to replay (N or PARTITION:N); repeatable")
    ] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="every record not replayed yet")] = False,
    topic: TopicOpt = None,
    set_json: Annotated[
        Path | None,
        typer.Option("--set-json", help="replace the record's value by this JSON file (one --offset)"),
    ] = None,
    edit: Annotated[bool, typer.Option("--edit", help="edit the value in $EDITOR (one --offset)")] = False,
    force: Annotated[bool, typer.Option("--force", help="replay records already replayed once")] = False,
    since: Annotated[
        str | None,
        typer.Option("--since", help="with --all: only letters written at or after this time (ISO 8601, "
                     "UTC unless it says, or Unix seconds): the letters of one outage"),
    ] = None,
    watch_s: Annotated[
        float,
        typer.Option("--watch", help="follow the re-driven jobs until each has ended, at most this many "
                     "seconds (0 = do not); exit 1 if one did not complete"),
    ] = 0.0,
) -> None:
    t = _topic(topic)
    if bool(offsets) == replay_all:
        raise typer.BadParameter("choose records with --offset N (repeatable) or --all")
    if since is not None and not replay_all:
        raise typer.BadParameter("--since chooses among --all")
    if set_json is not None and edit:
        raise typer.BadParameter("use either --set-json or --edit")
    refs = [_parse_ref(o) for o in offsets] if offsets else None
    s = get_settings()
    override: dict[str, Any] | None = None
    if set_json is not None:
        override = _load_object(set_json.read_text(), str(set_json))
    elif edit:
        if not refs or len(refs) != 1:
            raise typer.BadParameter("--edit needs exactly one --offset")
        found = [x for x in asyncio.run(read_letters(s, t)) if (x.partition, x.offset) == refs[0]]
        if not found or found[0].letter is None:
            raise typer.BadParameter(f"no dead letter at {offsets[0] if offsets else ''} on {t}")
        text = click.edit(json.dumps(found[0].letter.value, indent=2, ensure_ascii=False), extension=".json")
        if text is not None:
            override = _load_object(text, "the edited value")
    try:
        failures = asyncio.run(replay(s, t, refs, override, force, watch_s=watch_s, since=_since(since)))
    except ReplayError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(1) from exc
    if failures:
        raise typer.Exit(1)


def _since(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"--since {value!r}: expected ISO 8601 or Unix seconds") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _load_object(text: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise typer.BadParameter(f"{where} is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise typer.BadParameter(f"{where} must hold a JSON object")
    return value
