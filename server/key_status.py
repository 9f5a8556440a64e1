"""``uptake keys status``: every role of both repositories, its keys, threshold, version, expiry.

Read from the data directory (the server need not run). Online roles are
re-signed by the server itself (:mod:`server.lifetimes`); OFFLINE roles
(both roots, image targets) need people and their keys, so a warning is
given well ahead of their expiry (:data:`OFFLINE_WARNING`). So do the
supplier roles the image targets delegate to (:mod:`server.delegation`):
the server holds none of their keys, their supplier re-publishes them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

from server.config import ServerConfig
from server.image_repository import versioned_files
from signing.metadata import DELTAS_ROLE, key_names

#: Warn this long before an offline role's metadata expires.
OFFLINE_WARNING = timedelta(days=30)
_OFFLINE = {("image", "root"), ("image", "targets"), ("director", "root")}


@dataclass(frozen=True)
class RoleStatus:
    repository: str
    role: str
    online: bool
    keys: list[str]
    threshold: int
    version: int | None  # None: per vehicle (director targets, snapshot, timestamp)
    expires: str | None
    warning: str = ""
    #: a supplier's delegated role of the image repository (its keys are the supplier's)
    supplier: bool = False


def key_status(config: ServerConfig, now: datetime | None = None) -> list[RoleStatus]:
    now = now or datetime.now(UTC)
    result = []
    for repository, directory in (("image", config.image_dir), ("director", config.director_dir)):
        metadata_dir = directory / "metadata"
        root = Metadata[Root].from_file(str(versioned_files(metadata_dir, "root")[-1][1]))
        names = key_names(root.signed)
        current: dict[str, Metadata[Root] | Metadata[Targets] | Metadata[Snapshot] | Metadata[Timestamp]] = {"root": root}  # fmt: skip
        if repository == "image":
            for role, kind in (("targets", Targets), ("snapshot", Snapshot)):
                files = versioned_files(metadata_dir, role)
                if files:
                    current[role] = Metadata[kind].from_file(str(files[-1][1]))  # type: ignore[valid-type]
            current["timestamp"] = Metadata[Timestamp].from_file(
                str(metadata_dir / "timestamp.json")
            )
        for role in ("root", "targets", "snapshot", "timestamp"):
            spec = root.signed.roles[role]
            md = current.get(role)
            offline = (repository, role) in _OFFLINE
            warning = ""
            if md is not None and offline:
                warning = _expiry_warning(
                    md.signed.expires - now, "re-sign it with the offline keys"
                )
            result.append(
                RoleStatus(
                    repository, role, not offline,
                    [names.get(k, k) for k in spec.keyids], spec.threshold,
                    md.signed.version if md is not None else None,
                    md.signed.expires.isoformat() if md is not None else None,
                    warning,
                )
            )  # fmt: skip
        if repository == "image" and "targets" in current:
            result.extend(_supplier_status(metadata_dir, current["targets"].signed, now))  # type: ignore[arg-type]
    return result


def _expiry_warning(left: timedelta, action: str) -> str:
    if left < timedelta(0):
        return f"EXPIRED {-left.days} day(s) ago: {action}"
    if left < OFFLINE_WARNING:
        return f"expires in {left.days} day(s): {action}"
    return ""


def _supplier_status(metadata_dir: Path, targets: Targets, now: datetime) -> list[RoleStatus]:
    """The supplier roles ``targets`` delegates to, with their newest published metadata."""
    delegations = targets.delegations
    roles = (delegations.roles or {}) if delegations else {}
    result = []
    for name, role in sorted(roles.items()):
        if name == DELTAS_ROLE:
            continue  # online, re-signed by the server
        files = versioned_files(metadata_dir, name)
        md = Metadata[Targets].from_file(str(files[-1][1])) if files else None
        warning = (
            _expiry_warning(
                md.signed.expires - now,
                f"supplier {name} re-publishes it ('uptake delegation publish {name}')",
            )
            if md is not None
            else ""
        )
        result.append(
            RoleStatus(
                "image", name, False, [k[:16] for k in role.keyids], role.threshold,
                md.signed.version if md is not None else None,
                md.signed.expires.isoformat() if md is not None else None,
                warning, supplier=True,
            )
        )  # fmt: skip
    return result


def as_dicts(statuses: list[RoleStatus]) -> list[dict[str, object]]:
    return [asdict(s) for s in statuses]
