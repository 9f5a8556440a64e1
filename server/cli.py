"""``uptake server``: set up and run the image repository + director server."""

from __future__ import annotations

from pathlib import Path

import click

from server.cli_common import database_url_option, emit, password, require_server_extra
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
@database_url_option
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
    database_url: str | None,
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
    config = ServerConfig(data_dir, host, port, database_url or "")
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
@database_url_option
def server_run(
    data_dir: Path, host: str | None, port: int | None, database_url: str | None
) -> None:
    """Serve the image repository, the director and the admin API.

    \b
    A new, empty database is created at this version's schema. One made by an
    older Uptake is refused until 'uptake server migrate' upgrades it.
    Several processes may serve one PostgreSQL database and one data directory
    (shared disk) side by side: see docs/operations.md.
    """
    require_server_extra()
    from server.service import open_server, run_server

    try:
        config = ServerConfig.load(data_dir, host=host, port=port, database_url=database_url)
        components = open_server(config, password(SERVER_PASSWORD_ENV, "the server's online keys"))
        run_server(components)
    except (ConfigError, KeyFileError) as exc:  # ServerStartError too: port in use, no such address
        raise click.ClickException(str(exc)) from exc


@server.command("migrate")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    envvar="UPTAKE_DATA_DIR",
    help="The server's data directory (its server.json names the database); or --database-url.",
)
@database_url_option
@click.option(
    "--make-revision",
    metavar="MESSAGE",
    help="For developers: autogenerate a new revision in server/migrations/versions from the "
    "difference between the tables in server/db.py and a SCRATCH database at head "
    "(--database-url); review the file before committing it.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def server_migrate(
    data_dir: Path | None, database_url: str | None, make_revision: str | None, as_json: bool
) -> None:
    """Upgrade the fleet database's schema in place to this version of Uptake.

    \b
    1. stop every 'uptake server run' on the database;
    2. back it up (pg_dump, or a copy of uptake.db);
    3. uptake server migrate --data-dir /srv/uptake     (or --database-url URL)
    4. start the servers of the new version.
    An empty database is created at the newest schema; one already there is left alone
    (exit 0, nothing applied). Exit 1 with the reason if the database cannot be migrated.
    """
    require_server_extra()
    from server.db import check_database_url, make_engine
    from server.schema import make_revision as autogenerate
    from server.schema import upgrade

    try:
        if data_dir is not None:
            url = ServerConfig.load(data_dir, database_url=database_url).database_url
        elif database_url:
            url = database_url
        else:
            raise ConfigError("give --data-dir or --database-url (or $UPTAKE_DATABASE_URL)")
        check_database_url(url)
        engine = make_engine(url, prepare=False)
        try:
            if make_revision is not None:
                path = autogenerate(engine, make_revision)
                emit({"revision_file": str(path)}, as_json, f"Wrote {path}: review it")
                return
            result = upgrade(engine)
        finally:
            engine.dispose()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    except Exception as exc:  # the database refused a statement: nothing was committed
        raise click.ClickException(f"migration failed, nothing changed: {exc}") from exc
    if result.before is None:
        text = f"Created the tables of schema {result.after} in {result.database}"
    elif result.applied:
        text = (
            f"Migrated {result.database} from schema {result.before} to {result.after} "
            f"({', '.join(result.applied)})"
        )
    else:
        text = f"{result.database} is already at schema {result.after}: nothing to do"
    emit(result.to_dict(), as_json, text)


@server.command("rotate-keys", hidden=True)
@click.option(
    "--data-dir", type=click.Path(path_type=Path), required=True, envvar="UPTAKE_DATA_DIR"
)
@click.option("--offline-keys-dir", type=click.Path(path_type=Path, file_okay=False), required=True)
@click.option("--repository", type=click.Choice(["director", "image"]), required=True)
@click.option("--roles", default="", help="Comma-separated online roles (default: all of them).")
@click.option(
    "--root-key", "root_keys", multiple=True, type=click.Path(path_type=Path, dir_okay=False)
)
@click.option(
    "--key-type", type=click.Choice(["ed25519", "ecdsa-p256", "rsa-pss"]), default="ed25519"
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@database_url_option
@click.pass_context
def server_rotate_keys(
    ctx: click.Context,
    data_dir: Path,
    offline_keys_dir: Path,
    repository: str,
    roles: str,
    root_keys: tuple[Path, ...],
    key_type: str,
    as_json: bool,
    database_url: str | None,
) -> None:
    """Deprecated: 'uptake keys rotate --role online' (or --role ROLE, repeatable) does it."""
    from server.keys_cli import keys_rotate

    chosen = tuple(r.strip() for r in roles.split(",") if r.strip()) or ("online",)
    click.echo(
        "uptake server rotate-keys is deprecated: use 'uptake keys rotate --repository "
        f"{repository} {' '.join('--role ' + r for r in chosen)}'",
        err=True,
    )
    for role in chosen:
        if role not in ("targets", "snapshot", "timestamp", "online"):
            raise click.ClickException(f"cannot rotate {role!r} here: 'uptake keys rotate --role'")
    ctx.invoke(
        keys_rotate, data_dir=data_dir, offline_keys_dir=offline_keys_dir, repository=repository,
        roles=chosen, count=1, threshold=1, new_keys=(), root_keys=root_keys, key_type=key_type,
        as_json=as_json, database_url=database_url,
    )  # fmt: skip
