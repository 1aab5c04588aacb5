"""Offline checks of every Kubernetes manifest in deploy/.

Built-in kinds are validated against the Kubernetes JSON schemas that `kubernetes-validate` ships
(strict: unknown fields fail, as `kubectl apply --validate=strict` would); Strimzi and KEDA kinds
against the `openAPIV3Schema` of the real CRDs in ../shared/crds, made strict the same way (an
object schema without `additionalProperties` or `x-kubernetes-preserve-unknown-fields` rejects
unknown fields, as the API server's strict field validation does). CEL rules
(`x-kubernetes-validations`) are not evaluated; the one that matters here (KEDA min <= max) is
checked explicitly. Then the manifests are checked against the code: topics, consumer groups,
ACLs, partitions, env var names, ports and probes.
"""

from __future__ import annotations

import ast
import copy
import importlib
import importlib.resources
import json
import os
import re
import shutil
import socket
import subprocess
import time
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from contract.events import PIPELINE, next_stage
from contract.settings import KAFKA_VERSION, REPO_ROOT, Settings
from contract.topics import (
    API_TRANSACTIONAL_ID_PREFIX,
    BY_NAME,
    DLQ,
    DLQ_REPLAY_TRANSACTIONAL_ID_PREFIX,
    EVENTS,
    FIRST_TOPIC,
    PERSISTENCE_DLQ,
    ROUTER_GROUP,
    STAGE_TOPICS,
    TOPICS,
    WRITER_GROUP,
    stage_group,
)
from eco2.topics_yaml import CLUSTER, TOPICS_YAML, render

DEPLOY = REPO_ROOT / "deploy"


def _find_crds() -> Path:
    """`shared/crds` beside the repo (as CI has it), else `ECO2_SHARED_DIR`, else beside the
    local repository this one was cloned from (a clone made elsewhere, e.g. in /tmp)."""
    candidates = [REPO_ROOT.parent / "shared"]
    if os.environ.get("ECO2_SHARED_DIR"):
        candidates.append(Path(os.environ["ECO2_SHARED_DIR"]))
    origin = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "remote", "get-url", "origin"], capture_output=True, text=True
    ).stdout.strip()
    if origin and Path(origin).is_dir():
        candidates.append(Path(origin).resolve().parent / "shared")
    return next((c / "crds" for c in candidates if (c / "crds").is_dir()), candidates[0] / "crds")


CRDS = _find_crds()
K8S_VERSION = "1.33"  # the Kubernetes minor the built-in kinds are validated for
IMAGE = "eco2-streams"
CRD_GROUPS = ("kafka.strimzi.io", "keda.sh", "postgresql.cnpg.io", "monitoring.coreos.com")
# The optional monitoring (Prometheus operator CRDs) is its own kustomization beside the main one.
KUSTOMIZATIONS = (DEPLOY, DEPLOY / "monitoring")

Doc = dict[str, Any]


# --- loading ---------------------------------------------------------------------------------


def kustomization(root: Path = DEPLOY) -> Doc:
    return yaml.safe_load((root / "kustomization.yaml").read_text())


def manifest_files() -> list[Path]:
    return [root / r for root in KUSTOMIZATIONS for r in kustomization(root)["resources"]]


def load_docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@cache
def all_docs() -> tuple[Doc, ...]:
    return tuple(d for f in manifest_files() for d in load_docs(f))


def of_kind(kind: str) -> list[Doc]:
    return [d for d in all_docs() if d["kind"] == kind]


def by_name(kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in of_kind(kind)}


def containers(deploy: Doc) -> list[Doc]:
    return list(deploy["spec"]["template"]["spec"]["containers"])


def env_of(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


def config_map(name: str) -> dict[str, str]:
    return dict(by_name("ConfigMap")[name]["data"])


# --- validation ------------------------------------------------------------------------------


def _strict(node: Any) -> Any:
    """A CRD schema as the API server applies it: closed objects, int-or-string, nullable."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out and "type" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


@cache
def crd_schemas() -> dict[tuple[str, str], Doc]:
    """(apiVersion, kind) -> strict openAPIV3Schema, for every served version of every CRD."""
    if not CRDS.is_dir():
        pytest.fail(f"CRDs not found at {CRDS} (shared/crds beside the repo, or set ECO2_SHARED_DIR)")
    out: dict[tuple[str, str], Doc] = {}
    for path in sorted(CRDS.glob("*/*.yaml")):
        for crd in load_docs(path):
            if crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for v in crd["spec"]["versions"]:
                if v.get("served"):
                    out[(f"{group}/{v['name']}", kind)] = _strict(v["schema"]["openAPIV3Schema"])
    return out


@cache
def object_meta_validator() -> jsonschema.protocols.Validator:
    """Kubernetes' own ObjectMeta schema, for the metadata of custom resources."""
    root = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    versions = sorted(
        (p.name for p in root.iterdir() if p.name.endswith("-local-strict")),
        key=lambda n: tuple(int(x) for x in n[1:].split("-")[0].split(".")),
    )
    chosen = [v for v in versions if v.startswith(f"v{K8S_VERSION}.")] or versions[-1:]
    defs = json.loads((root / chosen[0] / "_definitions.json").read_text())
    registry: Registry = Resource.from_contents(defs) @ Registry()
    ref = f"{defs['$id']}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
    return jsonschema.Draft202012Validator({"$ref": ref}, registry=registry)


def validate(doc: Doc) -> None:
    """Raise when `doc` would not be accepted by a cluster with Strimzi and KEDA installed."""
    if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
        raise ValueError(f"not a Kubernetes object: {str(doc)[:80]}")
    group = doc["apiVersion"].split("/")[0]
    if group in CRD_GROUPS:
        schema = crd_schemas().get((doc["apiVersion"], doc["kind"]))
        if schema is None:
            raise ValueError(f"no CRD serves {doc['apiVersion']} {doc['kind']}")
        jsonschema.Draft7Validator(schema).validate(doc)
        object_meta_validator().validate(doc.get("metadata") or {})
        if not (doc.get("metadata") or {}).get("name"):
            raise ValueError(f"{doc['kind']} without metadata.name")
    else:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError as exc:
            raise ValueError(exc.message) from exc


def docs_with_ids() -> Iterator[Any]:
    for f in manifest_files():
        for d in load_docs(f):
            yield pytest.param(d, id=f"{f.relative_to(DEPLOY)}:{d['kind']}/{d['metadata']['name']}")


@pytest.mark.parametrize("doc", list(docs_with_ids()))
def test_manifest_validates_against_its_schema(doc: Doc) -> None:
    validate(doc)


def _find(kind: str, name: str | None = None) -> Doc:
    for d in all_docs():
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name):
            return copy.deepcopy(d)
    raise AssertionError(f"no {kind} {name or ''}")


