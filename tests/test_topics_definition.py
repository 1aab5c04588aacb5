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
