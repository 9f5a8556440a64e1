"""Reporting: the signed vehicle version manifest, sent only when it says something new.

A manifest is costly for everyone: each ECU signs its report (a UDS
secondary over CAN, with a counter it can never reuse), the primary signs
the whole, and the server verifies every signature. So :meth:`Reporter.report`
first decides, from unsigned facts, whether one is due:

* **something changed** since the server last acknowledged a manifest: the
  image the primary's bootloader boots, its ``attacks_detected``, its last
  install outcome, or what a secondary that can tell without signing
  (:meth:`client.secondaries.base.Secondary.status`) runs and reports; the
  cycle also says so when it delivered an image to a secondary;
* or the **heartbeat** is due (``agent.manifest_heartbeat`` seconds since
  the last acknowledged one), so the server knows the vehicle is alive.

Only then does it count, sign and send: the primary's report counter is
incremented and saved *before* signing (a counter is never signed twice),
each secondary signs its own report, and the manifest goes over the agent's
one HTTP client (:meth:`client.fetcher.ResumableFetcher.post`). When the
server accepts it, the primary's last install outcome is acknowledged
(cleared) and the digest of what was reported is kept. An idle poll thus
signs nothing and writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from securesystemslib.signer import Signer

from client.cycle_result import ManifestDelivery
from client.fetcher import HTTPConnectionError, ResumableFetcher
from client.secondaries.base import Secondary, SecondaryError
from client.state import AgentState, StateStore
from signing.manifest import EcuVersionReport, ImageInfo, VehicleManifest

log = logging.getLogger(__name__)

_TRANSIENT_STATUSES = (408, 429)


def _error_message(body: bytes) -> str:
    """The message of a JSON error body, or its start, printable."""
    try:
        message = json.loads(body)["error"]["message"]
        if isinstance(message, str):
            return message[:300]
    except (ValueError, KeyError, TypeError):
        pass
    return repr(body[:300])


class Reporter:
    """Builds, signs and sends the vehicle version manifest when one is due."""

    def __init__(
        self,
        *,
        vin: str,
        primary_serial: str,
        signer: Signer,
        secondaries: Sequence[Secondary],
        fetcher: ResumableFetcher,
        server_url: str,
        heartbeat: float,
        store: StateStore,
        running_image: Callable[[AgentState], ImageInfo],
        say: Callable[[str], None],
    ) -> None:
        self._vin = vin
        self._primary = primary_serial
        self._signer = signer
        self._secondaries = secondaries
        self._fetcher = fetcher
        self._url = f"{server_url.rstrip('/')}/api/v1/vehicles/{vin}/manifest"
        self._heartbeat = heartbeat
        self._store = store
        self._running_image = running_image
        self._say = say

    def digest(self, state: AgentState) -> str:
        """A digest of everything a manifest would say now, except the counters; signs nothing."""
        ecu = state.ecu(self._primary)
        content: dict[str, Any] = {
            self._primary: {
                "installed": self._running_image(state).to_dict(),
                "attacks_detected": ecu.attacks_detected,
                "last_install": ecu.last_install.to_dict() if ecu.last_install else None,
            }
        }
        for sec in self._secondaries:
            try:
                status = sec.status()
            except SecondaryError as exc:
                content[sec.ecu_serial] = f"unreadable: {exc}"
                continue
            content[sec.ecu_serial] = None if status is None else status.to_dict()
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def report(self, state: AgentState, *, changed: bool = False) -> tuple[ManifestDelivery, str]:
        """Send a manifest if one is due (see module docstring).

        ``changed`` says the cycle changed something the digest cannot see
        (an image delivered to a secondary). Returns what became of the
        manifest and, unless it was accepted or not needed, why.
        """
        digest = self.digest(state)
        if (
            not changed
            and digest == state.manifest_digest
            and time.time() - state.manifest_sent_at < self._heartbeat
        ):
            log.debug("vehicle state unchanged since the last manifest: not sending one")
            return ManifestDelivery.UNCHANGED, ""
        body = self.signed_manifest(state)
        try:
            answer = self._fetcher.post(self._url, body)
        except HTTPConnectionError as exc:
            problem = f"could not send the vehicle manifest: {exc}"
            self._say(problem)
            return ManifestDelivery.UNREACHABLE, problem
        if answer.status != 200:
            problem = f"server answered HTTP {answer.status}: {_error_message(answer.body)}"
            self._say(f"vehicle manifest not accepted: {problem}")
            transient = answer.status in _TRANSIENT_STATUSES or answer.status >= 500
            return (
                ManifestDelivery.UNREACHABLE if transient else ManifestDelivery.REFUSED
            ), problem
        state.ecu(self._primary).last_install = None  # acknowledged
        state.manifest_digest, state.manifest_sent_at = self.digest(state), time.time()
        self._store.save(state)
        self._say(
            f"reported: signed vehicle manifest ({len(body)} bytes, "
            f"{1 + len(self._secondaries)} ECU report(s)) accepted"
        )
        return ManifestDelivery.ACCEPTED, ""

    def signed_manifest(self, state: AgentState) -> bytes:
        """Count, sign and serialise a manifest now (the primary's counter is saved first)."""
        primary = state.ecu(self._primary)
        primary.report_counter += 1
        self._store.save(state)  # never sign the same counter twice
        reports = {
            self._primary: EcuVersionReport(
                self._primary,
                self._running_image(state),
                primary.report_counter,
                primary.attacks_detected,
                primary.last_install,
            ).sign(self._signer)
        }
        for sec in self._secondaries:
            try:
                reports[sec.ecu_serial] = sec.version_report()
            except SecondaryError as exc:
                self._say(f"secondary {sec.ecu_serial} did not report: {exc}")
        manifest = VehicleManifest(self._vin, self._primary, reports)
        return manifest.sign(self._signer).to_bytes()