def _broken() -> Iterator[Any]:
    """Real manifests with one mistake each: the validator must reject every one."""

    def case(label: str, kind: str, mutate: Any, name: str | None = None) -> Any:
        doc = _find(kind, name)
        mutate(doc)
        return pytest.param(doc, id=label)

    c0 = ["spec", "template", "spec", "containers", 0]

    def at(doc: Doc, path: list[Any]) -> Any:
        for p in path:
            doc = doc[p]
        return doc

    yield case(
        "deployment-unknown-container-field",
        "Deployment",
        lambda d: at(d, c0).update(imagePullPolice="Always"),
    )
    yield case(
        "deployment-port-as-string",
        "Deployment",
        lambda d: at(d, c0)["ports"][0].update(containerPort="http"),
    )
    yield case("deployment-without-selector", "Deployment", lambda d: d["spec"].pop("selector"))
    yield case(
        "hpa-wrong-api-version", "HorizontalPodAutoscaler", lambda d: d.update(apiVersion="autoscaling/v3")
    )
    yield case("service-port-missing", "Service", lambda d: d["spec"]["ports"][0].pop("port"))
    yield case("kafka-no-listeners", "Kafka", lambda d: d["spec"]["kafka"].pop("listeners"))
    yield case("kafka-unknown-spec-field", "Kafka", lambda d: d["spec"].update(zookeeper={"replicas": 3}))
    yield case("kafka-old-api-version", "Kafka", lambda d: d.update(apiVersion="kafka.strimzi.io/v1beta2"))
    yield case("nodepool-bad-role", "KafkaNodePool", lambda d: d["spec"].update(roles=["zookeeper"]))
    yield case("nodepool-no-storage", "KafkaNodePool", lambda d: d["spec"].pop("storage"))
    yield case("topic-partitions-string", "KafkaTopic", lambda d: d["spec"].update(partitions="12"))
    yield case(
        "user-unknown-operation",
        "KafkaUser",
        lambda d: d["spec"]["authorization"]["acls"][0].update(operations=["Produce"]),
    )
    yield case(
        "user-acl-old-operation-field",
        "KafkaUser",
        lambda d: d["spec"]["authorization"]["acls"][0].update(operation="Read"),
    )
    yield case("scaledobject-no-triggers", "ScaledObject", lambda d: d["spec"].pop("triggers"))
    yield case(
        "scaledobject-numeric-metadata",
        "ScaledObject",
        lambda d: d["spec"]["triggers"][0]["metadata"].update(lagThreshold=100),
    )
    yield case("scaledobject-max-zero", "ScaledObject", lambda d: d["spec"].update(maxReplicaCount=0))
    yield case(
        "triggerauth-ref-without-key",
        "TriggerAuthentication",
        lambda d: d["spec"]["secretTargetRef"][0].pop("key"),
    )
    yield case("cr-bad-metadata", "KafkaTopic", lambda d: d["metadata"].update(labels={"a": 1}))
    yield case("cnpg-instances-string", "Cluster", lambda d: d["spec"].update(instances="3"))
    yield case("cnpg-unknown-field", "Cluster", lambda d: d["spec"].update(replicas=3))
    yield case("cnpg-initdb-typo", "Cluster", lambda d: d["spec"]["bootstrap"]["initdb"].update(databse="x"))
    yield case("statefulset-no-service-name-type", "StatefulSet", lambda d: d["spec"].update(serviceName=1))
    yield case("podmonitor-no-selector", "PodMonitor", lambda d: d["spec"].pop("selector"))
    yield case(
        "rule-unknown-field",
        "PrometheusRule",
        lambda d: d["spec"]["groups"][0]["rules"][0].update(severity="warning"),
    )
    yield case("unknown-kind", "KafkaTopic", lambda d: d.update(kind="KafkaTopics"))
    yield pytest.param(["not", "a", "mapping"], id="not-an-object")


@pytest.mark.parametrize("doc", list(_broken()))
def test_validator_rejects_broken_manifests(doc: Any) -> None:
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError, ValueError)):
        validate(doc)


# --- the kustomization -----------------------------------------------------------------------


