"""``uptake fleet``: register vehicles, direct what their ECUs install, manage identities."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import click

from server.api_client import ApiClientError
from server.cli_common import call, client, emit, server_options
from signing.atomic_file import atomic_writer, write_atomic
from signing.json_limits import UntrustedJsonError, parse_json


@click.group()
def fleet() -> None:
    """Register vehicles and direct what their ECUs install.

    \b
    uptake fleet add-vehicle --from-agent /var/lib/uptake/registration.json
    uptake fleet assign --vin VIN --ecu BMS-001 --image stm32f4-bms/1.1.0/bms.bin
    uptake fleet show VIN --json
    uptake fleet set-attributes VIN --model roadster --year 2026 --region eu --tag pilot
    uptake fleet list --image stm32f4-bms/1.1.0/bms.bin --json
    uptake fleet export --vin VIN --format csv --output VIN.csv
    uptake fleet cancel VIN --assignment 12
    uptake fleet reset-report-counter VIN --ecu GW-001 --reason "counter pushed ahead"
    """


@fleet.command("add-vehicle")
@click.option(
    "--from-agent",
    "registration",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    required=True,
    help="registration.json written by 'uptake agent init' (VIN, ECU serials, hardware ids, "
    "public keys, and the CSR of the vehicle's TLS key).",
)
@click.option(
    "--encrypt-images",
    is_flag=True,
    help="Deliver this vehicle's images encrypted to each ECU's registered encryption key "
    '(server-wide: "encrypt_images": true in DATA/server.json).',
)
@click.option(
    "--certificate-out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Where to write the client certificate the server issues "
    "(default: tls/client.crt beside registration.json, where the agent looks for it).",
)
@click.option("--model", help="Vehicle model (campaigns select by it).")
@click.option("--year", type=click.IntRange(1900, 2200), help="Model year.")
@click.option("--region", help="Region (campaigns select by it).")
@click.option("--tag", "tags", multiple=True, help="A tag (repeat).")
@server_options
@click.option("--json", "as_json", is_flag=True)
def fleet_add_vehicle(
    registration: Path,
    encrypt_images: bool,
    certificate_out: Path | None,
    model: str | None,
    year: int | None,
    region: str | None,
    tags: tuple[str, ...],
    server_url: str,
    ca_cert: Path | None,
    token_file: Path | None,
    as_json: bool,
) -> None:
    """Register a vehicle, its ECUs' public keys and (from its CSR) its client certificate.

    \b
    The server's device CA signs the CSR of the vehicle's own TLS key: the
    certificate binds the VIN, and the agent presents it on every request.
    With an operator's own CA instead, leave the CSR to that CA
    (docs/identity.md) and put the certificate at STATE/tls/client.crt.
    """
    try:
        body = parse_json(registration.read_bytes(), where=str(registration), max_bytes=1024**2)
    except (UntrustedJsonError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    if not isinstance(body, dict):
        raise click.ClickException(f"{registration}: must be a JSON object")
    if encrypt_images:
        body["encrypt_images"] = True
    if model or year or region or tags:
        body["attributes"] = {"model": model, "year": year, "region": region, "tags": list(tags)}
    answer = call(client(server_url, ca_cert, token_file), "POST", "/api/v1/vehicles", body)
    written = None
    if answer.get("tls_certificate"):
        written = certificate_out or registration.parent / "tls" / "client.crt"
        try:
            write_atomic(written, answer["tls_certificate"].encode())
        except OSError as exc:
            raise click.ClickException(f"cannot write the certificate to {written}: {exc}") from exc
    emit(
        {**answer, "certificate_file": str(written) if written else None},
        as_json,
        f"Registered vehicle {body.get('vin')} with {len(body.get('ecus', []))} ECU(s)"
        + (f"\n  client certificate: {written}" if written else ""),
    )


@fleet.command("set-attributes")
@click.argument("vin")
@click.option("--model", help="Vehicle model.")
@click.option("--year", type=click.IntRange(1900, 2200), help="Model year.")
@click.option("--region", help="Region.")
@click.option("--tag", "tags", multiple=True, help="A tag (repeat; replaces all tags).")
@server_options
@click.option("--json", "as_json", is_flag=True)
def fleet_set_attributes(
    vin: str,
    model: str | None,
    year: int | None,
    region: str | None,
    tags: tuple[str, ...],
    server_url: str,
    ca_cert: Path | None,
    token_file: Path | None,
    as_json: bool,
) -> None:
    """Replace the model, year, region and tags campaigns select VIN by (audited)."""
    body = {"model": model, "year": year, "region": region, "tags": list(tags)}
    answer = call(
        client(server_url, ca_cert, token_file),
        "PUT",
        f"/api/v1/vehicles/{quote(vin)}/attributes",
        body,
    )
    emit(answer, as_json, f"{vin}: " + ", ".join(f"{k}={v}" for k, v in answer.items()))


@fleet.command("assign")
@click.option("--vin", required=True)
@click.option("--ecu", "ecu_serial", required=True, help="ECU serial.")
@click.option("--image", "filepath", required=True, help="Image repository target path.")
@server_options
@click.option("--json", "as_json", is_flag=True)
def fleet_assign(
    vin: str,
    ecu_serial: str,
    filepath: str,
    server_url: str,
    ca_cert: Path | None,
    token_file: Path | None,
    as_json: bool,
) -> None:
    """Direct one ECU of a vehicle to install an image."""
    try:
        row = client(server_url, ca_cert, token_file).request(
            "POST",
            f"/api/v1/vehicles/{quote(vin)}/assignments",
            json_body={"ecu_serial": ecu_serial, "filepath": filepath},
        )
    except ApiClientError as exc:
        raise click.ClickException(str(exc)) from exc
    emit(row, as_json, f"Assigned {filepath} to {vin}/{ecu_serial} ({row['status']})")


@fleet.command("show")
@click.argument("vin")
@server_options
@click.option("--json", "as_json", is_flag=True)
def fleet_show(
    vin: str, server_url: str, ca_cert: Path | None, token_file: Path | None, as_json: bool
) -> None:
    """Show what the server knows of a vehicle: installed images, latest assignments and security events."""
    try:
        rec = client(server_url, ca_cert, token_file).request(
            "GET", f"/api/v1/vehicles/{quote(vin)}"
        )
    except ApiClientError as exc:
        raise click.ClickException(str(exc)) from exc
    lines = [
        f"Vehicle {rec['vin']}: {rec['manifests_accepted']} manifest(s) accepted, {rec['manifests_rejected']} rejected"
    ]
    for e in rec["ecus"]:
        lines.append(
            f"  ECU {e['serial']} ({e['hardware_id']}): {e['installed']['filepath'] or '(nothing)'}"
            + (
                f"  last install: {e['last_install']['result']}"
                if e["last_install"]["result"]
                else ""
            )
            + (f"  ATTACKS: {e['attacks_detected']}" if e["attacks_detected"] else "")
            + (
                "  report counter reset: next report sets its baseline"
                if e["report_counter_state"] == "rebaseline"
                else ""
            )
        )
    lines.append(f"  latest {len(rec['assignments'])} of {rec['assignments_total']} assignment(s):")
    for a in rec["assignments"]:
        lines.append(
            f"    #{a['id']}: {a['ecu_serial']} <- {a['filepath']} [{a['status']}] {a['detail']}"
        )
    lines.append(
        f"  latest {len(rec['security_events'])} of {rec['security_events_total']} security event(s):"
    )
    for ev in rec["security_events"]:
        times = f" x{ev['count']} (first {ev['first_at']})" if ev["count"] > 1 else ""
        lines.append(
            f"    {ev['last_at']}: {ev['kind']} {ev['ecu_serial']} {ev['detail']}{times}".rstrip()
        )
    emit(rec, as_json, "\n".join(lines))


@fleet.command("reset-report-counter")
@click.argument("vin")
@click.option("--ecu", "ecu_serial", required=True, help="ECU serial whose counter to reset.")
@click.option("--reason", default="", help="Why (recorded in the security event).")
@server_options
@click.option("--json", "as_json", is_flag=True)
def fleet_reset_report_counter(
    vin: str,
    ecu_serial: str,
    reason: str,
    server_url: str,
    ca_cert: Path | None,
    token_file: Path | None,
    as_json: bool,
) -> None:
    """Let an ECU's next report set its report counter again (recovery from a counter pushed ahead).

    \b
    The server refuses reports whose counter is not above the last accepted one, or
    jumps too far above it. If a report with a far too high counter was accepted
    (a stolen ECU key, a bug), the genuine ECU is refused from then on: this resets
    the accepted counter, so the next report accepted from the ECU sets the baseline.
    Recorded as a report_counter_reset security event. After a stolen key, re-key the ECU.
    """
    try:
        result = client(server_url, ca_cert, token_file).request(
            "POST",
            f"/api/v1/vehicles/{quote(vin)}/ecus/{quote(ecu_serial)}/report-counter/reset",
            json_body={"reason": reason},
        )
    except ApiClientError as exc:
        raise click.ClickException(str(exc)) from exc
    emit(
        result,
        as_json,
        f"Reset the report counter of {vin}/{ecu_serial} (was {result['previous_report_counter']}): "
        "its next report sets the baseline",
    )


@fleet.command("revoke-vehicle")
@click.argument("vin")
@click.option("--reason", default="", help="Why (recorded in the audit log).")
@server_options
@click.option("--json", "as_json", is_flag=True)
def fleet_revoke_vehicle(
    vin: str, reason: str, server_url: str, ca_cert: Path | None, token_file: Path | None,
    as_json: bool,
) -> None:  # fmt: skip
    """Refuse every request with the vehicle's certificates at once (stolen, decommissioned)."""
    api = client(server_url, ca_cert, token_file)
    result = call(api, "POST", f"/api/v1/vehicles/{quote(vin)}/revoke", {"reason": reason})
    emit(result, as_json, f"Revoked vehicle {vin}: its certificates are refused from now on")


