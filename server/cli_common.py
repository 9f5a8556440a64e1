"""What every operator command shares: the server to talk to, TLS trust, the token, output.

Options (and their environment variables):

* ``--server URL`` (``$UPTAKE_SERVER``): the server, ``https://…`` (plain
  ``http://`` only for a development server on loopback);
* ``--ca-cert FILE`` (``$UPTAKE_CA_CERT``): the CA that signed the server's
  TLS certificate (``DATA/tls/server-ca.crt`` for a server with its own CA),
  else the system's trusted CAs;
* ``--token-file FILE`` (``$UPTAKE_TOKEN_FILE``), or the token itself in
  ``$UPTAKE_TOKEN``: an operator token (``DATA/admin-token`` is the first
  admin's).

Commands that sign with the OFFLINE targets key(s) also share ``--keys-dir`` and
``--targets-key`` (:func:`offline_key_options`, loaded by :func:`offline_signers`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from server.api_client import AdminClient, ApiClientError
from signing.delta_format import ARCH_NAMES

if TYPE_CHECKING:
    from securesystemslib.signer import Signer

DEFAULT_SERVER = "https://127.0.0.1:8443"
#: Older names of the token variables, still read.
_TOKEN_ENV = ("UPTAKE_TOKEN", "UPTAKE_ADMIN_TOKEN")
_TOKEN_FILE_ENV = ("UPTAKE_TOKEN_FILE", "UPTAKE_ADMIN_TOKEN_FILE")

_F = TypeVar("_F", bound=Callable[..., Any])


#: Environment variable with the fleet database URL (:data:`server.db.DATABASE_URL_ENV`).
DATABASE_URL_ENV = "UPTAKE_DATABASE_URL"


def database_url_option(fn: _F) -> _F:
    """``--database-url`` (``$UPTAKE_DATABASE_URL``) of every command that opens the database.

    Precedence: the option, then the environment, then ``database_url`` in
    server.json, then SQLite in the data directory.
    """
    return click.option(
        "--database-url",
        default=None,
        envvar=DATABASE_URL_ENV,
        metavar="URL",
        help="Fleet database, e.g. postgresql+psycopg://uptake@db/uptake (default: "
        f"${DATABASE_URL_ENV}, else server.json's database_url, else SQLite in the data dir).",
    )(fn)


def password(env_var: str, what: str, confirm: bool = False) -> bytes:
    value = os.environ.get(env_var)
    if value:
        return value.encode()
    if not sys.stdin.isatty():
        raise click.ClickException(f"{what}: set {env_var} (no terminal to prompt on)")
    return str(
        click.prompt(f"Password for {what}", hide_input=True, confirmation_prompt=confirm)
    ).encode()


def require_server_extra() -> None:
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


def emit(data: Any, as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else text)


def server_options(command: _F) -> _F:
    """``--server``, ``--ca-cert`` and ``--token-file`` (see module docstring)."""
    command = click.option(
        "--token-file",
        type=click.Path(path_type=Path, dir_okay=False),
        envvar=list(_TOKEN_FILE_ENV),
        help="File with an operator token ($UPTAKE_TOKEN_FILE; or the token in $UPTAKE_TOKEN).",
    )(command)
    command = click.option(
        "--ca-cert",
        type=click.Path(path_type=Path, dir_okay=False),
        envvar="UPTAKE_CA_CERT",
        help="CA certificate to verify the server with ($UPTAKE_CA_CERT; default: the system's).",
    )(command)
    command = click.option(
        "--server",
        "server_url",
        default=DEFAULT_SERVER,
        envvar="UPTAKE_SERVER",
        show_default=True,
        help="Server base URL ($UPTAKE_SERVER).",
    )(command)
    return command


def arch_option(command: _F) -> _F:
    """``--arch``: the machine code of a raw image, signed into its ``custom.arch`` (deltas)."""
    return click.option(
        "--arch",
        type=click.Choice(sorted(ARCH_NAMES.values())),
        default=None,
        help="The machine code of a raw image (an ELF header says it by itself), so that "
        "deltas to it rewrite relative branches first (e.g. armt for a Cortex-M flash image).",
    )(command)


def offline_key_options(command: _F) -> _F:
    """``--keys-dir`` and ``--targets-key`` of every command signed with the OFFLINE targets
    key(s) (:func:`offline_signers` loads them)."""
    command = click.option(
        "--targets-key",
        "targets_keys",
        multiple=True,
        type=click.Path(path_type=Path),
        help="Targets key file(s) to sign with, for thresholds > 1 (default KEYS_DIR/image-targets.key).",
    )(command)
    return click.option(
        "--keys-dir",
        type=click.Path(path_type=Path, file_okay=False),
        required=True,
        help="Directory with image-targets.key and the trusted image-root.json.",
    )(command)


def load_signers(paths: tuple[Path, ...], what: str) -> list[Signer]:
    """The signers of key files (one password, asked for as ``what``) or signer references."""
    from signing.keys import PASSWORD_ENV, KeyFileError, is_signer_reference, load_key

    key_password = (
        None if all(is_signer_reference(p) for p in paths) else password(PASSWORD_ENV, what)
    )
    try:
        return [load_key(p, key_password) for p in paths]
    except (KeyFileError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc


def offline_signers(
    keys_dir: Path, targets_keys: tuple[Path, ...], what: str
) -> tuple[list[Signer], bytes]:
    """The targets signers of :func:`offline_key_options` and the trusted image root beside
    them; ``what`` names the key in the password prompt."""
    from server.release import TRUSTED_ROOT_NAME

    signers = load_signers(targets_keys or (keys_dir / "image-targets.key",), what)
    root = keys_dir / TRUSTED_ROOT_NAME
    try:
        return signers, root.read_bytes()
    except OSError as exc:
        raise click.ClickException(f"{root}: {exc.strerror}") from exc


def client(server_url: str, ca_cert: Path | None, token_file: Path | None) -> AdminClient:
    """A client for the server with the operator's token (see module docstring)."""
    token = next((os.environ[v] for v in _TOKEN_ENV if os.environ.get(v)), None)
    try:
        if token is None:
            if token_file is None:
                raise click.ClickException(
                    "no operator token: pass --token-file or set UPTAKE_TOKEN"
                )
            token = AdminClient.read_token(token_file)
        return AdminClient(server_url, token, ca_cert=ca_cert)
    except ApiClientError as exc:
        raise click.ClickException(str(exc)) from exc


def call(api: AdminClient, method: str, path: str, json_body: Any = None) -> Any:
    """One request; a refusal becomes a one-line error and exit status 1."""
    try:
        return api.request(method, path, json_body=json_body)
    except ApiClientError as exc:
        raise click.ClickException(str(exc)) from exc
