"""``uptake server``: set up and run the image repository + director server."""

from __future__ import annotations

from pathlib import Path

import click

from server.cli_common import emit, password, require_server_extra
from server.config import SERVER_PASSWORD_ENV, ConfigError, ServerConfig
from signing.keys import PASSWORD_ENV, KeyFileError

_DEFAULT_SERVER = "http://127.0.0.1:8080"


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
    help="Where to write the OFFLINE keys (image root/targets, director root) and trusted roots. "
    "Move it off the server.",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8443, show_default=True, type=click.IntRange(1, 65535))
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
@click.option(
    "--tls-hostname",
    "tls_hostnames",
    multiple=True,
    help="Name or address vehicles reach the server by, for the TLS certificate init makes "
    "(repeatable; default 127.0.0.1 and localhost).",
)
@click.option(
    "--tls-cert",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Use this TLS certificate (PEM chain) instead of making one; with --tls-key.",
)
@click.option("--tls-key", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option(
    "--plain-http",
    is_flag=True,
    help="Serve plain HTTP without vehicle identities: development on loopback only.",
)
def server_init(
    data_dir: Path,
    offline_keys_dir: Path,
    host: str,
    port: int,
    database_url: str,
    key_type: str,
    tls_hostnames: tuple[str, ...],
    tls_cert: Path | None,
    tls_key: Path | None,
    plain_http: bool,
) -> None:
    """Create keys, the first metadata of both repositories, the database, TLS and the first token.

    \b
    TLS: unless --plain-http, the server serves HTTPS. Without --tls-cert, init makes a
    server CA (DATA/tls/server-ca.crt: give it to vehicles and operators, --ca-cert) and a
    certificate for --tls-hostname. It always makes the device CA (DATA/tls/device-ca.crt)
    that signs vehicles' client certificates at registration.
    The first admin token is written to DATA/admin-token (the server keeps only its hash).
    """
    require_server_extra()
    from server.db import check_database_url
    from server.service import init_server

    if (tls_cert is None) != (tls_key is None):
        raise click.BadParameter("give both --tls-cert and --tls-key, or neither")
    config = ServerConfig(data_dir, host, port, database_url)
    if plain_http:
        config.plain_http, config.vehicle_identity = True, "none"
    if tls_cert is not None and tls_key is not None:
        config.tls_cert, config.tls_key = str(tls_cert.resolve()), str(tls_key.resolve())
    try:
        check_database_url(config.database_url)  # before asking for passwords
        config.check_tls("server init")
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    online = password(SERVER_PASSWORD_ENV, "the server's online keys", confirm=True)
    offline = password(PASSWORD_ENV, "the offline keys", confirm=True)
    try:
        init_server(
            config, offline_keys_dir, online, offline, key_type,
            tls_hostnames=tls_hostnames or ("127.0.0.1", "localhost"),
        )  # fmt: skip
    except (ConfigError, KeyFileError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    scheme = "http" if config.plain_http else "https"
    click.echo(
        f"Initialised {config.data_dir}\n"
        f"  offline keys and trusted roots: {offline_keys_dir.resolve()} (move them off this "
        "machine)\n"
        f"  first admin token: {config.admin_token_path}\n"
        + (f"  server CA for --ca-cert: {config.server_ca_cert}\n" if config.server_ca_cert.exists()
           else "")
        + f"Start it with: uptake server run --data-dir {data_dir}  ({scheme}://{host}:{port})"
    )  # fmt: skip


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
    require_server_extra()
    from server.service import open_server, run_server

    try:
        config = ServerConfig.load(data_dir, host=host, port=port, database_url=database_url)
        components = open_server(config, password(SERVER_PASSWORD_ENV, "the server's online keys"))
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
    require_server_extra()
    from server.rotation import RotationError, rotate_online_keys

    try:
        config = ServerConfig.load(data_dir)
        online = password(SERVER_PASSWORD_ENV, "the server's online keys")
        offline = password(PASSWORD_ENV, f"the offline {repository} root key")
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
    emit(
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