@fleet.command("reinstate-vehicle")
@click.argument("vin")
@server_options
@click.option("--json", "as_json", is_flag=True)
def fleet_reinstate_vehicle(
    vin: str, server_url: str, ca_cert: Path | None, token_file: Path | None, as_json: bool
) -> None:
    """Accept a revoked vehicle's certificates again."""
    result = call(client(server_url, ca_cert, token_file), "POST",
                  f"/api/v1/vehicles/{quote(vin)}/reinstate")  # fmt: skip
    emit(result, as_json, f"Reinstated vehicle {vin}")


@fleet.command("revoke-certificate")
@click.argument("vin")
@click.option(
    "--serial",
    help="Hex serial number (uptake fleet show VIN; openssl's 01FAD9... or 01:fa:d9:... also work).",
)
@click.option(
    "--issuer", default="",
    help="With --serial: the certificate's issuer_sha256 (uptake fleet show VIN), when two CAs "
    "issued the same serial.",
)  # fmt: skip
@click.option(
    "--certificate", "certificate_file", type=click.Path(path_type=Path, dir_okay=False),
    help="The certificate itself (PEM): an operator CA's certificate, even one never used.",
)  # fmt: skip
@server_options
@click.option("--json", "as_json", is_flag=True)
def fleet_revoke_certificate(
    vin: str, serial: str | None, issuer: str, certificate_file: Path | None, server_url: str,
    ca_cert: Path | None, token_file: Path | None, as_json: bool,
) -> None:  # fmt: skip
    """Refuse one client certificate of a vehicle, and every certificate renewed from it.

    \b
    For a leaked vehicle key, revoke the whole vehicle instead
    (revoke-vehicle) and give it a new key (rekey-vehicle): docs/identity.md.
    """
    if (serial is None) == (certificate_file is None):
        raise click.UsageError("give either --serial or --certificate")
    api = client(server_url, ca_cert, token_file)
    if certificate_file is not None:
        try:
            pem = certificate_file.read_text()
        except (OSError, UnicodeError) as exc:
            raise click.ClickException(f"cannot read {certificate_file}: {exc}") from exc
        result = call(api, "POST", f"/api/v1/vehicles/{quote(vin)}/certificates/revoke",
                      {"certificate": pem})  # fmt: skip
    else:
        assert serial is not None
        result = call(api, "POST",
                      f"/api/v1/vehicles/{quote(vin)}/certificates/{quote(serial)}/revoke",
                      {"issuer_sha256": issuer.lower()})  # fmt: skip
    revoked = result.get("revoked_serials", [])
    emit(result, as_json, f"Revoked certificate {result.get('serial')} of vehicle {vin}"
         + (f" ({len(revoked)} certificate(s) refused from now on)" if revoked else ""))  # fmt: skip


