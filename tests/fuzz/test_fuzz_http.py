"""Fuzz every HTTP handler of a running server (``uptake server run`` on loopback).

The routes are the server's own route table, so a handler added later
is fuzzed too. Each example sends one request, with parameters that are
sometimes real (a registered VIN, existing metadata names, a published
image) and sometimes generated or hostile (traversal, odd Unicode, huge),
with no, a wrong or the right admin token, sometimes paging parameters, and a
body that is random bytes, random JSON, JSON nested far too deep, or a valid
body for that route with parts replaced (by anything, including hostile
strings, integers beyond 64 bits and deeply nested values, datetimes out of
range; sometimes under a ``Content-Encoding`` it does not follow; manifests
re-signed with the vehicle's real keys so they get past the signature check
into manifest processing).

Every answer must be below 500, and every error a JSON body
``{"error": {"status": ..., "message": ...}}``; the server log must never
show a traceback.
"""

from __future__ import annotations

import copy
import gzip
import itertools
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import urllib3
from hypothesis import given, settings
from hypothesis import strategies as st

import server
from server.api import schemas
from server.api.application import ROUTES as API_ROUTES
from signing.keys import load_signer
from signing.manifest import SignedEnvelope
from tests.fuzz import EXAMPLES, fuzz_settings
from tests.fuzz.strategies import (
    deeply_nested,
    edited,
    hostile_datetimes,
    hostile_strings,
    huge_integers,
    json_values,
)
from tests.uptake_fixtures import PASSWORD, ServerProcess, Vehicle, sample

ROUTES = sorted({(r.method.lower(), r.path) for r in API_ROUTES})
_PARAM = re.compile(r"\{(\w+)(?::[^}]*)?\}")


@dataclass
class Target:
    server: ServerProcess
    vehicle: Vehicle
    token: str
    manifest: dict[str, Any]
    primary_key: Any
    image_path: str
    http: urllib3.PoolManager


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    tmp = tmp_path_factory.mktemp("http-fuzz")
    server = ServerProcess(tmp)
    vehicle = Vehicle(tmp, server, secondaries=False)
    image = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
    server.assign(vehicle.vin, vehicle.primary, image.filepath)
    manifest = json.loads(vehicle.signed_manifest())
    yield Target(
        server,
        vehicle,
        server.config.admin_token_path.read_text().strip(),
        manifest,
        load_signer(vehicle.state_dir / "keys" / "primary.key", PASSWORD.encode()),
        image.filepath,
        urllib3.PoolManager(retries=False, timeout=30.0),
    )
    log = server.log()
    server.stop()
    assert "Traceback" not in log, log[-5000:]


def _param_values(t: Target, name: str) -> st.SearchStrategy[str]:
    real = {
        "vin": [t.vehicle.vin, "NOPE", "a" * 129],
        "file": [
            "1.root.json",
            "2.root.json",
            "timestamp.json",
            "1.targets.json",
            "1.snapshot.json",
            "0.root.json",
            "99999999999999999999.targets.json",
            ".hidden",
            "root.json",
            "9" * 300 + ".root.json",
            "\u00b2.targets.json",
            "\u0663.root.json",
        ],
        "path": [
            t.image_path,
            "rpi-gateway/1.1.0/gateway.elf",
            "../server.json",
            "a/../../b",
            "x" * 300,
        ],
        "sha256": ["0" * 64, "A" * 64, "zz"],
        "serial": [t.vehicle.primary, "NOPE", ".", ".."],
    }.get(name, ["x"])
    # mostly known-interesting values (2:1), so the generated requests get past the routing
    return st.one_of(
        st.sampled_from(real),
        st.sampled_from(real),
        st.text(min_size=1, max_size=40),
        hostile_strings.filter(bool),
    )


def _quoted(value: str, *, is_path: bool) -> str:
    """``value`` for a URL, with '.' and '..' encoded so that no client folds them away."""
    if value in (".", ".."):
        return value.replace(".", "%2E")
    return quote(value, safe="/" if is_path else "")


# counters the server accepts after the genuine ones (within its bound on a counter's jump)
_counter = itertools.count(1000)


def _resigned_manifest(t: Target, signed: Any) -> bytes:
    """An edited manifest, re-signed inside and out with the vehicle's real primary key."""
    signed = copy.deepcopy(signed)
    try:
        for report in signed["ecu_version_reports"].values():
            if isinstance(report["signed"].get("report_counter"), int):
                report["signed"]["report_counter"] = next(_counter)
            report["signatures"] = SignedEnvelope.create(report["signed"], t.primary_key).to_dict()[
                "signatures"
            ]
        return SignedEnvelope.create(signed, t.primary_key).to_bytes()
    except Exception:  # the edit made it unsignable (a float, a non-dict): send it as it is
        return json.dumps({"signed": signed, "signatures": []}).encode()


