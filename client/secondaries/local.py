"""A secondary ECU whose storage the primary reaches directly (simulated MCU).

It behaves like a real Uptane secondary with partial verification: its own
key and trusted director root live in its directory, it keeps its own report
counter and last accepted director targets version, writes the image to its
inactive bank, checks length and hash, "boots" the new bank, runs its health
check, and either commits or falls back to the old bank. Its version reports
are signed with its key, not the primary's.

Directory layout::

    DIR/ecu.key, ecu.pub.json   the ECU key (encrypted with $UPTAKE_KEY_PASSWORD)
    DIR/director-root.json      trusted director root (provisioned; follows key rotations)
    DIR/bank-a.bin, bank-b.bin  the two flash banks
    DIR/bootenv.json            which bank boots, trial state
    DIR/state.json              counters, installed images, last outcome
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
from tuf.api.metadata import Metadata, Root
from tuf.api.serialization.json import JSONSerializer

from client.bootenv import FileBootEnvironment, simulate_bootloader
from client.health import run_health_checks
from client.installer import InstallError, Slot, SlotInstaller, other_slot
from client.partial_verification import (
    PartialVerificationError,
    follow_root_chain,
    verify_director_targets,
)
from client.secondaries.base import EcuStatus, Secondary, SecondaryError, SecondaryUpdate
from signing.atomic_file import write_atomic
from signing.keys import KeyFileError, load_signer
from signing.manifest import (
    NO_IMAGE,
    EcuVersionReport,
    ImageInfo,
    InstallOutcome,
    InstallResult,
    SignedEnvelope,
)


class _Trial(msgspec.Struct, forbid_unknown_fields=True):
    filepath: str
    bank: Slot


class _EcuState(msgspec.Struct, forbid_unknown_fields=True):
    """The secondary's own ``state.json`` (what its firmware would keep in flash)."""

    report_counter: int = 0
    targets_version: int = 0
    banks: dict[Slot, ImageInfo | None] = msgspec.field(default_factory=dict)
    attacks: str = ""
    last_install: InstallOutcome | None = None
    trial: _Trial | None = None