def test_kustomization_lists_every_manifest_file() -> None:
    on_disk = {p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*.yaml")}
    on_disk -= {(root / "kustomization.yaml").relative_to(DEPLOY).as_posix() for root in KUSTOMIZATIONS}
    listed = [f.relative_to(DEPLOY).as_posix() for f in manifest_files()]
    assert len(listed) == len(set(listed)), "a file is listed twice"
    assert set(listed) == on_disk
    assert all(kustomization(root)["namespace"] == "eco2" for root in KUSTOMIZATIONS)


def test_every_object_has_a_unique_kind_and_name() -> None:
    keys = [(d["kind"], d["metadata"]["name"]) for d in all_docs()]
    assert len(keys) == len(set(keys))
    assert all("namespace" not in d["metadata"] for d in all_docs()), "kustomize sets the namespace"


@pytest.mark.skipif(not (shutil.which("kustomize") or shutil.which("kubectl")), reason="no kustomize")
def test_kustomize_builds_and_every_rendered_object_validates() -> None:
    argv = ["kustomize", "build"] if shutil.which("kustomize") else ["kubectl", "kustomize"]
    rendered: list[Doc] = []
    generated = 0
    for root in KUSTOMIZATIONS:
        out = subprocess.run([*argv, str(root)], capture_output=True, text=True, check=True).stdout
        rendered += [d for d in yaml.safe_load_all(out) if d]
        generated += len(kustomization(root).get("configMapGenerator", []))
    assert len(rendered) == len(all_docs()) + generated
    for d in rendered:
        validate(d)
        assert d["metadata"].get("namespace", "eco2") == "eco2" or d["kind"] == "Namespace"


def _pyproject_version() -> str:
    return str(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"])


def test_every_pod_runs_the_project_image_at_the_package_version() -> None:
    version = _pyproject_version()
    (img,) = kustomization()["images"]
    assert img == {"name": IMAGE, "newTag": version}
    for d in of_kind("Deployment"):
        for c in containers(d):
            assert c["image"] == f"{IMAGE}:{version}", d["metadata"]["name"]


# --- Strimzi ---------------------------------------------------------------------------------


def test_kafka_is_kraft_with_the_pinned_version_and_production_config() -> None:
    (kafka,) = of_kind("Kafka")
    assert kafka["metadata"]["name"] == CLUSTER
    spec = kafka["spec"]["kafka"]
    assert spec["version"] == KAFKA_VERSION
    assert "zookeeper" not in kafka["spec"]
    cfg = spec["config"]
    assert int(cfg["default.replication.factor"]) == 3
    assert int(cfg["min.insync.replicas"]) == 2
    assert int(cfg["offsets.topic.replication.factor"]) == 3
    assert int(cfg["transaction.state.log.replication.factor"]) == 3
    assert int(cfg["transaction.state.log.min.isr"]) == 2
    assert str(cfg["auto.create.topics.enable"]).lower() == "false"
    assert spec["authorization"]["type"] == "simple"
    assert {"topicOperator", "userOperator"} <= set(kafka["spec"]["entityOperator"])
    # The listener the app uses is the one in ECO2_KAFKA_BOOTSTRAP and authenticates like the users.
    host, port = config_map("eco2-config")["ECO2_KAFKA_BOOTSTRAP"].rsplit(":", 1)
    assert host == f"{CLUSTER}-kafka-bootstrap"
    (listener,) = [x for x in spec["listeners"] if x["port"] == int(port)]
    assert listener["tls"] is True and listener["authentication"]["type"] == "scram-sha-512"
    assert config_map("eco2-config")["ECO2_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"


def test_node_pools_have_three_controllers_and_three_brokers_on_persistent_storage() -> None:
    pools = of_kind("KafkaNodePool")
    roles: dict[str, int] = {}
    for p in pools:
        assert p["metadata"]["labels"]["strimzi.io/cluster"] == CLUSTER
        assert p["spec"]["replicas"] == 3
        for r in p["spec"]["roles"]:
            roles[r] = roles.get(r, 0) + p["spec"]["replicas"]
        storage = p["spec"]["storage"]
        volumes = storage["volumes"] if storage["type"] == "jbod" else [storage]
        assert volumes and all(v["type"] == "persistent-claim" and v["size"] for v in volumes)
        assert not any(v.get("deleteClaim") for v in volumes), "deleting a pool must keep the data"
    assert roles == {"controller": 3, "broker": 3}


def test_kafka_topics_are_the_generated_ones_and_equal_the_code() -> None:
    assert TOPICS_YAML.read_text() == render(), "run `eco2 deploy topics`"
    topics = of_kind("KafkaTopic")
    assert {t["spec"]["topicName"]: t["spec"]["partitions"] for t in topics} == {
        t.name: t.partitions for t in TOPICS
    }
    for t in topics:
        assert t["metadata"]["labels"]["strimzi.io/cluster"] == CLUSTER
        assert t["spec"]["replicas"] == 3
        assert int(t["spec"]["config"]["min.insync.replicas"]) == 2


def test_stage_workers_scalers_and_kafka_users_are_the_generated_ones() -> None:
    """deploy/app/stages.yaml and deploy/strimzi/users.yaml are what contract/ generates now."""
    from eco2.manifests import GENERATED

    for path, generate in GENERATED.items():
        assert path.read_text() == generate(), f"{path.name} drifted: run `eco2 deploy manifests`"


def test_every_topic_any_manifest_names_exists_in_the_code() -> None:
    names = {t.name for t in TOPICS}
    for d in all_docs():
        if d["kind"] == "ScaledObject":
            for trig in d["spec"]["triggers"]:
                assert trig["metadata"]["topic"] in names
        if d["kind"] == "KafkaUser":
            for acl in d["spec"]["authorization"]["acls"]:
                r = acl["resource"]
                if r["type"] == "topic" and r.get("patternType", "literal") == "literal":
                    assert r["name"] in names


Acl = tuple[str, str, str, str]  # resource type, name, pattern type, operation


def _expected_acls() -> dict[str, set[Acl]]:
    """What each component reads and writes, from the contract alone."""

    def topic(name: str, op: str) -> Acl:
        return ("topic", name, "literal", op)

    def group(name: str) -> Acl:
        return ("group", name, "literal", "Read")

    out: dict[str, set[Acl]] = {
        "eco2-api": {
            topic(FIRST_TOPIC, "Write"),
            topic(EVENTS, "Write"),
            ("transactionalId", API_TRANSACTIONAL_ID_PREFIX, "prefix", "Write"),
            ("transactionalId", API_TRANSACTIONAL_ID_PREFIX, "prefix", "Describe"),
        },
        "eco2-router": {topic(EVENTS, "Read"), group(ROUTER_GROUP)},
        "eco2-writer": {topic(EVENTS, "Read"), group(WRITER_GROUP), topic(PERSISTENCE_DLQ, "Write")},
        "eco2-keda": {("topic", "scan.", "prefix", "Describe"), ("group", "eco2-", "prefix", "Describe")},
        # `eco2 dlq replay`: reads both dead-letter topics (no group), re-produces to the targets
        # of eco2.dlq.plan: scan.events (writer letters) and each stage's topic (pipeline letters).
        "eco2-dlq-replay": {
            topic(DLQ, "Read"),
            topic(PERSISTENCE_DLQ, "Read"),
            topic(EVENTS, "Write"),
            *(topic(t, "Write") for t in STAGE_TOPICS.values()),
            ("transactionalId", DLQ_REPLAY_TRANSACTIONAL_ID_PREFIX, "prefix", "Write"),
            ("transactionalId", DLQ_REPLAY_TRANSACTIONAL_ID_PREFIX, "prefix", "Describe"),
        },
        "eco2-ops": {
            ("topic", "scan.", "prefix", "Read"),
            ("topic", "scan.", "prefix", "DescribeConfigs"),
            ("group", "eco2-", "prefix", "Describe"),
        },
    }
    for stage in PIPELINE:
        nxt = STAGE_TOPICS.get(next_stage(stage))  # None after the last stage: only `done` events
        acls = {
            topic(STAGE_TOPICS[stage], "Read"),
            group(stage_group([stage])),
            topic(EVENTS, "Write"),
            topic(DLQ, "Write"),
        }
        if nxt:
            acls.add(topic(nxt, "Write"))
        out[stage_group([stage])] = acls
    return out


def test_kafka_user_acls_are_exactly_what_each_component_needs() -> None:
    actual: dict[str, set[Acl]] = {}
    for u in of_kind("KafkaUser"):
        assert u["metadata"]["labels"]["strimzi.io/cluster"] == CLUSTER
        assert u["spec"]["authentication"]["type"] == "scram-sha-512"
        acls = actual.setdefault(u["metadata"]["name"], set())
        for acl in u["spec"]["authorization"]["acls"]:
            assert acl.get("type", "allow") == "allow" and acl.get("host", "*") == "*"
            r = acl["resource"]
            for op in acl["operations"]:
                assert op != "All"
                acls.add((r["type"], r["name"], r.get("patternType", "literal"), op))
    assert actual == _expected_acls()


# --- the app ---------------------------------------------------------------------------------


def _stages_of(container: Doc) -> list[str] | None:
    """The stages a `python -m streams worker --stages a,b` container runs (canonical order)."""
    cmd = container["command"] + container.get("args", [])
    if cmd[:4] != ["python", "-m", "streams", "worker"]:
        return None
    chosen = cmd[cmd.index("--stages") + 1].split(",")
    return [s for s in PIPELINE if s in chosen]


def _consumer_of(deploy: Doc) -> tuple[str, list[str]] | None:
    """(consumer group, topics) the Deployment's process really consumes, from its command."""
    (c,) = containers(deploy)
    stages = _stages_of(c)
    if stages is not None:
        return stage_group(stages), [STAGE_TOPICS[s] for s in stages]
    if c["command"] == ["python", "-m", "persistence"]:
        return WRITER_GROUP, [EVENTS]
    if c["command"] == ["python", "-m", "streams", "router"]:
        return ROUTER_GROUP, [EVENTS]
    return None


def test_one_deployment_per_component_and_per_stage() -> None:
    cmds = {" ".join(containers(d)[0]["command"]) for d in of_kind("Deployment")}
    assert cmds == {
        "python -m producers",
        "python -m gateway",
        "python -m simmodel",
        "python -m streams router",
        "python -m persistence",
        *(f"python -m streams worker --stages {s}" for s in PIPELINE),
    }


def test_scaled_objects_watch_the_group_and_topic_their_worker_really_uses() -> None:
    deployments = by_name("Deployment")
    scaled = {so["spec"]["scaleTargetRef"]["name"]: so for so in of_kind("ScaledObject")}
    # Every stage worker and the writer are KEDA-scaled, nothing else is.
    keda_targets = {
        name
        for name, d in deployments.items()
        if (_stages_of(containers(d)[0]) is not None) or containers(d)[0]["command"][-1] == "persistence"
    }
    assert set(scaled) == keda_targets
    auths = by_name("TriggerAuthentication")
    for target, so in scaled.items():
        group, topics = _consumer_of(deployments[target])  # type: ignore[misc]
        spec = so["spec"]
        triggers = spec["triggers"]
        assert [t["type"] for t in triggers] == ["kafka"] * len(topics)
        assert sorted(t["metadata"]["topic"] for t in triggers) == sorted(topics)
        for t in triggers:
            md = t["metadata"]
            assert md["consumerGroup"] == group, target
            assert md["bootstrapServers"] == config_map("eco2-config")["ECO2_KAFKA_BOOTSTRAP"]
            assert int(md["lagThreshold"]) > 0
            assert md["offsetResetPolicy"] == "earliest"  # what the Faust/aiokafka consumers use
            assert md["sasl"] == "scram_sha512" and md["tls"] == "enable"
            major, minor = (int(x) for x in md["version"].split(".")[:2])
            assert (major, minor) >= (2, 1), "Kafka 4 brokers reject protocol versions older than 2.1"
            assert t["authenticationRef"]["name"] in auths
            # KEDA never needs more replicas than partitions: extra consumers would sit idle.
            assert spec["maxReplicaCount"] <= BY_NAME[md["topic"]].partitions
        assert 1 <= spec.get("minReplicaCount", 0) <= spec["maxReplicaCount"]  # the CRD's CEL rule


def test_stage_lag_threshold_fits_in_one_pods_concurrency() -> None:
    """In-flight jobs are uncommitted lag: a pod must be able to hold its lagThreshold in flight."""
    deployments = by_name("Deployment")
    for so in of_kind("ScaledObject"):
        (c,) = containers(deployments[so["spec"]["scaleTargetRef"]["name"]])
        if _stages_of(c) is None:
            continue
        concurrency = int(env_of(c)["ECO2_STAGE_CONCURRENCY"]["value"])
        for t in so["spec"]["triggers"]:
            assert int(t["metadata"]["lagThreshold"]) <= concurrency


def test_keda_logs_in_as_a_describe_only_kafka_user() -> None:
    (auth,) = of_kind("TriggerAuthentication")
    refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"] + auth["spec"]["configMapTargetRef"]}
    username = config_map(refs["username"]["name"])[refs["username"]["key"]]
    assert refs["password"]["name"] == username and refs["password"]["key"] == "password"
    assert refs["ca"] == {"parameter": "ca", "name": f"{CLUSTER}-cluster-ca-cert", "key": "ca.crt"}
    assert {op for *_, op in _expected_acls()[username]} == {"Describe"}


def test_every_kafka_client_logs_in_as_its_own_user_with_the_right_group() -> None:
    users = by_name("KafkaUser")
    acls = _expected_acls()
    for name, d in by_name("Deployment").items():
        (c,) = containers(d)
        env = env_of(c)
        consumer = _consumer_of(d)
        if "ECO2_KAFKA_SASL_USERNAME" not in env:
            assert consumer is None and c["command"][-1] != "producers", f"{name} needs a Kafka user"
            continue
        user = env["ECO2_KAFKA_SASL_USERNAME"]["value"]
        assert user in users
        ref = env["ECO2_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": user, "key": "password"}, "Strimzi's Secret for that user"
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        ca_file = config_map("eco2-config")["ECO2_KAFKA_SSL_CAFILE"]
        assert Path(ca_file).parent == Path(mounts["kafka-ca"])
        if consumer:
            group, topics = consumer
            assert ("group", group, "literal", "Read") in acls[user]
            assert all(("topic", t, "literal", "Read") in acls[user] for t in topics)


def _settings_fields() -> set[str]:
    return {f"ECO2_{name.upper()}" for name in Settings.model_fields}


def test_every_env_var_a_pod_gets_is_a_settings_field(monkeypatch: pytest.MonkeyPatch) -> None:
    fields = _settings_fields()
    shared = config_map("eco2-config")
    assert set(shared) <= fields, set(shared) - fields
    for name, d in by_name("Deployment").items():
        for c in containers(d):
            for ref in c.get("envFrom", []):
                assert ref["configMapRef"]["name"] == "eco2-config"
            env = env_of(c)
            assert set(env) <= fields, (name, set(env) - fields)
            # The literal values must parse as the Settings types (ports are ints, ...).
            for k in fields:
                monkeypatch.delenv(k, raising=False)
            for k, v in {**shared, **{k: e["value"] for k, e in env.items() if "value" in e}}.items():
                monkeypatch.setenv(k, v)
            Settings()


def test_secrets_outside_the_repo_are_documented() -> None:
    ops = (REPO_ROOT / "docs" / "operations.md").read_text()
    strimzi_made = set(by_name("KafkaUser")) | {f"{CLUSTER}-cluster-ca-cert"}
    strimzi_made |= {f"{name}-app" for name in by_name("Cluster")}  # made by CloudNativePG
    for d in of_kind("Deployment"):
        for c in containers(d):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["name"] not in strimzi_made:
                    assert ref["name"] == "eco2-app"
                    assert f"--from-literal={ref['key']}=" in ops, f"document the key {ref['key']}"


HTTP_PORTS = {  # command -> the Settings default the component listens on (not a local override)
    "producers": Settings.model_fields["api_port"].default,
    "gateway": Settings.model_fields["gateway_port"].default,
    "simmodel": Settings.model_fields["model_port"].default,
}
HTTP_APPS = {"producers": "producers.api", "gateway": "gateway.app", "simmodel": "simmodel.server"}


def _get_routes(module: str) -> set[str]:
    """The GET paths the component's real FastAPI app serves."""
    app = importlib.import_module(HTTP_APPS[module]).create_app(Settings())
    return {r.path for r in app.routes if "GET" in (getattr(r, "methods", None) or ())}


def test_http_services_probe_health_and_ready_on_their_port() -> None:
    services = of_kind("Service")
    for name, d in by_name("Deployment").items():
        (c,) = containers(d)
        module = c["command"][2]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        if module in HTTP_PORTS:
            assert ports == {"http": HTTP_PORTS[module]}, name
            routes = _get_routes(module)
            # /ready (dependencies up) where the app has it; an app without one is ready when alive.
            ready = "/ready" if "/ready" in routes else "/health"
            assert c["readinessProbe"]["httpGet"] == {"path": ready, "port": "http"}, name
            assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}, name
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                if probe in c:
                    assert c[probe]["httpGet"]["path"] in routes, (name, probe)
            pod_labels = d["spec"]["template"]["metadata"]["labels"]
            (svc,) = [s for s in services if s["spec"]["selector"].items() <= pod_labels.items()]
            want = {"name": "http", "port": HTTP_PORTS[module], "targetPort": "http"}
            assert svc["spec"]["ports"] == [want]
        else:
            metrics = int(config_map("eco2-config")["ECO2_METRICS_PORT"])
            assert ports == {"metrics": metrics}, name
            # Consumers: /health fails when stalled (runtime/health.py), not just when dead.
            assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "metrics"}, name
            assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}, name
            assert c["startupProbe"]["httpGet"] == {"path": "/health", "port": "metrics"}, name


