"""CPU of one job's memo claims: main's redis-py pipelines (3 per stage) against the branch's Lua
claims (2 per model stage, 1 per model-free stage)."""
import asyncio, time, uuid
from contract.settings import get_settings
from view import pooled_client
from streams.stages import _CLAIM
s = get_settings()
V = "x" * 900
async def main_job(r, jid):
    for st in ("vision", "rule", "answer", "reward"):
        for claims, reads in (([f"m:{jid}:{st}:started"], [f"m:{jid}:{st}:out"]), ([f"m:{jid}:{st}:out"], []), ([f"m:{jid}:{st}:completed"] + ([f"m:{jid}:done"] if st == "reward" else []), [])):
            p = r.pipeline(transaction=False)
            for k in claims: p.set(k, V, nx=True, get=True, ex=600)
            for k in reads: p.get(k)
            await p.execute()
async def branch_job(r, script, jid):
    for st in ("vision", "rule", "answer", "reward"):
        if st in ("rule", "reward"):
            ks = [f"m:{jid}:{st}:started", f"m:{jid}:{st}:out", f"m:{jid}:{st}:completed"] + ([f"m:{jid}:done"] if st == "reward" else [])
            await script(keys=ks, args=[600, 2] + [V] * len(ks))
        else:
            await script(keys=[f"m:{jid}:{st}:started", f"m:{jid}:{st}:out"], args=[600, 0, V])
            await script(keys=[f"m:{jid}:{st}:out", f"m:{jid}:{st}:completed"], args=[600, 1, V, V])
async def run(kind, n=600, conc=50):
    r = pooled_client(s.redis_url, 64, "micro")
    script = r.register_script(_CLAIM)
    sem = asyncio.Semaphore(conc)
    async def one():
        async with sem:
            jid = uuid.uuid4().hex
            await (main_job(r, jid) if kind == "pipeline" else branch_job(r, script, jid))
    await asyncio.gather(*(one() for _ in range(50)))
    t0 = time.process_time()
    await asyncio.gather(*(one() for _ in range(n)))
    cpu = time.process_time() - t0
    await r.flushdb() if False else None
    await r.aclose()
    return cpu / n * 1000
for k in ["pipeline", "lua", "pipeline", "lua"]:
    print(f"{k:9s} {asyncio.run(run(k)):.3f} ms CPU per job", flush=True)