class LocalSecondary(Secondary):
    def __init__(
        self,
        directory: Path,
        ecu_serial: str,
        hardware_id: str,
        vin: str,
        password: bytes,
        health_check: Sequence[Sequence[str]] = (),
        bootlimit: int = 1,
    ) -> None:
        self.directory = directory
        self.ecu_serial, self.hardware_id, self.vin = ecu_serial, hardware_id, vin
        self._health_check = health_check
        try:
            self._signer = load_signer(directory / "ecu.key", password)
            self._root = Metadata[Root].from_file(str(directory / "director-root.json"))
        except (KeyFileError, OSError, ValueError) as exc:
            raise SecondaryError(
                f"secondary {ecu_serial}: cannot load its key or trusted root: {exc}"
            ) from exc
        self._banks = SlotInstaller(
            {"a": directory / "bank-a.bin", "b": directory / "bank-b.bin"},
            FileBootEnvironment(directory / "bootenv.json"),
            bootlimit,
        )
        self._banks.initialize()
        self._state_path = directory / "state.json"

    def _state(self) -> _EcuState:
        try:
            return msgspec.json.decode(self._state_path.read_bytes(), type=_EcuState, strict=True)
        except FileNotFoundError:
            return _EcuState()
        except (OSError, msgspec.DecodeError) as exc:
            raise SecondaryError(
                f"secondary {self.ecu_serial}: state {self._state_path} unreadable: {exc}"
            ) from exc

    def _save(self, state: _EcuState) -> None:
        encoded = msgspec.json.encode(state, order="sorted")
        write_atomic(self._state_path, msgspec.json.format(encoded, indent=1))

    def _installed(self, state: _EcuState) -> ImageInfo:
        return state.banks.get(self._banks.state().boot_slot) or NO_IMAGE

    def installed_image_path(self) -> Path | None:
        state = self._resume_trial()
        return (
            self._banks.slots[self._banks.state().boot_slot]
            if self._installed(state).length
            else None
        )

    def installed_sha256(self) -> str:
        return self._installed(self._resume_trial()).sha256

    def status(self) -> EcuStatus:
        state = self._resume_trial()
        return EcuStatus(self._installed(state), state.attacks, state.last_install)

    def version_report(self) -> SignedEnvelope:
        state = self._resume_trial()
        state.report_counter += 1
        self._save(state)  # a counter is never signed twice
        report = EcuVersionReport(
            self.ecu_serial,
            self._installed(state),
            state.report_counter,
            state.attacks,
            state.last_install,
        )
        return report.sign(self._signer)

    def install(self, update: SecondaryUpdate) -> InstallOutcome:
        state = self._resume_trial()
        try:
            self._follow_director_roots(update.director_roots)
            verified = verify_director_targets(
                update.director_targets,
                self._root,
                vin=self.vin,
                ecu_serial=self.ecu_serial,
                hardware_id=self.hardware_id,
                min_version=state.targets_version,
            )
        except PartialVerificationError as exc:
            refused = InstallOutcome(update.filepath, InstallResult.REFUSED, str(exc))
            return self._finish(state, refused, attack=str(exc))
        state.targets_version = verified.version
        target = verified.target
        if target is None or target.path != update.filepath:
            unknown = "director lists no such image for this ECU"
            return self._finish(
                state, InstallOutcome(update.filepath, InstallResult.REFUSED, unknown)
            )
        new = other_slot(self._banks.state().boot_slot)
        state.banks[new] = None
        self._save(state)
        try:
            with open(update.image_path, "rb") as image:
                digest = hashlib.file_digest(image, "sha256")
                length = image.tell()
            if digest.hexdigest() != target.hashes.get("sha256") or length != target.length:
                raise PartialVerificationError(
                    f"image {update.filepath} does not match the director's length/sha256"
                )
            with open(update.image_path, "rb") as image:
                self._banks.write(new, image, target.length, target.hashes["sha256"])
        except PartialVerificationError as exc:
            refused = InstallOutcome(update.filepath, InstallResult.REFUSED, str(exc))
            return self._finish(state, refused, attack=str(exc))
        except (InstallError, OSError) as exc:
            failed = InstallOutcome(update.filepath, InstallResult.FAILED, str(exc))
            return self._finish(state, failed)
        state.banks[new] = ImageInfo.of(target.path, target.length, dict(target.hashes))
        state.trial = _Trial(update.filepath, new)
        self._save(state)
        self._banks.arm(new)
        return self._run_trial(state)

    def _run_trial(self, state: _EcuState) -> InstallOutcome:
        """Boot the armed bank until it is healthy (commit) or the bootloader gives up on it."""
        trial = state.trial
        assert trial is not None  # only called with a trial under way
        reason = "the bootloader fell back to the previous bank"
        while True:
            booted = simulate_bootloader(self._banks.env)
            if booted != trial.bank:
                rolled_back = InstallOutcome(trial.filepath, InstallResult.ROLLED_BACK, reason)
                return self._finish(state, rolled_back)
            result = run_health_checks(self._health_check, booted, self._banks.slots[booted], 30)
            if result.ok:
                self._banks.commit()
                return self._finish(state, InstallOutcome(trial.filepath, InstallResult.INSTALLED))
            reason = result.reason

    def _resume_trial(self) -> _EcuState:
        """The state, after finishing a trial boot that a kill or power cut interrupted."""
        state = self._state()
        if state.trial is not None:
            if self._banks.state().upgrade_available:
                self._run_trial(state)
            else:  # committed or fallen back just before the interruption
                booted_new = self._banks.state().boot_slot == state.trial.bank
                result = InstallResult.INSTALLED if booted_new else InstallResult.ROLLED_BACK
                self._finish(state, InstallOutcome(state.trial.filepath, result))
            state = self._state()
        return state

    def _follow_director_roots(self, roots: tuple[bytes, ...]) -> None:
        newest = follow_root_chain(self._root, roots)
        if newest is not self._root:
            write_atomic(
                self.directory / "director-root.json",
                newest.to_bytes(JSONSerializer(compact=False)),
            )
            self._root = newest

    def _finish(
        self, state: _EcuState, outcome: InstallOutcome, attack: str = ""
    ) -> InstallOutcome:
        state.trial = None
        state.last_install = outcome
        state.attacks = attack
        self._save(state)
        return outcome


def provision_local_secondary(directory: Path, director_root: bytes, password: bytes) -> Path:
    """Create the ECU key and trusted root of a new local secondary; returns its public key file."""
    from signing.keys import generate_signer, public_key_path, save_signer

    directory.mkdir(parents=True, exist_ok=True)
    save_signer(generate_signer(), directory / "ecu.key", password)
    write_atomic(directory / "director-root.json", director_root)
    return public_key_path(directory / "ecu.key")


def inspect_local_secondary(directory: Path) -> dict[str, Any]:
    """What a local secondary runs and reports, read without its key and without changing it."""
    try:
        raw = (directory / "state.json").read_bytes()
        state = msgspec.json.decode(raw, type=_EcuState, strict=True)
    except FileNotFoundError:
        state = _EcuState()
    except (OSError, msgspec.DecodeError) as exc:
        raise SecondaryError(f"state {directory / 'state.json'} unreadable: {exc}") from exc
    env = FileBootEnvironment(directory / "bootenv.json").read()
    bank = env.get("boot_slot", "a")
    installed = state.banks.get("a" if bank == "a" else "b") or NO_IMAGE
    return {
        "installed": installed.to_dict() if installed.filepath else None,
        "slot": bank,
        "boot": env,
        "last_install": state.last_install.to_dict() if state.last_install else None,
        "attacks_detected": state.attacks,
        "report_counter": state.report_counter,
        "pending": {"filepath": state.trial.filepath, "phase": "trial", "slot": state.trial.bank}
        if state.trial
        else None,
    }
