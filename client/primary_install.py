"""The primary's own install: the journaled A/B state machine.

::

    download ──► write ──► arm ──► reboot ──► trial ──► installed (commit)
       │           │                  ▲          │
       │           │                  └──────────┘ unhealthy: reboot again; the
       │           │                               bootloader counts the tries and,
       ▼           ▼                               past bootlimit, boots the old slot:
    refused /    failed                            rolled_back
    postponed

Each :class:`~client.state.JournalPhase` is recorded in the state file
*before* the side effect it announces (:meth:`PrimaryInstall._drive` saves
the one state object of the cycle at every step), and each side effect is
idempotent or detectable, so a SIGKILL or a power cut at any instant leaves
either the old slot booted or the new slot on trial, and
:meth:`PrimaryInstall.resume` takes it from there at the next start:

* **download**: nothing written yet; the journal is dropped and the next
  verification starts over (the partial download resumes);
* **write**: the inactive slot's recorded image is cleared first, and the
  image (or the delta, applied streaming from the active slot) is written
  again from the verified file; the read-back hash decides;
* **arm**: ``boot_slot``, ``upgrade_available=1``, ``bootcount=0`` in one
  atomic boot environment update (:mod:`client.installer`);
* **reboot**: the boot id is recorded before a real reboot, so a restart
  within the same boot is never taken for the trial boot;
* **trial**: the health checks decide commit (``upgrade_available=0``) or
  another reboot, until the bootloader falls back.

Installer type ``command`` hands the verified image to the integrator's
command instead, and the health checks decide.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from tuf.api.metadata import TargetFile

from client.bootenv import simulate_bootloader
from client.config import AgentConfig, InstallerType
from client.downloads import VerifiedDownloads
from client.health import run_command, run_health_checks
from client.installer import InstallError, SlotInstaller, other_slot
from client.state import AgentState, Journal, JournalPhase, StateStore
from client.verification import DirectedImage
from signing.exceptions import (
    AttackDetected,
    ConfigurationFailure,
    TransientFailure,
    UptakeError,
    VerificationFailure,
)
from signing.manifest import NO_IMAGE, ImageInfo, InstallMethod, InstallOutcome, InstallResult


class RebootFailed(UptakeError):
    """The reboot command failed; the install resumes at the next start."""


def current_boot_id() -> str:
    """The kernel's id of this boot ('' where there is none): changes at every reboot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class PrimaryInstall:
    """Installs the primary's own image through the journal (see module docstring)."""

    def __init__(
        self,
        config: AgentConfig,
        slots: SlotInstaller,
        downloads: VerifiedDownloads,
        store: StateStore,
        say: Callable[[str], None],
    ) -> None:
        self._config = config
        self._serial = config.primary.ecu_serial
        self.slots = slots
        self._downloads = downloads
        self._store = store
        self._say = say

    def running_image(self, state: AgentState) -> ImageInfo:
        """The image in the slot the bootloader boots (NO_IMAGE on a factory-fresh device)."""
        return state.slot_images.get(self.slots.state().boot_slot) or NO_IMAGE

    @property
    def takes_delta(self) -> bool:
        """Whether an image can be rebuilt from a delta (not for the command installer)."""
        return self._config.installer.type is not InstallerType.COMMAND

    def note_attack(self, state: AgentState, what: str) -> None:
        """Keep evidence of an attack for the primary's next report (``attacks_detected``)."""
        state.ecu(self._serial).attacks_detected = what
        self._store.save(state)

    def record(self, state: AgentState, outcome: InstallOutcome) -> InstallOutcome:
        """An outcome that ends without touching a slot, kept for the next report."""
        state.ecu(self._serial).last_install = outcome
        self._store.save(state)
        return outcome

    # -- a new install --------------------------------------------------------------------

    def install(self, state: AgentState, item: DirectedImage) -> InstallOutcome:
        """Install ``item`` (verified, directed to the primary) to the inactive slot."""
        current = self.slots.state().boot_slot
        journal = Journal(
            phase=JournalPhase.DOWNLOAD,
            filepath=item.target.path,
            length=item.target.length,
            sha256=item.sha256,
            release_counter=item.custom.release_counter,
            target_slot=other_slot(current),
            from_slot=current,
        )
        delta = item.delta if self.takes_delta else None
        if delta is not None:
            journal.method = InstallMethod.DELTA
            journal.delta_filepath, journal.delta_length = delta.path, delta.length
            journal.delta_sha256 = delta.hashes["sha256"]
        state.journal = journal
        self._store.save(state)
        try:
            if delta is not None:
                self._download_delta(state, journal, delta)
            if journal.method is InstallMethod.FULL:
                self._downloads.image(item)
                self._say(
                    f"downloaded {item.target.path} ({item.target.length} bytes), "
                    "length and sha256 verified"
                )
        except VerificationFailure as exc:
            state.journal = None
            self._store.save(state)
            return self._refused(state, item.target.path, exc)
        return self._drive(state)

    def _download_delta(self, state: AgentState, journal: Journal, delta: TargetFile) -> None:
        try:
            self._downloads.target(delta, self._delta_name(journal))
        except AttackDetected as exc:  # it failed its signed hashes: report, use the full image
            state.ecu(self._serial).attacks_detected = str(exc)
            self._abandon_delta(state, f"download: {exc}")
        except VerificationFailure as exc:
            self._abandon_delta(state, f"download: {exc}")
        else:
            self._say(
                f"downloaded delta {delta.path} ({delta.length} bytes instead of "
                f"{journal.length}), length and sha256 verified"
            )

    def _refused(
        self, state: AgentState, filepath: str, exc: VerificationFailure
    ) -> InstallOutcome:
        """The outcome of a download that failed before any slot was touched."""
        if isinstance(exc, TransientFailure):
            # the network, not an attacker: keep the partial download and resume at the next poll
            detail = f"download interrupted ({exc}); it resumes at the next poll"
            outcome = InstallOutcome(filepath, InstallResult.POSTPONED, detail)
        elif isinstance(exc, ConfigurationFailure):
            outcome = InstallOutcome(filepath, InstallResult.FAILED, f"configuration error: {exc}")
        else:
            state.ecu(self._serial).attacks_detected = str(exc)
            outcome = InstallOutcome(filepath, InstallResult.REFUSED, str(exc))
        self._say(f"{self._serial}: {outcome.result} {filepath}: {outcome.detail}")
        return self.record(state, outcome)

    # -- after a restart ------------------------------------------------------------------

    def resume(self, state: AgentState) -> InstallOutcome | None:
        """Take an install the journal says was interrupted to its end (None: there was none)."""
        j = state.journal
        if j is None:
            return None
        self._say(f"resuming the install of {j.filepath} interrupted in phase '{j.phase}'")
        if j.phase is JournalPhase.DOWNLOAD:
            state.journal = None  # re-verified and resumed by the next verification
            self._store.save(state)
            return None
        simulated = self._config.installer.reboot_command is None
        if j.phase in (JournalPhase.REBOOT, JournalPhase.TRIAL) and simulated:
            j.phase = JournalPhase.REBOOT  # a restart of the simulated device is a power cycle
        elif j.phase is JournalPhase.REBOOT and j.boot_id and j.boot_id == current_boot_id():
            # restarted, but the machine never rebooted (the agent was killed, or the reboot
            # failed): the new slot has not been tried, so neither health-check nor commit it
            self._say(
                f"slot {j.target_slot} was armed but the machine has not rebooted since: rebooting"
            )
        elif j.phase is JournalPhase.REBOOT:
            j.phase = JournalPhase.TRIAL  # the real machine has rebooted
        return self._drive(state)

    # -- the state machine ----------------------------------------------------------------

    def _drive(self, state: AgentState) -> InstallOutcome:
        """Run the journal from its current phase to an outcome."""
        j = state.journal
        assert j is not None  # every caller has just journaled the install
        while True:
            if j.phase is JournalPhase.DOWNLOAD:
                j.phase = JournalPhase.WRITE
                state.slot_images[j.target_slot] = None  # about to be overwritten
                self._store.save(state)
            elif j.phase is JournalPhase.WRITE and j.method is InstallMethod.DELTA:
                self._write_delta(state, j)
            elif (
                j.phase is JournalPhase.WRITE
                and self._config.installer.type is InstallerType.COMMAND
            ):
                return self._install_with_command(state, j)
            elif j.phase is JournalPhase.WRITE:
                done = self._write_image(state, j)
                if done is not None:
                    return done
            elif j.phase is JournalPhase.ARM:
                self.slots.arm(j.target_slot)
                j.phase = JournalPhase.REBOOT
                self._store.save(state)
                self._say(
                    f"bootloader armed: next boot tries slot {j.target_slot} "
                    f"(bootlimit {self.slots.bootlimit})"
                )
            elif j.phase is JournalPhase.REBOOT:
                # a real reboot does not return: remember which boot asked for it, so that a
                # restart without a reboot is never taken for the trial boot
                j.boot_id = current_boot_id()
                self._store.save(state)
                self._reboot()
                j.phase = JournalPhase.TRIAL
                self._store.save(state)
            else:
                outcome = self._evaluate_trial(state, j)
                if outcome is not None:
                    return outcome
                j.phase = JournalPhase.REBOOT  # unhealthy: reboot, the bootloader counts it
                self._store.save(state)

    def _write_delta(self, state: AgentState, j: Journal) -> None:
        delta_file = self._downloads.path(self._delta_name(j))
        try:
            method = self.slots.write_delta(
                j.target_slot, j.from_slot, delta_file, j.length, j.sha256
            )
        except InstallError as exc:
            self._abandon_delta(state, str(exc))
            return
        delta_file.unlink(missing_ok=True)
        state.slot_images[j.target_slot] = j.image()
        j.phase = JournalPhase.ARM
        self._store.save(state)
        self._say(
            f"applied delta ({method}) from slot {j.from_slot} into inactive slot "
            f"{j.target_slot}: {j.filepath}, sha256 verified"
        )

    def _write_image(self, state: AgentState, j: Journal) -> InstallOutcome | None:
        try:
            with open(self._verified_image(j), "rb") as image:
                self.slots.write(j.target_slot, image, j.length, j.sha256)
        except VerificationFailure as exc:
            return self._download_failed(state, j, exc)
        except (InstallError, OSError) as exc:
            return self._finish(state, InstallResult.FAILED, f"writing slot {j.target_slot}: {exc}")
        state.slot_images[j.target_slot] = j.image()
        j.phase = JournalPhase.ARM
        self._store.save(state)
        self._say(f"wrote {j.filepath} to inactive slot {j.target_slot}, read-back sha256 verified")
        return None

    @staticmethod
    def _delta_name(j: Journal) -> str:
        return f"{j.delta_sha256}.delta"

    def _abandon_delta(self, state: AgentState, reason: str) -> None:
        """Fall back to the full image for the install in the journal."""
        j = state.journal
        assert j is not None  # only while an install is journaled
        j.method, j.delta_failure = InstallMethod.FULL, reason
        self._store.save(state)
        self._downloads.discard(self._delta_name(j))
        self._say(f"delta for {j.filepath} refused ({reason}): falling back to the full image")

    def _verified_image(self, j: Journal) -> Path:
        """The journal's full image, checked again (a power cut may have torn it), or fetched.

        The journal holds the length and sha256 from verified metadata: enough to verify the bytes.
        """
        target = TargetFile(j.length, {"sha256": j.sha256}, j.filepath)
        return self._downloads.target(target, j.sha256)

    def _download_failed(
        self, state: AgentState, j: Journal, exc: VerificationFailure
    ) -> InstallOutcome:
        """The journal's image could not be (re)fetched: the slot is untouched."""
        if isinstance(exc, TransientFailure):  # the next poll starts this install again
            detail = f"download interrupted ({exc})"
            return InstallOutcome(j.filepath, InstallResult.POSTPONED, detail, j.method)
        if isinstance(exc, ConfigurationFailure):
            return self._finish(state, InstallResult.FAILED, f"configuration error: {exc}")
        state.ecu(self._serial).attacks_detected = str(exc)
        return self._finish(state, InstallResult.REFUSED, str(exc))

    def _install_with_command(self, state: AgentState, j: Journal) -> InstallOutcome:
        """Installer type "command": the command installs, the health checks decide.

        The command must be idempotent: after a restart it runs again.
        """
        cfg = self._config.installer
        try:
            image = self._verified_image(j)
        except VerificationFailure as exc:
            return self._download_failed(state, j, exc)
        values = {"{image}": str(image), "{filepath}": j.filepath, "{sha256}": j.sha256}
        argv = [values.get(a, a) for a in cfg.install_command]
        result = run_command(argv, cfg.command_timeout, "install command")
        if not result.ok:
            return self._finish(state, InstallResult.FAILED, result.reason)
        self._say(f"installed {j.filepath} with {argv[0]}")
        checks = self._config.health_check
        health = run_health_checks(checks.commands, "a", image, checks.timeout)
        if not health.ok:
            if cfg.rollback_command:
                undo = run_command(
                    [values.get(a, a) for a in cfg.rollback_command],
                    cfg.command_timeout,
                    "rollback command",
                )
                if not undo.ok:
                    detail = f"{health.reason}; {undo.reason}"
                    return self._finish(state, InstallResult.FAILED, detail)
            self._say(f"health check FAILED after installing {j.filepath}: {health.reason}")
            return self._finish(state, InstallResult.ROLLED_BACK, health.reason)
        state.slot_images[self.slots.state().boot_slot] = j.image()
        self._say(f"health check passed: committed {j.filepath}")
        return self._finish(state, InstallResult.INSTALLED)

    def _reboot(self) -> None:
        command = self._config.installer.reboot_command
        if command is None:
            slot = simulate_bootloader(self.slots.env)
            self._say(f"rebooted (simulated bootloader): booting slot {slot}")
            return
        self._say(f"rebooting: {' '.join(command)}")
        result = run_command(command, 60, "reboot command")
        if not result.ok:
            raise RebootFailed(f"{result.reason}; the install resumes at the next start")
        # the machine is going down; the next start resumes from the journal
        os._exit(0)

    def _evaluate_trial(self, state: AgentState, j: Journal) -> InstallOutcome | None:
        boot = self.slots.state()
        if boot.boot_slot == j.target_slot and boot.upgrade_available:
            checks = self._config.health_check
            slot_path = self.slots.slots[j.target_slot]
            result = run_health_checks(checks.commands, j.target_slot, slot_path, checks.timeout)
            if result.ok:
                self.slots.commit()
                self._say(f"health check passed on slot {j.target_slot}: committed {j.filepath}")
                return self._finish(state, InstallResult.INSTALLED)
            j.health_failures.append(result.reason)
            self._store.save(state)
            self._say(
                f"health check FAILED on slot {j.target_slot} "
                f"(boot {boot.bootcount}/{boot.bootlimit}): {result.reason}"
            )
            return None
        if boot.boot_slot == j.target_slot:
            return self._finish(state, InstallResult.INSTALLED)  # committed just before a restart
        reason = j.health_failures[-1] if j.health_failures else "the new slot did not boot"
        self._say(f"bootloader fell back to slot {boot.boot_slot}: rolled back {j.filepath}")
        return self._finish(state, InstallResult.ROLLED_BACK, reason)

    def _finish(self, state: AgentState, result: InstallResult, detail: str = "") -> InstallOutcome:
        j = state.journal
        assert j is not None  # only while an install is journaled
        if not detail and j.delta_failure:
            detail = f"delta refused ({j.delta_failure}); installed from the full image"
        outcome = InstallOutcome(j.filepath, result, detail, j.method)
        ecu = state.ecu(self._serial)
        ecu.last_install = outcome
        if result is InstallResult.INSTALLED:
            ecu.release_counter = j.release_counter
        state.journal = None
        self._store.save(state)
        self._downloads.discard(j.sha256)
        if j.delta_sha256:
            self._downloads.discard(self._delta_name(j))
        return outcome
