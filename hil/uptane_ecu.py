"""The Uptane part of a simulated secondary's firmware.

Plugged into :class:`hil.uds_ecu.UdsEcuSimulator` through its two hooks,
this does what Uptane secondary firmware does on a real ECU:

* ``dependency_check`` (routine 0xFF01, after the image download): decode the
  metadata bundle the primary downloaded into the metadata region, follow
  any director root rotation, run **partial verification** of the director
  targets (signature from the trusted root, expiry, version, VIN, this ECU's
  serial and hardware id) and check the image's length and SHA-256 against
  the entry; refuse (and remember the attack) otherwise;
* ``version_report`` (DID 0xF1A0): sign an ECU version report with the
  ECU's own key: the image the running bank holds, attacks detected, a
  report counter that only grows, and the outcome of the last install
  (installed, refused, or rolled back when the new bank did not boot).

State lives in ``DIR/uptane.json`` (written atomically) and the ECU key in
``DIR/ecu.key`` (encrypted), like data in the ECU's own flash.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path
from typing import Any

from tuf.api.metadata import Metadata, Root
from tuf.api.serialization.json import JSONSerializer

from client.partial_verification import (
    PartialVerificationError,
    follow_root_chain,
    verify_director_targets,
)
from client.secondaries.metadata_bundle import MetadataBundle, MetadataBundleError
from hil.uds_ecu import EcuStatus
from signing.atomic_file import write_atomic
from signing.keys import generate_signer, load_signer, public_key_path, save_signer
from signing.manifest import NO_IMAGE, EcuVersionReport, ImageInfo, InstallOutcome, InstallResult


class UptaneEcuFirmware:
    def __init__(
        self, directory: Path, ecu_serial: str, hardware_id: str, vin: str, password: bytes
    ) -> None:
        self.directory = directory
        self.ecu_serial, self.hardware_id, self.vin = ecu_serial, hardware_id, vin
        self._signer = load_signer(directory / "ecu.key", password)
        self._root = Metadata[Root].from_file(str(directory / "director-root.json"))
        self._state_path = directory / "uptane.json"

    @staticmethod
    def provision(directory: Path, director_root: bytes, password: bytes) -> Path:
        """Factory step: the ECU's key pair and trusted director root. Returns the public key file."""
        directory.mkdir(parents=True, exist_ok=True)
        save_signer(generate_signer(), directory / "ecu.key", password)
        write_atomic(directory / "director-root.json", director_root)
        return public_key_path(directory / "ecu.key")

    def _state(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads(self._state_path.read_bytes())
            return state
        except FileNotFoundError:
            return {
                "counter": 0,
                "targets_version": 0,
                "images": {},
                "attacks": "",
                "pending": None,
                "last_install": None,
            }

    def _save(self, state: dict[str, Any]) -> None:
        write_atomic(self._state_path, json.dumps(state, sort_keys=True).encode())

    def dependency_check(self, metadata: bytes, image: bytes) -> tuple[bool, str]:
        state = self._state()
        try:
            bundle = MetadataBundle.decode(metadata)
            root = follow_root_chain(self._root, bundle.director_roots)
            if root is not self._root:
                write_atomic(
                    self.directory / "director-root.json",
                    root.to_bytes(JSONSerializer(compact=False)),
                )
                self._root = root
            verified = verify_director_targets(
                bundle.director_targets,
                root,
                vin=self.vin,
                ecu_serial=self.ecu_serial,
                hardware_id=self.hardware_id,
                min_version=state["targets_version"],
            )
            target = verified.target
            if target is None or target.path != bundle.filepath:
                raise PartialVerificationError(
                    f"director lists no {bundle.filepath!r} for ECU {self.ecu_serial}"
                )
            if len(image) != target.length or hashlib.sha256(
                image
            ).hexdigest() != target.hashes.get("sha256"):
                raise PartialVerificationError(
                    f"image does not match the director's length and sha256 for {target.path!r}"
                )
        except (MetadataBundleError, PartialVerificationError) as exc:
            state["attacks"] = str(exc)
            state["last_install"] = InstallOutcome(
                _bundle_path(metadata), InstallResult.REFUSED, str(exc)
            ).to_dict()
            self._save(state)
            return False, str(exc)
        state["targets_version"] = verified.version
        state["images"][f"{len(image)}:{zlib.crc32(image) & 0xFFFFFFFF:08x}"] = ImageInfo.of(
            target.path, target.length, dict(target.hashes)
        ).to_dict()
        state["pending"] = target.path
        state["attacks"] = ""
        self._save(state)
        return True, "ok"

    def version_report(self, status: EcuStatus) -> bytes:
        state = self._state()
        state["counter"] += 1
        raw = state["images"].get(f"{status.length}:{status.crc32:08x}")
        installed = ImageInfo.from_dict(raw, "image") if raw else NO_IMAGE
        if state["pending"]:
            if installed.filepath == state["pending"]:
                state["last_install"] = InstallOutcome(
                    state["pending"], InstallResult.INSTALLED
                ).to_dict()
                state["pending"] = None
            elif status.last_boot_failure:
                state["last_install"] = InstallOutcome(
                    state["pending"], InstallResult.ROLLED_BACK, status.last_boot_failure
                ).to_dict()
                state["pending"] = None
        self._save(state)
        last = state["last_install"]
        report = EcuVersionReport(
            self.ecu_serial,
            installed,
            state["counter"],
            state["attacks"],
            InstallOutcome.from_dict(last, "last_install") if last else None,
        )
        return report.sign(self._signer).to_bytes()


def _bundle_path(metadata: bytes) -> str:
    try:
        return MetadataBundle.decode(metadata).filepath
    except MetadataBundleError:
        return "unreadable-metadata-bundle"
