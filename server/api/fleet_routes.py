"""Routes fleet operators call: vehicles, their ECUs, assignments, events, identities."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from sqlmodel import Session

from server import audit
from server.api.access import ALLOWED_IDENTITIES, Route, actor_of
from server.api.boundary import (
    ApiError,
    id_cursor,
    in_session,
    json_body,
    next_cursor,
    page_query,
    url_name,
    url_number,
    url_vin,
)
from server.api.campaign_routes import store_attributes
from server.api.context import DELTAS, DIRECTOR, IMAGE_REPO, ISSUER
from server.api.responses import Assignment
from server.api.schemas import (
    AssignmentRequest,
    CertificatePemRevocation,
    CertificateRequest,
    CertificateRevocation,
    PageQuery,
    ReportCounterReset,
    VehicleRegistration,
)
from server.campaigns import attributes_of
from server.certificates import CertificateError, canonical_serial
from server.fleet import (
    EcuRegistration,
    assign,
    assignments_page,
    cancel_assignment,
    register_vehicle,
    reset_report_counter,
    security_events_page,
    vehicle_record,
)
from server.identities import (
    certificates_of,
    issue_certificate,
    reinstate_vehicle,
    rekey_vehicle,
    revoke_certificate,
    revoke_certificate_pem,
    revoke_vehicle,
)
from server.roles import Permission

log = logging.getLogger("server.api")


async def add_vehicle(request: web.Request) -> web.Response:
    body = await json_body(request, VehicleRegistration)
    director, issuer, actor = request.app[DIRECTOR], request.app[ISSUER], actor_of(request)
    ecus = [
        EcuRegistration(e.serial, e.hardware_id, e.public_key, encryption_key=e.encryption_key)
        for e in body.ecus
    ]

    def run(session: Session) -> dict[str, Any]:
        register_vehicle(
            session, director, body.vin, body.primary_ecu_serial, ecus,
            encrypt_images=body.encrypt_images,
        )  # fmt: skip
        attributes = (
            store_attributes(session, body.vin, body.attributes) if body.attributes else None
        )
        audit.append(
            session, actor, "vehicle.register", body.vin,
            ecus={e.serial: e.hardware_id for e in ecus}, encrypt_images=body.encrypt_images,
            attributes=attributes,
        )  # fmt: skip
        answer: dict[str, Any] = {"registered": body.vin}
        if body.tls_csr:
            answer["tls_certificate"] = issue_certificate(
                session, issuer.ca, body.vin, body.tls_csr, actor=actor, lifetime=issuer.lifetime
            )
        return answer

    answer = await in_session(request, run)
    director.invalidate(body.vin)
    return web.json_response(answer, status=201)


async def get_vehicle(request: web.Request) -> web.Response:
    vin = url_vin(request)

    def run(session: Session) -> dict[str, Any]:
        record = vehicle_record(session, vin)
        record["certificates"] = certificates_of(session, vin)
        record["attributes"] = attributes_of(session, vin)
        return record

    return web.json_response(await in_session(request, run))


async def list_vehicle_events(request: web.Request) -> web.Response:
    vin = url_vin(request)
    limit, position = page_query(request)
    after = id_cursor(position)
    events, last = await in_session(
        request, lambda s: security_events_page(s, vin, after=after, limit=limit)
    )
    return web.json_response({"security_events": events, "next": next_cursor(last)})


async def list_vehicle_assignments(request: web.Request) -> web.Response:
    vin = url_vin(request)
    limit, position = page_query(request)
    after = id_cursor(position)
    rows, last = await in_session(
        request, lambda s: assignments_page(s, vin, after=after, limit=limit)
    )
    return web.json_response({"assignments": rows, "next": next_cursor(last)})


async def add_assignment(request: web.Request) -> web.Response:
    vin = url_vin(request)
    body = await json_body(request, AssignmentRequest)
    director, image_repo, actor = request.app[DIRECTOR], request.app[IMAGE_REPO], actor_of(request)

    def run(session: Session) -> dict[str, Any]:
        row = assign(session, director, image_repo, vin, body.ecu_serial, body.filepath)
        audit.append(
            session, actor, "assignment.create", vin, ecu_serial=body.ecu_serial,
            filepath=body.filepath, assignment=row.id, status=row.status,
        )  # fmt: skip
        result: dict[str, Any] = row.model_dump(mode="json")
        return result

    row = await in_session(request, run)
    director.invalidate(vin)
    await request.app[DELTAS].on_vehicle(vin)
    return web.json_response(row, status=201)


async def cancel_assignment_route(request: web.Request) -> web.Response:
    vin = url_vin(request)
    assignment_id = url_number(request, "id", "an assignment's number")
    director, actor = request.app[DIRECTOR], actor_of(request)

    def run(session: Session) -> dict[str, Any]:
        row = cancel_assignment(session, director, vin, assignment_id)
        audit.append(
            session, actor, "assignment.cancel", vin, assignment=assignment_id,
            ecu_serial=row.ecu_serial, filepath=row.filepath,
        )  # fmt: skip
        result: dict[str, Any] = row.model_dump(mode="json")
        return result

    row = await in_session(request, run)
    director.invalidate(vin)
    return web.json_response(row)


async def reset_ecu_report_counter(request: web.Request) -> web.Response:
    vin, serial = url_vin(request), url_name(request, "serial")
    body = await json_body(request, ReportCounterReset, optional=True)
    actor = actor_of(request)

    def run(session: Session) -> dict[str, Any]:
        result = reset_report_counter(session, vin, serial, body.reason)
        audit.append(
            session, actor, "ecu.report_counter.reset", vin, ecu_serial=serial,
            reason=body.reason, previous=result["previous_report_counter"],
        )  # fmt: skip
        return result

    result = await in_session(request, run)
    log.warning("%s reset the report counter of %s/%s", actor, vin, serial)
    return web.json_response(result)


async def revoke_vehicle_route(request: web.Request) -> web.Response:
    vin, actor = url_vin(request), actor_of(request)
    body = await json_body(request, ReportCounterReset, optional=True)
    result = await in_session(
        request, lambda s: revoke_vehicle(s, vin, actor=actor, reason=body.reason)
    )
    request.app[ALLOWED_IDENTITIES].forget(vin)
    request.app[DIRECTOR].invalidate(vin)
    return web.json_response(result)


async def reinstate_vehicle_route(request: web.Request) -> web.Response:
    vin, actor = url_vin(request), actor_of(request)
    return web.json_response(
        await in_session(request, lambda s: reinstate_vehicle(s, vin, actor=actor))
    )


async def revoke_certificate_route(request: web.Request) -> web.Response:
    vin, actor = url_vin(request), actor_of(request)
    try:  # any spelling of the serial (01FAD9..., 1f:ad:9...) names the one recorded
        serial = canonical_serial(request.match_info["serial"])
    except CertificateError as exc:
        raise ApiError(400, f"URL serial: {exc}") from exc
    body = await json_body(request, CertificateRevocation, optional=True)
    result = await in_session(
        request,
        lambda s: revoke_certificate(s, vin, serial, actor=actor, issuer_sha256=body.issuer_sha256),
    )
    request.app[ALLOWED_IDENTITIES].forget(vin)
    return web.json_response(result)


async def revoke_certificate_pem_route(request: web.Request) -> web.Response:
    vin, actor = url_vin(request), actor_of(request)
    body = await json_body(request, CertificatePemRevocation)
    result = await in_session(
        request, lambda s: revoke_certificate_pem(s, vin, body.certificate, actor=actor)
    )
    request.app[ALLOWED_IDENTITIES].forget(vin)
    return web.json_response(result)


async def rekey_vehicle_route(request: web.Request) -> web.Response:
    vin, actor = url_vin(request), actor_of(request)
    body = await json_body(request, CertificateRequest)
    issuer = request.app[ISSUER]
    pem = await in_session(
        request,
        lambda s: rekey_vehicle(
            s, issuer.ca, vin, body.tls_csr, actor=actor, lifetime=issuer.lifetime
        ),
    )
    request.app[DIRECTOR].invalidate(vin)
    request.app[ALLOWED_IDENTITIES].forget(vin)
    return web.json_response({"vin": vin, "tls_certificate": pem}, status=201)


_V = "/api/v1/vehicles"
ROUTES = [
    Route("POST", _V, add_vehicle, Permission.MANAGE_FLEET,
          "Register a vehicle, its ECU keys and (with tls_csr) issue its client certificate",
          VehicleRegistration),
    Route("GET", _V + "/{vin}", get_vehicle, Permission.READ_FLEET,
          "A vehicle: its ECUs, certificates, and the latest assignments and events"),
    Route("GET", _V + "/{vin}/events", list_vehicle_events, Permission.READ_FLEET,
          "The vehicle's security events (paged)", query=PageQuery),
    Route("GET", _V + "/{vin}/assignments", list_vehicle_assignments, Permission.READ_FLEET,
          "The vehicle's assignments (paged)", query=PageQuery),
    Route("POST", _V + "/{vin}/assignments", add_assignment, Permission.MANAGE_FLEET,
          "Direct one ECU of the vehicle to install an image", AssignmentRequest),
    Route("POST", _V + "/{vin}/assignments/{id}/cancel", cancel_assignment_route,
          Permission.MANAGE_FLEET,
          "Withdraw a pending assignment: the vehicle's director targets are re-signed without "
          "it (409 once installed)", response=Assignment),
    Route("POST", _V + "/{vin}/ecus/{serial}/report-counter/reset", reset_ecu_report_counter,
          Permission.MANAGE_FLEET,
          "Let the ECU's next report set a new report-counter baseline", ReportCounterReset),
    Route("POST", _V + "/{vin}/revoke", revoke_vehicle_route, Permission.MANAGE_FLEET,
          "Refuse every request with the vehicle's certificates until reinstated",
          ReportCounterReset),
    Route("POST", _V + "/{vin}/reinstate", reinstate_vehicle_route, Permission.MANAGE_FLEET,
          "Accept the vehicle's certificates again"),
    Route("POST", _V + "/{vin}/certificates/{serial}/revoke", revoke_certificate_route,
          Permission.MANAGE_FLEET,
          "Refuse one client certificate of the vehicle (of issuer_sha256 if given) and every "
          "certificate renewed from it", CertificateRevocation),
    Route("POST", _V + "/{vin}/certificates/revoke", revoke_certificate_pem_route,
          Permission.MANAGE_FLEET,
          "Refuse a client certificate given as PEM (an operator CA's, seen or not) and its "
          "renewals", CertificatePemRevocation),
    Route("POST", _V + "/{vin}/certificates", rekey_vehicle_route, Permission.MANAGE_FLEET,
          "A new certificate for a new key of the vehicle: revokes every earlier one and "
          "reinstates the vehicle (after a leaked key)", CertificateRequest),
]  # fmt: skip