@fleet.command("cancel")
@click.argument("vin")
@click.option("--assignment", "assignment_id", type=click.IntRange(1), required=True,
              help="Assignment number (uptake fleet show VIN).")  # fmt: skip
@server_options
@click.option("--json", "as_json", is_flag=True)
def fleet_cancel(
    vin: str, assignment_id: int, server_url: str, ca_cert: Path | None,
    token_file: Path | None, as_json: bool,
) -> None:  # fmt: skip
    """Withdraw a pending assignment: the vehicle's director targets are re-signed without it.

    Refused once the ECU installed it (assign another image instead).
    """
    result = call(client(server_url, ca_cert, token_file), "POST",
                  f"/api/v1/vehicles/{quote(vin)}/assignments/{assignment_id}/cancel")  # fmt: skip
    emit(result, as_json, f"Cancelled assignment #{assignment_id} ({result['filepath']} to "
         f"{vin}/{result['ecu_serial']})")  # fmt: skip


def _tristate(value: str | None) -> str | None:
    return None if value is None else ("true" if value == "yes" else "false")


@fleet.command("list")
@click.option("--hardware-id", help="Vehicles with an ECU of this hardware id.")
@click.option("--image", help="Vehicles with an ECU running this image (target path).")
@click.option("--seen-since", help="Reported (a manifest accepted) since this ISO 8601 time.")
@click.option("--not-seen-since", help="Not reported since this ISO 8601 time (or never).")
@click.option("--revoked", type=click.Choice(["yes", "no"]), help="Revoked vehicles, or not.")
@click.option("--attacks", type=click.Choice(["yes", "no"]),
              help="Vehicles with an ECU reporting an attack, or none.")  # fmt: skip
