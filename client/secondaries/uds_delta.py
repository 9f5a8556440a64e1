"""Updating a UDS secondary by delta: fewer bytes on the cellular link and on CAN.

Delivery to secondaries (:mod:`client.secondary_delivery`) offers a UDS
secondary the verified delta before it downloads the full image
(:meth:`UdsSecondary.install_delta`, which calls :func:`install_patch`). The
delta path is taken only when all of this holds:

1. the secondary's last signed version report names the image it runs;
2. the image repository's ``deltas`` role has a delta from exactly that image
   to exactly the directed one (full verification checks both against the
   offline-signed targets), downloaded and verified as a TUF target;
3. the ECU declares that it applies sequential patches (DID 0xF1A3) and its
   limits fit: the delta's operations are re-encoded here as a patch with the
   ECU's dictionary (:mod:`client.secondaries.ecu_patch`); a delta that needs
   its base as a whole (zstd-dict, transformed) cannot be, and is not used.

The ECU applies the patch from its active bank into its erased inactive bank,
checks the sha256 the director signed (and its own partial verification)
before it may boot the new bank, so a bad delta, a wrong base, a power loss
or an ECU that refuses all leave the old bank running. Anything that goes
wrong before the ECU is written to, or in the transfer, falls back to the full
image; only an ECU's refusal of the director metadata itself (an attack) is
an outcome here.
"""

from __future__ import annotations

import io
from pathlib import Path

from client.delta_apply import DeltaError, read_delta_header, walk_delta
from client.secondaries.base import SecondaryError, SecondaryUpdate
from client.secondaries.ecu_patch import (
    DEFAULT_DICT_LOG,
    MIN_DICT_LOG,
    PatchHeader,
    PatchWriter,
)
from client.secondaries.flashing import DependencyCheckFailed
from client.secondaries.metadata_bundle import MetadataBundle
from client.secondaries.uds import UdsFlasher
from signing import delta_format as fmt
from signing.atomic_file import atomic_writer
from signing.manifest import InstallMethod, InstallOutcome, InstallResult

# LZMA settings tried for the patch stream (lc, lp, pb): the smaller patch is sent.
_PATCH_PROPS = ((0, 0, 0), (3, 0, 0))


class DeltaNotUsable(SecondaryError):
    """This delta cannot go to this ECU (no capability, too large, a whole-base method): the
    full image goes instead."""


def install_patch(
    flasher: UdsFlasher,
    update: SecondaryUpdate,
    delta: Path,
    patch: Path,
    base_sha256: str,
    result: tuple[int, bytes],
) -> InstallOutcome:
    """Send ``delta`` (verified) to the ECU as a sequential patch; it verifies before switching.

    Raises :class:`DeltaNotUsable` when the delta path does not apply (nothing
    was written to the ECU); :class:`~client.secondaries.flashing.FlashError`
    when the transfer failed (the ECU keeps its old bank).
    """
    capability = flasher.read_delta_capability()
    if capability is None or capability.patch_format != 1:
        raise DeltaNotUsable("the ECU does not apply sequential patches")
    if capability.max_dict_log < MIN_DICT_LOG or result[0] > capability.bank_size:
        raise DeltaNotUsable("the patch would not fit the ECU's limits")
    try:
        patch_length = ecu_patch_from_delta(
            delta, patch, bytes.fromhex(base_sha256), result,
            min(capability.max_dict_log, DEFAULT_DICT_LOG),
        )  # fmt: skip
    except DeltaError as exc:
        raise DeltaNotUsable(str(exc)) from exc
    bundle = MetadataBundle(update.filepath, update.director_targets, update.director_roots)
    try:
        with open(patch, "rb") as stream:
            flasher.flash_patch(stream, patch_length, result, metadata=bundle.encode())
    except DependencyCheckFailed as exc:
        return InstallOutcome(update.filepath, InstallResult.REFUSED, str(exc))
    detail = f"by a {patch_length}-byte patch instead of {result[0]} bytes"
    return InstallOutcome(update.filepath, InstallResult.INSTALLED, detail, InstallMethod.DELTA)


def ecu_patch_from_delta(
    delta: Path,
    out: Path,
    base_sha256: bytes,
    result: tuple[int, bytes],
    dict_log: int,
) -> int:
    """Re-encode ``delta`` as the smallest ECU patch; returns its length."""
    with open(delta, "rb") as stream:
        header = read_delta_header(stream)
    if (header.result_length, header.result_sha256) != result:
        raise DeltaError("the delta produces another image than the directed one")
    if not base_sha256.startswith(header.base_sha256):
        raise DeltaError("the delta was made for another image than the ECU runs")
    base = (header.base_length, base_sha256)
    best: bytes | None = None
    for lc, lp, pb in _PATCH_PROPS:
        buffer = io.BytesIO()
        props = fmt.lzma2_props_byte(lc, lp, pb)
        writer = PatchWriter(buffer, PatchHeader(props, dict_log, *base, *result))
        with open(delta, "rb") as stream:
            walk_delta(stream, writer.add, writer.copy)
        writer.finish()
        if best is None or buffer.tell() < len(best):
            best = buffer.getvalue()
    assert best is not None
    with atomic_writer(out) as f:
        f.write(best)
    return len(best)
