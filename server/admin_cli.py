"""``uptake admin``: operator tokens (admin role)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO
from urllib.parse import quote

import click

from server.cli_common import call, client, emit, server_options
from server.roles import Role

_DURATION_UNITS = {"d": timedelta(days=1), "h": timedelta(hours=1), "m": timedelta(minutes=1)}


def _expiry(value: str | None) -> str | None:
    """``90d``, ``12h``, ``30m`` or an ISO 8601 time → an ISO 8601 time with a zone."""
    if value is None:
        return None
    unit = _DURATION_UNITS.get(value[-1:])
    try:
        if unit is not None and value[:-1].isdigit() and len(value) <= 12:
            return (datetime.now(UTC) + int(value[:-1]) * unit).replace(microsecond=0).isoformat()
        when = datetime.fromisoformat(value)
    except (ValueError, OverflowError):  # OverflowError: a duration past what datetime holds
        raise click.BadParameter(
            f"{value!r}: a duration (90d, 12h, 30m) or an ISO 8601 time", param_hint="--expires"
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).isoformat()


@click.group()
def admin() -> None:
    """Operator accounts: named tokens with a role (needs an admin token).

    \b
    uptake admin token create --name alice --role release-engineer --expires 90d
    uptake admin token create --name brakes-inc --role supplier --hardware-id brake-ecu
    uptake admin token list
    uptake admin token revoke alice
    uptake admin token password alice      (a dashboard password for alice's account)
    Roles: admin, release-engineer, fleet-operator, viewer, supplier (its hardware ids only).
    A token is shown once, when created; the server keeps only its hash.
    """


@admin.group()
def token() -> None:
    """Create, list and revoke operator tokens."""


@token.command("create")
@click.option("--name", required=True, help="Who or what holds it (a name of the grammar).")
@click.option("--role", type=click.Choice([r.value for r in Role]), required=True)
@click.option(
    "--hardware-id",
    "hardware_ids",
    multiple=True,
    help="Supplier tokens: a hardware id whose images it may publish (repeatable).",
)
@click.option(
    "--expires", default=None, help="90d, 12h, 30m, or an ISO 8601 time (default: never)."
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the token to this file (0600) instead of printing it.",
)
@server_options
@click.option("--json", "as_json", is_flag=True)
def token_create(
    name: str,
    role: str,
    hardware_ids: tuple[str, ...],
    expires: str | None,
    out: Path | None,
    server_url: str,
    ca_cert: Path | None,
    token_file: Path | None,
    as_json: bool,
) -> None:
    """Create a token; it is shown (or written to --out) this once."""
    from signing.atomic_file import write_atomic

    body = {"name": name, "role": role, "hardware_ids": list(hardware_ids),
            "expires_at": _expiry(expires)}  # fmt: skip
    result = call(client(server_url, ca_cert, token_file), "POST", "/api/v1/tokens", body)
    if out is not None:
        write_atomic(out, result.pop("token").encode() + b"\n", mode=0o600)
        result["token_file"] = str(out)
    emit(
        result,
        as_json,
        f"Created token {name!r} ({role}"
        + (f", hardware ids {', '.join(hardware_ids)}" if hardware_ids else "")
        + (f", expires {result['expires_at']}" if result.get("expires_at") else "")
        + ")\n"
        + (f"  written to {out}" if out else f"  {result.get('token')}\n  (shown this once)"),
    )


@token.command("list")
@server_options
@click.option("--json", "as_json", is_flag=True)
def token_list(
    server_url: str, ca_cert: Path | None, token_file: Path | None, as_json: bool
) -> None:
    """List tokens: name, role, who made them, expiry, revocation (never the tokens)."""
    result = call(client(server_url, ca_cert, token_file), "GET", "/api/v1/tokens")
    lines = []
    for t in result["tokens"]:
        state = "revoked" if t["revoked_at"] else ("expires " + t["expires_at"] if t["expires_at"]
                                                   else "no expiry")  # fmt: skip
        hw = f" [{', '.join(t['hardware_ids'])}]" if t["hardware_ids"] else ""
        lines.append(f"{t['name']:24} {t['role']:17}{hw} by {t['created_by']}, {state}")
    emit(result, as_json, "\n".join(lines) or "(no tokens)")


@token.command("revoke")
@click.argument("name")
@server_options
@click.option("--json", "as_json", is_flag=True)
def token_revoke(
    name: str, server_url: str, ca_cert: Path | None, token_file: Path | None, as_json: bool
) -> None:
    """Revoke a token: it is refused from the next request on."""
    result = call(client(server_url, ca_cert, token_file), "POST",
                  f"/api/v1/tokens/{quote(name)}/revoke")  # fmt: skip
    emit(result, as_json, f"Revoked token {name!r}")


@token.command("password")
@click.argument("name")
@click.option(
    "--password-file",
    type=click.File("r"),
    help="Read the password from this file's first line ('-': standard input) instead of asking.",
)
@server_options
@click.option("--json", "as_json", is_flag=True)
def token_password(
    name: str,
    password_file: IO[str] | None,
    server_url: str,
    ca_cert: Path | None,
    token_file: Path | None,
    as_json: bool,
) -> None:
    """Set the dashboard password of account NAME (12 to 1024 characters).

    The account's holder then logs in to /dashboard/ with NAME and this
    password instead of the token. Its role and expiry are the token's; revoking
    the token ends password logins too. Setting a password again ends the
    account's open dashboard sessions. Without --password-file it is asked for
    twice, not echoed.
    """
    if password_file is not None:
        password = password_file.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    result = call(client(server_url, ca_cert, token_file), "POST",
                  f"/api/v1/tokens/{quote(name)}/password", {"password": password})  # fmt: skip
    emit(result, as_json, f"Set the dashboard password of {name!r} (its open sessions ended)")
