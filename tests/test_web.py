"""The gateway's demo page in real headless Chromium (Debian's /usr/bin/chromium, via Playwright)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Page, async_playwright

from contract import stream_token
from contract.events import STAGES
from contract.settings import Settings

from .gateway_support import EventProducer, Proc, delete_jobs, full_events, job, submit

pytestmark = pytest.mark.integration
pytest_plugins = ["tests.gateway_fixtures"]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture
async def page() -> AsyncIterator[Page]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} missing: `eco2 stack up` installs it (apt package chromium)")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield await browser.new_page()
        finally:
            await browser.close()


async def watch_progress(page: Page, timeout_s: float) -> list[str]:
    """Poll the page's progress label until the page reaches a final state; returns what it showed."""
    seen: list[str] = []
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        pct = await page.text_content("#pct")
        if pct and (not seen or seen[-1] != pct):
            seen.append(pct)
        state = await page.get_attribute("body", "data-state")
        if state in ("done", "failed"):
            # The page may have moved on between reading the label and the state: read it once more.
            pct = await page.text_content("#pct")
            if pct and seen[-1:] != [pct]:
                seen.append(pct)
            return seen
        await asyncio.sleep(0.05)
    status = await page.text_content("#status")
    raise AssertionError(f"page did not finish; progress seen {seen}, status {status}")


async def stage_statuses(page: Page) -> dict[str, str | None]:
    return {
        s: await page.get_attribute(f'#stages li[data-stage="{s}"]', "data-status")
        for s in STAGES
    }


async def test_page_shows_progress_to_the_final_stage(
    settings: Settings, gw_producer: EventProducer, gw_router: Proc, gw_gateway: str, page: Page, uid: str
) -> None:
    j = job(uid)
    rest = await submit(settings, gw_producer, j)
    await page.goto(f"{gw_gateway}/?job={j.job_id}&token={stream_token.issue(settings, j.job_id, uid)}")
    producing = asyncio.create_task(gw_producer.send_all(rest, gap_s=0.4))
    seen = await watch_progress(page, 60)
    await producing
    assert await page.get_attribute("body", "data-state") == "done"
    assert seen[-1] == "100%"
    assert await page.evaluate("window.eco2Log") == [f"{e.stage}:{e.status}" for e in [*full_events(j)]]
    assert set((await stage_statuses(page)).values()) == {"completed"}
    assert await page.text_content("#advice") == f"Rinse it ({j.job_id})."
    assert "Petty" in (await page.text_content("#prize") or "")
    await delete_jobs(settings, [j.job_id])


async def test_page_shows_a_failure(
    settings: Settings, gw_producer: EventProducer, gw_router: Proc, gw_gateway: str, page: Page, uid: str
) -> None:
    j = job(uid)
    await gw_producer.send_all(full_events(j, fail_at="answer"))
    await page.goto(f"{gw_gateway}/?job={j.job_id}&token={stream_token.issue(settings, j.job_id, uid)}")
    await watch_progress(page, 30)
    assert await page.get_attribute("body", "data-state") == "failed"
    assert "failed at answer: boom" in (await page.text_content("#status") or "")
    assert (await stage_statuses(page))["answer"] == "failed"
    await delete_jobs(settings, [j.job_id])


async def test_page_with_someone_elses_token_shows_a_refused_stream(
    settings: Settings, gw_producer: EventProducer, gw_router: Proc, gw_gateway: str, page: Page, uid: str
) -> None:
    """A token for another user opens no stream: the page's EventSource gets a connection error
    (never an event) and stops."""
    j = job(uid)
    await gw_producer.send_all(full_events(j))
    await page.goto(f"{gw_gateway}/?job={j.job_id}&token={stream_token.issue(settings, j.job_id, 'mallory')}")
    await watch_progress(page, 30)
    assert "stream refused" in (await page.text_content("#status") or "")
    assert await page.evaluate("window.eco2Log") == []
    await delete_jobs(settings, [j.job_id])


async def test_page_reopens_its_stream_after_a_503_and_shows_each_event_once(
    settings: Settings, page: Page, uid: str
) -> None:
    """While the Redis view is rebuilt the gateway holds a new stream, then answers 503 +
    Retry-After, and a browser's EventSource gives up on any non-200 answer. The page asks why,
    waits Retry-After and reopens; the reopened stream replays the history, shown once."""
    import redis.asyncio as aioredis

    import view
    from contract import keys
    from view import StateStore

    from .gateway_support import gateway_proc, isolated_redis_url, wait_ready

    url = isolated_redis_url(settings, db=7)  # a view of its own: only this test marks it
    r = aioredis.from_url(url)
    j = job(uid)
    proc = gateway_proc(settings, ECO2_REDIS_URL=url, ECO2_VIEW_WAIT_S="0.5")
    proc.start()
    try:
        await StateStore(r, settings.state_ttl_s).apply(full_events(j))
        rid = await view.run_id(r)
        await r.hset(keys.VIEW, mapping={"status": "rebuilding", "run_id": rid, "epoch": uid})  # type: ignore[misc]
        base = await wait_ready(proc)
        await page.goto(f"{base}/?job={j.job_id}&token={stream_token.issue(settings, j.job_id, uid)}")
        deadline = asyncio.get_running_loop().time() + 20
        while "retrying" not in (status := await page.text_content("#status") or ""):
            assert asyncio.get_running_loop().time() < deadline, f"no retry shown; status {status!r}"
            await asyncio.sleep(0.1)
        assert "HTTP 503" in status and await page.evaluate("window.eco2Log") == []
        await view.mark_ready(r)  # the rebuild is over
        await watch_progress(page, 30)
        assert await page.get_attribute("body", "data-state") == "done"
        log = await page.evaluate("window.eco2Log")
        assert log == [f"{e.stage}:{e.status}" for e in full_events(j)], log
    finally:
        proc.kill(signal.SIGTERM)
        await r.flushdb()
        await r.aclose()


async def test_page_submits_a_real_scan(
    settings: Settings,
    stack_status: dict[str, dict[str, object]],
    gw_router: Proc,
    gw_gateway: str,
    page: Page,
    uid: str,
) -> None:
    """The whole app: the page POSTs to the scan API (CORS), the pipeline runs the job, the test
    router puts its events into the gateway's Redis db and the page follows them to the answer."""
    # `stack_status` fails the test when any service (api, workers, model among them) is down.
    await page.goto(gw_gateway + "/")
    await page.fill("#user", uid)
    await page.fill("#image", "https://images.example.org/scan/pet-bottle.jpg")
    await page.click("#submit")
    seen = await watch_progress(page, 150)
    status = await page.text_content("#status")
    assert await page.get_attribute("body", "data-state") == "done", status
    assert seen[-1] == "100%"
    log = await page.evaluate("window.eco2Log")
    assert log[0] == "queued:completed" and log[-1] == "done:completed"
    assert [x for x in log if x.endswith(":completed")] == [f"{s}:completed" for s in STAGES]
    assert await page.text_content("#advice")
    assert await page.text_content("#prize")
    job_text = await page.text_content("#job") or ""
    await delete_jobs(settings, [job_text.removeprefix("job ")])