@click.option("--limit", type=click.IntRange(1, 500), default=100, show_default=True,
              help="Vehicles per page (per request).")  # fmt: skip
@click.option("--all", "all_pages", is_flag=True, help="Every page, not just the first.")
@click.option("--cursor", help="Start at this page (the 'next' of an earlier --json answer).")
@server_options
@click.option("--json", "as_json", is_flag=True, help="One page (or with --all, all) as JSON.")
def fleet_list(
    hardware_id: str | None, image: str | None, seen_since: str | None,
    not_seen_since: str | None, revoked: str | None, attacks: str | None, limit: int,
    all_pages: bool, cursor: str | None, server_url: str, ca_cert: Path | None,
    token_file: Path | None, as_json: bool,
) -> None:  # fmt: skip
    """List vehicles by VIN, a page at a time, filtered.

    \b
    uptake fleet list --image rpi-gateway/1.1.0/gateway.elf
    uptake fleet list --not-seen-since 2026-11-01T00:00:00Z --json
    uptake fleet list --attacks yes --all
    Without --all, the answer ends with the cursor of the next page, if any.
    """
    params = {
        "hardware_id": hardware_id, "image": image, "seen_since": seen_since,
        "not_seen_since": not_seen_since, "revoked": _tristate(revoked),
        "has_attacks": _tristate(attacks), "limit": str(limit),
    }  # fmt: skip
    api = client(server_url, ca_cert, token_file)
    vehicles: list[dict[str, Any]] = []
    while True:
        query = {k: v for k, v in params.items() if v is not None}
        if cursor:
            query["cursor"] = cursor
        page = call(api, "GET", f"/api/v1/vehicles?{urlencode(query)}")
        vehicles.extend(page["vehicles"])
        cursor = page["next"]
        if not all_pages or cursor is None:
            break
    lines = [
        f"{v['vin']:24} last seen {v['last_manifest_at'] or 'never':32} "
        f"{v['manifests_accepted']:>6} manifest(s)"
        + ("  REVOKED" if v["revoked"] else "")
        + ("  ATTACKS" if v["has_attacks"] else "")
        for v in vehicles
    ]
    if cursor:
        lines.append(f"(more: --cursor {cursor})")
    emit({"vehicles": vehicles, "next": cursor}, as_json, "\n".join(lines) or "(no vehicles)")