def test_every_container_has_requests_and_limits_and_runs_locked_down() -> None:
    for name, d in by_name("Deployment").items():
        pod = d["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"]:
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (name, kind)
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
        mounts = {m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"]}
        local_dir = config_map("eco2-config")["ECO2_LOCAL_DIR"]
        assert local_dir in mounts, f"{name}: ECO2_LOCAL_DIR must be writable"


def test_api_and_gateway_scale_with_an_hpa_and_no_fixed_replicas() -> None:
    deployments = by_name("Deployment")
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in of_kind("HorizontalPodAutoscaler")}
    assert set(hpas) == {"eco2-api", "eco2-gateway"}
    for target, h in hpas.items():
        assert containers(deployments[target])[0]["command"][2] in ("producers", "gateway")
        assert h["spec"]["minReplicas"] >= 2
    autoscaled = set(hpas) | {so["spec"]["scaleTargetRef"]["name"] for so in of_kind("ScaledObject")}
    for name in autoscaled:
        assert "replicas" not in deployments[name]["spec"], f"{name}: a re-apply would reset the autoscaler"


def test_selectors_match_their_pods() -> None:
    for d in of_kind("Deployment"):
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
    pods = of_kind("Deployment") + of_kind("StatefulSet")
    pod_labels = [d["spec"]["template"]["metadata"]["labels"] for d in pods]
    for kind in ("Service", "PodDisruptionBudget"):
        for s in of_kind(kind):
            sel = s["spec"]["selector"]
            sel = sel.get("matchLabels", sel)
            assert any(sel.items() <= lbl.items() for lbl in pod_labels), s["metadata"]["name"]


