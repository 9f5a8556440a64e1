"""Setting up and running the server process.

``init_server`` is the key ceremony for a new deployment: it generates the
online keys into ``DATA/keys`` and the offline keys (image root, image
targets, director root) into a separate directory meant to leave the
machine, and signs the first root and targets metadata with them.
``open_server``/``run_server`` load only the online keys.
"""

from __future__ import annotations

import datetime
import logging
import secrets
import shutil
import ssl
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from cryptography.hazmat.primitives import serialization
from securesystemslib.signer import Signer, SSlibKey
from sqlalchemy.engine import Engine
from sqlalchemy.engine.url import make_url
from sqlmodel import Session
from tuf.api.metadata import Metadata, Root, Targets
from tuf.api.serialization.json import JSONSerializer

from server import audit
from server.accounts import bootstrap_admin
from server.api.application import build_app
from server.api.boundary import answer_parser_errors_in_json
from server.api.observability import ACCESS_LOG, JsonAccessLogger
from server.certificates import CertificateAuthority, CertificateError, server_certificate
from server.config import OFFLINE_KEYS, ONLINE_KEYS, ConfigError, ServerConfig
from server.db import (
    DatabaseUrlError,
    PoolSettings,
    check_database_url,
    make_engine,
    shown_database_url,
)
from server.director import DirectorRepository
from server.image_repository import ImageRepository, deltas_delegation
from server.lifetimes import Lifetimes
from server.offline_keys import KEYSET_NAME, KeySet, KeySetError, generate_key_set
from server.schema import SchemaOutdatedError, SchemaUnknownError
from signing.atomic_file import write_atomic
from signing.keys import (
    SIGNER_REFERENCE_SUFFIX,
    KeyFileError,
    generate_signer,
    load_key,
    save_signer,
)
from signing.metadata import RootIdentity, expiry, set_key_names, set_root_identity

log = logging.getLogger(__name__)

#: Lifetime of the TLS certificate ``uptake server init`` makes for the server itself.
SERVER_CERTIFICATE_LIFETIME = datetime.timedelta(days=825)


class ServerStartError(ConfigError):
    """The server cannot listen where it is configured to (port in use, address not here)."""


@dataclass
class ServerComponents:
    config: ServerConfig
    engine: Engine
    image_repo: ImageRepository
    director: DirectorRepository
    device_ca: CertificateAuthority | None
    ssl_context: ssl.SSLContext | None

    def app(self) -> web.Application:
        return build_app(self.config, self.engine, self.image_repo, self.director, self.device_ca)


def _root(
    online: dict[str, Signer],
    offline: dict[str, tuple[int, list[tuple[str, SSlibKey]]]],
    root_signers: list[Signer],
    prefix: str,
    deployment: str,
) -> Metadata[Root]:
    """Root v1 of repository ``prefix``: online roles with one key, offline ones with their set."""
    root = Root(expires=expiry("root"), consistent_snapshot=True)
    names: dict[str, str] = {}
    for role in ("root", "targets", "snapshot", "timestamp"):
        name = f"{prefix}-{role}"
        if name in offline:
            threshold, keys = offline[name]
            for key_name, key in keys:
                root.add_key(key, role)
                names[key.keyid] = key_name
            root.roles[role].threshold = threshold
        else:
            root.add_key(online[name].public_key, role)
            names[online[name].public_key.keyid] = name
    # says which repository of which deployment it is, so provisioning can refuse a mix-up
    set_root_identity(root, RootIdentity(prefix, deployment))
    set_key_names(root, names)
    md = Metadata(root)
    for signer in root_signers:
        md.sign(signer, append=True)
    return md