_REGISTRATION = {
    "vin": "VINFUZZ",
    "primary_ecu_serial": "GW-FUZZ",
    "ecus": [
        {
            "serial": "GW-FUZZ",
            "hardware_id": "rpi-gateway",
            "public_key": {
                "keytype": "ed25519",
                "scheme": "ed25519",
                "keyval": {"public": "ab" * 32},
            },
        }
    ],
}


_MARK = "\x00hostile\x00"


@st.composite
def with_hostile_field(draw: st.DrawFn, doc: Any) -> bytes:
    """``doc`` as JSON with one value (or the whole) replaced by something hostile."""
    doc = copy.deepcopy(doc)
    raw = draw(
        st.one_of(
            deeply_nested(),
            huge_integers.map(lambda n: str(n).encode()),
            hostile_strings.map(lambda v: json.dumps(v).encode()),
            hostile_datetimes.map(lambda v: json.dumps(v).encode()),
        )
    )
    paths: list[list[Any]] = [[]]
    stack: list[tuple[list[Any], Any]] = [([], doc)]
    while stack:
        prefix, node = stack.pop()
        children = (
            node.items()
            if isinstance(node, dict)
            else enumerate(node)
            if isinstance(node, list)
            else []
        )
        for key, child in children:
            paths.append([*prefix, key])
            stack.append(([*prefix, key], child))
    path = draw(st.sampled_from(paths))
    if not path:
        return raw
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = _MARK
    return json.dumps(doc).encode().replace(json.dumps(_MARK).encode(), raw)


def _query(draw: st.DrawFn) -> str:
    """Sometimes paging parameters, real or hostile."""
    if draw(st.integers(0, 2)):
        return ""
    limit = draw(
        st.one_of(
            st.integers(-5, 600).map(str),
            huge_integers.map(str),
            hostile_strings,
        )
    )
    cursor = draw(
        st.one_of(st.none(), st.sampled_from(["MQ", "WyJ4IiwgbnVsbF0", "e30"]), hostile_strings)
    )
    query = f"?limit={quote(limit, safe='')}"
    return query + ("" if cursor is None else f"&cursor={quote(cursor, safe='')}")


