"""Server configuration and the data directory layout.

Everything the server keeps lives under one data directory::

    DATA/
      server.json            host, port, database URL and pool, body timeouts (`server init`)
      admin-token            bearer token for the admin API (0600)
      keys/                  ONLINE keys only (encrypted): image snapshot and
                             timestamp, director targets, snapshot, timestamp
      image-repo/metadata/   N.root.json, N.targets.json, N.snapshot.json,
                             timestamp.json (consistent snapshots)
      image-repo/targets/    images as <dir>/<sha256>.<name>
      image-repo/uploads/    images uploaded but not yet in signed targets
      director/metadata/     N.root.json of the director (shared by vehicles)
      director/encrypted/    per-ECU encrypted image copies, VIN/SERIAL/... (when encrypting)
      uptake.db              SQLite fleet database (unless database_url says otherwise)

The offline keys (image root and targets, director root) are written by
`uptake server init` to a separate directory that the running server never
reads.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from signing.atomic_file import write_atomic
from signing.delta_format import MAX_RECOMPRESS_MEMORY
from signing.exceptions import UptakeError

#: Environment variable with the password of the online keys.
SERVER_PASSWORD_ENV = "UPTAKE_SERVER_KEY_PASSWORD"

ONLINE_KEYS = (
    "image-snapshot",
    "image-timestamp",
    "director-targets",
    "director-snapshot",
    "director-timestamp",
    "image-deltas",
)
OFFLINE_KEYS = ("image-root", "image-targets", "director-root")
#: Longest body timeout the configuration may set, in seconds.
MAX_TIMEOUT = 3600
#: threads for the operators' and background work handlers hand off (asyncio.to_thread),
#: beside ``vehicle_db_threads``: each mostly waits for the database or the disk, so more
#: than asyncio's default of cores + 4; every one may hold a database connection
OPERATOR_THREADS = 12


class VehicleIdentityMode(enum.StrEnum):
    """Where the server learns which vehicle is asking (``vehicle_identity`` in server.json)."""

    #: the client certificate of this server's own TLS connection
    TLS = "tls"
    #: the certificate a trusted proxy (nginx) verified and passed in a header
    PROXY = "proxy"
    #: nobody checks (plain-HTTP development on loopback)
    NONE = "none"


@dataclass(frozen=True)
class VehicleAccess:
    """How vehicle identities are checked (see module docstring)."""

    mode: VehicleIdentityMode
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    images_require_client_cert: bool = False

    def from_trusted_proxy(self, remote: str | None) -> bool:
        if remote is None:
            return False
        try:
            address = ipaddress.ip_address(remote)
        except ValueError:
            return False
        return any(address in network for network in self.trusted_proxies)


class ConfigError(UptakeError):
    """The server configuration or data directory is unusable (says why)."""


@dataclass
class ServerConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8443
    database_url: str = ""
    #: Deliver every vehicle's images encrypted per ECU (:mod:`server.encrypted_images`);
    #: also settable per vehicle at registration ("encrypt_images": true).
    encrypt_images: bool = False
    #: Seconds a client has to send a whole JSON or metadata body (at most a few MB);
    #: then it gets 408 and the connection is closed, so stalled clients hold nothing.
    body_timeout: float = 60.0
    #: Seconds an image upload may go without a byte arriving before it gets 408
    #: (uploads may take long in total; only silence is refused).
    upload_idle_timeout: float = 30.0
    #: TLS certificate (chain) and key of the server, PEM; relative paths are in the data dir.
    #: ``uptake server init`` makes both, signed by its own server CA (tls/server-ca.crt, which
    #: vehicles and operators then trust), unless the operator brings their own.
    tls_cert: str = "tls/server.crt"
    tls_key: str = "tls/server.key"
    #: Serve plain HTTP: only on loopback for development, or behind a proxy that
    #: terminates TLS (with vehicle_identity "proxy" and trusted_proxies).
    plain_http: bool = False
    #: How a vehicle proves who it is: "tls" (client certificate on this server's TLS),
    #: "proxy" (the certificate a trusted proxy verified), "none" (development only).
    vehicle_identity: str = "tls"
    #: Extra CA certificates (PEM file) whose vehicle certificates the server accepts,
    #: beside its own device CA (tls/device-ca.crt): an operator's own PKI.
    client_ca_bundle: str = ""
    #: Addresses (or networks) of proxies whose X-Client-Cert header is believed.
    trusted_proxies: list[str] = field(default_factory=list)
    #: Image downloads need a vehicle certificate (or an operator token) too.
    images_require_client_cert: bool = False
    #: Lifetime of the client certificates the device CA issues; agents renew well before.
    vehicle_certificate_days: int = 365
    #: Seconds that metadata of a role lives, overriding :data:`server.lifetimes.DEFAULT_LIFETIMES`
    #: ("timestamp", "snapshot", "deltas", "director-targets", ...); online metadata is
    #: re-signed by the server once half of it has passed.
    metadata_lifetimes: dict[str, float] = field(default_factory=dict)
    #: PostgreSQL connection pool of each server process (:class:`server.db.PoolSettings`):
    #: connections kept open, extra ones allowed under load, and whether a pooled
    #: connection is tested before use (survives a database restart).
    database_pool_size: int = 10
    database_max_overflow: int = 10
    database_pool_pre_ping: bool = True
    #: Threads that run vehicles' manifests and identity checks (beside the
    #: :data:`OPERATOR_THREADS`). Few: a manifest is a short transaction whose Python bounds
    #: the process, and more threads only switch among each other (4 took a third more
    #: manifests/s than 12 on PostgreSQL over loopback). Raise it, and the pool with it, when
    #: the database is far away: each manifest waits for about ten round trips.
    vehicle_db_threads: int = 4
    #: Most memory (MiB) a vehicle may need to recompress the streams of a compression-aware
    #: delta (an xz kernel with a 32 MiB dictionary needs about 390); streams needing more stay
    #: compressed in the diff (a plain delta, or the full image when that saves too little).
    #: The fleet's smallest primary decides; deltas made before a change are kept.
    delta_max_recompress_mib: int = 512

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'uptake.db'}"

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def image_dir(self) -> Path:
        return self.data_dir / "image-repo"

    @property
    def director_dir(self) -> Path:
        return self.data_dir / "director"

    @property
    def admin_token_path(self) -> Path:
        return self.data_dir / "admin-token"

    @property
    def tls_dir(self) -> Path:
        return self.data_dir / "tls"

    @property
    def device_ca_cert(self) -> Path:
        return self.tls_dir / "device-ca.crt"

    @property
    def server_ca_cert(self) -> Path:
        return self.tls_dir / "server-ca.crt"

    def path(self, value: str) -> Path:
        """``value`` from the configuration as a path (relative ones are in the data dir)."""
        return self.data_dir / value

    @property
    def identity_mode(self) -> VehicleIdentityMode:
        return VehicleIdentityMode(self.vehicle_identity)

    def vehicle_access(self) -> VehicleAccess:
        return VehicleAccess(
            self.identity_mode,
            tuple(ipaddress.ip_network(p, strict=False) for p in self.trusted_proxies),
            self.images_require_client_cert,
        )

    def save(self) -> None:
        data = asdict(self)
        data["data_dir"] = str(self.data_dir)
        write_atomic(self.data_dir / "server.json", json.dumps(data, indent=2).encode() + b"\n")

    @classmethod
    def load(cls, data_dir: Path, **overrides: object) -> ServerConfig:
        path = Path(data_dir) / "server.json"
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError as exc:
            raise ConfigError(
                f"{path} not found: run 'uptake server init --data-dir {data_dir}' first"
            ) from exc
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot read server configuration ({exc})") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: must be a JSON object")
        raw["data_dir"] = data_dir
        raw.update({k: v for k, v in overrides.items() if v is not None})
        try:
            config = cls(**raw)
        except TypeError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        if not isinstance(config.port, int) or not 0 < config.port < 65536:
            raise ConfigError(f"{path}: port must be an integer between 1 and 65535")
        if not isinstance(config.host, str) or not config.host:
            raise ConfigError(f"{path}: host must be a non-empty string")
        if not isinstance(config.database_url, str):
            raise ConfigError(f"{path}: database_url must be a string")
        if not isinstance(config.encrypt_images, bool):
            raise ConfigError(f"{path}: encrypt_images must be true or false")
        for name in ("database_pool_size", "database_max_overflow"):
            value = getattr(config, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1000:
                raise ConfigError(f"{path}: {name} must be an integer from 0 to 1000")
        if config.database_pool_size < 1:
            raise ConfigError(f"{path}: database_pool_size must be at least 1")
        threads = config.vehicle_db_threads
        if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= 64:
            raise ConfigError(f"{path}: vehicle_db_threads must be an integer from 1 to 64")
        connections = config.database_pool_size + config.database_max_overflow
        if connections < threads + OPERATOR_THREADS:  # else a thread waits for a connection
            raise ConfigError(
                f"{path}: vehicle_db_threads ({threads}) and the server's {OPERATOR_THREADS} "
                "other threads need database_pool_size + database_max_overflow of at least "
                f"{threads + OPERATOR_THREADS} (now {connections})"
            )
        if not isinstance(config.database_pool_pre_ping, bool):
            raise ConfigError(f"{path}: database_pool_pre_ping must be true or false")
        recompress = config.delta_max_recompress_mib
        if (
            not isinstance(recompress, int)
            or isinstance(recompress, bool)
            or not 0 <= recompress <= MAX_RECOMPRESS_MEMORY >> 20
        ):
            raise ConfigError(
                f"{path}: delta_max_recompress_mib must be an integer from 0 to "
                f"{MAX_RECOMPRESS_MEMORY >> 20}"
            )
        config.check_tls(path)
        from server.lifetimes import LifetimeError, Lifetimes

        if not isinstance(config.metadata_lifetimes, dict):
            raise ConfigError(f"{path}: metadata_lifetimes must be an object of role -> seconds")
        try:
            Lifetimes(config.metadata_lifetimes)
        except LifetimeError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        for name in ("body_timeout", "upload_idle_timeout"):
            value = getattr(config, name)
            if (
                not isinstance(value, int | float)
                or isinstance(value, bool)
                or not 0 < value <= MAX_TIMEOUT
            ):
                raise ConfigError(
                    f"{path}: {name} must be a number of seconds above 0, at most {MAX_TIMEOUT}"
                )
        return config

    def check_tls(self, where: Path | str) -> None:
        """TLS settings that make sense together (see the fields' comments)."""
        for name in ("tls_cert", "tls_key", "client_ca_bundle", "vehicle_identity"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{where}: {name} must be a string")
        for name in ("plain_http", "images_require_client_cert"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{where}: {name} must be true or false")
        modes = ", ".join(m.value for m in VehicleIdentityMode)
        if self.vehicle_identity not in {m.value for m in VehicleIdentityMode}:
            raise ConfigError(f"{where}: vehicle_identity must be one of {modes}")
        if not isinstance(self.trusted_proxies, list) or not all(
            isinstance(p, str) for p in self.trusted_proxies
        ):
            raise ConfigError(f"{where}: trusted_proxies must be a list of addresses")
        try:
            for proxy in self.trusted_proxies:
                ipaddress.ip_network(proxy, strict=False)
        except ValueError as exc:
            raise ConfigError(f"{where}: trusted_proxies: {exc}") from exc
        days = self.vehicle_certificate_days
        if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= 3650:
            raise ConfigError(f"{where}: vehicle_certificate_days must be from 1 to 3650")
        mode = self.identity_mode
        if mode is VehicleIdentityMode.TLS and self.plain_http:
            raise ConfigError(
                f'{where}: vehicle_identity "tls" needs TLS; with plain_http use "proxy" '
                '(behind nginx) or "none" (development on loopback)'
            )
        if mode is VehicleIdentityMode.PROXY and not self.trusted_proxies:
            raise ConfigError(f'{where}: vehicle_identity "proxy" needs trusted_proxies')
        if self.plain_http and mode is VehicleIdentityMode.NONE and not _is_loopback(self.host):
            raise ConfigError(
                f"{where}: plain HTTP with no vehicle identity is for loopback only, "
                f"not host {self.host!r}"
            )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_password() -> bytes:
    """The online keys' password from the environment."""
    value = os.environ.get(SERVER_PASSWORD_ENV) or os.environ.get("UPTAKE_KEY_PASSWORD")
    if not value:
        raise ConfigError(
            f"the online keys are encrypted: set {SERVER_PASSWORD_ENV} to their password"
        )
    return value.encode()
