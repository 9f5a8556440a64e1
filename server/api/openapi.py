"""The OpenAPI 3.1 document of the HTTP API, made from the route table.

:func:`openapi_document` walks :data:`server.api.application.ROUTES`, the
same list the server registers and its access middleware enforces, so the
document cannot name a route the server lacks or miss one it serves:

* paths and methods, with ``{path:.+}`` written ``{path}``; path parameters
  typed by name (VINs, serials and names of the :mod:`signing.names`
  grammar, SHA-256 digests, numeric ids);
* security per route's access: none for public routes, the vehicle's TLS
  client certificate (``mutualTLS``) for vehicle routes, an operator token
  (``Authorization: Bearer``) for operator routes, with the permission it
  needs and the roles that have it (``x-uptake-permission``);
* query parameters and request bodies from the route's msgspec Structs
  (:mod:`server.api.schemas`, through ``msgspec.json.schema_components``),
  so the schema that documents a parameter is the one that parses it;
  the few routes that take raw bytes (manifests, signed metadata, images)
  are listed in :data:`_RAW_BODIES`;
* answers: the route's response Struct (:mod:`server.api.responses`) for
  2xx where declared (else any JSON, or the media types of
  :data:`_OTHER_ANSWERS`), and :class:`~server.api.responses.ErrorBody` for
  every 4xx.

The web dashboard's routes (``/dashboard/``, :mod:`server.dashboard.routes`)
share the route table and its access checks but are pages for browsers, not
the API: :func:`api_routes` leaves them out of the document.

The server serves it at ``GET /api/v1/openapi.json`` to anyone: it says
what the API is, which the source says too, and nothing about the fleet.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Sequence
from typing import Any

import msgspec
from aiohttp import web

from server.api.access import Audience, Route, canonical_path
from server.api.boundary import MAX_ROW_ID
from server.api.responses import ErrorBody
from server.roles import ROLE_PERMISSIONS, Permission
from server.web_sessions import DASHBOARD_PREFIX
from signing.names import NAME_PATTERN

OPENAPI_DOCUMENT: web.AppKey[bytes] = web.AppKey("openapi_document", bytes)
_REF = "#/components/schemas/{name}"

_NAME = {"type": "string", "pattern": NAME_PATTERN}
_PATH_PARAMETERS: dict[str, dict[str, Any]] = {
    "vin": {**_NAME, "description": "VIN"},
    "serial": {**_NAME, "description": "ECU serial, or a certificate's hex serial number"},
    "name": {**_NAME, "description": "token or delegation name"},
    "file": {**_NAME, "description": "metadata file name, e.g. 1.root.json"},
    "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
    "id": {"type": "integer", "minimum": 0, "maximum": MAX_ROW_ID},
    "path": {"type": "string", "minLength": 1, "description": "a target path"},
}
_ANY_JSON: dict[str, Any] = {}
_BINARY = {"type": "string", "format": "binary"}
#: Routes whose handlers read the body as bytes, not as a Struct: their media type and schema.
_RAW_BODIES: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {
    ("POST", "/api/v1/vehicles/{vin}/manifest"): ("application/json", {"type": "object"}),
    ("PUT", "/api/v1/image/uploads/{sha256}"): ("application/octet-stream", _BINARY),
    ("POST", "/api/v1/image/targets"): ("application/json", {"type": "object"}),
    ("POST", "/api/v1/image/staged"): ("application/json", {"type": "object"}),
    ("POST", "/api/v1/image/delegations/{name}/targets"): ("application/json", {"type": "object"}),
}
#: Routes that answer other than JSON (files, exports): their media types.
_OTHER_ANSWERS: dict[tuple[str, str], tuple[str, ...]] = {
    ("GET", "/image/targets/{path}"): ("application/octet-stream",),
    ("GET", "/director/{vin}/targets/{path}"): ("application/octet-stream",),
    ("GET", "/api/v1/ledger/export"): ("text/csv", "application/json"),
}


def _roles_with(permission: Permission) -> list[str]:
    return sorted(role.value for role, granted in ROLE_PERMISSIONS.items() if permission in granted)


def _security(route: Route) -> tuple[list[dict[str, list[str]]], str]:
    """The route's OpenAPI security requirement, and a sentence saying who may call it."""
    if route.access is Audience.PUBLIC:
        return [], "Anyone."
    if route.access is Audience.VEHICLE:
        if route.path.startswith("/image/"):
            return [{}, {"vehicleCertificate": []}, {"operatorToken": []}], (
                "Anyone; with images_require_client_cert, a vehicle's certificate or an "
                "operator token that may read releases."
            )
        return [{"vehicleCertificate": []}], "The vehicle named in the path (its certificate)."
    assert isinstance(route.access, Permission)
    roles = ", ".join(_roles_with(route.access))
    return [{"operatorToken": []}], f"An operator token with {route.access.value} ({roles})."


