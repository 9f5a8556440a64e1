"""A UDS ECU with an A/B bootloader, simulated on a python-can bus.

The simulator is the UDS *server* side of :mod:`client.secondaries.uds`:
can-isotp carries the requests, ``udsoncan.Request``/``Response`` parse and
build them, and this module only implements the ECU's behaviour:

* two flash banks (files ``bank-0.bin`` and ``bank-1.bin``) and a state file
  ``state.json`` (active bank, each bank's version/length/CRC, the bank on
  trial), all in the directory given to it; the state file is replaced
  atomically, bank files are written in place as flash is, so killing the
  simulator mid-transfer (``power loss``) leaves exactly what a real ECU
  would have: a half-written inactive bank and an untouched active one;
* a programming session guarded by seed/key security access;
* erase of the inactive bank (answering 0x78 "response pending" while it
  lasts), RequestDownload/TransferData/RequestTransferExit into it, with the
  block counter wrapping 0xFF -> 0x00 and a repeated counter accepted (the
  tester resends a block whose answer was lost);
* RequestDownload to :data:`~client.secondaries.uds.METADATA_ADDRESS` stores a
  metadata blob in RAM (director metadata for Uptane partial verification);
* RequestDownload to :data:`~client.secondaries.uds.PATCH_ADDRESS` receives a
  sequential patch (:mod:`client.secondaries.ecu_patch`) and applies it block
  by block from the active bank into the erased inactive bank, in the bounded
  RAM of :data:`~client.secondaries.ecu_patch.RAM_BOUND` plus one block; the
  capability is declared in DID 0xF1A3 (``EcuConfig.patch_limits``; ``None``
  for an ECU that takes full images only). Check-dependencies then carries the
  expected sha256 and answers with the CRC-32 of what it verified;
* routine 0xFF01 (check programming dependencies): the written image must
  have the CRC-32 the tester sends, then a pluggable
  :data:`DependencyCheck` ``(metadata, image) -> (ok, reason)`` decides (the
  default accepts; the Uptane layer plugs partial verification in);
* ECUReset boots the bank on trial if it passes the :data:`BootCheck`
  (default: the CRC matches and the vector table is not erased flash),
  otherwise falls back to the previous bank;
* DIDs: identification (F189, F18C, F191), the running image (F1A2), the
  Uptane version report (F1A0, from a pluggable :data:`VersionReporter`), the
  report nonce (F1A1, written by the primary) and any extra DIDs.

Faults (:class:`EcuFaults`): power loss when a given fraction of an image
download has arrived (the ECU stops dead and loses RAM; :meth:`power_on`
restarts it from its files), a mute ECU, or one that goes mute after a number
of requests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import secrets
import struct
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import can
import isotp
from udsoncan import MemoryLocation
from udsoncan.Request import Request
from udsoncan.Response import Response
from udsoncan.services.DiagnosticSessionControl import DiagnosticSessionControl
from udsoncan.services.ECUReset import ECUReset
from udsoncan.services.ReadDataByIdentifier import ReadDataByIdentifier
from udsoncan.services.RequestDownload import RequestDownload
from udsoncan.services.RequestTransferExit import RequestTransferExit
from udsoncan.services.RoutineControl import RoutineControl
from udsoncan.services.SecurityAccess import SecurityAccess
from udsoncan.services.TesterPresent import TesterPresent
from udsoncan.services.TransferData import TransferData
from udsoncan.services.WriteDataByIdentifier import WriteDataByIdentifier

from client.secondaries.ecu_patch import EcuPatchLimits, PatchApplier, PatchError
from client.secondaries.uds import (
    APPLICATION_ADDRESS,
    DID_ACTIVE_IMAGE,
    DID_DELTA_CAPABILITY,
    DID_ECU_SERIAL,
    DID_FINGERPRINT,
    DID_HARDWARE_NUMBER,
    DID_REPORT_NONCE,
    DID_SOFTWARE_VERSION,
    DID_VERSION_REPORT,
    METADATA_ADDRESS,
    PATCH_ADDRESS,
    ROUTINE_CHECK_DEPENDENCIES,
    ROUTINE_ERASE,
    SESSION_DEFAULT,
    SESSION_PROGRAMMING,
    HmacKeyAlgorithm,
    KeyAlgorithm,
    UdsAddressing,
    open_isotp_stack,
)
from signing.atomic_file import write_atomic

_log = logging.getLogger(__name__)

SIMULATOR_SECRET = b"uptake-hil-simulator-secret"
"""The seed/key secret of simulated ECUs (use ``HmacKeyAlgorithm(SIMULATOR_SECRET)``)."""

_Code = Response.Code
_METADATA_MAX = 256 * 1024
_EXTENDED_SESSION = 0x03


@dataclass(frozen=True)
class EcuStatus:
    """What the ECU knows about itself (given to the version reporter)."""

    serial: str
    hardware: str
    active_bank: int
    version: str
    length: int
    crc32: int
    nonce: bytes
    last_boot_failure: str | None


DependencyCheck = Callable[[bytes, bytes], tuple[bool, str]]
"""``(metadata, image) -> (ok, reason)``: may the written image be booted?"""
VersionReporter = Callable[[EcuStatus], bytes]
"""Produces the bytes of DID 0xF1A0 (the Uptane ECU version report)."""
BootCheck = Callable[[bytes], bool]
"""Does this image boot? (Called on the bank on trial at reset.)"""


def accept_all(metadata: bytes, image: bytes) -> tuple[bool, str]:
    """Default dependency check: the CRC was already checked, nothing more."""
    return True, "ok"


def json_version_report(status: EcuStatus) -> bytes:
    """Default version report: the installed image as JSON (unsigned)."""
    return json.dumps(
        {
            "ecu_serial": status.serial,
            "hardware_id": status.hardware,
            "active_bank": status.active_bank,
            "version": status.version,
            "length": status.length,
            "crc32": f"{status.crc32:08x}",
            "nonce": status.nonce.hex(),
            "last_boot_failure": status.last_boot_failure,
        },
        sort_keys=True,
    ).encode()


def vector_table_not_erased(image: bytes) -> bool:
    """Default boot check: an image starting with erased flash (0xFF) cannot boot."""
    return len(image) >= 8 and image[:8] != b"\xff" * 8


@dataclass
class EcuFaults:
    """Faults of the ECU itself (bus faults live on its :class:`~hil.can_bus.SimulatedCanBus`)."""

    power_loss_at: float | None = None
    """Fraction (0..1) of an image download after which power is lost (once)."""
    mute: bool = False
    mute_after_requests: int | None = None


@dataclass
class EcuConfig:
    addressing: UdsAddressing = field(default_factory=UdsAddressing)
    serial: str = "SIM-ECU-0001"
    hardware: str = "sim-ecu-v1"
    security_level: int = 0x01
    key_algorithm: KeyAlgorithm = field(default_factory=lambda: HmacKeyAlgorithm(SIMULATOR_SECRET))
    max_security_attempts: int = 3
    lockout_seconds: float = 1.0
    application_address: int = APPLICATION_ADDRESS
    bank_size: int = 2 * 1024 * 1024
    max_block_length: int = 0x0FFF
    erase_seconds: float = 0.0
    pending_interval: float = 0.5
    """Seconds between 0x78 answers during a long routine."""
    boot_seconds: float = 0.05
    factory_version: str = "1.0.0"
    factory_image: bytes = b"\x00\x20\x00\x20" + bytes(range(256)) * 16
    dependency_check: DependencyCheck = accept_all
    version_report: VersionReporter = json_version_report
    boot_check: BootCheck = vector_table_not_erased
    extra_dids: dict[int, bytes] = field(default_factory=dict)
    faults: EcuFaults = field(default_factory=EcuFaults)
    patch_limits: EcuPatchLimits | None = field(default_factory=EcuPatchLimits)
    """Sequential patches this ECU applies (None: full images only)."""


class _PowerLost(Exception):
    pass


class _Negative(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@dataclass
class _Download:
    address: int
    size: int
    received: int = 0
    counter: int = 1
    last_counter: int | None = None
    patch: PatchApplier | None = None
    written: int = 0  # bytes of the inactive bank a patch has written


class UdsEcuSimulator:
    """One simulated ECU serving UDS on ``bus`` with its state in ``state_dir``.

    Use as a context manager or call :meth:`power_on` / :meth:`power_off`.
    """

    def __init__(
        self, bus: can.BusABC, state_dir: Path | str, config: EcuConfig | None = None
    ) -> None:
        self.bus = bus
        self.state_dir = Path(state_dir)
        self.config = config or EcuConfig()
        self.power_lost = threading.Event()
        self.requests_served = 0
        self.programming_bytes = 0  # image or patch bytes received over the bus
        self.patches_applied = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._stack: isotp.TransportLayer | None = None
        self._state: dict[str, Any] = {}
        self._reset_requested = False
        self._init_storage()
        self._reset_ram()

    # -- power ----------------------------------------------------------------

    def power_on(self) -> None:
        if self._thread is not None:
            return
        self.power_lost.clear()
        self._reset_ram()
        self._state = self._load_state()
        self._stack, _ = open_isotp_stack(self.bus, self.config.addressing, ecu_side=True)
        self._stack.start()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._serve, name=f"uds-ecu-{self.config.serial}", daemon=True
        )
        self._thread.start()

    def power_off(self) -> None:
        """Cut power: stop answering at once, lose RAM, keep flash."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        if self._stack is not None:
            self._stack.stop()
            self._stack = None

    def __enter__(self) -> UdsEcuSimulator:
        self.power_on()
        return self

    def __exit__(self, *exc: object) -> None:
        self.power_off()

    def wait_power_lost(self, timeout: float) -> bool:
        return self.power_lost.wait(timeout)

    # -- state ----------------------------------------------------------------

    @property
    def status(self) -> EcuStatus:
        state = self._load_state()
        active = int(state["active"])
        bank = state["banks"][active] or {"version": "none", "length": 0, "crc32": 0}
        return EcuStatus(
            serial=self.config.serial,
            hardware=self.config.hardware,
            active_bank=active,
            version=str(bank["version"]),
            length=int(bank["length"]),
            crc32=int(bank["crc32"]),
            nonce=self._nonce,
            last_boot_failure=state.get("last_boot_failure"),
        )

    def read_bank(self, bank: int, length: int) -> bytes:
        with open(self._bank_path(bank), "rb") as f:
            return f.read(length)

    def _bank_path(self, bank: int) -> Path:
        return self.state_dir / f"bank-{bank}.bin"

    def _init_storage(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        state_path = self.state_dir / "state.json"
        if state_path.exists():
            self._state = self._load_state()
            return
        image = self.config.factory_image
        for bank in (0, 1):
            with open(self._bank_path(bank), "wb") as f:
                f.truncate(0)
                f.write(b"\xff" * self.config.bank_size)
        with open(self._bank_path(0), "r+b") as f:
            f.write(image)
            f.flush()
            os.fsync(f.fileno())
        self._state = {
            "active": 0,
            "pending": None,
            "banks": [
                {
                    "version": self.config.factory_version,
                    "length": len(image),
                    "crc32": zlib.crc32(image),
                },
                None,
            ],
            "last_boot_failure": None,
        }
        self._save_state()

    def _load_state(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads((self.state_dir / "state.json").read_text())
        return state

    def _save_state(self) -> None:
        write_atomic(self.state_dir / "state.json", json.dumps(self._state, indent=1).encode())

    def _reset_ram(self) -> None:
        self._session = SESSION_DEFAULT
        self._unlocked = False
        self._seed: bytes | None = None
        self._failed_keys = 0
        self._locked_until = 0.0
        self._download: _Download | None = None
        self._metadata = b""
        self._fingerprint: str | None = None
        self._erased = False
        self._written_length: int | None = None
        self._nonce = b""

    # -- request loop -----------------------------------------------------------

    def _serve(self) -> None:
        stack = self._stack
        assert stack is not None
        while not self._stop.is_set():
            payload = stack.recv(block=True, timeout=0.05)
            if payload is None:
                continue
            faults = self.config.faults
            self.requests_served += 1
            if faults.mute or (
                faults.mute_after_requests is not None
                and self.requests_served > faults.mute_after_requests
            ):
                continue
            try:
                response = self._answer(bytes(payload))
            except _PowerLost:
                self._lose_power()
                return
            except Exception:  # a simulator bug must not look like a mute ECU: log it
                _log.exception(
                    "%s: request %s failed", self.config.serial, bytes(payload[:8]).hex()
                )
                continue
            if response is not None:
                self._send(response)
            if self._reset_requested:
                self._reboot()

    def _send(self, response: Response) -> None:
        if self._stack is None:
            return
        # A failed send is the tester's problem: it times out and retries, as with a real ECU.
        with contextlib.suppress(isotp.BlockingSendFailure):
            self._stack.send(response.get_payload(), send_timeout=2.0)

    def _lose_power(self) -> None:
        self._stop.set()
        stack, self._stack = self._stack, None
        self._thread = None
        if stack is not None:
            stack.stop()
        self._reset_ram()
        self.power_lost.set()

    def _answer(self, payload: bytes) -> Response | None:
        self._reset_requested = False
        request = Request.from_payload(payload)
        service = request.service
        if service is None:
            return None  # unknown service id: udsoncan cannot even name it; stay silent
        handler = self._handlers().get(service)
        try:
            if handler is None:
                raise _Negative(_Code.ServiceNotSupported)
            data = handler(request)
        except _Negative as negative:
            return Response(service=service, code=negative.code)
        except OSError as exc:  # the flash (a file here) failed, as flash can
            _log.error("%s: flash access failed: %s", self.config.serial, exc)
            return Response(service=service, code=_Code.GeneralProgrammingFailure)
        if request.suppress_positive_response:
            return None
        return Response(service=service, code=_Code.PositiveResponse, data=data)

    def _handlers(self) -> Mapping[type, Callable[[Request], bytes]]:
        return {
            DiagnosticSessionControl: self._session_control,
            TesterPresent: lambda request: bytes([request.subfunction or 0]),
            SecurityAccess: self._security_access,
            ReadDataByIdentifier: self._read_dids,
            WriteDataByIdentifier: self._write_did,
            RoutineControl: self._routine_control,
            RequestDownload: self._request_download,
            TransferData: self._transfer_data,
            RequestTransferExit: self._transfer_exit,
            ECUReset: self._ecu_reset,
        }

    # -- services ---------------------------------------------------------------

    def _session_control(self, request: Request) -> bytes:
        session = request.subfunction
        if session not in (SESSION_DEFAULT, SESSION_PROGRAMMING, _EXTENDED_SESSION):
            raise _Negative(_Code.SubFunctionNotSupported)
        # Entering a session (even the active one again) starts it afresh: locked,
        # no transfer in progress. A tester restarting after a failure relies on it.
        self._unlocked = False
        self._download = None
        self._erased = False
        self._session = session
        # P2 server max 50 ms, P2* server max 5 s (in 10 ms units).
        return bytes([session]) + struct.pack(">HH", 50, 500)

    def _security_access(self, request: Request) -> bytes:
        if self._session == SESSION_DEFAULT:
            raise _Negative(_Code.ServiceNotSupportedInActiveSession)
        level = self.config.security_level
        sub = request.subfunction
        if sub == level:
            if time.monotonic() < self._locked_until:
                raise _Negative(_Code.RequiredTimeDelayNotExpired)
            self._seed = bytes(4) if self._unlocked else secrets.token_bytes(4)
            return bytes([sub]) + self._seed
        if sub == level + 1:
            if self._seed is None:
                raise _Negative(_Code.RequestSequenceError)
            expected = self.config.key_algorithm(level, self._seed)
            self._seed = None
            if request.data != expected:
                self._failed_keys += 1
                if self._failed_keys >= self.config.max_security_attempts:
                    self._failed_keys = 0
                    self._locked_until = time.monotonic() + self.config.lockout_seconds
                    raise _Negative(_Code.ExceedNumberOfAttempts)
                raise _Negative(_Code.InvalidKey)
            self._failed_keys = 0
            self._unlocked = True
            return bytes([sub])
        raise _Negative(_Code.SubFunctionNotSupported)

    def _did_value(self, did: int) -> bytes:
        status = self.status
        if did == DID_SOFTWARE_VERSION:
            return status.version.encode()
        if did == DID_ECU_SERIAL:
            return status.serial.encode()
        if did == DID_HARDWARE_NUMBER:
            return status.hardware.encode()
        if did == DID_FINGERPRINT:
            return (self._fingerprint or "").encode()
        if did == DID_ACTIVE_IMAGE:
            return struct.pack(">BII", status.active_bank, status.length, status.crc32)
        if did == DID_VERSION_REPORT:
            return self.config.version_report(status)
        if did == DID_REPORT_NONCE:
            return self._nonce
        if did == DID_DELTA_CAPABILITY and self.config.patch_limits is not None:
            limits = self.config.patch_limits
            return struct.pack(">BBI", 1, limits.max_dict_log, self.config.bank_size)
        if did in self.config.extra_dids:
            return self.config.extra_dids[did]
        raise _Negative(_Code.RequestOutOfRange)

    def _read_dids(self, request: Request) -> bytes:
        data = request.data or b""
        if not data or len(data) % 2:
            raise _Negative(_Code.IncorrectMessageLengthOrInvalidFormat)
        out = b""
        for offset in range(0, len(data), 2):
            did = int.from_bytes(data[offset : offset + 2], "big")
            out += did.to_bytes(2, "big") + self._did_value(did)
        return out

    def _write_did(self, request: Request) -> bytes:
        data = request.data or b""
        if len(data) < 3:
            raise _Negative(_Code.IncorrectMessageLengthOrInvalidFormat)
        did, value = int.from_bytes(data[:2], "big"), data[2:]
        if did == DID_REPORT_NONCE:
            self._nonce = value[:64]
        elif did == DID_FINGERPRINT:
            self._require_programming()
            self._fingerprint = value.decode("ascii", errors="replace")
        elif did in self.config.extra_dids:
            self.config.extra_dids[did] = value
        else:
            raise _Negative(_Code.RequestOutOfRange)
        return data[:2]

    def _require_programming(self) -> None:
        if self._session != SESSION_PROGRAMMING:
            raise _Negative(_Code.ServiceNotSupportedInActiveSession)
        if not self._unlocked:
            raise _Negative(_Code.SecurityAccessDenied)

    @property
    def _inactive_bank(self) -> int:
        return 1 - int(self._state["active"])

    def _routine_control(self, request: Request) -> bytes:
        data = request.data or b""
        if request.subfunction != 0x01 or len(data) < 2:
            raise _Negative(_Code.SubFunctionNotSupported)
        routine = int.from_bytes(data[:2], "big")
        echo = bytes([0x01]) + data[:2]
        self._require_programming()
        if routine == ROUTINE_ERASE:
            self._erase()
            return echo + b"\x00"
        if routine == ROUTINE_CHECK_DEPENDENCIES:
            record = data[2:]
            ok, reason = self._check_dependencies(record)
            if not ok:
                return echo + b"\x01" + reason.encode()[:200]
            if len(record) == 32:  # say what was verified: the tester then checks the boot by it
                bank = self._state["banks"][self._state["pending"]]
                return echo + b"\x00" + struct.pack(">I", int(bank["crc32"]))
            return echo + b"\x00"
        raise _Negative(_Code.RequestOutOfRange)

    def _erase(self) -> None:
        bank = self._inactive_bank
        self._download = None
        # The bank is invalid from the first erased byte on: record that first.
        self._state["banks"][bank] = None
        self._state["pending"] = None
        self._save_state()
        deadline = time.monotonic() + self.config.erase_seconds
        self._pending_answer(RoutineControl)
        while time.monotonic() < deadline:
            time.sleep(min(self.config.pending_interval, max(0.0, deadline - time.monotonic())))
            if self._stop.is_set():
                raise _PowerLost
            if time.monotonic() < deadline:
                self._pending_answer(RoutineControl)
        with open(self._bank_path(bank), "r+b") as f:
            f.write(b"\xff" * self.config.bank_size)
        self._erased = True
        self._written_length = None

    def _pending_answer(self, service: type) -> None:
        self._send(Response(service=service, code=_Code.RequestCorrectlyReceived_ResponsePending))

    def _check_dependencies(self, record: bytes) -> tuple[bool, str]:
        length = self._written_length
        if length is None:
            return False, "no image was downloaded"
        if len(record) not in (4, 32):
            return False, "expected the image CRC-32 (4 bytes) or sha256 (32 bytes)"
        image = self.read_bank(self._inactive_bank, length)
        crc = zlib.crc32(image)
        if len(record) == 32:  # after a patch: the tester knows the signed sha256, not the CRC
            if hashlib.sha256(image).digest() != record:
                return False, "the patched image's sha256 differs from the tester's"
        elif crc != int.from_bytes(record, "big"):
            expected = int.from_bytes(record, "big")
            return False, f"image CRC-32 {crc:08x} differs from the tester's {expected:08x}"
        ok, reason = self.config.dependency_check(self._metadata, image)
        if not ok:
            return False, reason
        bank = self._inactive_bank
        self._state["banks"][bank] = {
            "version": self._fingerprint or "unknown",
            "length": length,
            "crc32": crc,
        }
        self._state["pending"] = bank
        self._written_length = None
        self._save_state()
        return True, "ok"

    def _request_download(self, request: Request) -> bytes:
        data = request.data or b""
        if len(data) < 2:
            raise _Negative(_Code.IncorrectMessageLengthOrInvalidFormat)
        alfid = data[1]
        address_len, size_len = alfid & 0x0F, alfid >> 4
        if len(data) != 2 + address_len + size_len or data[0] != 0:
            raise _Negative(_Code.RequestOutOfRange)
        location = MemoryLocation.from_bytes(data[2 : 2 + address_len], data[2 + address_len :])
        self._require_programming()
        if self._download is not None:
            raise _Negative(_Code.ConditionsNotCorrect)
        patch = None
        if location.address == METADATA_ADDRESS:
            if location.memorysize > _METADATA_MAX:
                raise _Negative(_Code.RequestOutOfRange)
            self._metadata = b""
        elif location.address == PATCH_ADDRESS and self.config.patch_limits is not None:
            if not self._erased:
                raise _Negative(_Code.ConditionsNotCorrect)
            self._erased = False
            self._written_length = None
            patch = self._patch_applier(self.config.patch_limits)
        elif location.address == self.config.application_address:
            if location.memorysize > self.config.bank_size:
                raise _Negative(_Code.RequestOutOfRange)
            if not self._erased:
                raise _Negative(_Code.ConditionsNotCorrect)
            self._erased = False  # one download per erase, as flash needs
            self._written_length = None
        else:
            raise _Negative(_Code.RequestOutOfRange)
        self._download = _Download(address=location.address, size=location.memorysize, patch=patch)
        return bytes([0x20]) + struct.pack(">H", self.config.max_block_length)

    def _patch_applier(self, limits: EcuPatchLimits) -> PatchApplier:
        """Applies a patch from the active bank into the inactive one as blocks arrive."""
        active = int(self._state["active"])
        bank = self._state["banks"][active]
        length = int(bank["length"]) if bank else 0
        # the bootloader hashes its active image once per patch (flash reads, no RAM)
        base_sha = hashlib.sha256(self.read_bank(active, length)).digest()
        # RAM for the applier: the patch's LZMA2 dictionary, a piece of output, one block
        active_path = self._bank_path(active)

        def read_base(offset: int, size: int) -> bytes:
            with open(active_path, "rb") as f:
                f.seek(offset)
                return f.read(size)

        def write(data: bytes) -> None:
            download = self._download
            assert download is not None
            with open(self._bank_path(self._inactive_bank), "r+b") as f:
                f.seek(download.written)
                f.write(data)
            download.written += len(data)

        return PatchApplier(
            read_base,
            write,
            (length, base_sha),
            EcuPatchLimits(limits.max_dict_log, self.config.bank_size),
        )

    def _transfer_data(self, request: Request) -> bytes:
        download = self._download
        data = request.data or b""
        if download is None:
            raise _Negative(_Code.RequestSequenceError)
        if not data:
            raise _Negative(_Code.IncorrectMessageLengthOrInvalidFormat)
        counter, block = data[0], data[1:]
        if counter == download.last_counter and counter != download.counter:
            return bytes([counter])  # a repeat of the block just written: already there
        if counter != download.counter:
            raise _Negative(_Code.WrongBlockSequenceCounter)
        if (
            len(block) > self.config.max_block_length - 2
            or download.received + len(block) > download.size
        ):
            raise _Negative(_Code.TransferDataSuspended)
        if download.address != METADATA_ADDRESS:
            self.programming_bytes += len(block)
        if download.address == METADATA_ADDRESS:
            self._metadata += block
        elif download.patch is not None:
            self._apply_patch_block(download, block)
        else:
            self._write_image(download, block)
        download.received += len(block)
        download.last_counter = counter
        download.counter = (counter + 1) & 0xFF
        return bytes([counter])

    def _write_image(self, download: _Download, block: bytes) -> None:
        fraction = self.config.faults.power_loss_at
        threshold = None if fraction is None else math.ceil(download.size * fraction)
        cut = (
            len(block)
            if threshold is None
            else min(len(block), max(0, threshold - download.received))
        )
        with open(self._bank_path(self._inactive_bank), "r+b") as f:
            f.seek(download.received)
            f.write(block[:cut])
        if threshold is not None and download.received + cut >= threshold:
            self.config.faults.power_loss_at = None  # one power cut per fault plan
            raise _PowerLost

    def _apply_patch_block(self, download: _Download, block: bytes) -> None:
        """Feed one block to the patch applier; power may fail in the middle of patching."""
        assert download.patch is not None
        fraction = self.config.faults.power_loss_at
        threshold = None if fraction is None else math.ceil(download.size * fraction)
        if threshold is not None and download.received + len(block) >= threshold:
            download.patch.feed(block[: max(0, threshold - download.received)])
            self.config.faults.power_loss_at = None  # one power cut per fault plan
            raise _PowerLost
        try:
            download.patch.feed(block)
        except PatchError as exc:
            _log.warning("%s: patch refused: %s", self.config.serial, exc)
            self._download = None
            raise _Negative(_Code.GeneralProgrammingFailure) from None

    def _transfer_exit(self, request: Request) -> bytes:
        download = self._download
        if download is None or download.received != download.size:
            raise _Negative(_Code.RequestSequenceError)
        self._download = None
        if download.patch is not None:
            try:
                download.patch.finish()
            except PatchError as exc:
                _log.warning("%s: patch refused: %s", self.config.serial, exc)
                raise _Negative(_Code.GeneralProgrammingFailure) from None
            with open(self._bank_path(self._inactive_bank), "r+b") as f:
                os.fsync(f.fileno())
            self._written_length = download.written
            self.patches_applied += 1
        elif download.address != METADATA_ADDRESS:
            with open(self._bank_path(self._inactive_bank), "r+b") as f:
                os.fsync(f.fileno())
            self._written_length = download.size
        return b""

    def _ecu_reset(self, request: Request) -> bytes:
        if request.subfunction not in (0x01, 0x03):
            raise _Negative(_Code.SubFunctionNotSupported)
        self._reset_requested = True
        return bytes([request.subfunction])

    def _reboot(self) -> None:
        """Reset: RAM is lost, the bootloader boots the bank on trial or falls back."""
        time.sleep(self.config.boot_seconds)
        stack = self._stack
        if stack is not None:
            while stack.recv(block=False) is not None:
                pass  # requests sent while the ECU was rebooting are lost
        self._reset_ram()
        self._state = self._load_state()
        pending = self._state.get("pending")
        if pending is not None:
            bank = self._state["banks"][pending]
            image = self.read_bank(pending, int(bank["length"])) if bank else b""
            if bank and zlib.crc32(image) == int(bank["crc32"]) and self.config.boot_check(image):
                self._state["active"] = pending
                self._state["last_boot_failure"] = None
            else:
                self._state["last_boot_failure"] = (
                    f"bank {pending} did not boot; fell back to bank {self._state['active']}"
                )
            self._state["pending"] = None
            self._save_state()
