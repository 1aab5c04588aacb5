"""Every answer of the scan API and the gateway is counted by route template and status
(runtime/http_metrics.py), read back from /metrics as Prometheus would.

Before the middleware the scan API counted only the answers its handlers remembered to count:
never its 401s, its idempotency-key 400s, its 404s or its 413s. Both apps run in-process against
the stack's Redis and Kafka (the API's POST is a real Kafka transaction)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.routing import Route
from starlette.testclient import TestClient

from contract.settings import Settings
from gateway.app import create_app as create_gateway
from producers.api import create_app as create_api
from runtime.http_metrics import UNMATCHED, route_template

pytestmark = pytest.mark.integration

SCAN = "/api/v1/scan"
RESULT = "/api/v1/scan/{job_id}/result"
EVENTS = "/api/v1/scan/{job_id}/events"


def count(client: TestClient, metric: str, route: str, status: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == metric and sample.labels == {"route": route, "status": status}:
                return sample.value
    return 0.0


Call = Callable[[TestClient], Any]  # a response


def counted_once(client: TestClient, metric: str, cases: list[tuple[Call, str, int]]) -> None:
    for call, route, status in cases:
        before = count(client, metric, route, str(status))
        r = call(client)
        assert r.status_code == status, (route, r.text)
        assert count(client, metric, route, str(status)) == before + 1, (route, status)


async def _no_stored_result(job_id: str) -> dict[str, Any] | None:
    return None


def test_scan_api_counts_every_status(settings: Settings, stack_status: object, uid: str) -> None:
    s = settings.model_copy(update={"scan_burst": 1, "scan_rate_per_min": 0.01, "inflight_max": 0})
    user = {"X-User-ID": f"metrics-{uid}"}
    body = {"image_url": f"https://images.example.com/metrics/clear_pet-{uid}.jpg"}
    cases: list[tuple[Call, str, int]] = [
        (lambda c: c.get(f"/api/v1/scan/{uid}/result"), RESULT, 401),
        (lambda c: c.post(SCAN, json=body), SCAN, 401),
        (lambda c: c.post(SCAN, json=body, headers={**user, "X-Idempotency-Key": "k" * 201}), SCAN, 400),
        (lambda c: c.post(SCAN, json={"image_url": "not a url"}, headers=user), SCAN, 400),
        (lambda c: c.get(f"/api/v1/scan/unknown-{uid}/result", headers=user), RESULT, 404),
        (lambda c: c.post(SCAN, content=b"x" * (s.max_body_bytes + 1), headers=user), SCAN, 413),
        (lambda c: c.post(SCAN, json=body, headers=user), SCAN, 202),
        (lambda c: c.post(SCAN, json=body, headers=user), SCAN, 429),  # a burst of one
        (lambda c: c.get("/no/such/path"), UNMATCHED, 404),
    ]
    with TestClient(create_api(s, result_fallback=_no_stored_result)) as client:
        counted_once(client, "eco2_api_requests_total", cases)
        latency = [
            f
            for f in text_string_to_metric_families(client.get("/metrics").text)
            if f.name == "eco2_api_seconds"
        ]
        assert any(
            smp.labels.get("route") == RESULT and smp.name.endswith("_count") and smp.value > 0
            for smp in latency[0].samples
        )


def test_gateway_counts_every_status(settings: Settings, stack_status: object, uid: str) -> None:
    s = settings.model_copy(update={"unknown_job_wait_s": 0.0})
    events = f"/api/v1/scan/job-{uid}/events"
    cases: list[tuple[Call, str, int]] = [
        (lambda c: c.get(events), EVENTS, 401),
        (lambda c: c.get(events, headers={"X-User-ID": "not a user id"}), EVENTS, 400),
        (lambda c: c.get(events, params={"token": "forged"}), EVENTS, 401),
        (lambda c: c.get(events, headers={"X-User-ID": f"metrics-{uid}"}), EVENTS, 404),
        (lambda c: c.get("/health"), "/health", 200),
    ]
    with TestClient(create_gateway(s)) as client:
        counted_once(client, "eco2_gateway_requests_total", cases)


def test_route_template_for_answers_given_before_routing() -> None:
    """A middleware that answers before the router (the body limit) still gets the template."""

    async def endpoint(request: Any) -> Any:
        return None

    routes = [Route("/api/v1/scan/{job_id}/result", endpoint, methods=["GET"])]
    scope = {"type": "http", "path": "/api/v1/scan/abc/result", "method": "GET", "root_path": ""}
    assert route_template(scope, routes) == "/api/v1/scan/{job_id}/result"
    assert route_template({**scope, "method": "POST"}, routes) == "/api/v1/scan/{job_id}/result"
    assert route_template({**scope, "path": "/elsewhere"}, routes) == UNMATCHED