def test_operations_doc_names_every_deploy_file_in_its_apply_order() -> None:
    ops = (REPO_ROOT / "docs" / "operations.md").read_text()
    assert re.search(r"kubectl apply -k deploy/?", ops)
    for f in ("strimzi", "KEDA", "CloudNativePG", "eco2-app", "kubectl apply -k deploy/monitoring"):
        assert f in ops


# --- Postgres (CloudNativePG), migrations, Redis ------------------------------------------------


def _pods() -> dict[str, Doc]:
    return {**by_name("Deployment"), **by_name("StatefulSet")}


def _all_containers(pod_owner: Doc) -> list[Doc]:
    spec = pod_owner["spec"]["template"]["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def test_postgres_is_a_cnpg_cluster_and_every_dsn_comes_from_its_app_secret() -> None:
    (cluster,) = of_kind("Cluster")
    assert cluster["apiVersion"] == "postgresql.cnpg.io/v1"
    spec = cluster["spec"]
    assert spec["instances"] >= 3 and spec["storage"]["size"]
    initdb = spec["bootstrap"]["initdb"]
    # CloudNativePG names the owner's Secret <cluster>-app; its `uri` is a complete DSN.
    want = {"name": f"{cluster['metadata']['name']}-app", "key": "uri"}
    readers = set()
    for name, d in _pods().items():
        for c in _all_containers(d):
            e = env_of(c).get("ECO2_POSTGRES_DSN")
            if e is not None:
                assert e["valueFrom"]["secretKeyRef"] == want, (name, c["name"])
                readers.add(name)
    assert {"eco2-api", "eco2-writer"} <= readers
    assert initdb["database"] and initdb["owner"]
    assert "ECO2_POSTGRES_DSN" not in config_map("eco2-config")


def test_migrations_run_in_an_init_container_of_every_postgres_user() -> None:
    for name in ("eco2-api", "eco2-writer"):
        d = by_name("Deployment")[name]
        (init,) = d["spec"]["template"]["spec"]["initContainers"]
        assert init["command"] == ["python", "-m", "eco2.cli", "db", "migrate"]  # run by tests/test_image.py
        assert init["image"] == containers(d)[0]["image"]
        assert init["securityContext"]["readOnlyRootFilesystem"] is True
        assert {"cpu", "memory"} <= set(init["resources"]["limits"])
    from eco2.cli import app  # the command exists

    assert "db" in {g.name for g in app.registered_groups}


def test_redis_is_a_statefulset_with_aof_on_a_volume_behind_the_configured_service() -> None:
    (sts,) = of_kind("StatefulSet")
    (c,) = containers(sts)
    argv = c["command"] + c.get("args", [])
    opts = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert argv[0] == "redis-server"
    assert opts["--appendonly"] == "yes" and opts["--appendfsync"] in ("everysec", "always")
    assert opts["--maxmemory-policy"] == "noeviction", "evicting would silently lose job history"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == opts["--dir"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert sts["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    # ECO2_REDIS_URL names this StatefulSet's Service and port.
    url = urlsplit(config_map("eco2-config")["ECO2_REDIS_URL"])
    svc = by_name("Service")[sts["spec"]["serviceName"]]
    assert url.hostname == svc["metadata"]["name"]
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    (port,) = svc["spec"]["ports"]
    assert url.port == port["port"] == int(opts["--port"])
    assert port["targetPort"] in {p["name"] for p in c["ports"]}


def test_the_local_redis_persists_as_the_statefulset_does(tmp_path: Path) -> None:
    """`eco2 stack up` and the benchmarks' private Redis (`eco2/infra.py` `redis_argv`) run with
    the persistence flags of the StatefulSet: what the benchmarks measure (fsync, AOF rewrites and
    their forks, issue 23) is what Kubernetes runs."""
    from eco2.infra import redis_argv

    (sts,) = of_kind("StatefulSet")
    (c,) = containers(sts)
    argv = c["command"] + c.get("args", [])
    local = redis_argv("127.0.0.1", 6379, tmp_path)
    flags = ("--appendonly", "--appendfsync", "--save", "--auto-aof-rewrite-percentage",
             "--zset-max-listpack-value")
    want = {f: argv[argv.index(f) + 1] for f in flags}
    assert {f: local[local.index(f) + 1] for f in flags} == want
    assert want["--auto-aof-rewrite-percentage"] == "400"


# --- monitoring -------------------------------------------------------------------------------


def _exported_metrics() -> set[str]:
    """Every series name the code's prometheus_client definitions export (read from the source)."""
    suffixes = {"Counter": ("_total",), "Gauge": ("",), "Histogram": ("_bucket", "_sum", "_count"),
                "Summary": ("_sum", "_count"), "Info": ("_info",), "Enum": ("",)}  # fmt: skip
    out: set[str] = set()
    products = [p.parent for p in REPO_ROOT.glob("*/__init__.py") if p.parent.name not in ("bench", "tests")]
    for pkg in sorted(products):
        for path in pkg.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                kind = getattr(node.func, "id", getattr(node.func, "attr", ""))
                first = node.args[0]
                if kind in suffixes and isinstance(first, ast.Constant) and isinstance(first.value, str):
                    base = first.value.removesuffix("_total") if kind == "Counter" else first.value
                    out |= {base + sfx for sfx in suffixes[kind]}
    return out


# Alerts may name a metric another issue adds; listed here until it is exported, then removed.
NOT_YET_EXPORTED: set[str] = set()


def _promql_metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(eco2_[a-z0-9_]+)\b", expr))


def _monitoring_exprs() -> dict[str, str]:
    out: dict[str, str] = {}
    for rule in of_kind("PrometheusRule"):
        for group in rule["spec"]["groups"]:
            for r in group["rules"]:
                out[f"alert {r.get('alert') or r.get('record')}"] = r["expr"]
    dashboard = json.loads((DEPLOY / "monitoring" / "eco2-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for t in panel["targets"]:
            out[f"panel {panel['title']} {t['refId']}"] = t["expr"]
    return out


def test_every_metric_in_alerts_and_dashboard_is_exported_by_the_code() -> None:
    exported = _exported_metrics()
    assert {"eco2_consumer_lag", "eco2_stage_seconds_bucket", "eco2_api_requests_total"} <= exported
    unknown = {}
    for where, expr in _monitoring_exprs().items():
        scrape = re.search(r'\bup\{job=~"\(\.\+/\)\?eco2-consumers"\}', expr)  # the PodMonitor's job
        assert _promql_metric_names(expr) or scrape, f"{where}: names no eco2 metric"
        missing = _promql_metric_names(expr) - exported - NOT_YET_EXPORTED
        if missing:
            unknown[where] = missing
    assert unknown == {}
    assert not NOT_YET_EXPORTED & exported, "now exported: remove it from NOT_YET_EXPORTED"


def test_the_metric_name_check_catches_a_typo() -> None:
    exported = _exported_metrics()
    assert _promql_metric_names("sum(rate(eco2_stage_jobs_totl[5m]))") - exported == {"eco2_stage_jobs_totl"}
    assert "eco2_stage_seconds" not in exported, "a histogram exports _bucket/_sum/_count only"


def test_alerts_cover_what_operators_need() -> None:
    names = {m for e in _monitoring_exprs().values() for m in _promql_metric_names(e)}
    alerts = {k: v for k, v in _monitoring_exprs().items() if k.startswith("alert ")}
    needed = {
        "lag growing per stage": "eco2_consumer_lag",
        "oldest in-flight age": "eco2_consumer_oldest_in_flight_seconds",
        "dead letters": "eco2_stage_failures_total",
        "writer dead letters": "eco2_writer_dead_letters_total",
        "router Redis errors": "eco2_router_redis_errors_total",
        "Redis view rebuilding": "eco2_view_rebuilding",
        "SSE near the limit": "eco2_gateway_max_streams",
        "API 5xx": "eco2_api_requests_total",
    }
    for what, metric in needed.items():
        assert any(metric in e for e in alerts.values()), what
    panels = " ".join(k for k in _monitoring_exprs() if k.startswith("panel "))
    for title in (
        "Jobs finished per minute",
        "End-to-end",
        "Stage latency",
        "lag per stage",
        "SSE",
        "Dead letters",
    ):
        assert title in panels, title
    assert names


def test_pod_monitors_scrape_every_pod_that_serves_metrics() -> None:
    monitors = of_kind("PodMonitor")
    for name, d in by_name("Deployment").items():
        (c,) = containers(d)
        labels = d["spec"]["template"]["metadata"]["labels"]
        ports = {p["name"] for p in c["ports"]}
        serves = (
            "metrics"
            if "metrics" in ports
            else ("http" if c["command"][2] in ("producers", "gateway") else None)
        )
        if serves is None:
            continue
        scraped = [
            ep
            for m in monitors
            if _selects(m["spec"]["selector"], labels)
            for ep in m["spec"]["podMetricsEndpoints"]
            if ep["port"] == serves
        ]
        assert scraped and all(ep["path"] == "/metrics" for ep in scraped), name


def _selects(selector: Doc, labels: dict[str, str]) -> bool:
    ok = selector.get("matchLabels", {}).items() <= labels.items()
    for e in selector.get("matchExpressions", []):
        if e["operator"] == "In":
            ok = ok and labels.get(e["key"]) in e["values"]
    return ok


def test_the_dlq_replay_pod_of_the_runbook_is_valid_and_logs_in_as_the_replay_user() -> None:
    ops = (REPO_ROOT / "docs" / "operations.md").read_text()
    fence = "`" * 3
    block = ops.split(f"{fence}sh dlq-replay-pod\n", 1)[1].split(fence, 1)[0]
    pod = json.loads(block.split("--overrides='", 1)[1].rsplit("'", 1)[0])
    validate(pod)
    (c,) = pod["spec"]["containers"]
    env = env_of(c)
    assert env["ECO2_KAFKA_SASL_USERNAME"]["value"] == "eco2-dlq-replay"
    assert "eco2-dlq-replay" in by_name("KafkaUser")
    ref = env["ECO2_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "eco2-dlq-replay", "key": "password"}
    (cluster,) = of_kind("Cluster")
    dsn = env["ECO2_POSTGRES_DSN"]["valueFrom"]["secretKeyRef"]
    assert dsn == {"name": f"{cluster['metadata']['name']}-app", "key": "uri"}
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert str(Path(config_map("eco2-config")["ECO2_KAFKA_SSL_CAFILE"]).parent) in mounts
    assert c["image"] == f"{IMAGE}:{_pyproject_version()}" and c["securityContext"]["readOnlyRootFilesystem"]


@pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="no redis-server (eco2 stack up installs it)"
)
def test_the_redis_command_line_of_the_statefulset_runs_with_aof(tmp_path: Path) -> None:
    """Debian's redis-server takes the StatefulSet's exact arguments (port and dir moved to a
    free port and a temporary directory) and writes its append-only file."""
    import redis

    (sts,) = of_kind("StatefulSet")
    (c,) = containers(sts)
    argv = list(c["command"] + c.get("args", []))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv[argv.index("--port") + 1] = str(port)
    argv[argv.index("--dir") + 1] = str(tmp_path)
    proc = subprocess.Popen(
        [*argv, "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    try:
        client = redis.Redis(port=port, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        client.set("k", "v")
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    aof = list(tmp_path.rglob("*.aof"))
    assert aof and any(b"k" in p.read_bytes() for p in aof), aof


def _alert_cases() -> list[Doc]:
    """promtool unit tests: synthetic series, the alerts that must (not) fire, with which labels."""
    w = {"severity": "warning"}
    crit = {"severity": "critical"}
    lag = 'eco2_consumer_lag{group="eco2-stage-vision",topic="scan.vision",partition="0"}'
    age = (
        'eco2_consumer_oldest_in_flight_seconds{group="eco2-stage-answer",topic="scan.answer",partition="3"}'
    )
    return [
        {  # a backlog that keeps growing fires; one that stays put does not
            "interval": "1m",
            "input_series": [
                {"series": lag, "values": "0+50x60"},
                {"series": lag.replace("vision", "rule"), "values": "600x60"},
            ],
            "alert_rule_test": [
                {"eval_time": "20m", "alertname": "Eco2ConsumerLagGrowing", "exp_alerts": []},
                {
                    "eval_time": "40m",
                    "alertname": "Eco2ConsumerLagGrowing",
                    "exp_alerts": [{"exp_labels": {**w, "group": "eco2-stage-vision"}}],
                },
            ],
        },
        {  # a message in flight for minutes: after the `for`, the alert names its partition
            "interval": "1m",
            "input_series": [{"series": age, "values": "0+60x20"}],
            "alert_rule_test": [
                {"eval_time": "6m", "alertname": "Eco2OldestInFlightMessageTooOld", "exp_alerts": []},
                {
                    "eval_time": "12m",
                    "alertname": "Eco2OldestInFlightMessageTooOld",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                **w,
                                "group": "eco2-stage-answer",
                                "topic": "scan.answer",
                                "partition": "3",
                            }
                        }
                    ],
                },
            ],
        },
        {  # a consumer whose scrape fails (prometheus-operator's job: namespace/PodMonitor)
            "interval": "1m",
            "input_series": [
                {"series": 'up{job="eco2/eco2-consumers",pod="eco2-router-0"}', "values": "1 1 0 0 0 0 1 1"},
                {"series": 'up{job="eco2/eco2-consumers",pod="eco2-writer-0"}', "values": "1x8"},
                {"series": 'up{job="eco2/eco2-http",pod="eco2-api-0"}', "values": "0x8"},
            ],
            "alert_rule_test": [
                {"eval_time": "2m", "alertname": "Eco2ConsumerDown", "exp_alerts": []},
                {
                    "eval_time": "4m",
                    "alertname": "Eco2ConsumerDown",
                    "exp_alerts": [{"exp_labels": {"severity": "critical", "pod": "eco2-router-0"}}],
                },
                {"eval_time": "7m", "alertname": "Eco2ConsumerDown", "exp_alerts": []},
            ],
        },
        {
            "interval": "1m",
            "input_series": [
                {"series": 'eco2_gateway_streams{pod="gw-1"}', "values": "9500x20"},
                {"series": 'eco2_gateway_max_streams{pod="gw-1"}', "values": "10000x20"},
                {"series": 'eco2_gateway_streams{pod="gw-2"}', "values": "100x20"},
                {"series": 'eco2_gateway_max_streams{pod="gw-2"}', "values": "10000x20"},
                {"series": 'eco2_api_requests_total{route="/api/v1/scan",status="503"}', "values": "0+10x20"},
                {
                    "series": 'eco2_api_requests_total{route="/api/v1/scan",status="202"}',
                    "values": "0+100x20",
                },
                {
                    "series": 'eco2_stage_failures_total{stage="vision",reason="model_permanent_error"}',
                    "values": "0 0 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1",
                },  # fmt: skip
                {"series": "eco2_view_rebuilding", "values": "0 0 1 1 1 1 0 0 0 0"},
            ],
            "alert_rule_test": [
                {
                    "eval_time": "10m",
                    "alertname": "Eco2SSEConnectionsNearLimit",
                    "exp_alerts": [{"exp_labels": {**w, "pod": "gw-1"}}],
                },
                {"eval_time": "10m", "alertname": "Eco2Api5xx", "exp_alerts": [{"exp_labels": crit}]},
                {
                    "eval_time": "3m",
                    "alertname": "Eco2DeadLetters",
                    "exp_alerts": [
                        {"exp_labels": {**w, "stage": "vision", "reason": "model_permanent_error"}}
                    ],
                },
                {
                    "eval_time": "4m",
                    "alertname": "Eco2RedisViewRebuilding",
                    "exp_alerts": [{"exp_labels": w}],
                },
                {"eval_time": "9m", "alertname": "Eco2RedisViewRebuilding", "exp_alerts": []},
            ],  # fmt: skip
        },
    ]


@pytest.mark.skipif(
    not shutil.which("promtool"), reason="no promtool (eco2 stack up installs Debian's prometheus)"
)
def test_alert_rules_parse_and_fire_on_synthetic_series(tmp_path: Path) -> None:
    """promtool checks every rule (PromQL and annotation templates) and every dashboard query,
    then unit-tests the alerts' expressions, `for` and labels (annotations stripped: their wording
    is not under test)."""
    groups = [g for r in of_kind("PrometheusRule") for g in r["spec"]["groups"]]
    # The dashboard's queries as recording rules: promtool parses their PromQL too.
    panels = {k: e for k, e in _monitoring_exprs().items() if k.startswith("panel ")}
    recorded = [{"record": f"eco2:dashboard:{i}", "expr": e} for i, e in enumerate(panels.values())]
    checked = [*groups, {"name": "dashboard-queries", "rules": recorded}]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": checked}))
    check = subprocess.run(
        ["promtool", "check", "rules", "rules.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    bare = copy.deepcopy(groups)
    for g in bare:
        for r in g["rules"]:
            r.pop("annotations", None)
    (tmp_path / "bare.yaml").write_text(yaml.safe_dump({"groups": bare}))
    cases = {"rule_files": ["bare.yaml"], "evaluation_interval": "1m", "tests": _alert_cases()}
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(cases))
    run = subprocess.run(
        ["promtool", "test", "rules", "tests.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
