"""Routes that read the fleet's inventory: lists of vehicles, ECUs and events, the ledger.

Lists are paged by key (:mod:`server.inventory`) and filtered by query
parameters declared as Structs (:mod:`server.api.schemas`), so an unknown or
malformed parameter answers 400 naming it. Ledger exports stream: the
server reads :data:`server.ledger.EXPORT_BATCH` entries at a time and writes
them out as CSV or a JSON array before reading the next batch.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
from typing import Any

from aiohttp import web
from sqlmodel import Session

from server import ledger
from server.api.access import Route
from server.api.boundary import (
    ApiError,
    id_cursor,
    in_session,
    key_cursor,
    next_cursor,
    page_query,
    query_params,
    url_number,
    url_vin,
)
from server.api.context import IMAGE_REPO
from server.api.responses import (
    EcuPage,
    EventPage,
    LedgerPage,
    StoredManifest,
    VehiclePage,
)
from server.api.schemas import (
    EcuQuery,
    EventQuery,
    ExportFormat,
    LedgerExportQuery,
    LedgerQuery,
    VehicleQuery,
)
from server.db import Vehicle
from server.inventory import (
    EcuFilter,
    EventFilter,
    VehicleFilter,
    ecus_page,
    events_page,
    vehicles_page,
)
from server.roles import Permission

log = logging.getLogger("server.api")


async def list_vehicles(request: web.Request) -> web.Response:
    q = query_params(request, VehicleQuery)
    limit, position = page_query(request)
    where = VehicleFilter(
        hardware_id=q.hardware_id, image=q.image, seen_since=q.seen_since,
        not_seen_since=q.not_seen_since, revoked=q.revoked, has_attacks=q.has_attacks,
    )  # fmt: skip
    after = key_cursor(position)
    rows, last = await in_session(
        request, lambda s: vehicles_page(s, where, after=after, limit=limit)
    )
    return web.json_response({"vehicles": rows, "next": next_cursor(last)})


async def list_ecus(request: web.Request) -> web.Response:
    q = query_params(request, EcuQuery)
    limit, position = page_query(request)
    where = EcuFilter(
        vin=q.vin, hardware_id=q.hardware_id, image=q.image, has_attacks=q.has_attacks,
        last_install_result=q.last_install_result,
    )  # fmt: skip
    after = key_cursor(position)
    rows, last = await in_session(request, lambda s: ecus_page(s, where, after=after, limit=limit))
    return web.json_response({"ecus": rows, "next": next_cursor(last)})


async def list_events(request: web.Request) -> web.Response:
    q = query_params(request, EventQuery)
    limit, position = page_query(request)
    where = EventFilter(vin=q.vin, kind=q.kind, since=q.since)
    after = id_cursor(position)
    rows, last = await in_session(
        request, lambda s: events_page(s, where, after=after, limit=limit)
    )
    return web.json_response({"security_events": rows, "next": next_cursor(last)})


def _known_vehicle(session: Session, vin: str) -> None:
    if session.get(Vehicle, vin) is None:
        raise ApiError(404, f"unknown vehicle {vin}")


async def vehicle_ledger(request: web.Request) -> web.Response:
    vin = url_vin(request)
    q = query_params(request, LedgerQuery)
    limit, position = page_query(request)
    after = id_cursor(position)

    image_repo = request.app[IMAGE_REPO]

    def run(session: Session) -> dict[str, Any]:
        _known_vehicle(session, vin)
        rows, last = ledger.ledger_page(
            session, vin, after=after, limit=limit, ecu_serial=q.ecu, change=q.change,
            failed=q.failed,
        )  # fmt: skip
        current = ledger.current_versions(session, image_repo, vin)
        return {"vin": vin, "current": current, "entries": rows, "next": next_cursor(last)}

    return web.json_response(await in_session(request, run))


async def vehicle_manifest(request: web.Request) -> web.Response:
    vin = url_vin(request)
    manifest_id = url_number(request, "id", "a stored manifest's number")
    record = await in_session(request, lambda s: ledger.manifest_record(s, vin, manifest_id))
    if record is None:
        raise ApiError(404, f"vehicle {vin} has no stored manifest {manifest_id}")
    return web.json_response(record)


_SPREADSHEET_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: Any) -> Any:
    """Text a spreadsheet would run as a formula is quoted with a leading apostrophe."""
    if isinstance(value, str) and value.startswith(_SPREADSHEET_FORMULA):
        return "'" + value
    return value


def _csv_rows(rows: list[dict[str, Any]], header: bool) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    if header:
        writer.writerow(ledger.EXPORT_COLUMNS)
    for row in rows:
        writer.writerow([_csv_cell(row[c]) for c in ledger.EXPORT_COLUMNS])
    return out.getvalue().encode()


async def export_ledger(request: web.Request) -> web.StreamResponse:
    q = query_params(request, LedgerExportQuery)
    if q.vin is not None:
        vin = q.vin
        await in_session(request, lambda s: _known_vehicle(s, vin))
    as_csv = q.format is ExportFormat.CSV
    name = q.vin or q.image or f"version-{q.version}"
    filename = "ledger-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8" if as_csv else "application/json",
            "Content-Disposition": f'attachment; filename="{filename}.{q.format.value}"',
        }
    )
    await response.prepare(request)
    try:
        await _stream_export(request, response, q, as_csv)
    except ConnectionError as exc:  # the client went away: nobody to answer
        log.info("ledger export to %s cut off: %s", request.remote, exc)
    return response


async def _stream_export(
    request: web.Request, response: web.StreamResponse, q: LedgerExportQuery, as_csv: bool
) -> None:
    await response.write(_csv_rows([], header=True) if as_csv else b"[")
    after, first = 0, True
    while True:
        batch = await in_session(
            request,
            functools.partial(
                ledger.export_batch, vin=q.vin, filepath=q.image, version=q.version, after=after
            ),
        )
        if not batch:
            break
        if as_csv:
            await response.write(_csv_rows(batch, header=False))
        else:
            text = ",\n".join(json.dumps(row, sort_keys=True) for row in batch)
            await response.write((("\n" if first else ",\n") + text).encode())
        first, after = False, batch[-1]["id"]
    if not as_csv:
        await response.write(b"\n]\n")
    await response.write_eof()


_V = "/api/v1/vehicles"
ROUTES = [
    Route("GET", _V, list_vehicles, Permission.READ_FLEET,
          "Vehicles, by VIN (paged; filter by hardware id, installed image, last seen, "
          "revoked, attacks)", query=VehicleQuery, response=VehiclePage),
    Route("GET", _V + "/{vin}/ledger", vehicle_ledger, Permission.READ_FLEET,
          "The vehicle's inventory ledger: every change of each ECU, with the manifest that "
          "reported it (paged, oldest first)", query=LedgerQuery, response=LedgerPage),
    Route("GET", _V + "/{vin}/manifests/{id}", vehicle_manifest, Permission.READ_FLEET,
          "A manifest of the vehicle the ledger stored: the JSON the vehicle signed, and its hash",
          response=StoredManifest),
    Route("GET", "/api/v1/ecus", list_ecus, Permission.READ_FLEET,
          "ECUs of the whole fleet, by serial (paged; filter by vehicle, hardware id, image, "
          "attacks, last install result)", query=EcuQuery, response=EcuPage),
    Route("GET", "/api/v1/events", list_events, Permission.READ_FLEET,
          "Security events of the whole fleet, oldest first (paged; filter by vehicle, kind, "
          "time)", query=EventQuery, response=EventPage),
    Route("GET", "/api/v1/ledger/export", export_ledger, Permission.READ_FLEET,
          "Export the ledger of one vehicle (vin) or one release (image or version) as CSV or "
          "JSON, streamed", query=LedgerExportQuery),
]  # fmt: skip
