"""``uptake server``, ``uptake release`` and ``uptake fleet`` commands."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click
from securesystemslib.signer import Signer

from server.api_client import AdminClient, ApiClientError
from server.config import SERVER_PASSWORD_ENV, ConfigError, ServerConfig
from signing.json_limits import UntrustedJsonError, parse_json
from signing.keys import PASSWORD_ENV, KeyFileError, load_signer

_DEFAULT_SERVER = "http://127.0.0.1:8080"


def _password(env_var: str, what: str, confirm: bool = False) -> bytes:
    value = os.environ.get(env_var)
    if value:
        return value.encode()
    if not sys.stdin.isatty():
        raise click.ClickException(f"{what}: set {env_var} (no terminal to prompt on)")
    return str(
        click.prompt(f"Password for {what}", hide_input=True, confirmation_prompt=confirm)
    ).encode()


def _require_server_extra() -> None:
    """The server itself needs aiohttp and sqlmodel; a vehicle install has neither."""
    import importlib.util

    missing = [
        m
        for m in ("aiohttp", "sqlmodel", "bsdiff4", "zstandard")
        if importlib.util.find_spec(m) is None
    ]
    if missing:
        raise click.ClickException(
            f"the server needs {', '.join(missing)}: install it with: pip install 'uptake[server]'"
        )


def _emit(data: Any, as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else text)


# -- server ---------------------------------------------------------------------------


@click.group()
def server() -> None:
    """Run the image repository + director server.

    \b
    First time:   uptake server init --data-dir /srv/uptake --offline-keys-dir /media/usb/uptake-keys
    Then:         uptake server run --data-dir /srv/uptake
    Online keys are encrypted with $UPTAKE_SERVER_KEY_PASSWORD; offline keys with $UPTAKE_KEY_PASSWORD.
    """


@server.command("init")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    required=True,
    help="Where the server keeps everything.",
)
@click.option(
    "--offline-keys-dir",
    type=click.Path(path_type=Path),
    required=True,
    help="Where to write the OFFLINE keys (image root/targets, director root) and trusted roots. Move it off the server.",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--database-url",
    default="",
    help="SQLAlchemy URL; default SQLite in the data dir (e.g. postgresql+psycopg://user@host/db).",
)
@click.option(
    "--key-type",
    type=click.Choice(["ed25519", "ecdsa-p256", "rsa-pss"]),
    default="ed25519",
    show_default=True,
)
def server_init(
    data_dir: Path, offline_keys_dir: Path, host: str, port: int, database_url: str, key_type: str
) -> None:
    """Create keys, the first metadata of both repositories and the database."""
    _require_server_extra()
    from server.db import check_database_url
    from server.service import init_server

    config = ServerConfig(data_dir, host, port, database_url)
    try:
        check_database_url(config.database_url)  # before asking for passwords
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    online = _password(SERVER_PASSWORD_ENV, "the server's online keys", confirm=True)
    offline = _password(PASSWORD_ENV, "the offline keys", confirm=True)
    try:
        init_server(config, offline_keys_dir, online, offline, key_type)
    except (ConfigError, KeyFileError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(
        f"Initialised {config.data_dir}\n  offline keys and trusted roots: {offline_keys_dir.resolve()} (move them off this machine)"
        f"\n  admin token: {config.admin_token_path}\nStart it with: uptake server run --data-dir {data_dir}"
    )


@server.command("run")
@click.option(
    "--data-dir", type=click.Path(path_type=Path), required=True, envvar="UPTAKE_DATA_DIR"
)
@click.option("--host", default=None, help="Override the configured listen address.")
@click.option(
    "--port", default=None, type=click.IntRange(0, 65535), help="Override the configured port."
)
@click.option("--database-url", default=None, help="Override the configured database URL.")
def server_run(
    data_dir: Path, host: str | None, port: int | None, database_url: str | None
) -> None:
    """Serve the image repository, the director and the admin API."""
    _require_server_extra()
    from server.service import open_server, run_server

    try:
        config = ServerConfig.load(data_dir, host=host, port=port, database_url=database_url)
        components = open_server(config, _password(SERVER_PASSWORD_ENV, "the server's online keys"))
        run_server(components)
    except (ConfigError, KeyFileError) as exc:  # ServerStartError too: port in use, no such address
        raise click.ClickException(str(exc)) from exc


@server.command("rotate-keys")
@click.option(
    "--data-dir", type=click.Path(path_type=Path), required=True, envvar="UPTAKE_DATA_DIR"
)
@click.option(
    "--offline-keys-dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Directory with the offline root key (REPO-root.key) and the trusted REPO-root.json to refresh.",
)
@click.option("--repository", type=click.Choice(["director", "image"]), required=True)
@click.option(
    "--roles",
    default="",
    help="Comma-separated online roles to rotate (default: all of them: "
    "director targets,snapshot,timestamp; image snapshot,timestamp).",
)
@click.option(
    "--root-key",
    "root_keys",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Root key file(s) to sign with, for root thresholds > 1 (default OFFLINE/REPO-root.key).",
)
@click.option(
    "--key-type",
    type=click.Choice(["ed25519", "ecdsa-p256", "rsa-pss"]),
    default="ed25519",
    show_default=True,
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def server_rotate_keys(
    data_dir: Path,
    offline_keys_dir: Path,
    repository: str,
    roles: str,
    root_keys: tuple[Path, ...],
    key_type: str,
    as_json: bool,
) -> None:
    """Replace a repository's ONLINE keys after a compromise (run with the server STOPPED).

    \b
    1. stop 'uptake server run' (nothing signed with the old keys is served meanwhile);
    2. uptake server rotate-keys --data-dir D --offline-keys-dir K --repository director
       generates new online keys into D/keys, signs root vN+1 naming them with
       the OFFLINE root key, stores it where vehicles fetch it, and re-signs
       the repository's metadata (every vehicle's, for the director);
    3. start 'uptake server run' again.
    Vehicles follow the root rotation on their next poll and from then on
    refuse metadata signed with the old keys. If the command is interrupted,
    run it again: it finishes the rotation it started.
    Online keys use $UPTAKE_SERVER_KEY_PASSWORD; the root key $UPTAKE_KEY_PASSWORD.
    """
    _require_server_extra()
    from server.rotation import RotationError, rotate_online_keys

    try:
        config = ServerConfig.load(data_dir)
        online = _password(SERVER_PASSWORD_ENV, "the server's online keys")
        offline = _password(PASSWORD_ENV, f"the offline {repository} root key")
        result = rotate_online_keys(
            config,
            offline_keys_dir,
            repository,
            [r.strip() for r in roles.split(",") if r.strip()],
            online,
            offline,
            root_keys=root_keys,
            key_type=key_type,
        )
    except (ConfigError, RotationError, KeyFileError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    _emit(
        result.__dict__,
        as_json,
        f"{'Finished' if result.resumed else 'Rotated'} {repository} {', '.join(result.roles)} keys: "
        f"root v{result.root_version}"
        + (
            f", director metadata of {result.vehicles_resigned} vehicle(s) re-signed"
            if repository == "director"
            else ""
        )
        + f"\nStart the server again: uptake server run --data-dir {data_dir}",
    )


# -- release ----------------------------------------------------------------------------

_server_opt = click.option(
    "--server",
    "server_url",
    default=_DEFAULT_SERVER,
    envvar="UPTAKE_SERVER",
    show_default=True,
    help="Server base URL ($UPTAKE_SERVER).",
)
_token_opt = click.option(
    "--token-file",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="UPTAKE_ADMIN_TOKEN_FILE",
    help="File with the admin token (DATA/admin-token; $UPTAKE_ADMIN_TOKEN_FILE).",
)


def _client(server_url: str, token_file: Path | None) -> AdminClient:
    token = os.environ.get("UPTAKE_ADMIN_TOKEN")
    if token:
        return AdminClient(server_url, token)
    if token_file is None:
        raise click.ClickException("no admin token: pass --token-file or set UPTAKE_ADMIN_TOKEN")
    try:
        return AdminClient.from_token_file(server_url, token_file)
    except ApiClientError as exc:
        raise click.ClickException(str(exc)) from exc


@click.group()
def release() -> None:
    """Publish firmware to the image repository (signed with OFFLINE targets keys).

    \b
    uptake release publish bms.bin --hardware-id stm32f4-bms --version 1.1.0 \\
        --keys-dir /media/usb/uptake-keys --token-file /srv/uptake/admin-token
    """


@release.command("publish")
@click.argument("image", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--hardware-id",
    "hardware_ids",
    multiple=True,
    required=True,
    help="ECU hardware id the image fits (repeatable).",
)
@click.option("--version", required=True, help="Human version, e.g. 1.1.0.")
@click.option(
    "--release-counter",
    type=click.IntRange(0),
    default=None,
    help="Anti-rollback counter; default: one above the highest published for these hardware ids.",
)
@click.option("--filepath", default=None, help="Target name; default HARDWARE_ID/VERSION/FILENAME.")
@click.option(
    "--requires",
    "requires",
    multiple=True,
    metavar="HARDWARE_ID=SPEC",
    help="What the image needs of the vehicle's other ECUs, e.g. 'stm32f4-bms=>=1.1.0,<2' (repeatable): "
    "the director never directs, and vehicles never install, a combination that breaks it.",
)
@click.option(
    "--keys-dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Directory with image-targets.key and the trusted image-root.json.",
)
@click.option(
    "--targets-key",
    "targets_keys",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Targets key file(s) to sign with, for thresholds > 1 (default KEYS_DIR/image-targets.key).",
)
@_server_opt
@_token_opt
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def release_publish(
    image: Path,
    hardware_ids: tuple[str, ...],
    version: str,
    release_counter: int | None,
    filepath: str | None,
    requires: tuple[str, ...],
    keys_dir: Path,
    targets_keys: tuple[Path, ...],
    server_url: str,
    token_file: Path | None,
    as_json: bool,
) -> None:
    """Sign IMAGE into the image repository's targets and publish it."""
    from server.release import TRUSTED_ROOT_NAME, PublishError, publish_image

    needs = {}
    for item in requires:
        hw, sep, spec = item.partition("=")
        if not sep or not hw or not spec:
            raise click.BadParameter(
                f"{item!r} is not HARDWARE_ID=SPEC (e.g. stm32f4-bms=>=1.1.0)",
                param_hint="--requires",
            )
        needs[hw] = spec
    password = _password(PASSWORD_ENV, "the offline targets key")
    try:
        signers: list[Signer] = [
            load_signer(p, password) for p in (targets_keys or (keys_dir / "image-targets.key",))
        ]
        trusted_root = (keys_dir / TRUSTED_ROOT_NAME).read_bytes()
    except (KeyFileError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        published = publish_image(
            _client(server_url, token_file),
            image,
            list(hardware_ids),
            version,
            signers,
            trusted_root,
            release_counter=release_counter,
            filepath=filepath,
            requires=needs or None,
        )
    except PublishError as exc:
        raise click.ClickException(str(exc)) from exc
    _emit(
        published.__dict__,
        as_json,
        f"Published {published.filepath} ({published.length} bytes, sha256 {published.sha256[:16]}…, "
        f"release counter {published.release_counter}) in targets v{published.targets_version}",
    )


# -- fleet ------------------------------------------------------------------------------


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
    type=click.File("rb"),
    required=True,
    help="registration.json written by 'uptake agent init' (VIN, ECU serials, hardware ids, public keys).",
)
@click.option(
    "--encrypt-images",
    is_flag=True,
    help="Deliver this vehicle's images encrypted to each ECU's registered encryption key "
    '(server-wide: "encrypt_images": true in DATA/server.json).',
)
@_server_opt
@_token_opt
def fleet_add_vehicle(
    registration: Any, encrypt_images: bool, server_url: str, token_file: Path | None
) -> None:
    """Register a vehicle and its ECUs' public keys with the director."""
    try:
        body = parse_json(registration.read(), where=registration.name, max_bytes=1024 * 1024)
    except UntrustedJsonError as exc:
        raise click.ClickException(str(exc)) from exc
    if encrypt_images and isinstance(body, dict):
        body["encrypt_images"] = True
    try:
        _client(server_url, token_file).request("POST", "/api/v1/vehicles", json_body=body)
    except ApiClientError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"Registered vehicle {body.get('vin')} with {len(body.get('ecus', []))} ECU(s)")