@st.composite
def requests(draw: st.DrawFn, t: Target) -> tuple[str, str, bytes | None, dict[str, str]]:
    method, route = draw(st.sampled_from(ROUTES))
    if draw(st.integers(0, 9)) == 0:
        method = draw(st.sampled_from(["get", "post", "put", "delete", "patch"]))
    path = _PARAM.sub(
        lambda m: _quoted(draw(_param_values(t, m.group(1))), is_path=m.group(1) == "path"),
        route,
    ) + (_query(draw) if method == "get" else "")
    headers = {
        "Content-Type": draw(
            st.sampled_from(["application/json", "application/octet-stream", "text/plain"])
        )
    }
    # sometimes a Content-Encoding the body may not follow ("br": refused by aiohttp's parser in
    # plain text, see server/api/boundary.py, so not drawn here)
    encoding = draw(st.sampled_from(["", "", "", "gzip", "deflate", "identity", "x-bogus"]))
    if encoding:
        headers["Content-Encoding"] = encoding
    auth = draw(st.sampled_from(["none", "wrong", "right"]))
    if auth != "none":
        # legal header characters (obs-text included): malformed HTTP is refused by aiohttp's parser
        wrong = draw(
            st.text(
                st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
                max_size=20,
            )
        )
        headers["Authorization"] = f"Bearer {t.token if auth == 'right' else wrong}"
    kind = draw(st.sampled_from(["none", "bytes", "json", "deep", "valid-ish", "hostile-field"]))
    body: bytes | None = None
    valid = _valid_body(t, route)
    if kind == "bytes":
        body = draw(st.binary(max_size=512))
    elif kind == "json":
        body = json.dumps(draw(json_values)).encode()
    elif kind == "deep":
        body = draw(deeply_nested())
    elif kind == "hostile-field":
        body = draw(with_hostile_field(valid))
    elif kind == "valid-ish":
        if route.endswith("/manifest"):
            body = _resigned_manifest(t, draw(edited(t.manifest["signed"], max_edits=3)))
        else:
            body = json.dumps(draw(edited(valid, max_edits=2))).encode()
    if body and encoding in ("gzip", "deflate") and draw(st.booleans()):
        compressed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
        cut = draw(st.integers(0, 2))  # whole, truncated, or with a byte flipped
        if cut == 1:
            compressed = compressed[: len(compressed) // 2]
        elif cut == 2:
            middle = len(compressed) // 2
            compressed = (
                compressed[:middle] + bytes([compressed[middle] ^ 0xFF]) + compressed[middle + 1 :]
            )
        body = compressed
    return method.upper(), path, body, headers


def _valid_body(t: Target, route: str) -> Any:
    """A body the route would accept (or nearly: a registration of a key nobody holds)."""
    if route.endswith("/manifest"):
        return t.manifest
    if route == "/api/v1/vehicles":
        return _REGISTRATION
    if route.endswith("/assignments"):
        return {"ecu_serial": t.vehicle.primary, "filepath": t.image_path}
    if route.endswith("/reset"):
        return {"reason": "fuzz"}
    if route == "/api/v1/tokens":
        return {"name": "fuzz", "role": "viewer", "expires_at": "2030-01-01T00:00:00Z"}
    if route.endswith("/certificates/revoke"):
        return {"certificate": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"}
    if route.endswith("/revoke") and "/certificates/" in route:
        return {"issuer_sha256": "0" * 64}
    return {"signed": {"_type": "targets", "version": 2}, "signatures": []}


@settings(fuzz_settings, max_examples=EXAMPLES * 3)
@given(data=st.data())
def test_every_handler_answers_4xx_json_never_500(target: Target, data: st.DataObject) -> None:
    method, path, body, headers = data.draw(requests(target))
    resp = target.http.request(method, target.server.url + path, body=body, headers=headers)
    assert resp.status < 500, (method, path, body, resp.status, resp.data[:500])
    # the dashboard's pages answer their refusals as pages (HTML), everything else in JSON
    page = path.startswith("/dashboard") and not path.split("?")[0].endswith("/live")
    if resp.status >= 400 and not page:
        answer = json.loads(resp.data)
        assert answer["error"]["status"] == resp.status and isinstance(
            answer["error"]["message"], str
        ), answer


def test_routes_were_found() -> None:
    assert ("post", "/api/v1/vehicles/{vin}/manifest") in ROUTES and len(ROUTES) >= 10


_NESTED_LISTS = b"[" * 1000 + b"]" * 1000  # about 2 KB
_NESTED_SIGNED = b'{"signed":' * 1000 + b"{}" + b"}" * 1000


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/director/{vin}/metadata/" + "9" * 30 + ".targets.json", None, 404),
        # not a name (over 128 characters): refused at the boundary
        ("GET", "/director/{vin}/metadata/" + "9" * 300 + ".root.json", None, 400),
        ("GET", "/director/{vin}/metadata/%C2%B2.targets.json", None, 400),
        ("GET", "/image/targets/" + "x" * 300, None, 404),  # served by look-up, never by path
        ("GET", "/image/metadata/" + "9" * 300 + ".root.json", None, 400),
        # integers no database column holds
        (
            "POST",
            "/api/v1/vehicles",
            json.dumps({**_REGISTRATION, "vin": 2**64}).encode(),
            400,
        ),
        ("GET", "/api/v1/vehicles/{vin}/events?limit=" + "9" * 30, None, 400),
        (
            "GET",
            "/api/v1/vehicles/{vin}/events?cursor=" + "OTk5OTk5OTk5OTk5OTk5OTk5OTk5",
            None,
            400,
        ),
        # "." and ".." as names in URLs
        ("GET", "/api/v1/vehicles/%2E%2E", None, 400),
        ("GET", "/director/%2E%2E/targets/x", None, 400),
        ("POST", "/api/v1/vehicles/{vin}/ecus/%2E%2E/report-counter/reset", b"{}", 400),
        # datetimes past datetime.max / before datetime.min once in UTC, or beyond the bounds
        *[
            (
                "POST",
                "/api/v1/tokens",
                json.dumps({"name": "t", "role": "viewer", "expires_at": when}).encode(),
                400,
            )
            for when in [
                "9999-12-31T23:59:59-05:00",
                "0001-01-01T00:00:00+14:00",
                "2999-01-01T00:00:00Z",
                "2030-01-01T00:00:00",
            ]
        ],
    ],
)
def test_requests_that_once_answered_500(
    target: Target, method: str, path: str, body: bytes | None, status: int
) -> None:
    resp = target.http.request(
        method,
        target.server.url + path.format(vin=target.vehicle.vin),
        body=body,
        headers={"Authorization": f"Bearer {target.token}"},
    )
    assert resp.status == status, resp.data
    assert json.loads(resp.data)["error"]["status"] == status


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v1/vehicles/{vin}/manifest", _NESTED_LISTS),
        ("/api/v1/vehicles/{vin}/manifest", _NESTED_SIGNED),
        ("/api/v1/vehicles", _NESTED_LISTS),
        ("/api/v1/vehicles", _NESTED_SIGNED),
        ("/api/v1/vehicles/{vin}/assignments", _NESTED_SIGNED),
        ("/api/v1/image/targets", _NESTED_SIGNED),
    ],
)
def test_deeply_nested_bodies_answer_400(target: Target, path: str, body: bytes) -> None:
    """About 2 KB of nesting once ended in RecursionError: a 500 and a traceback."""
    resp = target.http.request(
        "POST",
        target.server.url + path.format(vin=target.vehicle.vin),
        body=body,
        headers={"Authorization": f"Bearer {target.token}"},
    )
    assert resp.status == 400, resp.data
    assert "nested deeper" in json.loads(resp.data)["error"]["message"]


