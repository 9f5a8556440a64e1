"""Bundles: the images the director sends one vehicle, checked and installed as a whole.

An image may require versions of the vehicle's other ECUs
(``custom.requires`` in the image repository's offline-signed targets,
see :mod:`signing.metadata`). After full verification the agent:

1. :func:`check_bundle`: works out what every ECU would run after the
   update (the directed image, else the one installed now, identified by
   its sha256 in the verified image repository targets of the
   :class:`~client.verification.VerifiedUpdate`) and refuses the
   WHOLE bundle when any requirement is unmet. The director never directs
   such a combination, so it is evidence of an attack (e.g. a compromised
   director key that dropped the BMS image from a gateway + BMS bundle);
2. :func:`install_order`: installs the ECUs that others depend on first;
3. :func:`unmet_dependency`: does not install an image whose requirement
   names an ECU whose own install in this bundle did not succeed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tuf.api.metadata import TargetFile

from client.verification import DirectedImage, VerifiedUpdate
from signing.exceptions import AttackDetected
from signing.manifest import InstallOutcome, InstallResult
from signing.metadata import (
    EcuImage,
    ImageCustom,
    MetadataFormatError,
    image_custom,
    unmet_requirements,
)


def _installed_images(
    image_targets: Mapping[str, TargetFile],
    installed_sha256: Mapping[str, str],
    ecus: Mapping[str, str],
) -> dict[str, tuple[str, ImageCustom | None]]:
    found: dict[str, tuple[str, ImageCustom | None]] = {}
    for serial, hw in ecus.items():
        found[serial] = ("", None)
        sha = installed_sha256.get(serial, "")
        for path, target in sorted(image_targets.items()):
            if not sha or target.hashes.get("sha256") != sha:
                continue
            try:
                custom = image_custom(target)
            except MetadataFormatError:
                continue
            if hw in custom.hardware_ids:
                found[serial] = (path, custom)
                break
    return found


def check_bundle(
    verified: VerifiedUpdate, installed_sha256: Mapping[str, str], ecus: Mapping[str, str]
) -> None:
    """Raise :class:`AttackDetected` when the update leaves an unmet requirement."""
    if not verified.to_install:
        return
    after = _installed_images(verified.image_targets, installed_sha256, ecus)
    for item in verified.directed.values():
        after[item.ecu_serial] = (item.target.path, item.custom)
    problems = unmet_requirements(
        EcuImage(serial, ecus[serial], path, custom)
        for serial, (path, custom) in sorted(after.items())
    )
    if problems:
        raise AttackDetected("partial bundle refused: " + "; ".join(problems))


def install_order(directed: Sequence[DirectedImage]) -> list[DirectedImage]:
    """``directed`` with the images others require first (stable; a cycle keeps the given order)."""
    remaining = list(directed)
    ordered: list[DirectedImage] = []
    while remaining:
        pending_hw = {d.hardware_id for d in remaining}
        ready = next(
            (
                d
                for d in remaining
                if not any(
                    r.hardware_id in pending_hw and r.hardware_id != d.hardware_id
                    for r in d.custom.requires
                )
            ),
            remaining[0],
        )
        ordered.append(ready)
        remaining.remove(ready)
    return ordered


def unmet_dependency(
    item: DirectedImage, directed: Sequence[DirectedImage], outcomes: Mapping[str, InstallOutcome]
) -> str | None:
    """Why ``item`` must not be installed after the outcomes so far, or None."""
    for req in item.custom.requires:
        for dep in directed:
            outcome = outcomes.get(dep.ecu_serial)
            if (
                dep.hardware_id == req.hardware_id
                and outcome is not None
                and outcome.result is not InstallResult.INSTALLED
            ):
                return (
                    f"not installed: it requires {req.hardware_id} {req.spec} and {dep.target.path} "
                    f"on {dep.ecu_serial} was {outcome.result}"
                )
    return None
