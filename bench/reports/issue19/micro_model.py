"""CPU per model call: the SDK on httpx2 (main) against the SDK on its aiohttp transport (branch)."""
import asyncio, sys, time, httpx2, openai
from openai import AsyncOpenAI, DefaultAsyncHttpxClient, DefaultAioHttpClient
from openai._constants import DEFAULT_CONNECTION_LIMITS as L
from contract.settings import get_settings
from contract.events import ScanJob, now
from streams import model
s = get_settings()
def mk(kind):
    lim = type(L)(max_connections=200, max_keepalive_connections=200)
    hc = DefaultAioHttpClient(limits=lim, timeout=30) if kind == "aiohttp" else DefaultAsyncHttpxClient(limits=lim, timeout=30)
    return AsyncOpenAI(base_url=s.model_base_url, api_key=s.model_api_key, max_retries=0, timeout=30, http_client=hc)
async def run(kind, n, conc):
    c = mk(kind)
    job = ScanJob(job_id="micro", user_id="u", image_url="https://example.com/bottle.jpg", created_at=now())
    sem = asyncio.Semaphore(conc)
    async def one():
        async with sem:
            await model.classify(c, s, job)
    await asyncio.gather(*(one() for _ in range(50)))  # warm the pool
    t0 = time.process_time(); w0 = time.monotonic()
    await asyncio.gather(*(one() for _ in range(n)))
    cpu = time.process_time() - t0
    await c.close()
    return cpu / n * 1000, time.monotonic() - w0
kinds = sys.argv[1:] or ["httpx", "aiohttp", "httpx", "aiohttp"]
for k in kinds:
    ms, wall = asyncio.run(run(k, 1500, 100))
    print(f"{k:8s} {ms:.3f} ms CPU per call (wall {wall:.1f}s)", flush=True)
