"""`eco2 chaos --rollout`'s parts that need no stack: its defaults, and the model stand-in's count
of calls per job that its "no model call repeated" verdict reads."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from bench.chaos import COMPONENTS, ROLLOUT, ChaosConfig, model_calls
from contract import trace
from contract.settings import Settings
from simmodel.server import create_app


def test_rollout_restarts_every_app_component_at_the_hosted_models_pace() -> None:
    cfg = ChaosConfig.for_rollout(hold_s=100)
    assert cfg.rollout and set(cfg.faults) == set(COMPONENTS) == set(ROLLOUT)
    assert (cfg.vus, cfg.model_latency, cfg.hold_s) == (60, (5.0, 10.0), 100)


def _body(schema: str, url: str) -> dict[str, Any]:
    content = [{"type": "image_url", "image_url": {"url": url}}]
    return {
        "model": "m",
        "messages": [{"role": "user", "content": content}],
        "response_format": {"json_schema": {"name": schema}},
    }


async def test_model_server_counts_calls_per_job_from_the_job_header(monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app(Settings(sim_latency_min_s=0, sim_latency_max_s=0))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://m") as http:
        for job, schema in [
            ("a", "classification"),
            ("a", "answer"),
            ("b", "classification"),
            ("b", "classification"),
        ]:
            r = await http.post(
                "/v1/chat/completions",
                json=_body(schema, f"https://x/clear_pet-{job}.jpg"),
                headers={trace.JOB_HEADER: job},
            )
            assert r.status_code in (200, 400)  # the answer body here has no rule context: either way counted
        await http.post("/v1/chat/completions", json=_body("classification", "https://x/no-header.jpg"))
        stats = (await http.get("/admin/stats", params={"by": "job"})).json()
    assert stats == {
        "total": 5,
        "jobs": {"a": {"classification": 1, "answer": 1}, "b": {"classification": 2}},
    }

    # The rollout's verdict on those counts: b repeated its vision call and never answered; c was
    # never seen at all.
    real = httpx.AsyncClient

    def to_app(**kw: Any) -> httpx.AsyncClient:
        return real(transport=httpx.ASGITransport(app=app), **kw)

    monkeypatch.setattr(httpx, "AsyncClient", to_app)
    verdict = await model_calls(Settings(), ["a", "b", "c"])
    assert verdict == {"jobs": 3, "calls": 4, "jobs_with_a_repeated_call": 1, "jobs_not_one_each": 2}
