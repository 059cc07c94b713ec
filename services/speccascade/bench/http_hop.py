"""HTTP through Serve's proxy: routes on the ingress itself vs a sibling ingress deployment that forwards
to it by handle (what serve/http.py chose between). Run: .venv/bin/python -m speccascade.bench.http_hop
"""
import asyncio, json, statistics, sys, time, http.client
import ray
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve.config import HTTPOptions

CHUNKS = 16
direct_api, sibling_api = FastAPI(), FastAPI()

class Work:
    async def one(self):
        await asyncio.sleep(0)
        return {"text": "x"}
    async def many(self):
        for _ in range(CHUNKS):
            await asyncio.sleep(0)
            yield "data: {}\n\n"

@serve.ingress(direct_api)
class Direct(Work):
    @direct_api.post("/one")
    async def http_one(self):
        return await self.one()
    @direct_api.post("/many")
    async def http_many(self):
        return StreamingResponse(self.many(), media_type="text/event-stream")

class Backend(Work):
    pass

@serve.ingress(sibling_api)
class Sibling:
    def __init__(self, backend):
        self.backend = backend
    @sibling_api.post("/one")
    async def http_one(self):
        return await self.backend.one.remote()
    @sibling_api.post("/many")
    async def http_many(self):
        gen = self.backend.options(stream=True).many.remote()
        return StreamingResponse(gen, media_type="text/event-stream")

def timed(port, path, n):
    out = []
    conn = http.client.HTTPConnection("127.0.0.1", port)
    for _ in range(n):
        t = time.perf_counter()
        conn.request("POST", path, body=b"{}", headers={"Content-Type": "application/json"})
        r = conn.getresponse(); r.read()
        out.append((time.perf_counter() - t) * 1000)
    return statistics.median(out[5:])

ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
serve.start(http_options=HTTPOptions(host="127.0.0.1", port=8123))
opts = dict(ray_actor_options={"num_cpus": 0.25}, logging_config={"enable_access_log": False})
serve.run(serve.deployment(Direct).options(**opts).bind(), name="direct", route_prefix="/d")
serve.run(serve.deployment(Sibling).options(**opts).bind(serve.deployment(Backend).options(**opts).bind()), name="sibling", route_prefix="/s")
res = {}
for rnd in range(3):  # interleaved rounds
    for name, prefix in (("direct", "/d"), ("sibling", "/s")):
        for path in ("/one", "/many"):
            res.setdefault((name, path), []).append(timed(8123, prefix + path, 105))
for k, v in res.items():
    print(k, "median ms per request over 3 rounds:", [round(x, 2) for x in v], "->", round(statistics.median(v), 2))
serve.shutdown(); ray.shutdown()
