"""The in-vehicle agent: the Uptane primary.

One update cycle (:meth:`Agent.run_cycle`):

1. **recover**: finish or roll back an install the journal says was in
   progress when the agent (or the power) stopped;
2. **report**: sign a vehicle version manifest (the primary's own ECU
   report plus each secondary's, signed by that secondary) and upload it;
3. **verify**: Uptane full verification of both repositories
   (:mod:`client.verification`); a failure that looks like an attack is kept
   and goes into ``attacks_detected`` of the next report;
4. **install**: for the primary, the journaled A/B state machine
   download → write → arm → reboot → trial → commit | rollback; for each
   secondary, download, verify, hand it over (:mod:`client.secondaries`);
5. **report** again so the server learns the outcome at once.

Every step that changes the device first records in the journal
(:mod:`client.state`) what it is about to do, so a SIGKILL or power cut at
any instant leaves either the old slot booted or the new slot on trial,
and the next start takes it from there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import urllib3
from tuf.api.exceptions import LengthOrHashMismatchError
from tuf.api.metadata import TargetFile

from client.bootenv import (
    BootEnvironment,
    BootEnvironmentError,
    FileBootEnvironment,
    simulate_bootloader,
)
from client.bundle import check_bundle, install_order, unmet_dependency
from client.config import AgentConfig
from client.cycle_result import CycleReport, FailureKind, ManifestDelivery
from client.delta_apply import DeltaError, apply_delta_file, read_delta_header
from client.fetcher import ResumableFetcher
from client.health import run_command, run_health_checks
from client.installer import InstallError, SlotInstaller, check_slot, other_slot
from client.preconditions import unmet_precondition
from client.secondaries import open_secondaries
from client.secondaries.base import Secondary, SecondaryError, SecondaryUpdate
from client.state import AgentState, Journal, StateError, StateStore
from client.verification import (
    AttackDetected,
    ConfigurationFailure,
    DirectedImage,
    FullVerifier,
    TransientFailure,
    VerificationFailure,
)
from signing.encryption import EncryptionFormatError, load_encryption_key
from signing.exceptions import UptakeError
from signing.keys import load_signer
from signing.manifest import NO_IMAGE, EcuVersionReport, ImageInfo, InstallOutcome, VehicleManifest

log = logging.getLogger(__name__)


class AgentError(UptakeError):
    """The agent cannot run (bad key, unreachable state...); says what and where."""


def _failure_kind(exc: VerificationFailure) -> FailureKind:
    if isinstance(exc, AttackDetected):
        return FailureKind.ATTACK
    if isinstance(exc, TransientFailure):
        return FailureKind.TRANSIENT
    if isinstance(exc, ConfigurationFailure):
        return FailureKind.CONFIGURATION
    return FailureKind.ATTACK  # an unclassified refusal is treated as the worst case


def _error_message(body: bytes) -> str:
    """The message of a JSON error body, or its start, printable."""
    try:
        message = json.loads(body)["error"]["message"]
        if isinstance(message, str):
            return message[:300]
    except (ValueError, KeyError, TypeError):
        pass
    return repr(body[:300])


def current_boot_id() -> str:
    """The kernel's id of this boot ('' where there is none): changes at every reboot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def make_boot_environment(config: AgentConfig) -> BootEnvironment:
    from client import bootenv

    path = config.path(config.installer.boot_env)
    if config.installer.type == "uboot":
        return bootenv.UBootEnvironment(path)
    if config.installer.type == "grub":
        return bootenv.GrubEnvironment(path)
    return FileBootEnvironment(path)


