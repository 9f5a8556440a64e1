"""The audit log: who changed what, when; append-only and hash-chained.

Every state change the server makes on someone's behalf (a publish, a
registration, an assignment, a token created or revoked, a campaign moved
on, a certificate issued or revoked...) appends one :class:`~server.db.AuditRecord`
in the same database transaction as the change itself, so neither exists
without the other.

Records form a hash chain: record *n* stores the hash of record *n-1* and
its own hash over its sequence number, time, actor, action, subject,
detail and that previous hash (SHA-256 of canonical JSON). Appends first
lock the one :class:`~server.db.AuditHead` row (an ``UPDATE``, which every
database serialises, PostgreSQL across server processes too), so two
writers can never chain onto the same record.

:func:`verify` walks the chain and names the first record that was
changed, deleted or moved, and checks that the head names the last one.
Someone with write access to the database could still rewrite the whole
chain from some point on: keep the head hash :func:`verify` prints somewhere
else (a ticket, a log shipper) and pass it back as ``expected_head`` to
detect that too.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import update
from sqlmodel import Session, col, select

from server.db import AuditHead, AuditRecord, as_utc, bounded_text, utcnow
from signing.exceptions import UptakeError

_GENESIS = "0" * 64
_MAX_DETAIL = 4000
#: Records read at a time while verifying (memory stays flat whatever the log's length).
_VERIFY_BATCH = 2000


class AuditError(UptakeError):
    """The audit log could not be written or read."""


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _timestamp(at: datetime) -> str:
    return as_utc(at).isoformat(timespec="microseconds")


def record_hash(
    seq: int, at: datetime, actor: str, action: str, subject: str, detail: str, prev_hash: str
) -> str:
    """The hash a record with these fields must carry."""
    fields = [seq, _timestamp(at), actor, action, subject, detail, prev_hash]
    return hashlib.sha256(_canonical(fields).encode()).hexdigest()


def append(
    session: Session, actor: str, action: str, subject: str = "", **detail: Any
) -> AuditRecord:
    """Append a record inside the caller's transaction (committed with the change it records)."""
    detail_text = _canonical(detail)
    if len(detail_text) > _MAX_DETAIL:
        detail_text = _canonical({"truncated": detail_text[: _MAX_DETAIL - 100]})
    if session.get(AuditHead, 1) is None:
        session.add(AuditHead(id=1, seq=0, hash=_GENESIS))
        session.flush()
    # the UPDATE takes the write lock before the head is read: chains never fork
    session.exec(update(AuditHead).where(col(AuditHead.id) == 1).values(seq=AuditHead.seq + 1))
    head = session.exec(select(AuditHead).where(col(AuditHead.id) == 1)).one()
    session.refresh(head)
    at = utcnow()
    subject = bounded_text(subject)
    record = AuditRecord(
        seq=head.seq,
        at=at,
        actor=actor,
        action=action,
        subject=subject,
        detail=detail_text,
        prev_hash=head.hash,
        hash=record_hash(head.seq, at, actor, action, subject, detail_text, head.hash),
    )
    head.hash = record.hash
    session.add(record)
    session.add(head)
    session.flush()
    return record


@dataclass(frozen=True)
class AuditVerification:
    """What :func:`verify` found: ``problems`` is empty for an intact log."""

    records: int
    head_seq: int
    head_hash: str
    problems: tuple[str, ...]
    #: sequence numbers of the records found changed, deleted, moved or missing, in order
    broken_seqs: tuple[int, ...] = ()

    @property
    def intact(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "intact": self.intact,
            "records": self.records,
            "head_seq": self.head_seq,
            "head_hash": self.head_hash,
            "problems": list(self.problems),
            "broken_seqs": list(self.broken_seqs),
            "first_broken_seq": self.broken_seqs[0] if self.broken_seqs else None,
        }


def _records(session: Session) -> Iterator[AuditRecord]:
    after = 0
    while True:
        batch = session.exec(
            select(AuditRecord)
            .where(col(AuditRecord.seq) > after)
            .order_by(col(AuditRecord.seq))
            .limit(_VERIFY_BATCH)
        ).all()
        if not batch:
            return
        yield from batch
        after = batch[-1].seq


def verify(
    session: Session, expected_head: str | None = None, max_problems: int = 20
) -> AuditVerification:
    """Check the whole chain (see module docstring)."""
    problems: list[str] = []
    broken: list[int] = []
    prev_hash, expected_seq, count = _GENESIS, 1, 0
    for record in _records(session):
        count += 1
        where = f"audit record {record.seq}"
        found = len(problems)
        if record.seq != expected_seq:
            problems.append(
                f"{where}: expected record {expected_seq} here (records deleted or renumbered)"
            )
        if record.prev_hash != prev_hash:
            problems.append(f"{where}: does not follow the record before it (deleted or reordered)")
        computed = record_hash(
            record.seq, record.at, record.actor, record.action, record.subject, record.detail,
            record.prev_hash,
        )  # fmt: skip
        if computed != record.hash:
            problems.append(f"{where}: its content was changed after it was written")
        if len(problems) > found:
            broken.append(min(record.seq, expected_seq))
        prev_hash, expected_seq = record.hash, record.seq + 1
        if len(problems) >= max_problems:
            break
    head = session.get(AuditHead, 1)
    head_seq, head_hash = (head.seq, head.hash) if head else (0, _GENESIS)
    if len(problems) < max_problems and (head_seq != expected_seq - 1 or head_hash != prev_hash):
        problems.append(
            f"the head names record {head_seq}, the chain ends at {expected_seq - 1}: "
            "records were deleted from its end"
        )
        broken.append(expected_seq)
    if expected_head is not None and expected_head != head_hash:
        problems.append(f"the head hash is {head_hash}, not the expected {expected_head}")
        broken.append(head_seq)
    return AuditVerification(count, head_seq, head_hash, tuple(problems), tuple(broken))


def records_page(
    session: Session, *, after: int | None, limit: int, action: str | None = None,
    subject: str | None = None,
) -> tuple[list[dict[str, Any]], int | None]:  # fmt: skip
    """Records after sequence number ``after``, oldest first, and the last one returned."""
    query = select(AuditRecord).order_by(col(AuditRecord.seq))
    if after is not None:
        query = query.where(col(AuditRecord.seq) > after)
    if action is not None:
        query = query.where(col(AuditRecord.action) == action)
    if subject is not None:
        query = query.where(col(AuditRecord.subject) == subject)
    rows = session.exec(query.limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return [record_dict(r) for r in rows], (rows[-1].seq if rows and more else None)


def local_actor() -> str:
    """Who runs a command on the server's machine itself (key rotation, ``server init``)."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = str(os.getuid())
    return f"local:{user}@{socket.gethostname()}"


def record_dict(record: AuditRecord) -> dict[str, Any]:
    return {
        "seq": record.seq,
        "at": _timestamp(record.at),
        "actor": record.actor,
        "action": record.action,
        "subject": record.subject,
        "detail": json.loads(record.detail),
        "prev_hash": record.prev_hash,
        "hash": record.hash,
    }
