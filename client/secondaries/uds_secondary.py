"""A secondary ECU reached over CAN with UDS (ISO 14229 on ISO-TP).

The ECU does the Uptane work itself, as secondary firmware would: it keeps
its own key and trusted director root, verifies the director metadata the
primary downloads into its metadata region (partial verification) in its
check-dependencies routine, and signs its own version reports, which the
primary reads from DID 0xF1A0 and forwards unchanged.

Configuration: ``[[secondaries]]`` with ``transport = "uds"``, whose
``options`` are :class:`client.config.UdsOptions` (typed and checked when the
configuration loads): the python-can ``interface`` and ``channel``, the
``request_id``/``response_id`` pair, ``can_fd``, the seed/key algorithm
(``security_secret`` or ``key_algorithm``) and the timeouts.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import can

from client.config import UdsOptions
from client.secondaries.base import Secondary, SecondaryError, SecondaryUpdate
from client.secondaries.flashing import DependencyCheckFailed, FlashError
from client.secondaries.metadata_bundle import MetadataBundle
from client.secondaries.uds import (
    HmacKeyAlgorithm,
    KeyAlgorithm,
    UdsAddressing,
    UdsConfig,
    UdsFlasher,
    UdsTimeouts,
)
from signing.manifest import InstallOutcome, InstallResult, ManifestError, SignedEnvelope


def _key_algorithm(options: UdsOptions) -> KeyAlgorithm | None:
    if options.key_algorithm:
        module, _, attr = options.key_algorithm.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
            algorithm: KeyAlgorithm = factory()
        except Exception as exc:  # an integrator's module: whatever it raises, say where
            raise SecondaryError(
                f"key_algorithm {options.key_algorithm!r}: {type(exc).__name__}: {exc}"
            ) from exc
        return algorithm
    if options.security_secret:
        return HmacKeyAlgorithm(bytes.fromhex(options.security_secret))
    return None


def uds_config(options: UdsOptions) -> UdsConfig:
    return UdsConfig(
        addressing=UdsAddressing(
            request_id=options.request_id,
            response_id=options.response_id,
            can_fd=options.can_fd,
        ),
        timeouts=UdsTimeouts(request=options.request_timeout, erase=options.erase_timeout),
        key_algorithm=_key_algorithm(options),
    )


class UdsSecondary(Secondary):
    def __init__(
        self,
        ecu_serial: str,
        hardware_id: str,
        options: UdsOptions,
        bus: can.BusABC | None = None,
    ) -> None:
        self.ecu_serial, self.hardware_id = ecu_serial, hardware_id
        self._options = options
        self._bus = bus
        self._config = uds_config(options)
        # the last report read: what the ECU runs does not change until we flash it, and each
        # read costs CAN time and one of the ECU's report counters
        self._last_report: SignedEnvelope | None = None

    def _flasher(self) -> UdsFlasher:
        try:
            if self._bus is not None:
                return UdsFlasher(self._bus, self._config)
            bus = can.Bus(
                interface=self._options.interface,
                channel=self._options.channel,
                fd=self._config.addressing.can_fd,
            )
            return UdsFlasher(bus, self._config, owns_bus=True)
        except (can.CanError, OSError, ValueError) as exc:
            raise SecondaryError(
                f"secondary {self.ecu_serial}: cannot open its CAN bus: {exc}"
            ) from exc

    def version_report(self) -> SignedEnvelope:
        flasher = self._flasher()
        try:
            raw = flasher.read_version_report(os.urandom(8))
        except FlashError as exc:
            raise SecondaryError(f"secondary {self.ecu_serial}: {exc.step}: {exc}") from exc
        finally:
            flasher.close()
        try:
            envelope = SignedEnvelope.from_bytes(raw, f"ECU report of {self.ecu_serial}")
            report = envelope.ecu_report()
        except ManifestError as exc:
            raise SecondaryError(
                f"secondary {self.ecu_serial}: unreadable version report: {exc}"
            ) from exc
        if report.ecu_serial != self.ecu_serial:
            raise SecondaryError(
                f"secondary {self.ecu_serial} answered with a report of {report.ecu_serial}"
            )
        self._last_report = envelope
        return envelope

    def installed_sha256(self) -> str:
        report = self._last_report or self.version_report()
        return report.ecu_report().installed_image.hashes.get("sha256", "")

    def takes_deltas(self) -> bool:
        return True  # if it declares the capability (install_delta asks it)

    def install_delta(
        self, update: SecondaryUpdate, delta: Path, scratch: Path, base_sha256: str
    ) -> InstallOutcome | None:
        """Send the delta as a sequential patch the ECU applies (:mod:`.uds_delta`), or None."""
        from client.secondaries.uds_delta import DeltaNotUsable, install_patch

        self._last_report = None  # whatever happens next, what the ECU runs may change
        flasher = self._flasher()
        try:
            result = (update.length, bytes.fromhex(update.sha256))
            return install_patch(flasher, update, delta, scratch, base_sha256, result)
        except DeltaNotUsable:
            return None
        except FlashError:
            return None  # the old bank still runs: the full image goes instead
        finally:
            flasher.close()

    def install(self, update: SecondaryUpdate) -> InstallOutcome:
        bundle = MetadataBundle(
            update.filepath, update.director_targets, update.director_roots
        ).encode()
        self._last_report = None  # whatever happens next, the ECU's state changes
        flasher = self._flasher()
        try:
            with open(update.image_path, "rb") as image:
                flasher.flash(image, os.fstat(image.fileno()).st_size, metadata=bundle)
        except DependencyCheckFailed as exc:
            return InstallOutcome(update.filepath, InstallResult.REFUSED, str(exc))
        except FlashError as exc:
            return InstallOutcome(update.filepath, InstallResult.FAILED, f"{exc.step}: {exc}")
        finally:
            flasher.close()
        return InstallOutcome(update.filepath, InstallResult.INSTALLED)
