"""Per-pod discovery for remote pools: ``discovery: dns`` re-resolves each URL's host name and keeps one
replica per address (a Kubernetes headless Service answers with every ready pod's IP).

Every ``discovery_interval_s`` the pool's URLs are resolved; an address that appears becomes a replica
(``http://10.1.2.3:8000/v1``, its name without credentials), an address that disappears stops getting new
requests at once and is closed once its in-flight requests have finished, so a scale-down or a rollout drops
no request. A failed resolution keeps the replicas as they are. Prefix and session affinity keep working
across changes: rendezvous hashing on replica names moves only the keys of a replica that came or went.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger("switchyard.discovery")

# host, port → addresses (IPv4/IPv6 literals); the default asks the system resolver
Resolver = Callable[[str, int], Awaitable[list[str]]]


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def with_address(url: str, address: str) -> str:
    """``url`` with its host replaced by ``address`` (credentials, port, path kept)."""
    parts = urlsplit(url)
    host = f"[{address}]" if ":" in address else address
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (userinfo + "@" if userinfo else "") + host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class DnsDiscovery:
    """Keeps ``pool``'s replicas equal to the addresses its URLs resolve to. ``make_backend(url)`` builds a
    replica for one address's URL."""

    def __init__(self, pool: Any, urls: list[str], make_backend: Callable[[str], Any], interval_s: float,
                 resolver: Resolver | None = None) -> None:
        self.pool = pool
        self.urls = urls
        self.make_backend = make_backend
        self.interval_s = interval_s
        self.resolver = resolver or system_resolver
        self._task: asyncio.Task | None = None

    async def resolve(self) -> list[str] | None:
        """The replica URLs now, or None when a name did not resolve (keep what we have)."""
        out: list[str] = []
        for url in self.urls:
            parts = urlsplit(url)
            try:
                addresses = await self.resolver(parts.hostname or "", parts.port or (443 if parts.scheme == "https"
                                                                                       else 80))
            except (OSError, ValueError) as e:
                log.warning("pool %s: cannot resolve %s (%s); keeping %d replicas", self.pool.alias,
                            parts.hostname, type(e).__name__, len(self.pool.replicas))
                return None
            out += [with_address(url, a) for a in addresses]
        return out or None

    async def refresh(self) -> None:
        urls = await self.resolve()
        if urls is not None:
            await self.pool.set_replicas({u: None for u in urls}, self.make_backend)

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name=f"discovery-{self.pool.alias}")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.refresh()
            except Exception as e:  # noqa: BLE001 - discovery must never stop serving
                log.warning("pool %s: discovery failed: %r", self.pool.alias, e)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
