"""A man-in-the-middle between a vehicle and the server, for attack tests.

:class:`MaliciousProxy` is a real HTTP proxy on 127.0.0.1 (aiohttp in a
thread) that forwards everything to the server and lets a test rewrite any
response body, replace it, or slow it down: the position of an attacker on
the network, a compromised CDN, or a compromised repository.

Per request, in order:

1. the request body is recorded in :attr:`MaliciousProxy.request_bodies`
   and passed through :attr:`MaliciousProxy.request_rewrites` (tamper with
   what the vehicle uploads, e.g. its manifest);
2. the request is forwarded and the upstream body passed through
   :attr:`MaliciousProxy.rewrites` (a rewrite that answers forces status 200);
3. the first of :attr:`MaliciousProxy.redirects` that names a location for
   the request (its path with query) answers ``302 Found`` to it instead;
4. the first of :attr:`MaliciousProxy.streams` that claims the request
   streams the answer instead, chunk by chunk (:func:`endless`,
   :func:`trickle`): data that never ends, or comes too slowly.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from aiohttp import web

from tests.uptake_fixtures import free_port

Rewrite = Callable[[str, bytes], bytes | None]
#: ``(method, path, body) -> new body or None``, applied to what the client sends.
RequestRewrite = Callable[[str, str, bytes], bytes | None]
#: ``(path, upstream body) -> chunks to send instead, or None`` to answer normally.
Stream = Callable[[str, bytes], AsyncIterator[bytes] | None]


class MaliciousProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.rewrites: list[Rewrite] = []
        self.requests: list[str] = []
        #: (method and path, the request's Range header or "") of every request, in order
        self.ranges: list[tuple[str, str]] = []
        self.request_rewrites: list[RequestRewrite] = []
        self.request_bodies: list[tuple[str, bytes]] = []
        self.streams: list[Stream] = []
        #: ``path_qs -> Location or None``: redirect the request instead of forwarding it
        self.redirects: list[Callable[[str], str | None]] = []
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
        self.ranges.append((f"{request.method} {path}", request.headers.get("Range", "")))
        body = await request.read()
        self.request_bodies.append((f"{request.method} {path}", body))
        for redirect in self.redirects:
            location = redirect(request.path_qs)
            if location is not None:
                return web.Response(status=302, headers={"Location": location})
        for request_rewrite in self.request_rewrites:
            new_body = request_rewrite(request.method, path, body)
            if new_body is not None:
                body = new_body
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() in ("content-type", "authorization", "range")
        }
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                request.method, self.upstream + request.path_qs, data=body or None, headers=headers
            ) as resp,
        ):
            data = await resp.read()
            status, ctype = (
                resp.status,
                resp.headers.get("Content-Type", "application/octet-stream"),
            )
            passed = {
                k: v
                for k, v in resp.headers.items()
                if k.lower() in ("content-range", "etag", "last-modified")
            }
        for rewrite in self.rewrites:
            new = rewrite(path, data)
            if new is not None:
                data, status, passed = new, 200, {}
        for stream in self.streams:
            chunks = stream(path, data)
            if chunks is not None:
                return await self._stream(request, chunks, ctype)
        return web.Response(body=data, status=status, headers={"Content-Type": ctype, **passed})

    async def _stream(
        self, request: web.Request, chunks: AsyncIterator[bytes], ctype: str
    ) -> web.StreamResponse:
        # no Content-Length: chunked transfer, so the client cannot know where the body ends
        resp = web.StreamResponse(status=200, headers={"Content-Type": ctype})
        await resp.prepare(request)
        try:
            async for chunk in chunks:
                await resp.write(chunk)
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client hung up: what a defended client does
        return resp

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


def endless(
    matches: Callable[[str], bool], filler: bytes = b" " * 65536, limit: int = 64 * 1024**2
) -> Stream:
    """Answer requests whose path ``matches`` with the real body followed by data without end.

    Without a length, as a chunked body. It does stop after ``limit`` bytes:
    far beyond any length a client may accept, but a client that lost its
    defence fails the test instead of filling the disk.
    """

    def stream(path: str, body: bytes) -> AsyncIterator[bytes] | None:
        if not matches(path):
            return None

        async def chunks() -> AsyncIterator[bytes]:
            yield body
            for _ in range(limit // len(filler)):
                yield filler
                await asyncio.sleep(0)

        return chunks()

    return stream


def trickle(
    matches: Callable[[str], bool], bytes_per_second: float, forever: bool = True
) -> Stream:
    """Answer requests whose path ``matches`` with the real body at ``bytes_per_second``.

    With ``forever`` the connection then stays open, dribbling spaces at the
    same rate: a server that is never quite silent enough for a read timeout.
    """

    def stream(path: str, body: bytes) -> AsyncIterator[bytes] | None:
        if not matches(path):
            return None

        async def chunks() -> AsyncIterator[bytes]:
            tick = 0.1
            step = max(1, int(bytes_per_second * tick))
            start, sent = time.monotonic(), 0
            data = body
            while data or forever:
                piece, data = (data[:step], data[step:]) if data else (b" " * step, b"")
                yield piece
                sent += len(piece)
                await asyncio.sleep(max(0.0, start + sent / bytes_per_second - time.monotonic()))

        return chunks()

    return stream


def padded(matches: Callable[[str], bool], extra: int, filler: bytes = b" ") -> Rewrite:
    """A rewrite that appends ``extra`` bytes of ``filler`` to bodies whose path ``matches``."""
    return lambda path, body: body + filler * extra if matches(path) else None
