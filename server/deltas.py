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
published: vehicles then download the full image. Jobs are deduplicated;
their outcome is visible at ``GET /api/v1/deltas``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from server.db import Assignment, Ecu
from server.image_repository import ImageRepository, ImageRepositoryError
from signing.metadata import DeltaCustom, MetadataFormatError, image_custom
from signing.names import confined

log = logging.getLogger(__name__)


@dataclass
class DeltaJob:
    base_sha256: str
    result_filepath: str
    status: str = "queued"  # queued | running | published | not_worth_it | failed
    detail: str = ""
    delta_length: int = 0
    result_length: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class DeltaPublisher:
    def __init__(
        self, image_repo: ImageRepository, engine: Engine, work_dir: Path, min_saving: float = 0.1
    ) -> None:
        self._repo = image_repo
        self._engine = engine
        self._work_dir = work_dir
        self._min_saving = min_saving
        self._queue: asyncio.Queue[DeltaJob] = asyncio.Queue()
        self.jobs: dict[tuple[str, str], DeltaJob] = {}

    # -- what to make -----------------------------------------------------------

    def request(self, base_sha256: str, result_filepath: str) -> None:
        result = self._repo.find_target(result_filepath)
        if result is None or not base_sha256 or base_sha256 == result.hashes.get("sha256"):
            return
        key = (base_sha256, result_filepath)
        previous = self.jobs.get(key)
        if (previous is not None and previous.status != "failed") or self._repo.has_delta(
            base_sha256, result.hashes["sha256"]
        ):
            return  # a failed job may be tried again when asked again
        if self._repo.find_by_sha256(base_sha256) is None:
            return  # the vehicle runs an image this repository never published: nothing to diff from
        job = DeltaJob(base_sha256, result_filepath)
        self.jobs[key] = job
        self._queue.put_nowait(job)

    async def on_published(self, filepaths: list[str]) -> None:
        """A release: deltas from every installed image of the same hardware ids."""
        for base, path in await asyncio.to_thread(self._installed_bases, filepaths):
            self.request(base, path)

    async def on_vehicle(self, vin: str) -> None:
        """A vehicle's state changed: deltas for its pending assignments from what it runs."""
        for base, path in await asyncio.to_thread(self._pending_for, vin):
            self.request(base, path)

    # database look-ups run in a thread: the event loop serves vehicles meanwhile

    def _installed_bases(self, filepaths: list[str]) -> list[tuple[str, str]]:
        pairs: list[tuple[str, str]] = []
        with Session(self._engine) as session:
            for path in filepaths:
                target = self._repo.find_target(path)
                if target is None:
                    continue
                try:
                    hardware_ids = image_custom(target).hardware_ids
                except MetadataFormatError:
                    continue
                installed = session.exec(
                    select(Ecu.installed_sha256)
                    .where(col(Ecu.hardware_id).in_(hardware_ids))
                    .distinct()
                ).all()
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

    async def run(self) -> None:
        while True:
            job = await self._queue.get()
            job.status = "running"
            try:
                await self._make(job)
            except Exception as exc:  # one bad job must not stop the others
                job.status, job.detail = "failed", f"{type(exc).__name__}: {exc}"
                log.exception("delta %s -> %s failed", job.base_sha256[:12], job.result_filepath)

    async def _make(self, job: DeltaJob) -> None:
        base = self._repo.find_by_sha256(job.base_sha256)
        result = self._repo.find_target(job.result_filepath)
        if base is None or result is None:
            job.status, job.detail = "failed", "base or result image no longer published"
            return
        self._work_dir.mkdir(parents=True, exist_ok=True)
        # the base hash came from a vehicle's report: the name must stay in the work directory
        out = confined(
            self._work_dir, f"{job.base_sha256}-{result.hashes['sha256']}.delta", where="delta"
        )
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
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await proc.communicate()
        if proc.returncode != 0:
            out.unlink(missing_ok=True)
            job.status, job.detail = "failed", stderr.decode(errors="replace").strip()[-500:]
            return
        report = json.loads(stdout)
        job.delta_length, job.result_length = out.stat().st_size, result.length
        if job.delta_length > result.length * (1 - self._min_saving):
            out.unlink()
            job.status = "not_worth_it"
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
            job.status, job.detail = "failed", str(exc)
            return
        job.status = "published"
        job.detail = f"method {custom.method}"
        log.info(
            "published delta %s -> %s: %d bytes (full image %d)",
            base.path,
            result.path,
            job.delta_length,
            result.length,
        )
