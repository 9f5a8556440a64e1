"""What the request handlers share: the server's parts, keyed on the aiohttp application."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

from aiohttp import web
from sqlalchemy.engine import Engine

from server.certificates import CertificateAuthority
from server.config import ServerConfig
from server.deltas import DeltaPublisher
from server.director import DirectorRepository
from server.fleet import RejectionLimiter
from server.image_repository import ImageRepository
from server.operator_passwords import LoginLimiter, PasswordHashing
from server.timestamp_versions import TimestampVersions


@dataclass(frozen=True)
class BodyTimeouts:
    """How long clients may take to send request bodies (``ServerConfig``)."""

    whole_body: float
    upload_idle: float


ENGINE: web.AppKey[Engine] = web.AppKey("engine", Engine)
IMAGE_REPO: web.AppKey[ImageRepository] = web.AppKey("image_repo", ImageRepository)
DIRECTOR: web.AppKey[DirectorRepository] = web.AppKey("director", DirectorRepository)
DELTAS: web.AppKey[DeltaPublisher] = web.AppKey("deltas", DeltaPublisher)
#: on PostgreSQL: the newest director timestamp versions, read on the event loop (None on SQLite)
TIMESTAMP_VERSIONS: web.AppKey[TimestampVersions | None] = web.AppKey("timestamp_versions")
REJECTIONS: web.AppKey[RejectionLimiter] = web.AppKey("rejections", RejectionLimiter)
TIMEOUTS: web.AppKey[BodyTimeouts] = web.AppKey("timeouts", BodyTimeouts)
CONFIG: web.AppKey[ServerConfig] = web.AppKey("config", ServerConfig)
#: failed dashboard logins per account and address (:mod:`server.operator_passwords`)
LOGINS: web.AppKey[LoginLimiter] = web.AppKey("logins", LoginLimiter)
#: the threads that hash passwords, and the cap on logins in progress
PASSWORD_HASHING: web.AppKey[PasswordHashing] = web.AppKey("password_hashing", PasswordHashing)


@dataclass(frozen=True)
class CertificateIssuer:
    """The device CA that signs vehicles' CSRs (None when vehicles come with an operator's CA)."""

    ca: CertificateAuthority | None
    lifetime: timedelta


ISSUER: web.AppKey[CertificateIssuer] = web.AppKey("issuer", CertificateIssuer)
#: the few threads that run vehicles' database work (:func:`server.api.boundary.vehicle_work`)
VEHICLE_THREADS: web.AppKey[ThreadPoolExecutor] = web.AppKey("vehicle_threads", ThreadPoolExecutor)