def _nullable_removed(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter is absent, never null: ``anyOf [X, null]`` becomes X."""
    options = schema.get("anyOf")
    if options is not None:
        rest = [o for o in options if o != {"type": "null"}]
        if len(rest) == 1:
            merged = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
            return {**rest[0], **merged}
    return {k: v for k, v in schema.items() if k != "default"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def api_routes(routes: Sequence[Route]) -> list[Route]:
    """``routes`` without the dashboard's pages (see module docstring)."""
    return [r for r in routes if not r.path.startswith(DASHBOARD_PREFIX)]


def openapi_document(routes: Sequence[Route]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes`` (see module docstring)."""
    routes = api_routes(routes)
    structs: list[type[msgspec.Struct]] = [ErrorBody]
    for route in routes:
        structs += [s for s in (route.body, route.query, route.response) if s is not None]
    structs = list(dict.fromkeys(structs))
    refs, components = msgspec.json.schema_components(structs, ref_template=_REF)
    ref_of = dict(zip(structs, refs, strict=True))
    error = {
        "description": "Refused: what and why",
        "content": _json(ref_of[ErrorBody]),
    }
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        path = canonical_path(route.path)
        key = (route.method, path)
        security, who = _security(route)
        operation: dict[str, Any] = {
            "operationId": f"{route.method.lower()}_{route.handler.__name__}",
            "summary": route.summary,
            "description": f"{route.summary}.\n\nWho may call it: {who}",
            "tags": [route.handler.__module__.rsplit(".", 1)[-1].removesuffix("_routes")],
            "security": security,
        }
        if isinstance(route.access, Permission):
            operation["x-uptake-permission"] = route.access.value
        parameters = [
            {"name": name, "in": "path", "required": True,
             "schema": _PATH_PARAMETERS.get(name, {"type": "string"})}
            for name in re.findall(r"\{(\w+)\}", path)
        ]  # fmt: skip
        if route.query is not None:
            query = components[route.query.__name__]
            for name, schema in query["properties"].items():
                parameters.append(
                    {"name": name, "in": "query", "required": name in query.get("required", ()),
                     "schema": _nullable_removed(schema)}
                )  # fmt: skip
        if parameters:
            operation["parameters"] = parameters
        if route.body is not None:
            operation["requestBody"] = {"required": True, "content": _json(ref_of[route.body])}
        elif key in _RAW_BODIES:
            media, schema = _RAW_BODIES[key]
            operation["requestBody"] = {"required": True, "content": {media: {"schema": schema}}}
        if route.response is not None:
            answer = _json(ref_of[route.response])
        elif key in _OTHER_ANSWERS:
            answer = {media: {"schema": _ANY_JSON} for media in _OTHER_ANSWERS[key]}
        else:
            answer = _json(_ANY_JSON)
        operation["responses"] = {
            "2XX": {"description": "Done", "content": answer},
            "4XX": error,
        }
        paths.setdefault(path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Uptake",
            "version": importlib.metadata.version("uptake"),
            "description": "Uptane over-the-air updates: image repository, director, fleet. "
            "Lists are paged (`limit`, `cursor` = the `next` of the previous page); every "
            "refusal is a JSON 4xx saying what and where.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "operatorToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An operator token (uptake admin token create); its role "
                    "decides which routes it may call.",
                },
                "vehicleCertificate": {
                    "type": "mutualTLS",
                    "description": "The vehicle's TLS client certificate (its VIN).",
                },
            },
        },
    }


async def serve_openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI_DOCUMENT], content_type="application/json")
