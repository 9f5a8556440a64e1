"""Which combinations of images the director may direct to one vehicle.

Images may declare, in their offline-signed image repository metadata,
what they need of the vehicle's other ECUs (``custom.requires``, see
:mod:`signing.metadata`). The director keeps every vehicle's *intended*
combination compatible:

* :func:`check_assignment` runs before an assignment is stored: the
  vehicle's intended images (active assignments, else what each ECU last
  reported installed) with the new one in place must meet every
  requirement, else the assignment is refused (HTTP 409). Assign the
  images others depend on first (e.g. the BMS, then the gateway that
  requires it).
* :func:`fail_unmet_dependents` runs after a manifest: when part of a
  bundle failed (the BMS rolled back), the pending assignments that needed
  it are ended as failed rather than directed alone, which the vehicle would
  refuse as a partial bundle anyway.

The agent performs the same check (:func:`signing.metadata.unmet_requirements`)
on what it verified, so a compromised director key cannot install half a
bundle either.
"""

from __future__ import annotations

from sqlmodel import Session, col, select

from server.db import Assignment, Ecu, utcnow
from server.image_repository import ImageRepository
from signing.metadata import EcuImage, image_custom, unmet_requirements

_ACTIVE = ("pending", "installed")


def _intended(
    session: Session, image_repo: ImageRepository, vin: str, override: dict[str, str]
) -> list[EcuImage]:
    ecus = session.exec(select(Ecu).where(Ecu.vin == vin)).all()
    active = {
        row.ecu_serial: row.filepath
        for row in session.exec(
            select(Assignment)
            .where(Assignment.vin == vin, col(Assignment.status).in_(_ACTIVE))
            .order_by(col(Assignment.id))
        )
    }
    active.update(override)
    result = []
    for ecu in ecus:
        filepath = active.get(ecu.serial, ecu.installed_filepath)
        target = image_repo.find_target(filepath) if filepath else None
        result.append(
            EcuImage(
                ecu.serial, ecu.hardware_id, filepath, image_custom(target) if target else None
            )
        )
    return result


def check_combination(
    session: Session, image_repo: ImageRepository, vin: str, override: dict[str, str]
) -> list[str]:
    """The requirements the vehicle would break if each ECU of ``override`` ran its image."""
    return unmet_requirements(_intended(session, image_repo, vin, override))


def check_assignment(
    session: Session, image_repo: ImageRepository, vin: str, ecu_serial: str, filepath: str
) -> list[str]:
    """The requirements the vehicle would break if ``ecu_serial`` were directed to ``filepath``."""
    return check_combination(session, image_repo, vin, {ecu_serial: filepath})


def fail_unmet_dependents(session: Session, image_repo: ImageRepository, vin: str) -> list[str]:
    """End pending assignments whose requirements the vehicle can no longer meet; returns their files."""
    failed = []
    for row in session.exec(
        select(Assignment).where(Assignment.vin == vin, Assignment.status == "pending")
    ).all():
        intended = _intended(session, image_repo, vin, {})
        mine = [e for e in intended if e.ecu_serial == row.ecu_serial]
        others = [e for e in intended if e.ecu_serial != row.ecu_serial]
        problems = [
            p for p in unmet_requirements(mine + others) if f" on {row.ecu_serial} requires " in p
        ]
        if problems:
            row.status, row.updated_at = "failed", utcnow()
            row.detail = "dependency not met: " + "; ".join(problems)
            session.add(row)
            session.flush()
            failed.append(row.filepath)
    return failed
