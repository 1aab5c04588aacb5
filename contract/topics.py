"""The single definition of every Kafka topic.

The local stack creates topics from this list and `deploy/strimzi/topics.yaml` is generated from it
(`eco2 deploy topics`), so broker, manifests and code can never disagree.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

from aiokafka.partitioner import murmur2

from contract.pipeline import PIPELINE, SPEC

DAY_MS = 24 * 3600 * 1000

# Stage topics get 12 partitions: KEDA may scale a stage up to 12 pods (replicas beyond the
# partition count would sit idle), and 12 divides evenly over 1, 2, 3, 4, 6 and 12 consumers,
# so every replica count KEDA picks on the way up gets an even share of the lag.
STAGE_PARTITIONS = 12
# The events topic is the 4 shards of the progress stream (fixed by the product owner).
EVENTS_PARTITIONS = 4


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)
    doc: str = ""


# Prepended to every topic name: empty in every deployment. A test that runs a private pipeline
# (another stage list) on the shared local Kafka sets it for its own processes, so its topics
# and the stack's never meet.
PREFIX = os.environ.get("ECO2_TOPIC_PREFIX", "")

EVENTS = f"{PREFIX}scan.events"
DLQ = f"{PREFIX}scan.dlq"
PERSISTENCE_DLQ = f"{PREFIX}scan.persistence.dlq"

# One topic per stage, scan.<stage>, in pipeline order; the scan API writes the first.
STAGE_TOPICS: dict[str, str] = {stage: f"{PREFIX}scan.{stage}" for stage in PIPELINE}
FIRST_TOPIC = STAGE_TOPICS[PIPELINE[0]]

# Retention is sized to what reads each log (docs/operations.md, "Kafka disk"): a stage topic is
# read within seconds and kept through a long weekend's outage of its stage; scan.events feeds the
# Redis view's rebuild, which replays the state TTL (a day), kept three so a lost view is rebuilt
# whole even when noticed days later. At 300 VUs around the clock that is ~26 GiB per broker with
# zstd (7 and 14 days without compression were ~185 GiB: the 20-minute soak's MISS).
STAGE_RETENTION_DAYS = 3
EVENTS_RETENTION_DAYS = 3

_stage_config = {"retention.ms": str(STAGE_RETENTION_DAYS * DAY_MS), "cleanup.policy": "delete"}

TOPICS: tuple[TopicSpec, ...] = (
    *(TopicSpec(STAGE_TOPICS[st.name], STAGE_PARTITIONS, _stage_config, st.doc) for st in SPEC),
    TopicSpec(
        EVENTS,
        EVENTS_PARTITIONS,
        {"retention.ms": str(EVENTS_RETENTION_DAYS * DAY_MS), "cleanup.policy": "delete"},
        "progress events, 4 shards keyed by job_id",
    ),
    TopicSpec(
        DLQ,
        1,
        {"retention.ms": str(30 * DAY_MS), "cleanup.policy": "delete"},
        "pipeline dead letters (job + reason)",
    ),
    TopicSpec(
        PERSISTENCE_DLQ,
        1,
        {"retention.ms": str(30 * DAY_MS), "cleanup.policy": "delete"},
        "records the Postgres writer could not store",
    ),
)

BY_NAME: dict[str, TopicSpec] = {t.name: t for t in TOPICS}

# Replication of every topic (and of Kafka's internal offsets/transaction logs) in production:
# 3 copies, and an acks=all write needs 2 of them, so one broker can be down (rolling update,
# node loss) without losing an acknowledged message or stopping writes. The Strimzi manifests
# (`deploy/strimzi/topics.yaml`, generated) and the local stack both read it from here.
REPLICATION_FACTOR = 3
MIN_INSYNC_REPLICAS = 2


@dataclass(frozen=True)
class Replication:
    factor: int
    min_insync: int


def replication(brokers: int) -> Replication:
    """What a cluster of `brokers` nodes uses: production's 3/2 from three brokers on, 1/1 alone.

    (Two brokers get factor 2 with min ISR 1: 3 copies need 3 brokers, and min ISR 2 of 2 would
    stop every write while one broker restarts.)"""
    factor = max(1, min(REPLICATION_FACTOR, brokers))
    return Replication(factor, min(MIN_INSYNC_REPLICAS, max(1, factor - 1)))


def partition_for(key: str, partitions: int) -> int:
    """The partition Kafka's default (murmur2) partitioner picks for `key`.

    Every producer passes this explicitly so that the scan API (aiokafka), the Faust agents and
    any Java client agree on where a job's messages live.
    """
    return _key_hash(key) % partitions


@functools.lru_cache(maxsize=4096)
def _key_hash(key: str) -> int:
    """murmur2 in pure Python, once per key while it is recent: a stage worker sends a job's
    events, its next-stage record and its dead letters with the same key (issue 19)."""
    return murmur2(key.encode()) & 0x7FFFFFFF


def shard_of(job_id: str) -> int:
    """The events shard (partition of `scan.events`) a job's progress lives on."""
    return partition_for(job_id, EVENTS_PARTITIONS)


# Consumer groups. A stage worker's Faust app id (= its consumer group) is derived from the
# stages it runs, so a one-stage pod in Kubernetes has exactly the group KEDA watches.
def stage_group(stages: list[str] | tuple[str, ...]) -> str:
    return "eco2-stage-" + "-".join(stages)


ROUTER_GROUP = "eco2-router"
WRITER_GROUP = "eco2-writer"

# The scan API's transactional producer ids start with this (one id per API process, e.g.
# f"{API_TRANSACTIONAL_ID_PREFIX}-{hostname}"); its KafkaUser may use only ids with this prefix.
API_TRANSACTIONAL_ID_PREFIX = "eco2-api"
# `eco2 dlq replay`'s (a re-drive's job and its attempt's `queued` event go in one transaction):
# f"{DLQ_REPLAY_TRANSACTIONAL_ID_PREFIX}-{random}"; its KafkaUser may use only these ids.
DLQ_REPLAY_TRANSACTIONAL_ID_PREFIX = "eco2-dlq-replay"
