"""Delivery to secondaries: the verified image and metadata, handed over for their own checks.

For each image directed to a secondary, :meth:`SecondaryDelivery.deliver`:

1. gets the full image, verified against the image repository: rebuilt from
   a delta and the image the secondary runs, when the primary can read that
   image (:meth:`~client.secondaries.base.Secondary.installed_image_path`)
   and the deltas role has one (a bad delta costs nothing but the download
   of the full image), else downloaded (:mod:`client.downloads`);
2. hands the secondary that image, the director targets metadata exactly as
   full verification verified it, and the director root chain
   (:class:`~client.verification.VerifiedUpdate`), so the secondary can run
   partial verification itself and follow a key rotation;
3. records the secondary's new release counter when it installed.

The secondary signs its own version reports; the primary forwards them and
cannot forge what a secondary says.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from client.delta_apply import DeltaError, apply_delta_file, read_delta_header
from client.downloads import VerifiedDownloads
from client.secondaries.base import Secondary, SecondaryError, SecondaryUpdate
from client.state import AgentState, StateStore
from client.verification import DirectedImage, VerifiedUpdate
from signing.exceptions import (
    AttackDetected,
    ConfigurationFailure,
    TransientFailure,
    VerificationFailure,
)
from signing.manifest import InstallOutcome, InstallResult


class SecondaryDelivery:
    """Gets verified images to secondaries (see module docstring)."""

    def __init__(
        self,
        secondaries: Mapping[str, Secondary],
        downloads: VerifiedDownloads,
        store: StateStore,
        note_attack: Callable[[AgentState, str], None],
        say: Callable[[str], None],
    ) -> None:
        self._secondaries = secondaries
        self._downloads = downloads
        self._store = store
        self._note_attack = note_attack
        self._say = say

    def deliver(
        self, state: AgentState, item: DirectedImage, verified: VerifiedUpdate
    ) -> InstallOutcome:
        """Get ``item`` installed on its secondary; the outcome says how that went."""
        sec = self._secondaries[item.ecu_serial]
        outcome = self._by_delta_on_the_ecu(state, sec, item, verified)
        path = None
        if outcome is None:
            try:
                path = self._rebuilt_from_delta(state, sec, item) or self._downloads.image(item)
            except VerificationFailure as exc:
                return self._refused(state, item, exc)
            try:
                outcome = sec.install(self._update(item, verified, path))
            except SecondaryError as exc:
                outcome = InstallOutcome(item.target.path, InstallResult.FAILED, str(exc))
        self._say(
            f"secondary {sec.ecu_serial}: {outcome.result} {item.target.path}"
            + (f" ({outcome.detail})" if outcome.detail else "")
        )
        if outcome.result is InstallResult.INSTALLED:
            state.ecu(sec.ecu_serial).release_counter = item.custom.release_counter
            self._store.save(state)
            if path is not None:
                path.unlink(missing_ok=True)
        return outcome

    @staticmethod
    def _update(item: DirectedImage, verified: VerifiedUpdate, image: Path) -> SecondaryUpdate:
        return SecondaryUpdate(
            item.target.path, verified.director_targets, image, verified.director_roots,
            item.target.length, item.sha256,
        )  # fmt: skip

    def _by_delta_on_the_ecu(
        self, state: AgentState, sec: Secondary, item: DirectedImage, verified: VerifiedUpdate
    ) -> InstallOutcome | None:
        """The ECU applies the verified delta itself (:mod:`client.secondaries.uds_delta`), or None.

        Only for secondaries whose image the primary cannot read: those it can
        get the rebuilt full image instead (:meth:`_rebuilt_from_delta`).
        """
        delta = item.delta
        if delta is None or sec.installed_image_path() is not None:
            return None
        try:
            patch = self._downloads.path(f"{delta.hashes['sha256']}.delta")
            scratch = self._downloads.path(f"{delta.hashes['sha256']}.ecu-patch")
            self._downloads.target(delta, patch.name)
        except VerificationFailure as exc:
            if isinstance(exc, AttackDetected):
                self._note_attack(state, str(exc))
            self._say(f"delta for {sec.ecu_serial} not used ({exc}): sending the full image")
            return None
        try:
            base = sec.installed_sha256()
            outcome = sec.install_delta(self._update(item, verified, patch), patch, scratch, base)
        except SecondaryError as exc:
            self._say(f"delta for {sec.ecu_serial} not used ({exc}): sending the full image")
            return None
        finally:
            patch.unlink(missing_ok=True)
            scratch.unlink(missing_ok=True)
        if outcome is None:
            self._say(f"{sec.ecu_serial} takes no patch for this delta: sending the full image")
        return outcome

    def _refused(
        self, state: AgentState, item: DirectedImage, exc: VerificationFailure
    ) -> InstallOutcome:
        if isinstance(exc, TransientFailure):
            detail = f"download interrupted ({exc}); it resumes at the next poll"
            outcome = InstallOutcome(item.target.path, InstallResult.POSTPONED, detail)
        elif isinstance(exc, ConfigurationFailure):
            detail = f"configuration error: {exc}"
            outcome = InstallOutcome(item.target.path, InstallResult.FAILED, detail)
        else:
            self._note_attack(state, str(exc))
            outcome = InstallOutcome(item.target.path, InstallResult.REFUSED, str(exc))
        self._say(f"{item.ecu_serial}: {outcome.result} {item.target.path}: {outcome.detail}")
        return outcome

    def _rebuilt_from_delta(
        self, state: AgentState, sec: Secondary, item: DirectedImage
    ) -> Path | None:
        """The full image, rebuilt from ``item.delta`` and the image the secondary runs, or None.

        The secondary then gets (and checks) the full image as always, so a
        bad delta costs nothing but the fallback download.
        """
        base = sec.installed_image_path()
        delta = item.delta
        if base is None or delta is None:
            return None
        try:
            patch = self._downloads.path(f"{delta.hashes['sha256']}.delta")
            result = self._downloads.path(item.sha256)
        except AttackDetected as exc:  # a hash that is no file name
            self._note_attack(state, str(exc))
            return None
        try:
            self._downloads.target(delta, patch.name)
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
                self._note_attack(state, str(exc))
            self._say(f"delta for {sec.ecu_serial} refused ({exc}): falling back to the full image")
            return None
        finally:
            patch.unlink(missing_ok=True)
        self._say(
            f"rebuilt {item.target.path} for {sec.ecu_serial} from a {delta.length}-byte delta "
            f"instead of downloading {item.target.length} bytes, sha256 verified"
        )
        return result
