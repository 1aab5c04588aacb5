"""Which model each call of a scan asks for: the client's choice for the whole job, else the calling
stage's own setting (ECO2_VISION_MODEL for vision, ECO2_ANSWER_MODEL for answer).

The unit tests drive the real `openai` client over a mock transport and read the request bodies;
the integration test reads the job the scan API wrote to the first stage topic."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import httpx2
import pytest
from openai import AsyncOpenAI

from contract.events import ScanJob, now
from contract.settings import Settings
from contract.topics import BY_NAME, FIRST_TOPIC, partition_for
from streams import model

from .kafka_events import read_partition

CLASSIFICATION = {
    "major_category": "recyclable",
    "middle_category": "pet",
    "minor_category": "bottle",
    "situation_tags": [],
    "confidence": 0.9,
}
ANSWER = {"disposal_steps": ["rinse"], "gaps": [], "summary": "ok"}


def _api(asked: list[str], doc: dict[str, Any]) -> AsyncOpenAI:
    def handler(request: httpx2.Request) -> httpx2.Response:
        asked.append(json.loads(request.content)["model"])
        content = json.dumps(doc)
        return httpx2.Response(
            200, json={"choices": [{"message": {"role": "assistant", "content": content}}]}
        )

    return AsyncOpenAI(
        base_url="http://model.test/v1",
        api_key="x",
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)),
    )


def _job(model_name: str = "") -> ScanJob:
    return ScanJob(
        job_id="j", user_id="u", image_url="https://img.example/a.jpg", model=model_name, created_at=now()
    )


async def _both_calls(job: ScanJob) -> tuple[str, str]:
    s = Settings(vision_model="vision-m", answer_model="answer-m")
    asked: list[str] = []
    await model.classify(_api(asked, CLASSIFICATION), s, job)
    await model.write_answer(_api(asked, ANSWER), s, job, [])
    return asked[0], asked[1]


async def test_each_stage_asks_for_its_own_model_when_the_client_chose_none() -> None:
    assert await _both_calls(_job()) == ("vision-m", "answer-m")


async def test_the_clients_model_is_used_by_every_call_of_the_job() -> None:
    assert await _both_calls(_job("gpt-4o")) == ("gpt-4o", "gpt-4o")


@pytest.mark.integration
async def test_the_api_leaves_the_model_to_the_stages_unless_the_client_names_one(
    settings: Settings, stack_status: Any, uid: str
) -> None:
    """The job on the first stage topic carries the client's model or "" (never the vision
    model, which would make the answer call use it too)."""
    since = int(time.time() * 1000) - 1000
    jobs: dict[str, str | None] = {}
    async with httpx.AsyncClient(base_url=settings.api_url, timeout=30) as http:
        for chosen in (None, "gpt-4o"):
            body: dict[str, Any] = {"image_url": "https://images.example.com/glass_bottle.jpg"}
            if chosen:
                body["model"] = chosen
            r = await http.post("/api/v1/scan", json=body, headers={"X-User-ID": f"model-{uid}"})
            assert r.status_code == 202, r.text
            jobs[r.json()["job_id"]] = chosen
    for job_id, chosen in jobs.items():
        p = partition_for(job_id, BY_NAME[FIRST_TOPIC].partitions)
        msgs = await read_partition(
            settings, FIRST_TOPIC, p, since, lambda ms, j=job_id: any(m.key == j.encode() for m in ms)
        )
        record = next(json.loads(m.value) for m in msgs if m.key == job_id.encode())
        assert record["model"] == (chosen or "")
