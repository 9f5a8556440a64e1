"""Producing deltas in the background.

When a release is published, the server makes a delta to it from every
image of the same hardware id that vehicles report as installed; when a
vehicle reports an installed image and has a pending assignment with no
delta from it yet, the server makes that one too. Each delta is created by
``uptake delta create`` in a child process (it may need hundreds of MiB and
both cores for a while; the server stays responsive and its memory flat),
then published as a target of the online ``deltas`` role
(:meth:`ImageRepository.add_delta`), with its base and result hashes in
its custom metadata.

A delta that saves less than ``min_saving`` of the full image is not
published: vehicles then download the full image. Jobs are rows of the
``DeltaJob`` table, one per (base, result): any server process sharing the
database claims the next queued one (PostgreSQL ``FOR UPDATE SKIP LOCKED``;
on SQLite a guarded UPDATE), so replicas share the work and a job queued
before a restart is made after it. A job whose process died goes back to the
queue (at once on the same host, else after :data:`CLAIM_LEASE`). Outcomes
are visible at ``GET /api/v1/deltas``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, or_, update
from sqlalchemy.engine import CursorResult, Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from server.db import Assignment, DeltaJob, DeltaJobState, Ecu, bounded_text, utcnow
from server.image_repository import ImageRepository, ImageRepositoryError
from server.metrics import DELTA_JOBS, log_event
from signing.delta_format import MAX_RECOMPRESS_MEMORY
from signing.metadata import DeltaCustom, MetadataFormatError, image_custom
from signing.names import confined

log = logging.getLogger(__name__)


#: Seconds after which a running job whose process is gone (or silent) is claimed again.
CLAIM_LEASE = 1800.0
#: Seconds between looks at the job table for jobs other processes queued.
POLL_INTERVAL = 2.0


@dataclass
class _Claimed:
    """A job this process claimed, and what it learnt making it."""

    id: int
    base_sha256: str
    result_filepath: str
    status: DeltaJobState = DeltaJobState.RUNNING
    detail: str = ""
    delta_length: int = 0
    result_length: int = 0


def _this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class DeltaPublisher:
    """Queues delta jobs in the ``DeltaJob`` table and makes those any process queued."""

    def __init__(
        self,
        image_repo: ImageRepository,
        engine: Engine,
        work_dir: Path,
        min_saving: float = 0.1,
        max_recompress_mib: int = MAX_RECOMPRESS_MEMORY >> 20,
    ) -> None:
        self._repo = image_repo
        self._max_recompress_mib = max_recompress_mib
        self._engine = engine
        self._work_dir = work_dir
        self._min_saving = min_saving
        self._wake = asyncio.Event()
        self._me = _this_process()

    # -- what to make -----------------------------------------------------------

    def _request(self, session: Session, base_sha256: str, result_filepath: str) -> bool:
        """Queue the job unless it exists (a failed one is queued again); True if queued."""
        result = self._repo.find_target(result_filepath)
        if result is None or not base_sha256 or base_sha256 == result.hashes.get("sha256"):
            return False
        if self._repo.has_delta(base_sha256, result.hashes["sha256"]):
            return False
        if self._repo.find_by_sha256(base_sha256) is None:
            return False  # the vehicle runs an image this repository never published
        job = session.exec(
            select(DeltaJob).where(
                DeltaJob.base_sha256 == base_sha256, DeltaJob.result_filepath == result_filepath
            )
        ).first()
        if job is None:
            job = DeltaJob(base_sha256=base_sha256, result_filepath=result_filepath)
        elif job.status != DeltaJobState.FAILED:
            return False  # a failed job may be tried again when asked again
        job.status, job.detail, job.updated_at = DeltaJobState.QUEUED, "", utcnow()
        job.claimed_by, job.claimed_at = "", None
        session.add(job)
        try:
            session.commit()
        except IntegrityError:  # another process queued it meanwhile
            session.rollback()
            return False
        DELTA_JOBS.labels("created").inc()
        log_event("delta-job", status=job.status, base_sha256=base_sha256, result=result_filepath)
        return True

    def _request_all(self, pairs: list[tuple[str, str]]) -> None:
        queued = False
        with Session(self._engine) as session:
            for base, path in pairs:
                queued |= self._request(session, base, path)
        if queued:
            self._wake.set()

    def jobs(self, session: Session) -> list[dict[str, object]]:
        """Every delta job (bounded by the published images, see :class:`server.db.DeltaJob`)."""
        return [job.to_dict() for job in session.exec(select(DeltaJob).order_by(col(DeltaJob.id)))]

    async def on_published(self, filepaths: list[str]) -> None:
        """A release: deltas from every installed image of the same hardware ids."""
        await asyncio.to_thread(lambda: self._request_all(self._installed_bases(filepaths)))

    async def on_vehicle(self, vin: str) -> None:
        """A vehicle's state changed: deltas for its pending assignments from what it runs."""
        await asyncio.to_thread(lambda: self._request_all(self._pending_for(vin)))

    # database look-ups run in a thread: the event loop serves vehicles meanwhile

    def _installed_bases(self, filepaths: list[str]) -> list[tuple[str, str]]:
        pairs: list[tuple[str, str]] = []
        installed_by_hardware: dict[tuple[str, ...], list[str]] = {}  # one query per set
        with Session(self._engine) as session:
            for path in filepaths:
                target = self._repo.find_target(path)
                if target is None:
                    continue
                try:
                    hardware_ids = image_custom(target).hardware_ids
                except MetadataFormatError:
                    continue
                installed = installed_by_hardware.get(hardware_ids)
                if installed is None:
                    installed = list(
                        session.exec(
                            select(Ecu.installed_sha256)
                            .where(col(Ecu.hardware_id).in_(hardware_ids))
                            .distinct()
                        ).all()
                    )
                    installed_by_hardware[hardware_ids] = installed
                pairs.extend((sha, path) for sha in installed)
        return pairs

    def _pending_for(self, vin: str) -> list[tuple[str, str]]:
        with Session(self._engine) as session:
            rows = session.exec(
                select(Assignment, Ecu).where(
                    Assignment.vin == vin,
                    Assignment.status == "pending",
                    Assignment.ecu_serial == Ecu.serial,
                )
            ).all()
            return [(ecu.installed_sha256, assignment.filepath) for assignment, ecu in rows]

    # -- making them --------------------------------------------------------------

    def _claim(self) -> _Claimed | None:
        """Take the oldest queued job (or one whose claim lapsed), for this process only.

        PostgreSQL: ``FOR UPDATE SKIP LOCKED`` lets replicas claim side by side;
        SQLite: the UPDATE is guarded by the status read, so one writer wins.
        """
        now = utcnow()
        lapsed = now - timedelta(seconds=CLAIM_LEASE)
        claimable = or_(
            col(DeltaJob.status) == DeltaJobState.QUEUED,
            and_(
                col(DeltaJob.status) == DeltaJobState.RUNNING,
                col(DeltaJob.claimed_at) < lapsed,
            ),
        )
        with Session(self._engine) as session:
            candidate = session.exec(
                select(DeltaJob)
                .where(claimable)
                .order_by(col(DeltaJob.id))
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if candidate is None:
                return None
            result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
                update(DeltaJob)
                .where(col(DeltaJob.id) == candidate.id, claimable)
                .values(
                    status=DeltaJobState.RUNNING, claimed_by=self._me, claimed_at=now,
                    updated_at=now,
                )
            )  # fmt: skip
            session.commit()
            if result.rowcount != 1:
                return None  # another process took it between the read and the update
            assert candidate.id is not None
            return _Claimed(candidate.id, candidate.base_sha256, candidate.result_filepath)

    def _requeue_orphans(self) -> None:
        """Jobs this host's processes were making when they died go back to the queue."""
        host = self._me.rsplit(":", 1)[0]
        with Session(self._engine) as session:
            running = session.exec(
                select(DeltaJob).where(
                    DeltaJob.status == DeltaJobState.RUNNING,
                    col(DeltaJob.claimed_by).startswith(f"{host}:"),
                )
            ).all()
            for job in running:
                pid = int(job.claimed_by.rsplit(":", 1)[1] or 0)
                if pid != os.getpid() and not _alive(pid):
                    job.status, job.claimed_by, job.claimed_at = DeltaJobState.QUEUED, "", None
                    session.add(job)
            session.commit()

    def _finish(self, job: _Claimed) -> None:
        with Session(self._engine) as session:
            row = session.get(DeltaJob, job.id)
            if row is None or row.claimed_by != self._me:
                return  # the lease lapsed and another process took it over
            row.status, row.detail = job.status, bounded_text(job.detail)
            row.delta_length, row.result_length = job.delta_length, job.result_length
            row.updated_at = utcnow()
            session.add(row)
            session.commit()

    async def run(self) -> None:
        await asyncio.to_thread(self._requeue_orphans)
        while True:
            try:
                job = await asyncio.to_thread(self._claim)
            except Exception:  # database away for a moment: try again later
                log.exception("cannot claim a delta job")
                job = None
            if job is None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), POLL_INTERVAL)
                continue
            try:
                await self._make(job)
            except Exception as exc:  # one bad job must not stop the others
                job.status, job.detail = DeltaJobState.FAILED, f"{type(exc).__name__}: {exc}"
                log.exception("delta %s -> %s failed", job.base_sha256[:12], job.result_filepath)
            try:
                await asyncio.to_thread(self._finish, job)
            except Exception:
                log.exception("cannot record delta job %d", job.id)
            DELTA_JOBS.labels("failed" if job.status == DeltaJobState.FAILED else "finished").inc()
            log_event(
                "delta-job", status=job.status, base_sha256=job.base_sha256,
                result=job.result_filepath, detail=job.detail[:300],
            )  # fmt: skip

    async def _make(self, job: _Claimed) -> None:
        base = self._repo.find_by_sha256(job.base_sha256)
        result = self._repo.find_target(job.result_filepath)
        if base is None or result is None:
            job.status, job.detail = (
                DeltaJobState.FAILED,
                "base or result image no longer published",
            )
            return
        self._work_dir.mkdir(parents=True, exist_ok=True)
        # the base hash came from a vehicle's report: the name must stay in the work directory
        out = confined(
            self._work_dir, f"{job.base_sha256}-{result.hashes['sha256']}.delta", where="delta"
        )
        # a raw image's machine code, as its release named it (checked when it was published)
        arch = image_custom(result).arch
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "uptake",
            "delta",
            "create",
            str(self._repo.image_file(base)),
            str(self._repo.image_file(result)),
            "-o",
            str(out),
            "--json",
            "--max-recompress-mib",
            str(self._max_recompress_mib),
            *(["--arch", arch] if arch else []),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await proc.communicate()
        if proc.returncode != 0:
            out.unlink(missing_ok=True)
            job.status, job.detail = (
                DeltaJobState.FAILED,
                stderr.decode(errors="replace").strip()[-500:],
            )
            return
        report = json.loads(stdout)
        job.delta_length, job.result_length = out.stat().st_size, result.length
        if job.delta_length > result.length * (1 - self._min_saving):
            out.unlink()
            job.status = DeltaJobState.NOT_WORTH_IT
            job.detail = f"{job.delta_length} bytes against {result.length} for the full image"
            return
        custom = DeltaCustom(
            base.hashes["sha256"],
            base.length,
            result.hashes["sha256"],
            result.length,
            str(report.get("method", "unknown")),
        )
        try:
            await asyncio.to_thread(self._repo.add_delta, out, custom)
        except ImageRepositoryError as exc:
            out.unlink(missing_ok=True)
            job.status, job.detail = DeltaJobState.FAILED, str(exc)
            return
        job.status = DeltaJobState.PUBLISHED
        job.detail = f"method {custom.method}"
        log.info(
            "published delta %s -> %s: %d bytes (full image %d)",
            base.path,
            result.path,
            job.delta_length,
            result.length,
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0
