"""The framework's ceiling for ``bench/fleet_load.py``: the least work an aiohttp server does.

A minimal aiohttp application over the same mutual TLS as the Uptake server,
doing only what no correct server can skip, with nothing of Uptake's own:

* ``GET /director/{vin}/metadata/timestamp.json``: fixed bytes from memory
  (no identity check, no database, no metrics, no access log);
* ``POST /api/v1/vehicles/{vin}/manifest``: read the body, parse the JSON,
  canonicalise the two signed parts (securesystemslib, as python-tuf does) and
  verify their two ed25519 signatures with the vehicle's key, held in memory
  (no schema, no counters, no database write).

``fleet_load.py`` starts it as a child process (one process, one event loop,
like one ``uptake server run``) and drives it with the same client, vehicles
and connections as the server, so the run shows how much of the gap to nginx
and to the verification bound is the framework's and how much is Uptake's.

    python bench/aiohttp_ceiling.py --port P --cert C --key K --ca CA --keys KEYS.json \
        --timestamp FILE
"""

from __future__ import annotations

import argparse
import json
import ssl
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from securesystemslib.formats import encode_canonical

_MAX_BODY = 64 * 1024


def _verified(key: Ed25519PublicKey, envelope: dict[str, Any]) -> bool:
    text = encode_canonical(envelope["signed"])
    assert text is not None
    try:
        key.verify(bytes.fromhex(envelope["signatures"][0]["sig"]), text.encode())
    except (InvalidSignature, ValueError, KeyError, IndexError):
        return False
    return True


def application(timestamp: bytes, keys: dict[str, Ed25519PublicKey]) -> web.Application:
    async def poll(request: web.Request) -> web.Response:
        return web.Response(body=timestamp, content_type="application/json")

    async def manifest(request: web.Request) -> web.Response:
        body = await request.content.read(_MAX_BODY + 1)
        key = keys.get(request.match_info["vin"])
        if key is None or len(body) > _MAX_BODY:
            raise web.HTTPForbidden()
        envelope = json.loads(body)
        reports = envelope["signed"]["ecu_version_reports"].values()
        if not all(_verified(key, e) for e in (*reports, envelope)):
            raise web.HTTPBadRequest()
        return web.json_response({"accepted": True})

    app = web.Application(client_max_size=_MAX_BODY)
    app.router.add_get("/director/{vin}/metadata/timestamp.json", poll)
    app.router.add_post("/api/v1/vehicles/{vin}/manifest", manifest)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--ca", type=Path, required=True, help="CA of the vehicles' certificates")
    parser.add_argument("--keys", type=Path, required=True, help="JSON: VIN -> ed25519 hex")
    parser.add_argument("--timestamp", type=Path, required=True)
    args = parser.parse_args()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(args.ca))
    context.load_cert_chain(args.cert, args.key)
    context.verify_mode = ssl.CERT_REQUIRED
    keys = {
        vin: Ed25519PublicKey.from_public_bytes(bytes.fromhex(hex_key))
        for vin, hex_key in json.loads(args.keys.read_text()).items()
    }
    web.run_app(
        application(args.timestamp.read_bytes(), keys),
        host="127.0.0.1", port=args.port, ssl_context=context, access_log=None, print=None,
    )  # fmt: skip


if __name__ == "__main__":
    main()