@fleet.command("export")
@click.option("--vin", help="Export this vehicle's ledger: every change of each of its ECUs.")
@click.option("--image", help="Export the ledger entries of this image (target path).")
@click.option("--version", "version", help="Export the ledger entries of this image version.")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv",
              show_default=True)  # fmt: skip
@click.option("--output", type=click.Path(path_type=Path, dir_okay=False),
              help="Write here (atomically: all or nothing); default: standard output.")  # fmt: skip
@server_options
def fleet_export(
    vin: str | None, image: str | None, version: str | None, fmt: str, output: Path | None,
    server_url: str, ca_cert: Path | None, token_file: Path | None,
) -> None:  # fmt: skip
    """Export the inventory ledger of one vehicle or one release, as CSV or JSON.

    \b
    uptake fleet export --vin VIN1 --output vin1.csv
    uptake fleet export --image rpi-gateway/1.1.0/gateway.elf --format json --output gw.json
    Each row: one change of one ECU (installed image, install result, attack), with the
    image's version and the id of the signed manifest that reported it
    (GET /api/v1/vehicles/VIN/manifests/ID). The server streams it; the file appears
    only once all of it arrived.
    """
    given = {"vin": vin, "image": image, "version": version}
    chosen = {k: v for k, v in given.items() if v is not None}
    if len(chosen) != 1:
        raise click.UsageError("give exactly one of --vin, --image or --version")
    path = f"/api/v1/ledger/export?{urlencode({**chosen, 'format': fmt})}"
    api = client(server_url, ca_cert, token_file)
    try:
        if output is None:
            api.download(path, sys.stdout.buffer)
            return
        with atomic_writer(output) as out:
            size = api.download(path, out)
    except ApiClientError as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:
        raise click.ClickException(f"cannot write {output}: {exc}") from exc
    click.echo(f"Wrote {output} ({size} bytes)", err=True)


@fleet.command("rekey-vehicle")
@click.argument("vin")
@click.option(
    "--csr", "csr_file", required=True, type=click.Path(path_type=Path, dir_okay=False),
    help="The CSR (PEM) of the vehicle's new TLS key, subject CN = VIN.",
)  # fmt: skip
@click.option(
    "--certificate-out", required=True, type=click.Path(path_type=Path, dir_okay=False),
    help="Where to write the new client certificate (the vehicle's STATE/tls/client.crt).",
)  # fmt: skip
@server_options
@click.option("--json", "as_json", is_flag=True)
def fleet_rekey_vehicle(
    vin: str, csr_file: Path, certificate_out: Path, server_url: str, ca_cert: Path | None,
    token_file: Path | None, as_json: bool,
) -> None:  # fmt: skip
    """Certify a new key of a vehicle: every earlier certificate is revoked, the vehicle reinstated.

    \b
    After a leaked vehicle key: revoke-vehicle at once, then rekey-vehicle
    with the CSR of a key the vehicle made anew.
    """
    try:
        csr = csr_file.read_text()
    except (OSError, UnicodeError) as exc:
        raise click.ClickException(f"cannot read {csr_file}: {exc}") from exc
    answer = call(client(server_url, ca_cert, token_file), "POST",
                  f"/api/v1/vehicles/{quote(vin)}/certificates", {"tls_csr": csr})  # fmt: skip
    try:
        write_atomic(certificate_out, answer["tls_certificate"].encode())
    except OSError as exc:
        msg = f"cannot write the certificate to {certificate_out}: {exc}"
        raise click.ClickException(msg) from exc
    emit({**answer, "certificate_file": str(certificate_out)}, as_json,
         f"New certificate for vehicle {vin}: {certificate_out}; earlier ones revoked")  # fmt: skip
