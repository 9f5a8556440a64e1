"""The JSON answers of the HTTP API, declared for the OpenAPI document (msgspec).

Handlers build their answers as plain dicts; these Structs say what those
dicts hold, and :mod:`server.api.openapi` turns them into the response
schemas of the routes that name them (``Route.response``). The schemathesis
run (``tests/test_openapi.py``) checks every answer against them, so a
field renamed in a handler and not here fails a test. Unknown keys are
allowed: an answer may grow a field without breaking clients.
"""

from __future__ import annotations

from typing import Any

import msgspec


class _Answer(msgspec.Struct, kw_only=True):
    pass


class ErrorDetail(_Answer):
    status: int
    message: str


class ErrorBody(_Answer):
    """Every 4xx (and a bug's 500): what was refused and why."""

    error: ErrorDetail


class Health(_Answer):
    status: str


class VehicleSummary(_Answer):
    vin: str
    primary_ecu_serial: str
    registered_at: str
    last_manifest_at: str | None
    manifests_accepted: int
    manifests_rejected: int
    director_targets_version: int
    revoked: bool
    has_attacks: bool


class VehiclePage(_Answer):
    vehicles: list[VehicleSummary]
    #: the cursor of the next page; null on the last
    next: str | None


class InstalledImage(_Answer):
    filepath: str
    length: int
    sha256: str


class LastInstall(_Answer):
    filepath: str
    result: str
    detail: str
    method: str


class EcuSummary(_Answer):
    serial: str
    vin: str
    hardware_id: str
    is_primary: bool
    installed: InstalledImage
    report_counter: int
    attacks_detected: str
    last_install: LastInstall
    updated_at: str | None


class EcuPage(_Answer):
    ecus: list[EcuSummary]
    next: str | None


class SecurityEvent(_Answer):
    id: int
    kind: str
    reason: str
    ecu_serial: str
    detail: str
    count: int
    first_at: str
    last_at: str
    #: in the fleet-wide list
    vin: str = ""


class EventPage(_Answer):
    security_events: list[SecurityEvent]
    next: str | None


class LedgerEntry(_Answer):
    id: int
    vin: str
    ecu_serial: str
    hardware_id: str
    at: str
    #: installed | install_result | attack | attack_cleared
    change: str
    filepath: str
    version: str
    sha256: str
    length: int
    install_filepath: str
    install_result: str
    detail: str
    manifest_id: int


class CurrentVersion(_Answer):
    ecu_serial: str
    hardware_id: str
    filepath: str
    version: str
    sha256: str
    last_install_result: str
    attacks_detected: str


class LedgerPage(_Answer):
    vin: str
    #: what each ECU runs now (every page)
    current: list[CurrentVersion]
    entries: list[LedgerEntry]
    next: str | None


class StoredManifest(_Answer):
    id: int
    vin: str
    received_at: str
    sha256: str
    length: int
    #: false when the manifest was too large to keep, or pruned: only its hash remains
    content_stored: bool
    #: the signed manifest as the vehicle sent it
    manifest: dict[str, Any] | None


class Assignment(_Answer):
    id: int
    vin: str
    ecu_serial: str
    filepath: str
    status: str
    detail: str
    created_at: str
    updated_at: str


class AuditRecord(_Answer):
    seq: int
    at: str
    actor: str
    action: str
    subject: str
    detail: dict[str, Any]
    prev_hash: str
    hash: str


class AuditPage(_Answer):
    records: list[AuditRecord]
    next: str | None


class AuditVerification(_Answer):
    intact: bool
    records: int
    head_seq: int
    head_hash: str
    problems: list[str]
    broken_seqs: list[int]
    first_broken_seq: int | None


class Image(_Answer):
    filepath: str
    hardware_ids: list[str]
    version: str
    release_counter: int
    length: int
    sha256: str


class ImagePage(_Answer):
    images: list[Image]
    next: str | None