def init_server(
    config: ServerConfig,
    offline_dir: Path,
    password: bytes,
    offline_password: bytes,
    key_type: str = "ed25519",
    tls_hostnames: tuple[str, ...] = ("127.0.0.1", "localhost"),
) -> None:
    """Create keys, the first metadata of both repositories, the database, the first admin
    token, and (unless the configuration serves plain HTTP or names the operator's own TLS
    certificate) a server CA with a server certificate for ``tls_hostnames``, and the
    device CA that signs vehicles' client certificates."""
    # before anything is made: a missing driver must not leave half a deployment behind
    check_database_url(config.database_url)
    offline_dir = Path(offline_dir).resolve()
    if offline_dir == config.data_dir or config.data_dir in offline_dir.parents:
        raise ConfigError("the offline keys directory must be outside the server's data directory")
    # a key set made by 'uptake keys init' is used, not overwritten
    prepared = (offline_dir / KEYSET_NAME).exists() and not (
        offline_dir / "image-root.json"
    ).exists()
    for directory in (config.data_dir,) if prepared else (config.data_dir, offline_dir):
        if directory.exists() and any(directory.iterdir()):
            raise ConfigError(
                f"{directory} is not empty: refusing to overwrite an existing deployment"
            )
    try:
        _init(config, offline_dir, password, offline_password, key_type, tls_hostnames)
    except BaseException:
        # leave nothing half-made behind: a retry starts from scratch (a prepared key set stays)
        shutil.rmtree(config.data_dir, ignore_errors=True)
        if not prepared:
            shutil.rmtree(offline_dir, ignore_errors=True)
        raise


def _init(
    config: ServerConfig,
    offline_dir: Path,
    password: bytes,
    offline_password: bytes,
    key_type: str,
    tls_hostnames: tuple[str, ...],
) -> None:
    signers: dict[str, Signer] = {}
    for name in ONLINE_KEYS:
        signer = generate_signer(key_type)
        save_signer(signer, config.keys_dir / f"{name}.key", password)
        signers[name] = signer
    if not (offline_dir / KEYSET_NAME).exists():
        generate_key_set(offline_dir, {}, offline_password, key_type)
    try:
        key_set = KeySet.load(offline_dir)
        offline = {
            role: (key_set.roles[role].threshold, list(key_set.public_keys(offline_dir, role)))
            for role in OFFLINE_KEYS
        }
        offline_signers = {
            role: key_set.signers(offline_dir, role, offline_password) for role in OFFLINE_KEYS
        }
    except KeySetError as exc:
        raise ConfigError(str(exc)) from exc
    deployment = secrets.token_hex(8)
    image_root = _root(signers, offline, offline_signers["image-root"], "image", deployment)
    targets = Metadata(Targets(version=1, expires=expiry("targets")))
    # deltas/* is delegated to an online key so the server can publish deltas itself
    targets.signed.delegations = deltas_delegation(signers["image-deltas"].public_key)
    for targets_signer in offline_signers["image-targets"]:
        targets.sign(targets_signer, append=True)
    ImageRepository.initialize(
        config.image_dir,
        image_root,
        targets,
        signers["image-snapshot"],
        signers["image-timestamp"],
        signers["image-deltas"],
        Lifetimes(config.metadata_lifetimes),
    )
    director_root = _root(
        signers, offline, offline_signers["director-root"], "director", deployment
    )
    DirectorRepository.initialize(config.director_dir, director_root)
    # Trust anchors for release engineers and vehicle provisioning, kept offline.
    serializer = JSONSerializer(compact=False)
    write_atomic(offline_dir / "image-root.json", image_root.to_bytes(serializer))
    write_atomic(offline_dir / "director-root.json", director_root.to_bytes(serializer))
    _init_certificates(config, password, tls_hostnames)
    engine = make_engine(config.database_url)
    with Session(engine) as session:
        audit.append(
            session, audit.local_actor(), "keys.init", f"deployment {deployment}",
            offline={role: {"threshold": t, "keyids": [k.keyid for _, k in keys]}
                     for role, (t, keys) in offline.items()},
            online={name: signer.public_key.keyid for name, signer in signers.items()},
        )  # fmt: skip
        token = bootstrap_admin(session)
        session.commit()
    engine.dispose()
    # the operator's copy; the server keeps only its hash
    write_atomic(config.admin_token_path, token.encode() + b"\n", mode=0o600)
    config.save()
    secure_data_dir(config)


