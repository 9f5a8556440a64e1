"""The in-vehicle agent: the Uptane primary's update cycle.

One cycle (:meth:`Agent.run_cycle`) loads the state once and every step works
on that one :class:`~client.state.AgentState`:

1. **resume** an install the journal says was interrupted
   (:mod:`client.primary_install`);
2. **report**, if something changed or the heartbeat is due
   (:mod:`client.reporting`): an idle poll signs and writes nothing;
3. **verify** both repositories (:mod:`client.verification`) into one
   immutable :class:`~client.verification.VerifiedUpdate`, and check the
   bundle as a whole (:mod:`client.bundle`); evidence of an attack goes into
   ``attacks_detected`` of the next report;
4. **wait** while a precondition fails (:mod:`client.preconditions`);
5. **install**, dependencies first: the primary's own image through the
   journaled A/B state machine, each secondary's by delivery
   (:mod:`client.secondary_delivery`);
6. **report** again at once when anything happened.

What the cycle did comes back as a :class:`~client.cycle_result.CycleReport`
whose status (ok, postponed, failed) is the exit code of
``uptake agent run --once``. :meth:`Agent.run_forever` polls with jitter until
SIGTERM.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from client.bundle import check_bundle, install_order, unmet_dependency
from client.config import AgentConfig
from client.cycle_result import CycleReport, FailureKind
from client.downloads import VerifiedDownloads
from client.fetcher import DownloadError, ResumableFetcher, TlsSettings
from client.installer import SlotInstaller
from client.preconditions import missing_consent, unmet_precondition
from client.primary_install import PrimaryInstall
from client.reporting import Reporter
from client.secondaries import open_secondaries
from client.secondaries.base import Secondary, SecondaryError
from client.secondary_delivery import SecondaryDelivery
from client.state import AgentState, StateStore
from client.vehicle_identity import ClientIdentity, IdentityError, certificate_from_answer
from client.verification import (
    DirectedImage,
    EcuBeforeUpdate,
    FullVerifier,
    VerifiedUpdate,
)
from signing.encryption import EncryptionFormatError, load_encryption_key
from signing.exceptions import (
    AttackDetected,
    ConfigurationFailure,
    TransientFailure,
    UptakeError,
    VerificationFailure,
)
from signing.keys import KeyFileError, load_signer
from signing.manifest import InstallOutcome, InstallResult

log = logging.getLogger(__name__)


class AgentError(UptakeError):
    """The agent cannot run (bad key, unusable slot...); says what and where."""


def _failure_kind(exc: VerificationFailure) -> FailureKind:
    if isinstance(exc, TransientFailure):
        return FailureKind.TRANSIENT
    if isinstance(exc, ConfigurationFailure):
        return FailureKind.CONFIGURATION
    return FailureKind.ATTACK  # AttackDetected, and anything unclassified: the worst case


@dataclass
class _DownloadedAhead:
    """What :meth:`Agent._download_ahead` holds now, by ECU serial, and whether it met an attack."""

    held: dict[str, str] = field(default_factory=dict)
    attack: bool = False


class Agent:
    """The Uptane primary: one update cycle at a time (see module docstring).

    ``narrate`` receives one line per thing the agent does; by default the
    lines are logged (``INFO``), so a service writes each line once.
    """

    def __init__(
        self,
        config: AgentConfig,
        password: bytes,
        narrate: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.say: Callable[[str], None] = narrate or log.info
        try:
            signer = load_signer(config.path(config.primary.key), password)
        except KeyFileError as exc:
            raise AgentError(f"primary ECU key: {exc}") from exc
        decryption_key = None
        if config.path(config.primary.encryption_key).exists():
            try:
                decryption_key = load_encryption_key(
                    config.path(config.primary.encryption_key), password
                )
            except EncryptionFormatError as exc:
                raise AgentError(f"primary ECU encryption key: {exc}") from exc
        self.store = StateStore(config.path("state.json"))
        slots = SlotInstaller.from_config(config)
        problems = slots.check_slots()
        if problems:
            raise AgentError("; ".join(problems))
        slots.initialize()
        self.secondaries: dict[str, Secondary] = {
            s.ecu_serial: s for s in open_secondaries(config, password)
        }
        self.identity = ClientIdentity(
            config.path(config.tls.client_cert), config.path(config.tls.client_key), password
        )
        if self.identity.key_path.parent.is_dir():
            self.identity.finish_interrupted_renewal()
        # the agent's one HTTP client
        fetcher = self.fetcher = ResumableFetcher(config.download, self._tls_settings())
        self.downloads = VerifiedDownloads(
            config.path("downloads"),
            config.agent.server_url,
            config.agent.image_url,
            config.agent.vin,
            fetcher,
            config.agent.max_image_size,
            decryption_key,
        )
        self.verifier = FullVerifier(
            config.path("metadata"),
            config.agent.server_url,
            config.agent.vin,
            fetcher,
            image_url=config.agent.image_url,
        )
        self.primary = PrimaryInstall(config, slots, self.downloads, self.store, self.say)
        self.delivery = SecondaryDelivery(
            self.secondaries, self.downloads, self.store, self.primary.note_attack, self.say
        )
        self.reporter = Reporter(
            vin=config.agent.vin,
            primary_serial=config.primary.ecu_serial,
            signer=signer,
            secondaries=list(self.secondaries.values()),
            fetcher=fetcher,
            server_url=config.agent.server_url,
            heartbeat=config.agent.manifest_heartbeat,
            store=self.store,
            running_image=self.primary.running_image,
            say=self.say,
        )

    # -- TLS identity ---------------------------------------------------------------------

    def _tls_settings(self) -> TlsSettings:
        tls = self.config.tls
        ca = str(self.config.path(tls.ca_certs)) if tls.ca_certs else ""
        if not self.config.agent.server_url.startswith("https://") or not self.identity.available():
            return TlsSettings(ca_certs=ca)
        return TlsSettings(
            ca_certs=ca,
            cert_file=str(self.identity.cert_path),
            key_file=str(self.identity.key_path),
            key_password=self.identity.password.decode(),
        )

    def renew_identity_if_due(self) -> None:
        """Renew the client certificate over mutual TLS when it nears its end (best effort)."""
        if not (self.config.agent.server_url.startswith("https://") and self.identity.available()):
            return
        try:
            if not self.identity.renewal_due(timedelta(days=self.config.tls.renew_before_days)):
                return
            url = f"{self.config.agent.server_url}/api/v1/vehicles/{self.config.agent.vin}/certificate"

            def request(csr: str) -> str:
                answer = self.fetcher.post(url, json.dumps({"tls_csr": csr}).encode())
                if answer.status != 201:
                    raise IdentityError(
                        f"server answered HTTP {answer.status}: {answer.body[:300]!r}"
                    )
                return certificate_from_answer(answer.body)

            not_after = self.identity.renew(self.config.agent.vin, request)
        except (IdentityError, DownloadError) as exc:
            self.say(f"client certificate renewal failed ({exc}); retrying at the next poll")
            return
        self.fetcher.use_tls(self._tls_settings())
        self.say(f"renewed the client certificate (new key): valid until {not_after:%Y-%m-%d}")

    # -- the cycle ------------------------------------------------------------------------

    def run_cycle(self) -> CycleReport:
        report = CycleReport()
        self.renew_identity_if_due()
        state = self.store.load()
        serial = self.config.primary.ecu_serial
        resumed = self.primary.resume(state)
        if resumed is not None:
            report.outcomes[serial] = resumed
        report.manifest, report.manifest_problem = self.reporter.report(state)
        attack = False
        try:
            verified = self.verify(state)
        except VerificationFailure as exc:
            report.verification_error = str(exc)
            report.verification_failure = _failure_kind(exc)
            attack = report.verification_failure is FailureKind.ATTACK
            verified = VerifiedUpdate()
        for refusal in verified.refused_deltas:  # the full image is used instead
            self.primary.note_attack(state, refusal)
            self.say(f"delta refused ({refusal}): using the full image")
            attack = True
        todo = list(verified.to_install)
        report.directed = [f"{d.ecu_serial}:{d.target.path}" for d in todo]
        if report.verification_error == "":
            self.downloads.keep_only(self._downloads_in_use(state, todo))
        waiting = unmet_precondition(self.config.preconditions) if todo else None
        if waiting is None and any(item.install_on_consent for item in todo):
            waiting = missing_consent(self.config.preconditions)
        if waiting is not None:
            self.say(f"update waits: precondition {waiting}")
            report.waiting = waiting
            ahead = self._download_ahead(state, [i for i in todo if i.install_on_consent])
            attack = attack or ahead.attack
            for item in todo:
                detail = f"waiting for precondition {waiting}"
                if item.ecu_serial in ahead.held:
                    detail += f"; {ahead.held[item.ecu_serial]}"
                outcome = InstallOutcome(item.target.path, InstallResult.POSTPONED, detail)
                report.outcomes[item.ecu_serial] = self._record(state, item, outcome)
            todo = []
        delivered = False
        for item in install_order(todo):  # ECUs that others require first
            blocked = unmet_dependency(item, todo, report.outcomes)
            if blocked:
                outcome = InstallOutcome(item.target.path, InstallResult.FAILED, blocked)
                report.outcomes[item.ecu_serial] = self._record(state, item, outcome)
                continue
            outcome = self.install(state, item, verified)
            report.outcomes[item.ecu_serial] = outcome
            if item.ecu_serial != serial and outcome.result is not InstallResult.POSTPONED:
                delivered = True
        if (
            any(o.result is not InstallResult.POSTPONED for o in report.outcomes.values())
            or attack
            or report.waiting
        ):
            # tell the server at once what happened (an outcome, or an attack seen)
            report.manifest, report.manifest_problem = self.reporter.report(
                state, changed=delivered
            )
        return report

    def verify(self, state: AgentState) -> VerifiedUpdate:
        """Full verification and the bundle check; attack evidence is kept for the next report."""
        primary = state.ecu(self.config.primary.ecu_serial)
        ecus = self.config.ecu_serials
        try:
            verified = self.verifier.verify(
                ecus,
                {s: state.ecu(s).release_counter for s in ecus},
                lambda s: self._before_update(state, s),
                self.config.primary.ecu_serial,
            )
            if verified.to_install:
                installed = {s: self._before_update(state, s).sha256 for s in ecus}
                check_bundle(verified, installed, ecus)
        except AttackDetected as exc:
            self.primary.note_attack(state, str(exc))
            self.say(f"REFUSED: {exc}")
            raise
        except ConfigurationFailure as exc:
            self.say(f"REFUSED (a configuration or provisioning error, not an attack): {exc}")
            raise
        except TransientFailure as exc:
            self.say(f"verification postponed: {exc}")
            raise
        if primary.attacks_detected and not verified.refused_deltas:
            primary.attacks_detected = ""
            self.store.save(state)
        self.say(
            "verified director and image repository metadata (full verification): "
            + (
                ", ".join(f"{d.ecu_serial} -> {d.target.path}" for d in verified.to_install)
                or "nothing to install"
            )
        )
        return verified

    def _download_ahead(self, state: AgentState, items: list[DirectedImage]) -> _DownloadedAhead:
        """Download and verify install-on-consent images now, so consent installs at once.

        A campaign in "download now, install on consent" mode marks its images;
        the download needs no precondition (nothing is written to any slot), the
        install waits for all of them. The install later finds the verified file
        (or the delta) in ``downloads/`` and fetches nothing; a download that
        fails here is retried at the next poll, and one that fails its signed
        hashes is an attack like any other.
        """
        ahead = _DownloadedAhead()
        for item in items:
            try:
                if item.delta is not None:
                    self.downloads.target(item.delta, f"{item.delta.hashes['sha256']}.delta")
                    what = f"delta of {item.delta.length} bytes"
                else:
                    self.downloads.image(item)
                    what = f"image of {item.target.length} bytes"
            except AttackDetected as exc:
                self.primary.note_attack(state, str(exc))
                self.say(f"REFUSED download of {item.target.path} for {item.ecu_serial}: {exc}")
                ahead.attack = True
                continue
            except VerificationFailure as exc:
                self.say(f"download of {item.target.path} for {item.ecu_serial} postponed: {exc}")
                continue
            ahead.held[item.ecu_serial] = f"{what} downloaded and verified"
            self.say(f"{item.ecu_serial}: {what} for {item.target.path} downloaded ahead, verified")
        return ahead

    def _downloads_in_use(self, state: AgentState, todo: list[DirectedImage]) -> set[str]:
        """The sha256s whose files in ``downloads/`` a directed image or the journal still needs."""
        names = {item.sha256 for item in todo}
        names |= {item.delta.hashes["sha256"] for item in todo if item.delta is not None}
        if state.journal is not None:
            names |= {state.journal.sha256, state.journal.delta_sha256}
        return names - {""}

    def install(
        self, state: AgentState, item: DirectedImage, verified: VerifiedUpdate
    ) -> InstallOutcome:
        """Install one verified, directed image on its ECU."""
        if item.ecu_serial == self.config.primary.ecu_serial:
            return self.primary.install(state, item)
        return self.delivery.deliver(state, item, verified)

    def _before_update(self, state: AgentState, serial: str) -> EcuBeforeUpdate:
        hardware_id = self.config.ecu_serials[serial]
        counter = state.ecu(serial).release_counter
        if serial == self.config.primary.ecu_serial:
            sha256 = self.primary.running_image(state).sha256
            return EcuBeforeUpdate(hardware_id, counter, sha256, self.primary.takes_delta)
        sec = self.secondaries[serial]
        try:
            return EcuBeforeUpdate(hardware_id, counter, sec.installed_sha256(), sec.takes_deltas())
        except SecondaryError as exc:
            self.say(f"secondary {serial} cannot tell what it runs: {exc}")
            return EcuBeforeUpdate(hardware_id, counter)

    def _record(
        self, state: AgentState, item: DirectedImage, outcome: InstallOutcome
    ) -> InstallOutcome:
        """An outcome that ends without touching a slot, kept for the primary's next report."""
        if item.ecu_serial == self.config.primary.ecu_serial:
            self.primary.record(state, outcome)
        self.say(f"{item.ecu_serial}: {outcome.result} {item.target.path}: {outcome.detail}")
        return outcome

    def run_forever(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set (SIGTERM), with jitter so fleets don't poll in lockstep."""
        interval = self.config.agent.poll_interval
        while not stop.is_set():
            try:
                self.run_cycle()
            except (UptakeError, OSError) as exc:
                log.error("update cycle failed: %s; retrying at the next poll", exc)
            except Exception:  # a bug: keep the traceback for the report, keep the service up
                log.exception("update cycle failed unexpectedly; retrying at the next poll")
            jitter = interval * self.config.agent.poll_jitter
            stop.wait(interval + random.uniform(-jitter, jitter))


__all__ = ["Agent", "AgentError"]
