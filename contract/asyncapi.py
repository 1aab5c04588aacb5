"""The AsyncAPI 3.0 document of the event-streaming side, generated from `contract/` only.

Topics, partitions and configs come from `topics.py`, message schemas from the pydantic models in
`events.py`, the header from `trace.py`, consumer groups from `topics.py`, SSE event names from
`events.py`. `eco2 contract` writes it to docs/contracts/asyncapi.yaml and a test fails when the
committed file differs from what this module generates now.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from contract import topics, trace, versioning
from contract.events import (
    DONE,
    DONE_SEQ,
    FAILED_EVENT,
    FAILED_SEQ,
    PIPELINE,
    QUEUED,
    STAGES,
    DeadLetter,
    ScanEvent,
    ScanJob,
    ScanResult,
)
from contract.pipeline import ATTEMPT_SPAN
from contract.topics import DLQ, EVENTS, FIRST_TOPIC, PERSISTENCE_DLQ, STAGE_TOPICS, TopicSpec

KAFKA_BINDING = "0.5.0"
HTTP_BINDING = "0.3.0"
REF = "#/components/schemas/{model}"

# Who writes each topic besides the stage workers (for the descriptions).
_PRODUCERS = {
    FIRST_TOPIC: "the scan API (one Kafka transaction with the job's queued event)",
    EVENTS: "the scan API (queued) and every stage worker (started/completed/failed)",
    DLQ: "the stage workers, for jobs they give up on (`eco2 dlq replay` re-produces one to its stage topic)",
    PERSISTENCE_DLQ: "the Postgres writer, for records it can never store (`eco2 dlq replay` "
    "re-produces one to scan.events)",
}


def _channel_id(topic: str) -> str:
    return "".join(part.capitalize() for part in topic.split("."))  # scan.dlq -> ScanDlq


def _msg(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/messages/{name}"}


def _kafka_channel(spec: TopicSpec, message: str) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if "retention.ms" in spec.config:
        config["retention.ms"] = int(spec.config["retention.ms"])
    if "cleanup.policy" in spec.config:
        config["cleanup.policy"] = spec.config["cleanup.policy"].split(",")
    return {
        "address": spec.name,
        "title": spec.name,
        "description": f"{spec.doc}. {spec.partitions} partition(s); written by "
        f"{_PRODUCERS.get(spec.name, 'the stage worker before it')}. The key is the job id and the "
        "partition is murmur2(key) % partitions (Kafka's default partitioner), passed explicitly by "
        "every producer, so all of a job's messages on a topic share one partition, in order.",
        "servers": [{"$ref": "#/servers/local"}, {"$ref": "#/servers/kubernetes"}],
        "messages": {message: _msg(message)},
        "bindings": {
            "kafka": {
                "topic": spec.name,
                "partitions": spec.partitions,
                "topicConfiguration": config,
                "bindingVersion": KAFKA_BINDING,
            }
        },
    }


def _kafka_message(model: type[BaseModel], title: str, summary: str) -> dict[str, Any]:
    return {
        "name": model.__name__,
        "title": title,
        "summary": summary,
        "contentType": "application/json",
        "headers": {"$ref": "#/components/schemas/KafkaHeaders"},
        "payload": {"$ref": f"#/components/schemas/{model.__name__}"},
        "bindings": {
            "kafka": {
                "key": {"type": "string", "description": "the job id (UTF-8)"},
                "bindingVersion": KAFKA_BINDING,
            }
        },
    }


def _operation(action: str, channel: str, message: str, summary: str, groups: list[str]) -> dict[str, Any]:
    op: dict[str, Any] = {
        "action": action,
        "channel": {"$ref": f"#/channels/{channel}"},
        "summary": summary,
        "messages": [{"$ref": f"#/channels/{channel}/messages/{message}"}],
    }
    if groups:
        op["bindings"] = {
            "kafka": {"groupId": {"type": "string", "enum": groups}, "bindingVersion": KAFKA_BINDING}
        }
    return op


def _schemas() -> dict[str, Any]:
    out: dict[str, Any] = {
        "KafkaHeaders": {
            "type": "object",
            "description": "Kafka record headers of every message",
            "properties": {
                trace.HEADER: {
                    "type": "string",
                    "description": "W3C trace context; each consumer continues the trace of what it read",
                    "pattern": trace.PATTERN,
                }
            },
            "required": [trace.HEADER],
        },
        "SseEventId": {
            "type": "string",
            "pattern": "^[0-9]+$",
            "description": f"the SSE `id:`: the event's seq (queued 1, stage started 10n, completed 10n+1, "
            f"{DONE} {DONE_SEQ}, {FAILED_EVENT} {FAILED_SEQ}, plus {ATTEMPT_SPAN} per attempt: a failed job "
            f"re-driven by an operator (`eco2 dlq replay`) comes back as attempt n, `attempt` on each "
            f"event, seqs {ATTEMPT_SPAN}n+..., its first event `{QUEUED}` {ATTEMPT_SPAN}n+1 right after the "
            f"failure's); send it back as Last-Event-ID to resume (after a failure: 204 until a "
            f"re-drive, then the new attempt)",
        },
    }
    for model in (ScanJob, ScanEvent, ScanResult, DeadLetter):
        schema = model.model_json_schema(ref_template=REF)
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out


def _sse_message(name: str) -> dict[str, Any]:
    if name == FAILED_EVENT:
        what = (
            "the job failed (terminal for its attempt; carries the failed result and `error`); an "
            "operator's re-drive may start the next attempt, whose `queued` follows"
        )
    elif name == DONE:
        what = "the job finished (terminal; carries the whole result)"
    elif name == QUEUED:
        what = "the job was accepted (or, with `attempt` > 0, re-driven after a failure: a new attempt)"
    else:
        what = f"the {name} stage started or completed (see `status`)"
    return {
        "name": name,
        "title": f"SSE event `{name}`",
        "summary": what,
        "contentType": "application/json",
        "correlationId": {"description": "the SSE `id:` line (the seq)", "location": "$message.header#/id"},
        "headers": {
            "type": "object",
            "properties": {"event": {"const": name}, "id": {"$ref": "#/components/schemas/SseEventId"}},
        },
        "payload": {"$ref": "#/components/schemas/ScanEvent"},
    }


def document() -> dict[str, Any]:
    channels: dict[str, Any] = {}
    for spec in topics.TOPICS:
        message = "ScanJob" if spec.name in STAGE_TOPICS.values() else "ScanEvent"
        if spec.name in (DLQ, PERSISTENCE_DLQ):
            message = "DeadLetter"
        channels[_channel_id(spec.name)] = _kafka_channel(spec, message)
    sse_names = [*STAGES, FAILED_EVENT]
    channels["ScanEventStream"] = {
        "address": "/api/v1/scan/{job_id}/events",
        "title": "SSE stream of one job",
        "description": "The gateway's Server-Sent Events stream of one job (its HTTP side: "
        "docs/contracts/openapi-gateway.json). Authenticated by the auth proxy's X-User-ID or the "
        "`token` of the POST's stream_url. Events arrive once each, in seq order, from "
        "Last-Event-ID on; `: keepalive` comments fill silences; the stream ends after `done` or "
        f"`{FAILED_EVENT}`. The failure is never named `error`: EventSource keeps that name for "
        "its own connection errors.",
        "servers": [{"$ref": "#/servers/gateway"}],
        "parameters": {"job_id": {"description": "the job id from the POST's 202"}},
        "messages": {n: _msg(f"Sse{n.capitalize()}") for n in sse_names},
        "bindings": {"http": {"bindingVersion": HTTP_BINDING}},
    }
    stage_groups = {s: topics.stage_group([s]) for s in PIPELINE}
    all_stages = topics.stage_group(list(PIPELINE))
    operations: dict[str, Any] = {
        "apiSendsJob": _operation(
            "send",
            _channel_id(FIRST_TOPIC),
            "ScanJob",
            "the scan API queues a job (transactional id prefix "
            f"`{topics.API_TRANSACTIONAL_ID_PREFIX}`, with its queued event)",
            [],
        ),
        "apiSendsQueuedEvent": _operation(
            "send", _channel_id(EVENTS), "ScanEvent", "the scan API's queued event (same transaction)", []
        ),
    }
    for i, stage in enumerate(PIPELINE):
        topic = STAGE_TOPICS[stage]
        operations[f"{stage}WorkerReceives"] = _operation(
            "receive",
            _channel_id(topic),
            "ScanJob",
            f"the {stage} worker takes jobs (group `{stage_groups[stage]}` per stage in Kubernetes, "
            f"`{all_stages}` when one process runs all stages)",
            [stage_groups[stage], all_stages],
        )
        if i + 1 < len(PIPELINE):
            nxt = STAGE_TOPICS[PIPELINE[i + 1]]
            operations[f"{stage}WorkerSendsJob"] = _operation(
                "send", _channel_id(nxt), "ScanJob", f"the {stage} worker passes the job on", []
            )
    operations["workersSendEvents"] = _operation(
        "send",
        _channel_id(EVENTS),
        "ScanEvent",
        "stage workers report started/completed per stage, then done or the one failed event",
        [],
    )
    operations["workersSendDeadLetters"] = _operation(
        "send", _channel_id(DLQ), "DeadLetter", "a stage gives up on a job (after retries)", []
    )
    operations["routerReceivesEvents"] = _operation(
        "receive",
        _channel_id(EVENTS),
        "ScanEvent",
        "the event router applies events to Redis (state, history, pub/sub for the gateway)",
        [topics.ROUTER_GROUP],
    )
    operations["writerReceivesEvents"] = _operation(
        "receive",
        _channel_id(EVENTS),
        "ScanEvent",
        "the Postgres writer stores terminal events",
        [topics.WRITER_GROUP],
    )
    operations["writerSendsDeadLetters"] = _operation(
        "send", _channel_id(PERSISTENCE_DLQ), "DeadLetter", "the writer gives up on a record", []
    )
    operations["gatewaySendsStream"] = {
        "action": "send",
        "channel": {"$ref": "#/channels/ScanEventStream"},
        "summary": "the gateway streams a job's events to its owner",
        "messages": [{"$ref": f"#/channels/ScanEventStream/messages/{n}"} for n in sse_names],
    }
    messages: dict[str, Any] = {
        "ScanJob": _kafka_message(ScanJob, "Scan job", "a job and what earlier stages found"),
        "ScanEvent": _kafka_message(ScanEvent, "Progress event", "one progress event (seq orders them)"),
        "DeadLetter": _kafka_message(DeadLetter, "Dead letter", "an original message and why it failed"),
    }
    for name in sse_names:
        messages[f"Sse{name.capitalize()}"] = _sse_message(name)
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "eco2 scan event streaming",
            "version": versioning.SCHEMA_VERSION,
            "description": "The Kafka topics of the scan pipeline and the SSE stream built on them. "
            "Generated from contract/ by `eco2 contract`; do not edit by hand.\n\n**Versions.** "
            + versioning.RULE,
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {"host": "127.0.0.1:9092", "protocol": "kafka", "description": "`eco2 stack up`"},
            "kubernetes": {
                "host": "eco2-kafka-bootstrap:9093",
                "protocol": "kafka-secure",
                "description": "Strimzi, SASL_SSL with SCRAM-SHA-512 per-component KafkaUsers",
            },
            "gateway": {"host": "127.0.0.1:8081", "protocol": "http", "description": "the SSE gateway"},
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": _schemas()},
    }