#: Private to the server's user: the data directory and what holds secrets or fleet data.
_PRIVATE_DIR, _PRIVATE_FILE = 0o700, 0o600


def _private_paths(config: ServerConfig) -> tuple[list[Path], list[Path]]:
    """The directories and files that only the server's user may read."""
    files = [config.admin_token_path, config.path(config.tls_key)]
    if config.database_url.startswith("sqlite"):
        database = make_url(config.database_url).database
        if database:
            files += [Path(database + suffix) for suffix in ("", "-wal", "-shm", "-journal")]
    if config.keys_dir.is_dir():
        files += [p for p in config.keys_dir.iterdir() if p.is_file()]
    return [config.data_dir, config.keys_dir], files


def secure_data_dir(config: ServerConfig) -> list[str]:
    """Make the data directory 0700 and the database, key and token files 0600 wherever they
    are looser (SQLite makes its files 0644); returns what it tightened."""
    dirs, files = _private_paths(config)
    tightened = []
    for path, mode in [(d, _PRIVATE_DIR) for d in dirs] + [(f, _PRIVATE_FILE) for f in files]:
        try:
            current = path.stat().st_mode & 0o777
        except FileNotFoundError:
            continue
        if current & ~mode:
            path.chmod(mode)
            tightened.append(f"{path} {current:o} -> {mode:o}")
    return tightened


def _init_certificates(config: ServerConfig, password: bytes, hostnames: tuple[str, ...]) -> None:
    device_ca = CertificateAuthority.generate("Uptake device CA")
    device_ca.save(config.device_ca_cert, config.keys_dir / "device-ca.key", password)
    own_certificate = (
        config.tls_cert != ServerConfig.tls_cert or config.path(config.tls_cert).exists()
    )
    if config.plain_http or own_certificate:
        return
    server_ca = CertificateAuthority.generate("Uptake server CA")
    server_ca.save(config.server_ca_cert, config.keys_dir / "server-ca.key", password)
    cert, key = server_certificate(server_ca, list(hostnames), SERVER_CERTIFICATE_LIFETIME)
    write_atomic(config.path(config.tls_cert), cert.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    )
    write_atomic(config.path(config.tls_key), key_pem, mode=0o600)


