"""Operator roles and what each may do.

Operators (people, and the scripts acting for them) hold named API tokens;
each token has one role. The server decides every request with one table,
:data:`ROLE_PERMISSIONS`: a route declares the :class:`Permission` it needs
(:mod:`server.api.application`), and a token whose role lacks it gets 403.

=================  ==========================================================
role               may
=================  ==========================================================
admin              everything, including operator tokens
release-engineer   read; publish images and deltas; campaigns
fleet-operator     read; vehicles, assignments, certificates; campaigns
viewer             read only
supplier           read releases; publish images for its own hardware ids only
=================  ==========================================================
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


class Role(enum.StrEnum):
    ADMIN = "admin"
    RELEASE_ENGINEER = "release-engineer"
    FLEET_OPERATOR = "fleet-operator"
    VIEWER = "viewer"
    SUPPLIER = "supplier"


class Permission(enum.StrEnum):
    #: vehicles, their ECUs, assignments, events
    READ_FLEET = "read-fleet"
    #: published images, deltas, releases
    READ_RELEASES = "read-releases"
    #: upload images and publish targets metadata (suppliers: their hardware ids only)
    PUBLISH = "publish"
    #: register vehicles, assign images, reset counters, revoke vehicle certificates
    MANAGE_FLEET = "manage-fleet"
    #: create, approve, start, pause, resume, cancel campaigns
    MANAGE_CAMPAIGNS = "manage-campaigns"
    #: operator tokens
    MANAGE_ACCOUNTS = "manage-accounts"


_READ = frozenset({Permission.READ_FLEET, Permission.READ_RELEASES})

ROLE_PERMISSIONS: Mapping[Role, frozenset[Permission]] = {
    Role.ADMIN: frozenset(Permission),
    Role.RELEASE_ENGINEER: _READ | {Permission.PUBLISH, Permission.MANAGE_CAMPAIGNS},
    Role.FLEET_OPERATOR: _READ | {Permission.MANAGE_FLEET, Permission.MANAGE_CAMPAIGNS},
    Role.VIEWER: _READ,
    Role.SUPPLIER: frozenset({Permission.READ_RELEASES, Permission.PUBLISH}),
}


@dataclass(frozen=True)
class Operator:
    """Who is asking: a token's name, its role and (for suppliers) its hardware ids."""

    name: str
    role: Role
    hardware_ids: tuple[str, ...] = ()

    def may(self, permission: Permission) -> bool:
        return permission in ROLE_PERMISSIONS[self.role]

    def may_publish_for(self, hardware_ids: Iterable[str]) -> bool:
        """Whether this operator may publish an image for all of ``hardware_ids``."""
        if not self.may(Permission.PUBLISH):
            return False
        return self.role is not Role.SUPPLIER or set(hardware_ids) <= set(self.hardware_ids)
