"""The single topic definition and the Strimzi manifests generated from it."""

from __future__ import annotations

import yaml

from contract.topics import EVENTS, STAGE_PARTITIONS, STAGE_TOPICS, TOPICS, partition_for, shard_of
from eco2.topics_yaml import TOPICS_YAML, render


def test_committed_topics_yaml_matches_the_code():
    assert TOPICS_YAML.read_text() == render(), "run `eco2 deploy topics` and commit the result"


def test_manifest_topics_equal_code_topics():
    docs = [d for d in yaml.safe_load_all(TOPICS_YAML.read_text()) if d]
    assert {d["spec"]["topicName"]: d["spec"]["partitions"] for d in docs} == {
        t.name: t.partitions for t in TOPICS
    }


def test_events_topic_has_exactly_four_shards():
    assert {t.name: t.partitions for t in TOPICS}[EVENTS] == 4
    assert all({t.name: t.partitions for t in TOPICS}[n] == STAGE_PARTITIONS for n in STAGE_TOPICS.values())


def test_partition_for_is_the_java_murmur2_partitioner():
    # murmur2 reference values from Kafka's Java UtilsTest; toPositive(h) % n picks the partition.
    for key, java_hash in [("21", -973932308), ("foobar", -790332482), ("abc", 479470107)]:
        assert partition_for(key, 4) == (java_hash & 0x7FFFFFFF) % 4
        assert partition_for(key, 12) == (java_hash & 0x7FFFFFFF) % 12
    assert shard_of("foobar") == (-790332482 & 0x7FFFFFFF) % 4


def test_events_retention_covers_the_view_rebuild_window():
    """A lost Redis view is rebuilt by replaying `scan.events` over the rebuild window (the state
    TTL by default): the topic must still hold that window, with margin to notice the loss."""
    from contract.settings import Settings

    s = Settings()
    window_ms = (s.rebuild_window_s or s.state_ttl_s) * 1000
    keep_ms = int({t.name: t for t in TOPICS}[EVENTS].config["retention.ms"])
    assert keep_ms >= 2 * window_ms, f"scan.events keeps {keep_ms} ms, the rebuild replays {window_ms} ms"