def server_ssl_context(config: ServerConfig, password: bytes) -> ssl.SSLContext:
    """TLS for the server: its certificate, and client certificates of the trusted device CAs.

    Client certificates are optional at the TLS layer (operators use tokens);
    routes that need a vehicle check the certificate (:mod:`server.api.access`).
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(
            config.path(config.tls_cert), config.path(config.tls_key), password=password
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"TLS certificate {config.path(config.tls_cert)} / key {config.path(config.tls_key)}: "
            f"{exc}"
        ) from exc
    context.verify_mode = ssl.CERT_OPTIONAL
    bundles = [config.device_ca_cert] if config.device_ca_cert.exists() else []
    if config.client_ca_bundle:
        bundles.append(config.path(config.client_ca_bundle))
    for bundle in bundles:
        try:
            context.load_verify_locations(cafile=bundle)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"client CA bundle {bundle}: {exc}") from exc
    return context


def online_key_file(config: ServerConfig, name: str) -> Path:
    """The online key ``name``: a signer reference (HSM, key service) if one is there, else the
    encrypted ``DATA/keys/NAME.key``."""
    reference = config.keys_dir / f"{name}{SIGNER_REFERENCE_SUFFIX}"
    return reference if reference.exists() else config.keys_dir / f"{name}.key"


def load_online_signers(config: ServerConfig, password: bytes) -> dict[str, Signer]:
    signers = {}
    for name in ONLINE_KEYS:
        try:
            signers[name] = load_key(online_key_file(config, name), password)
        except KeyFileError as exc:
            raise ConfigError(str(exc)) from exc
    return signers


def pool_settings(config: ServerConfig) -> PoolSettings:
    return PoolSettings(
        size=config.database_pool_size,
        max_overflow=config.database_max_overflow,
        pre_ping=config.database_pool_pre_ping,
    )


def open_server(config: ServerConfig, password: bytes) -> ServerComponents:
    signers = load_online_signers(config, password)
    device_ca = None
    if (config.keys_dir / "device-ca.key").exists():
        try:
            device_ca = CertificateAuthority.load(
                config.device_ca_cert, config.keys_dir / "device-ca.key", password
            )
        except CertificateError as exc:
            raise ConfigError(str(exc)) from exc
    ssl_context = None if config.plain_http else server_ssl_context(config, password)
    try:
        engine = make_engine(config.database_url, pool_settings(config))
    except (DatabaseUrlError, SchemaOutdatedError, SchemaUnknownError):
        raise
    except Exception as exc:  # server down, refused login, unwritable file
        raise ConfigError(
            f"cannot open database {shown_database_url(config.database_url)!r}: {exc}"
        ) from exc
    lifetimes = Lifetimes(config.metadata_lifetimes)
    image_repo = ImageRepository(
        config.image_dir,
        signers["image-snapshot"],
        signers["image-timestamp"],
        signers["image-deltas"],
        lifetimes,
    )
    director = DirectorRepository(
        config.director_dir,
        image_repo,
        signers["director-targets"],
        signers["director-snapshot"],
        signers["director-timestamp"],
        encrypt_images=config.encrypt_images,
        lifetimes=lifetimes,
        # SQLite is one process by design; on PostgreSQL replicas may sign too
        sole_writer=engine.dialect.name == "sqlite",
    )
    for tightened in secure_data_dir(config):
        log.warning("permissions were looser than the server's own: %s", tightened)
    return ServerComponents(config, engine, image_repo, director, device_ca, ssl_context)


class _MalformedHttpFilter(logging.Filter):
    """One line, not a traceback, for requests aiohttp already refused as malformed HTTP.

    Any client can send those; the 400 answer is made by
    :class:`server.api.boundary.JsonErrorsRequestHandler`, and a traceback per request would
    let anyone fill the server log. That includes a body that does not decode
    (a false ``Content-Encoding``) met while aiohttp reads and drops a body the answer left
    unread: a ``RequestPayloadError`` caused by the parser's error.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, RequestPayloadError) and isinstance(exc.__cause__, HttpProcessingError):
            exc = exc.__cause__
        if isinstance(exc, HttpProcessingError) and getattr(exc, "code", 500) < 500:
            # formatted here, args dropped: the client's bytes in exc.message may hold a '%'
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {exc.message}"
            record.args, record.exc_info = (), None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def _structured_logs() -> None:
    """The access log and the event log: one JSON object per line on stderr, always on.

    Their lines are already JSON (:mod:`server.api.observability`, :func:`server.metrics.log_event`),
    so they bypass the root handler's text prefix whatever ``--log-format`` says.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in ("uptake.access", "uptake.events"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.handlers = [handler]
        logger.propagate = False


def run_server(components: ServerComponents, print_url: bool = True) -> None:
    """Serve until interrupted; :class:`ServerStartError` if it cannot listen where configured."""
    logging.getLogger("aiohttp.server").addFilter(_MalformedHttpFilter())
    _structured_logs()
    answer_parser_errors_in_json()
    config = components.config
    try:
        web.run_app(
            components.app(),
            host=config.host,
            port=config.port,
            print=(lambda msg: print(msg, flush=True)) if print_url else None,
            access_log=ACCESS_LOG,
            access_log_class=JsonAccessLogger,
            ssl_context=components.ssl_context,
        )
    except OSError as exc:  # raised while binding, before anything is served
        raise ServerStartError(
            f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"
        ) from exc
