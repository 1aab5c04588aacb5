"""docs/contracts/ is what the code and contract/ generate now, and the AsyncAPI document passes
the official AsyncAPI parser."""

from __future__ import annotations

import json

import openapi_spec_validator
import yaml

from contract import topics, trace, versioning
from contract.events import SSE_EVENTS
from contract.settings import Settings
from eco2 import contract_cli

from .node_tools import run_node


def test_committed_documents_match_the_code() -> None:
    drift = [str(p.relative_to(contract_cli.REPO_ROOT)) for p in contract_cli.stale()]
    assert drift == [], f"{drift} differ from what the code generates: run `eco2 contract` and commit"


def test_openapi_documents_are_valid_openapi() -> None:
    for path in (contract_cli.API_DOC, contract_cli.GATEWAY_DOC):
        doc = json.loads(path.read_text())
        assert doc["openapi"].startswith("3.1")
        openapi_spec_validator.validate(doc)


def test_asyncapi_passes_the_official_parser(settings: Settings) -> None:
    proc = run_node(settings, "validate_asyncapi.mjs", str(contract_cli.ASYNCAPI_DOC))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["version"] == "3.0.0" and summary["problems"] == []
    assert summary["channels"] == [t.name for t in topics.TOPICS] + ["/api/v1/scan/{job_id}/events"]


def test_asyncapi_says_what_contract_says() -> None:
    doc = yaml.safe_load(contract_cli.ASYNCAPI_DOC.read_text())
    by_topic = {c["address"]: c for c in doc["channels"].values()}
    for spec in topics.TOPICS:
        kafka = by_topic[spec.name]["bindings"]["kafka"]
        assert kafka["partitions"] == spec.partitions
        assert kafka["topicConfiguration"]["retention.ms"] == int(spec.config["retention.ms"])
    headers = doc["components"]["schemas"]["KafkaHeaders"]
    assert headers["required"] == [trace.HEADER] and headers["properties"][trace.HEADER]["pattern"]
    groups = {
        g
        for op in doc["operations"].values()
        if op["action"] == "receive"
        for g in op["bindings"]["kafka"]["groupId"]["enum"]
    }
    assert {topics.ROUTER_GROUP, topics.WRITER_GROUP, topics.stage_group(["vision"])} <= groups
    messages = doc["components"]["messages"]
    stream = doc["channels"]["ScanEventStream"]["messages"].values()
    names = sorted(messages[m["$ref"].rsplit("/", 1)[1]]["name"] for m in stream)
    assert names == sorted(SSE_EVENTS)
    assert "error" not in SSE_EVENTS


def test_asyncapi_states_the_version_rule() -> None:
    """The document carries the rule of contract/versioning.py and every record schema its `v`."""
    doc = yaml.safe_load(contract_cli.ASYNCAPI_DOC.read_text())
    assert doc["info"]["version"] == versioning.SCHEMA_VERSION
    assert versioning.RULE in doc["info"]["description"]
    schemas = doc["components"]["schemas"]
    for name in ("ScanJob", "ScanEvent", "ScanResult", "DeadLetter"):
        v = schemas[name]["properties"][versioning.FIELD]
        assert v["default"] == versioning.SCHEMA_VERSION and v["pattern"] == versioning.PATTERN
        assert schemas[name]["additionalProperties"] is True  # unknown fields are kept, not refused