class Agent:
    def __init__(
        self, config: AgentConfig, password: bytes, narrate: Callable[[str], None] | None = None
    ) -> None:
        self.config = config
        self._narrate = narrate
        try:
            self.signer = load_signer(config.path(config.primary_key), password)
        except Exception as exc:
            raise AgentError(f"primary ECU key: {exc}") from exc
        self.store = StateStore(config.path(Path("state.json")))
        self.installer = SlotInstaller(
            {"a": config.path(config.installer.slot_a), "b": config.path(config.installer.slot_b)},
            make_boot_environment(config),
            config.installer.bootlimit,
            config.installer.slot_type,
        )
        problems = []
        for name, path in self.installer.slots.items():
            try:
                check_slot(name, path, config.installer.slot_type)
            except InstallError as exc:
                problems.append(str(exc))
        if problems:
            raise AgentError(f"{config.source}: " + "; ".join(problems))
        self.installer.initialize()
        self.secondaries: list[Secondary] = open_secondaries(config, password)
        self.verifier = FullVerifier(
            config.path(Path("metadata")),
            config.path(Path("downloads")),
            config.server_url,
            config.vin,
            ResumableFetcher(config.download),
        )
        if config.path(config.encryption_key).exists():
            try:
                self.verifier.decryption_key = load_encryption_key(
                    config.path(config.encryption_key), password
                )
            except EncryptionFormatError as exc:
                raise AgentError(f"primary ECU encryption key: {exc}") from exc
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=10, read=60), retries=False
        )

    def say(self, message: str) -> None:
        log.info(message)
        if self._narrate:
            self._narrate(message)

    # -- the cycle ------------------------------------------------------------

    def run_cycle(self) -> CycleReport:
        report = CycleReport()
        self.recover(report)
        report.manifest, report.manifest_problem = self.send_manifest()
        attack = False
        try:
            directed = self.check()
        except VerificationFailure as exc:
            report.verification_error = str(exc)
            report.verification_failure = _failure_kind(exc)
            attack = isinstance(exc, AttackDetected)
            directed = []
        report.directed = [f"{d.ecu_serial}:{d.target.path}" for d in directed]
        waiting = unmet_precondition(self.config.preconditions) if directed else None
        if waiting is not None:
            self.say(f"update waits: precondition {waiting}")
            report.waiting = waiting
            for item in directed:
                report.outcomes[item.ecu_serial] = self._record(
                    item, "postponed", f"waiting for precondition {waiting}"
                )
            directed = []
        for item in install_order(directed):  # ECUs that others require first
            blocked = unmet_dependency(item, directed, report.outcomes)
            report.outcomes[item.ecu_serial] = (
                self._record(item, "failed", blocked) if blocked else self.install(item)
            )
        if (
            any(o.result != "postponed" for o in report.outcomes.values())
            or attack
            or report.waiting
        ):
            # tell the server at once what happened (an outcome, or an attack seen)
            report.manifest, report.manifest_problem = self.send_manifest()
        return report

    def run_forever(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set (SIGTERM), with jitter so fleets don't poll in lockstep."""
        while not stop.is_set():
            try:
                self.run_cycle()
            except (AgentError, BootEnvironmentError, SecondaryError, StateError, OSError) as exc:
                log.error("update cycle failed: %s; retrying at the next poll", exc)
            except Exception:  # a bug: keep the traceback for the report, keep the service up
                log.exception("update cycle failed unexpectedly; retrying at the next poll")
            jitter = self.config.poll_interval * self.config.poll_jitter
            stop.wait(self.config.poll_interval + random.uniform(-jitter, jitter))

    # -- reporting --------------------------------------------------------------

    def build_manifest(self) -> bytes:
        return self._build_manifest()[0]

    def _build_manifest(self) -> tuple[bytes, str]:
        """The signed manifest and a digest of what it says (reports without their counters)."""
        state = self.store.load()
        primary = state.ecu(self.config.primary_serial)
        primary.report_counter += 1
        self.store.save(state)  # never sign the same counter twice
        installed = self._running_image(state)
        reports = {
            self.config.primary_serial: EcuVersionReport(
                self.config.primary_serial,
                installed,
                primary.report_counter,
                primary.attacks_detected,
                primary.last_install,
            ).sign(self.signer)
        }
        for sec in self.secondaries:
            try:
                reports[sec.ecu_serial] = sec.version_report()
            except SecondaryError as exc:
                self.say(f"secondary {sec.ecu_serial} did not report: {exc}")
        manifest = VehicleManifest(self.config.vin, self.config.primary_serial, reports)
        content = {
            s: {k: v for k, v in e.signed.items() if k != "report_counter"}
            for s, e in reports.items()
        }
        digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
        return manifest.sign(self.signer).to_bytes(), digest

    def send_manifest(self) -> tuple[ManifestDelivery, str]:
        """Report to the server, unless it already knows all this and the heartbeat is not due.

        Verifying a manifest's signatures is the expensive part of a poll for
        the server, so an idle vehicle sends one only every ``manifest_heartbeat``.
        Returns what became of the manifest and, unless accepted or not needed, why.
        """
        body, digest = self._build_manifest()
        state = self.store.load()
        if (
            digest == state.manifest_digest
            and time.time() - state.manifest_sent_at < self.config.manifest_heartbeat
        ):
            log.debug("vehicle state unchanged since the last manifest: not sending one")
            return ManifestDelivery.UNCHANGED, ""
        url = f"{self.config.server_url}/api/v1/vehicles/{self.config.vin}/manifest"
        try:
            resp = self._http.request(
                "POST", url, body=body, headers={"Content-Type": "application/json"}
            )
        except urllib3.exceptions.HTTPError as exc:
            problem = f"could not send the vehicle manifest: {exc}"
            self.say(problem)
            return ManifestDelivery.UNREACHABLE, problem
        if resp.status != 200:
            problem = f"server answered HTTP {resp.status}: {_error_message(resp.data)}"
            self.say(f"vehicle manifest not accepted: {problem}")
            transient = resp.status in (408, 429) or resp.status >= 500
            return (
                ManifestDelivery.UNREACHABLE if transient else ManifestDelivery.REFUSED
            ), problem
        state = self.store.load()
        state.ecu(self.config.primary_serial).last_install = None  # acknowledged
        state.manifest_digest, state.manifest_sent_at = digest, time.time()
        self.store.save(state)
        self.say(
            f"reported: signed vehicle manifest ({len(body)} bytes, "
            f"{1 + len(self.secondaries)} ECU report(s)) accepted"
        )
        return ManifestDelivery.ACCEPTED, ""

    # -- verification -----------------------------------------------------------

    def check(self) -> list[DirectedImage]:
        state = self.store.load()
        counters = {s: state.ecu(s).release_counter for s in self.config.ecu_serials}
        primary = state.ecu(self.config.primary_serial)
        try:
            directed = self.verifier.verify(counters, self.config.ecu_serials)
            check_bundle(
                directed,
                self._installed_sha256(),
                self.config.ecu_serials,
                self.config.path(Path("metadata")) / "image" / "targets.json",
            )
        except AttackDetected as exc:
            primary.attacks_detected = str(exc)
            self.store.save(state)
            self.say(f"REFUSED: {exc}")
            raise
        except ConfigurationFailure as exc:
            self.say(f"REFUSED (a configuration or provisioning error, not an attack): {exc}")
            raise
        except TransientFailure as exc:
            self.say(f"verification postponed: {exc}")
            raise
        if primary.attacks_detected:
            primary.attacks_detected = ""
            self.store.save(state)
        installed = self._installed_sha256()
        todo = [d for d in directed if installed.get(d.ecu_serial) != d.sha256]
        self.say(
            "verified director and image repository metadata (full verification): "
            + (
                ", ".join(f"{d.ecu_serial} -> {d.target.path}" for d in todo)
                if todo
                else "nothing to install"
            )
        )
        return todo

    def _running_image(self, state: AgentState) -> ImageInfo:
        """The image in the slot the bootloader boots (NO_IMAGE on a factory-fresh device)."""
        return state.slot_images.get(self.installer.state().boot_slot) or NO_IMAGE

    def _installed_sha256(self) -> dict[str, str]:
        result = {
            self.config.primary_serial: self._running_image(self.store.load()).hashes.get(
                "sha256", ""
            )
        }
        for sec in self.secondaries:
            try:
                result[sec.ecu_serial] = sec.installed_sha256()
            except SecondaryError:
                result[sec.ecu_serial] = ""
        return result

    # -- installing -------------------------------------------------------------

    def install(self, item: DirectedImage) -> InstallOutcome:
        if item.ecu_serial == self.config.primary_serial:
            return self._install_primary(item)
        return self._install_secondary(item)

    def _download(self, item: DirectedImage) -> Path:
        if item.target.length > self.config.max_image_size:
            raise AttackDetected(
                f"{item.target.path}: {item.target.length} bytes exceeds max_image_size "
                f"{self.config.max_image_size}"
            )
        path = self.verifier.download(item, self.verifier.download_path(item.sha256))
        self.say(
            f"downloaded {item.target.path} ({item.target.length} bytes), length and sha256 verified"
        )
        return path

    def _install_secondary(self, item: DirectedImage) -> InstallOutcome:
        sec = next(s for s in self.secondaries if s.ecu_serial == item.ecu_serial)
        try:
            path = self._rebuild_from_delta(sec, item) or self._download(item)
        except VerificationFailure as exc:
            return self._refuse(item, exc)
        assert self.verifier.director_targets is not None
        targets_bytes = (
            self.config.path(Path("metadata")) / "director" / "targets.json"
        ).read_bytes()
        try:
            outcome = sec.install(
                SecondaryUpdate(item.target.path, targets_bytes, path, self._director_roots())
            )
        except SecondaryError as exc:
            outcome = InstallOutcome(item.target.path, "failed", str(exc))
        self.say(
            f"secondary {sec.ecu_serial}: {outcome.result} {item.target.path}"
            + (f" ({outcome.detail})" if outcome.detail else "")
        )
        if outcome.result == "installed":
            state = self.store.load()
            state.ecu(sec.ecu_serial).release_counter = item.custom.release_counter
            self.store.save(state)
            path.unlink(missing_ok=True)
        return outcome

    def _record(self, item: DirectedImage, result: str, detail: str) -> InstallOutcome:
        """An outcome that ends without touching a slot, kept for the primary's next report."""
        outcome = InstallOutcome(item.target.path, result, detail)
        if item.ecu_serial == self.config.primary_serial:
            state = self.store.load()
            state.ecu(item.ecu_serial).last_install = outcome
            self.store.save(state)
        self.say(f"{item.ecu_serial}: {result} {item.target.path}: {detail}")
        return outcome

    def _director_roots(self) -> tuple[bytes, ...]:
        """Director roots after v1 that the director Updater verified (for secondaries to follow rotations)."""
        history = self.config.path(Path("metadata")) / "director" / "root_history"
        versions = sorted(
            int(v) for p in history.glob("*.root.json") if (v := p.name.split(".", 1)[0]).isdigit()
        )
        return tuple((history / f"{v}.root.json").read_bytes() for v in versions if v > 1)

    def _rebuild_from_delta(self, sec: Secondary, item: DirectedImage) -> Path | None:
        """The full image for a secondary, rebuilt from a delta and the image it runs, or None.

        Only when the primary can read that image; the secondary then gets (and checks) the
        full image as always, so a bad delta costs nothing but the fallback download.
        """
        base = sec.installed_image_path()
        delta = self._find_delta(item, sec.installed_sha256()) if base else None
        if base is None or delta is None:
            return None
        try:
            patch = self.verifier.download_path(f"{delta.hashes['sha256']}.delta")
            result = self.verifier.download_path(item.sha256)
        except AttackDetected as exc:
            self._note_attack(str(exc))
            return None
        try:
            self.verifier.download_target(delta, patch)
            with open(patch, "rb") as f:
                header = read_delta_header(f)
            if (
                header.result_length != item.target.length
                or header.result_sha256.hex() != item.sha256
            ):
                raise DeltaError("the delta produces another image than the directed one")
            apply_delta_file(base, patch, result)  # atomic; checks the result against the header
        except (VerificationFailure, DeltaError, OSError) as exc:
            if isinstance(exc, AttackDetected):
                self._note_attack(str(exc))
            self.say(f"delta for {sec.ecu_serial} refused ({exc}): falling back to the full image")
            return None
        finally:
            patch.unlink(missing_ok=True)
        self.say(
            f"rebuilt {item.target.path} for {sec.ecu_serial} from a {delta.length}-byte delta "
            f"instead of downloading {item.target.length} bytes, sha256 verified"
        )
        return result

    def _refuse(self, item: DirectedImage, exc: VerificationFailure) -> InstallOutcome:
        if isinstance(exc, TransientFailure):
            # the network, not an attacker: keep the partial download and resume at the next poll
            return self._record(
                item, "postponed", f"download interrupted ({exc}); it resumes at the next poll"
            )
        if isinstance(exc, ConfigurationFailure):
            return self._record(item, "failed", f"configuration error: {exc}")
        self._note_attack(str(exc))
        return self._record(item, "refused", str(exc))

    def _find_delta(self, item: DirectedImage, installed_sha256: str) -> TargetFile | None:
        """The verified delta to ``item`` from what runs, or None; a forged one is reported."""
        try:
            return self.verifier.find_delta(item, installed_sha256)
        except AttackDetected as exc:
            self._note_attack(str(exc))
            self.say(f"delta to {item.target.path} refused ({exc}): using the full image")
            return None

    def _note_attack(self, what: str) -> None:
        """Keep evidence of an attack for the primary's next report (attacks_detected)."""
        state = self.store.load()
        state.ecu(self.config.primary_serial).attacks_detected = what
        self.store.save(state)

    def _install_primary(self, item: DirectedImage) -> InstallOutcome:
        current = self.installer.state().boot_slot
        state = self.store.load()
        delta = (
            None
            if self.config.installer.type == "command"
            else self._find_delta(item, self._running_image(state).hashes.get("sha256", ""))
        )
        state = self.store.load()  # a forged delta was noted as an attack meanwhile
        journal = Journal(
            "download",
            item.target.path,
            item.target.length,
            item.sha256,
            item.custom.release_counter,
            other_slot(current),
            current,
        )
        if delta is not None:
            journal.method = "delta"
            journal.delta_filepath, journal.delta_length = delta.path, delta.length
            journal.delta_sha256 = delta.hashes["sha256"]
        state.journal = journal
        self.store.save(state)
        try:
            if delta is not None:
                try:
                    self.verifier.download_target(delta, self._delta_file(journal))
                    self.say(
                        f"downloaded delta {delta.path} ({delta.length} bytes instead of "
                        f"{item.target.length}), length and sha256 verified"
                    )
                except VerificationFailure as exc:
                    if isinstance(exc, AttackDetected):  # it failed its signed hashes
                        self._note_attack(str(exc))
                        state = self.store.load()
                    self._abandon_delta(state, f"download: {exc}")
                    self._download(item)
            else:
                self._download(item)
        except VerificationFailure as exc:
            state = self.store.load()
            state.journal = None
            self.store.save(state)
            return self._refuse(item, exc)
        return self._drive(self.store.load())

    def _delta_file(self, j: Journal) -> Path:
        return self.verifier.download_path(f"{j.delta_sha256}.delta")

    def _abandon_delta(self, state: AgentState, reason: str) -> None:
        """Fall back to the full image for the install in the journal."""
        j = state.journal
        assert j is not None
        j.method, j.delta_failure = "full", reason
        self.store.save(state)
        self._delta_file(j).unlink(missing_ok=True)
        self.say(f"delta for {j.filepath} refused ({reason}): falling back to the full image")

    def _verified_image(self, j: Journal) -> Path:
        """The journal's full image on disk, checked again (a power cut may have torn it), or fetched.

        The journal holds the length and sha256 from verified metadata: enough to verify the bytes.
        """
        target = TargetFile(j.length, {"sha256": j.sha256}, j.filepath)
        path = self.verifier.download_path(j.sha256)
        try:
            with open(path, "rb") as f:
                target.verify_length_and_hashes(f)
            return path
        except (OSError, LengthOrHashMismatchError):
            path.unlink(missing_ok=True)
        self.verifier.download_target(target, path)
        self.say(f"downloaded {j.filepath} ({j.length} bytes), length and sha256 verified")
        return path

    def _drive(self, state: AgentState) -> InstallOutcome:
        """Run the journal from its current phase to an outcome."""
        j = state.journal
        assert j is not None
        while True:
            if j.phase == "download":
                j.phase = "write"
                state.slot_images[j.target_slot] = None  # about to be overwritten
                self.store.save(state)
            elif j.phase == "write" and j.method == "delta":
                try:
                    method = self.installer.write_delta(
                        j.target_slot, j.from_slot, self._delta_file(j), j.length, j.sha256
                    )
                except InstallError as exc:
                    self._abandon_delta(state, str(exc))
                    continue
                self._delta_file(j).unlink(missing_ok=True)
                state.slot_images[j.target_slot] = j.image()
                j.phase = "arm"
                self.store.save(state)
                self.say(
                    f"applied delta ({method}) from slot {j.from_slot} into inactive slot {j.target_slot}: "
                    f"{j.filepath}, sha256 verified"
                )
            elif j.phase == "write" and self.config.installer.type == "command":
                return self._install_with_command(state)
            elif j.phase == "write":
                try:
                    with open(self._verified_image(j), "rb") as image:
                        self.installer.write(j.target_slot, image, j.length, j.sha256)
                except VerificationFailure as exc:
                    return self._download_failed(state, exc)
                except (InstallError, OSError) as exc:
                    return self._finish(state, "failed", f"writing slot {j.target_slot}: {exc}")
                state.slot_images[j.target_slot] = j.image()
                j.phase = "arm"
                self.store.save(state)
                self.say(
                    f"wrote {j.filepath} to inactive slot {j.target_slot}, read-back sha256 verified"
                )
            elif j.phase == "arm":
                self.installer.arm(j.target_slot)
                j.phase = "reboot"
                self.store.save(state)
                self.say(
                    f"bootloader armed: next boot tries slot {j.target_slot} (bootlimit {self.installer.bootlimit})"
                )
            elif j.phase == "reboot":
                # a real reboot does not return: remember which boot asked for it, so that a
                # restart without a reboot is never taken for the trial boot
                j.boot_id = current_boot_id()
                self.store.save(state)
                self._reboot()
                j.phase = "trial"
                self.store.save(state)
            elif j.phase == "trial":
                outcome = self._evaluate_trial(state)
                if outcome is not None:
                    return outcome
                j.phase = "reboot"  # unhealthy: reboot, the bootloader counts the attempt
                self.store.save(state)
            else:
                return self._finish(state, "failed", f"unknown journal phase {j.phase!r}")

    def _download_failed(self, state: AgentState, exc: VerificationFailure) -> InstallOutcome:
        """The journal's image could not be (re)fetched: the slot is untouched."""
        j = state.journal
        assert j is not None
        if isinstance(exc, TransientFailure):  # the next poll starts this install again
            return InstallOutcome(
                j.filepath, "postponed", f"download interrupted ({exc})", j.method
            )
        if isinstance(exc, ConfigurationFailure):
            return self._finish(state, "failed", f"configuration error: {exc}")
        self._note_attack(str(exc))
        return self._finish(self.store.load(), "refused", str(exc))

    def _install_with_command(self, state: AgentState) -> InstallOutcome:
        """Installer type "command": the command installs, the health checks decide.

        The command must be idempotent: after a restart it runs again.
        """
        j = state.journal
        assert j is not None
        cfg = self.config.installer
        try:
            image = self._verified_image(j)
        except VerificationFailure as exc:
            return self._download_failed(state, exc)
        values = {"{image}": str(image), "{filepath}": j.filepath, "{sha256}": j.sha256}
        argv = [values.get(a, a) for a in cfg.install_command]
        result = run_command(argv, cfg.command_timeout, "install command")
        if not result.ok:
            return self._finish(state, "failed", result.reason)
        self.say(f"installed {j.filepath} with {argv[0]}")
        health = run_health_checks(
            self.config.health_check.commands, "a", image, self.config.health_check.timeout
        )
        if not health.ok:
            if cfg.rollback_command:
                undo = run_command(
                    [values.get(a, a) for a in cfg.rollback_command],
                    cfg.command_timeout,
                    "rollback command",
                )
                if not undo.ok:
                    return self._finish(state, "failed", f"{health.reason}; {undo.reason}")
            self.say(f"health check FAILED after installing {j.filepath}: {health.reason}")
            return self._finish(state, "rolled_back", health.reason)
        state.slot_images[self.installer.state().boot_slot] = j.image()
        self.say(f"health check passed: committed {j.filepath}")
        return self._finish(state, "installed")

    def _reboot(self) -> None:
        reboot = self.config.installer.reboot
        if reboot == "simulate":
            slot = simulate_bootloader(self.installer.env)
            self.say(f"rebooted (simulated bootloader): booting slot {slot}")
            return
        self.say(f"rebooting: {' '.join(reboot)}")
        result = run_command(reboot, 60, "reboot command")
        if not result.ok:
            raise AgentError(f"{result.reason}; the install resumes at the next start")
        # the machine is going down; the next start resumes from the journal
        os._exit(0)

    def _evaluate_trial(self, state: AgentState) -> InstallOutcome | None:
        j = state.journal
        assert j is not None
        boot = self.installer.state()
        if boot.boot_slot == j.target_slot and boot.upgrade_available:
            result = run_health_checks(
                self.config.health_check.commands,
                j.target_slot,
                self.installer.slots[j.target_slot],
                self.config.health_check.timeout,
            )
            if result.ok:
                self.installer.commit()
                self.say(f"health check passed on slot {j.target_slot}: committed {j.filepath}")
                return self._finish(state, "installed")
            j.health_failures.append(result.reason)
            self.store.save(state)
            self.say(
                f"health check FAILED on slot {j.target_slot} (boot {boot.bootcount}/{boot.bootlimit}): {result.reason}"
            )
            return None
        if boot.boot_slot == j.target_slot:
            return self._finish(state, "installed")  # committed just before a restart
        reason = j.health_failures[-1] if j.health_failures else "the new slot did not boot"
        self.say(f"bootloader fell back to slot {boot.boot_slot}: rolled back {j.filepath}")
        return self._finish(state, "rolled_back", reason)

    def _finish(self, state: AgentState, result: str, detail: str = "") -> InstallOutcome:
        j = state.journal
        assert j is not None
        if not detail and j.delta_failure:
            detail = f"delta refused ({j.delta_failure}); installed from the full image"
        outcome = InstallOutcome(j.filepath, result, detail, j.method)
        ecu = state.ecu(self.config.primary_serial)
        ecu.last_install = outcome
        if result == "installed":
            ecu.release_counter = j.release_counter
        state.journal = None
        self.store.save(state)
        self.verifier.download_path(j.sha256).unlink(missing_ok=True)
        if j.delta_sha256:
            self._delta_file(j).unlink(missing_ok=True)
        return outcome

    # -- restart ------------------------------------------------------------------

    def recover(self, report: CycleReport | None = None) -> None:
        """Take an interrupted install to its end (see module docstring)."""
        state = self.store.load()
        j = state.journal
        if j is None:
            return
        self.say(f"resuming the install of {j.filepath} interrupted in phase '{j.phase}'")
        if j.phase == "download":
            state.journal = None  # re-verified and resumed by the next cycle
            self.store.save(state)
            return
        if j.phase in ("reboot", "trial") and self.config.installer.reboot == "simulate":
            j.phase = "reboot"  # a restart of the simulated device is a power cycle
        elif j.phase == "reboot" and j.boot_id and j.boot_id == current_boot_id():
            # restarted, but the machine never rebooted (the agent was killed, or the reboot
            # failed): the new slot has not been tried, so neither health-check nor commit it
            self.say(
                f"slot {j.target_slot} was armed but the machine has not rebooted since: rebooting"
            )
        elif j.phase == "reboot":
            j.phase = "trial"  # the real machine has rebooted
        outcome = self._drive(state)
        if report is not None:
            report.outcomes[self.config.primary_serial] = outcome
