"""Server configuration and the data directory layout.

Everything the server keeps lives under one data directory::

    DATA/
      server.json            host, port, database URL, body timeouts (written by `server init`)
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

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from signing.atomic_file import write_atomic
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


class ConfigError(UptakeError):
    """The server configuration or data directory is unusable (says why)."""


@dataclass
class ServerConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8080
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


def server_password() -> bytes:
    """The online keys' password from the environment."""
    value = os.environ.get(SERVER_PASSWORD_ENV) or os.environ.get("UPTAKE_KEY_PASSWORD")
    if not value:
        raise ConfigError(
            f"the online keys are encrypted: set {SERVER_PASSWORD_ENV} to their password"
        )
    return value.encode()