@fleet.command("assign")
@click.option("--vin", required=True)
@click.option("--ecu", "ecu_serial", required=True, help="ECU serial.")
@click.option("--image", "filepath", required=True, help="Image repository target path.")
@_server_opt
@_token_opt
@click.option("--json", "as_json", is_flag=True)
def fleet_assign(
    vin: str,
    ecu_serial: str,
    filepath: str,
    server_url: str,
    token_file: Path | None,
    as_json: bool,
) -> None:
    """Direct one ECU of a vehicle to install an image."""
    try:
        row = _client(server_url, token_file).request(
            "POST",
            f"/api/v1/vehicles/{quote(vin)}/assignments",
            json_body={"ecu_serial": ecu_serial, "filepath": filepath},
        )
    except ApiClientError as exc:
        raise click.ClickException(str(exc)) from exc
    _emit(row, as_json, f"Assigned {filepath} to {vin}/{ecu_serial} ({row['status']})")


@fleet.command("show")
@click.argument("vin")
@_server_opt
@_token_opt
@click.option("--json", "as_json", is_flag=True)
def fleet_show(vin: str, server_url: str, token_file: Path | None, as_json: bool) -> None:
    """Show what the server knows of a vehicle: installed images, latest assignments and security events."""
    try:
        rec = _client(server_url, token_file).request("GET", f"/api/v1/vehicles/{quote(vin)}")
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
    _emit(rec, as_json, "\n".join(lines))


@fleet.command("reset-report-counter")
@click.argument("vin")
@click.option("--ecu", "ecu_serial", required=True, help="ECU serial whose counter to reset.")
@click.option("--reason", default="", help="Why (recorded in the security event).")
@_server_opt
@_token_opt
@click.option("--json", "as_json", is_flag=True)
def fleet_reset_report_counter(
    vin: str,
    ecu_serial: str,
    reason: str,
    server_url: str,
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
        result = _client(server_url, token_file).request(
            "POST",
            f"/api/v1/vehicles/{quote(vin)}/ecus/{quote(ecu_serial)}/report-counter/reset",
            json_body={"reason": reason},
        )
    except ApiClientError as exc:
        raise click.ClickException(str(exc)) from exc
    _emit(
        result,
        as_json,
        f"Reset the report counter of {vin}/{ecu_serial} (was {result['previous_report_counter']}): "
        "its next report sets the baseline",
    )