def test_non_ascii_admin_token_is_refused_not_crashed(target: Target) -> None:
    resp = target.http.request(
        "GET",
        target.server.url + "/api/v1/images",
        headers={"Authorization": "Bearer \u00e9t\u00e9"},
    )
    assert resp.status == 401, resp.data


# -- every query parameter of every GET route, with the values that once answered 500 ----------

_QUERY_GET = re.compile(r"""(?:query\.get|query_number)\(\s*(?:request,\s*)?["'](\w+)["']""")


def _query_parameters() -> list[str]:
    """Every query parameter the server reads: the fields of the query schemas, and each
    ``request.query.get("...")`` and ``query_number(request, "...")`` in its source (the dashboard's), so a new one is covered."""
    names = {"limit", "cursor"}
    for schema in vars(schemas).values():
        if isinstance(schema, type) and issubclass(schema, schemas._Query):
            names.update(schema.__struct_fields__)
    for source in Path(server.__file__).parent.rglob("*.py"):
        names.update(_QUERY_GET.findall(source.read_text()))
    return sorted(names)


QUERY_PARAMETERS = _query_parameters()
#: past datetime.max / before datetime.min in UTC, and integers no 64-bit column holds
HOSTILE_QUERY_VALUES = [
    "9999-12-31T23:00:00-05:00",
    "0001-01-01T00:00:00+05:00",
    "9" * 19,
    "9" * 25,
]
GET_ROUTES = [path for method, path in ROUTES if method == "get"]


def _real_path(t: Target, route: str) -> str:
    real = {"vin": t.vehicle.vin, "serial": t.vehicle.primary, "file": "timestamp.json",
            "path": t.image_path, "id": "1", "name": "admin", "sha256": "0" * 64}  # fmt: skip
    return _PARAM.sub(lambda m: quote(real.get(m[1], "x"), safe="/"), route)


def test_query_parameters_were_found() -> None:
    assert {"seen_since", "since", "before", "after", "cursor"} <= set(QUERY_PARAMETERS)


@pytest.mark.parametrize("route", GET_ROUTES)
def test_hostile_datetimes_and_integers_in_every_query_parameter_answer_4xx(
    target: Target, route: str
) -> None:
    """Every GET route of the API and the dashboard, every query parameter the server reads,
    each hostile value: a 4xx JSON error or a page, never a 500."""
    path = _real_path(target, route)
    auth = {"Authorization": f"Bearer {target.token}"}
    for name in QUERY_PARAMETERS:
        for value in HOSTILE_QUERY_VALUES:
            url = f"{target.server.url}{path}?{name}={quote(value, safe='')}"
            resp = target.http.request("GET", url, headers=auth, redirect=False)
            assert resp.status < 500, (url, resp.status, resp.data[:300])
            if resp.status >= 400 and resp.headers.get("Content-Type", "").startswith(
                "application/json"
            ):
                assert json.loads(resp.data)["error"]["status"] == resp.status


@pytest.mark.parametrize("route", GET_ROUTES)
def test_head_answers_as_get_does(target: Target, route: str) -> None:
    """HEAD is registered with every GET route, with the GET route's access."""
    url = target.server.url + _real_path(target, route)
    for headers in ({}, {"Authorization": f"Bearer {target.token}"}):
        got = target.http.request("GET", url, headers=headers, redirect=False)
        head = target.http.request("HEAD", url, headers=headers, redirect=False)
        assert head.status == got.status and head.data == b"", (route, head.status, got.status)
