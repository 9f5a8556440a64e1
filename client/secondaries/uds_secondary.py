"""A secondary ECU reached over CAN with UDS (ISO 14229 on ISO-TP).

The ECU does the Uptane work itself, as secondary firmware would: it keeps
its own key and trusted director root, verifies the director metadata the
primary downloads into its metadata region (partial verification) in its
check-dependencies routine, and signs its own version reports, which the
primary reads from DID 0xF1A0 and forwards unchanged.

Configuration (``[[secondaries]]`` with ``transport = "uds"``), ``options``:

* ``interface`` / ``channel``: python-can bus, e.g. ``"socketcan"`` / ``"can0"``;
* ``request_id`` / ``response_id`` (default 0x7E0 / 0x7E8), ``can_fd`` (false);
* ``security_secret``: hex secret of the HMAC seed/key algorithm, or
  ``key_algorithm = "package.module:factory"`` returning a ``(level, seed) -> key`` callable;
* ``erase_timeout`` (60 s), ``request_timeout`` (2 s).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import Any

import can

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
from signing.manifest import InstallOutcome, ManifestError, SignedEnvelope


def _key_algorithm(options: Mapping[str, Any]) -> KeyAlgorithm | None:
    if "key_algorithm" in options:
        module, _, attr = str(options["key_algorithm"]).partition(":")
        factory = getattr(importlib.import_module(module), attr)
        algorithm: KeyAlgorithm = factory()
        return algorithm
    if "security_secret" in options:
        return HmacKeyAlgorithm(bytes.fromhex(str(options["security_secret"])))
    return None


def uds_config(options: Mapping[str, Any]) -> UdsConfig:
    return UdsConfig(
        addressing=UdsAddressing(
            request_id=int(options.get("request_id", 0x7E0)),
            response_id=int(options.get("response_id", 0x7E8)),
            can_fd=bool(options.get("can_fd", False)),
        ),
        timeouts=UdsTimeouts(
            request=float(options.get("request_timeout", 2.0)),
            erase=float(options.get("erase_timeout", 60.0)),
        ),
        key_algorithm=_key_algorithm(options),
    )


class UdsSecondary(Secondary):
    def __init__(
        self,
        ecu_serial: str,
        hardware_id: str,
        options: Mapping[str, Any],
        bus: can.BusABC | None = None,
    ) -> None:
        self.ecu_serial, self.hardware_id = ecu_serial, hardware_id
        self._options = dict(options)
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
                interface=self._options.get("interface", "socketcan"),
                channel=self._options.get("channel", "can0"),
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
            return InstallOutcome(update.filepath, "refused", str(exc))
        except FlashError as exc:
            return InstallOutcome(update.filepath, "failed", f"{exc.step}: {exc}")
        finally:
            flasher.close()
        return InstallOutcome(update.filepath, "installed")
