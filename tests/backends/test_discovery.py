"""Per-pod discovery (``discovery: dns``): a fake resolver answers three pod addresses (three fake upstreams on
127.0.0.1-3, one port); the gateway sees three replicas, keeps a prefix on one pod, and when a pod leaves the
answer its in-flight streams finish and no request fails."""

from __future__ import annotations

import asyncio
import time

import httpx

from bench.fake_upstream import FakeBehavior, FakeUpstream
from gateway.app import create_app
from gateway.settings import settings_from_dict
from tests.conftest import free_port, start_live_server

HOST = "pods.slm.test"


def test_three_pods_become_three_replicas_and_one_leaves_without_a_failed_request():
    port = free_port()
    pods = {}
    servers = []
    for address in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
        app = FakeUpstream(name=address, behavior=FakeBehavior(num_tokens=10, token_delay_s=0.05))
        pods[address] = app
        servers.append(start_live_server(app, port=port, host=address))
    answer = {"addresses": ["127.0.0.1", "127.0.0.2", "127.0.0.3"]}

    async def resolver(host: str, _port: int) -> list[str]:
        assert host == HOST
        return list(answer["addresses"])

    pools = [{"name": name, "kind": "remote", "model": "m", "urls": [f"http://{HOST}:{port}/v1"],
              "discovery": "dns", "discovery_interval_s": 0.1, "max_retries": 0} for name in ("slm", "llm")]
    settings = settings_from_dict({"pools": pools, "example_cache": {"enabled": False}})
    gateway = start_live_server(create_app(settings, resolver=resolver))
    try:
        ready = httpx.get(gateway.base_url + "/readyz").json()
        assert ready["pools"]["slm"] == {"healthy_replicas": 3, "replicas": 3}
        url = gateway.base_url + "/v1/chat/completions"
        async def spread() -> None:  # 30 different prompts at once: rendezvous on the prefix (and the load bound)
            async with httpx.AsyncClient(timeout=30) as client:  # spread them; a pod is missed with p < 1e-4
                await asyncio.gather(*(client.post(url, json={
                    "model": "slm", "messages": [{"role": "user", "content": f"q{i} " * 80}]}) for i in range(30)))

        asyncio.run(spread())
        assert all(app.num_requests > 0 for app in pods.values()), {a: p.num_requests for a, p in pods.items()}
        before = {a: p.num_requests for a, p in pods.items()}
        same = {"model": "slm", "messages": [{"role": "user", "content": "the same long prefix " * 40}]}
        for _ in range(4):
            httpx.post(url, json=same)
        grew = [a for a, p in pods.items() if p.num_requests > before[a]]
        assert len(grew) == 1  # one prefix, one pod

        async def burst_while_a_pod_leaves() -> list[int]:
            async with httpx.AsyncClient(timeout=30) as client:
                async def one(i: int) -> int:
                    body = {"model": "slm", "stream": True, "messages": [{"role": "user", "content": f"s{i} " * 60}]}
                    async with client.stream("POST", url, json=body) as r:
                        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
                    return r.status_code if lines and lines[-1] == "data: [DONE]" and '"error"' not in "".join(
                        lines) else 0
                tasks = [asyncio.create_task(one(i)) for i in range(12)]
                await asyncio.sleep(0.15)  # the streams are under way on every pod
                answer["addresses"] = ["127.0.0.1", "127.0.0.2"]
                return await asyncio.gather(*tasks)

        assert asyncio.run(burst_while_a_pod_leaves()) == [200] * 12  # in-flight streams on the leaving pod end
        deadline = time.monotonic() + 10
        while httpx.get(gateway.base_url + "/readyz").json()["pools"]["slm"]["replicas"] != 2:
            assert time.monotonic() < deadline, "the pod that left is still a replica"
            time.sleep(0.05)
        gone = pods["127.0.0.3"].num_requests
        for i in range(6):
            assert httpx.post(url, json={"model": "slm", "messages": [{"role": "user", "content": f"a{i}"}]}
                              ).status_code == 200
        assert pods["127.0.0.3"].num_requests == gone  # no new request reaches it
    finally:
        gateway.stop()
        for server in servers:
            server.stop()
