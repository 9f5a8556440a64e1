"""A man-in-the-middle between a vehicle and the server, for attack tests.

:class:`MaliciousProxy` is a real HTTP proxy on 127.0.0.1 (aiohttp in a
thread) that forwards everything to the server and lets a test rewrite any
response body, replace it, or slow it down: the position of an attacker on
the network, a compromised CDN, or a compromised repository.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from tests.uptake_fixtures import free_port

Rewrite = Callable[[str, bytes], bytes | None]


class MaliciousProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.rewrites: list[Rewrite] = []
        self.requests: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.requests.append(f"{request.method} {path}")
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "authorization", "range")}
        async with aiohttp.ClientSession() as session, session.request(
            request.method, self.upstream + request.path_qs, data=body or None, headers=headers
        ) as resp:
            data = await resp.read()
            status, ctype = resp.status, resp.headers.get("Content-Type", "application/octet-stream")
        for rewrite in self.rewrites:
            new = rewrite(path, data)
            if new is not None:
                data, status = new, 200
        return web.Response(body=data, status=status, headers={"Content-Type": ctype})

    def close(self) -> None:
        async def stop() -> None:
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def resign(data: bytes, signers: list[Any], mutate: Callable[[Any], None]) -> bytes:
    """Parse TUF metadata, let ``mutate`` change ``signed``, re-sign with ``signers``."""
    from tuf.api.metadata import Metadata
    from tuf.api.serialization.json import JSONSerializer

    md = Metadata.from_bytes(data)
    mutate(md.signed)
    md.signatures.clear()
    for signer in signers:
        md.sign(signer, append=True)
    return md.to_bytes(JSONSerializer(compact=False))
