"""How long signed metadata lives, and when the server re-signs what it holds online.

Defaults follow the Uptane deployment best practices: root about a year,
image targets months (both offline: people re-sign them), snapshot and
timestamp about a day, the director's per-vehicle targets a week (online,
so re-signed by the server). ``metadata_lifetimes`` in server.json overrides
any of them, in seconds::

    "metadata_lifetimes": {"timestamp": 3600, "snapshot": 86400}

The server re-signs online metadata once less than half of its lifetime is
left, without any request (:meth:`server.image_repository.ImageRepository.refresh_online_metadata`,
run every :meth:`Lifetimes.upkeep_interval`), and director metadata when a
vehicle asks for it: nothing it serves is ever close to expiry.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from signing.exceptions import UptakeError

DEFAULT_LIFETIMES: dict[str, timedelta] = {
    "root": timedelta(days=365),
    "targets": timedelta(days=90),
    "snapshot": timedelta(days=1),
    "timestamp": timedelta(days=1),
    "deltas": timedelta(days=30),
    "director-targets": timedelta(days=7),
    "director-snapshot": timedelta(days=1),
    "director-timestamp": timedelta(days=1),
}
#: Roles the server signs online (and so re-signs by itself).
ONLINE_LIFETIMES = tuple(r for r in DEFAULT_LIFETIMES if r not in ("root", "targets"))


class LifetimeError(UptakeError):
    """``metadata_lifetimes`` names an unknown role or a lifetime that is not a positive number."""


class Lifetimes:
    """Lifetimes by role (see module docstring)."""

    def __init__(self, overrides: dict[str, float] | None = None) -> None:
        self._lifetimes = dict(DEFAULT_LIFETIMES)
        for role, seconds in (overrides or {}).items():
            if role not in DEFAULT_LIFETIMES:
                raise LifetimeError(
                    f"metadata_lifetimes: unknown role {role!r} (known: {', '.join(DEFAULT_LIFETIMES)})"
                )
            if (
                not isinstance(seconds, int | float)
                or isinstance(seconds, bool)
                or not 1 <= seconds <= 10 * 365 * 86400
            ):
                raise LifetimeError(
                    f"metadata_lifetimes.{role}: a number of seconds from 1 to ten years"
                )
            self._lifetimes[role] = timedelta(seconds=seconds)

    def lifetime(self, role: str) -> timedelta:
        return self._lifetimes[role]

    def expires(self, role: str, now: datetime | None = None) -> datetime:
        """When metadata of ``role`` signed ``now`` expires (whole seconds, as TUF writes it)."""
        return ((now or datetime.now(UTC)) + self._lifetimes[role]).replace(microsecond=0)

    def due(self, role: str, expires: datetime, now: datetime | None = None) -> bool:
        """Whether metadata of ``role`` expiring at ``expires`` must be re-signed now."""
        return expires - (now or datetime.now(UTC)) < self._lifetimes[role] / 2

    def upkeep_interval(self) -> float:
        """Seconds between two upkeep passes: a quarter of the shortest online lifetime."""
        shortest = min(self._lifetimes[r] for r in ONLINE_LIFETIMES).total_seconds()
        return min(600.0, max(0.25, shortest / 4))
