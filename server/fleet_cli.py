"""``uptake fleet``: register vehicles, direct what their ECUs install, manage identities."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import click

from server.api_client import ApiClientError
from server.cli_common import call, client, emit, server_options
from signing.atomic_file import write_atomic
from signing.json_limits import UntrustedJsonError, parse_json


@click.group()
def fleet() -> None:
    """Register vehicles and direct what their ECUs install.

    \b
    uptake fleet add-vehicle --from-agent /var/lib/uptake/registration.json
    uptake fleet assign --vin VIN --ecu BMS-001 --image stm32f4-bms/1.1.0/bms.bin
    uptake fleet show VIN --json
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
@server_options
@click.option("--json", "as_json", is_flag=True)
def fleet_add_vehicle(
    registration: Path,
    encrypt_images: bool,
    certificate_out: Path | None,
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
@click.option("--serial", required=True, help="Hex serial number (uptake fleet show VIN).")
@server_options
@click.option("--json", "as_json", is_flag=True)
def fleet_revoke_certificate(
    vin: str, serial: str, server_url: str, ca_cert: Path | None, token_file: Path | None,
    as_json: bool,
) -> None:  # fmt: skip
    """Refuse one client certificate of a vehicle (a leaked key) at once."""
    result = call(client(server_url, ca_cert, token_file), "POST",
                  f"/api/v1/vehicles/{quote(vin)}/certificates/{quote(serial)}/revoke")  # fmt: skip
    emit(result, as_json, f"Revoked certificate {serial} of vehicle {vin}")
