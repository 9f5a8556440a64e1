"""Flashing a secondary ECU with UDS (ISO 14229) over ISO-TP (ISO 15765-2) on CAN.

The primary is the UDS *client*; the ECU's bootloader is the *server*. One
:meth:`UdsFlasher.flash` runs the usual programming sequence, each step with
its own timeout and a name that failures carry (:class:`FlashError.step`):

=====================  =========================================================
step                   request
=====================  =========================================================
programming-session    0x10 0x02 DiagnosticSessionControl (programming)
security-access        0x27 seed/key with a pluggable :data:`KeyAlgorithm`
write-fingerprint      0x2E F184: the version being programmed (optional)
metadata-download      0x34/0x36/0x37 to :data:`METADATA_ADDRESS` (optional):
                       the Uptane director metadata the ECU checks
erase                  0x31 01 FF00 (the ECU answers 0x78 "pending" meanwhile)
request-download       0x34; the ECU's maxNumberOfBlockLength sizes the blocks
transfer-data          0x36 blocks, counter 1..0xFF then wrapping to 0x00; a block
                       whose answer is lost is sent again with the same counter
                       (ISO 14229-1 makes the server accept a repeated counter)
transfer-exit          0x37
check-dependencies     0x31 01 FF01 with the image CRC-32: the ECU checks the
                       image (and metadata) before it may boot it
ecu-reset              0x11 0x01 hard reset: the ECU boots the new bank
boot                   0x22 F1A2 until the ECU answers: it must run the new image
=====================  =========================================================

:meth:`UdsFlasher.flash_patch` programs by *delta* instead: the same
sequence, but the download goes to :data:`PATCH_ADDRESS` and carries a
sequential patch (:mod:`client.secondaries.ecu_patch`) that the ECU applies
from its active bank into the erased inactive bank as the blocks arrive;
check-dependencies then carries the expected image's sha256 (32 bytes), and
the ECU answers with the CRC-32 of what it verified. An ECU declares that it
can do this in :data:`DID_DELTA_CAPABILITY`.

Throughput: the flasher sends blocks as large as the ECU offers
(maxNumberOfBlockLength, up to 64 KiB, carried by ISO-TP's escape sequence
above 4095 bytes), with STmin 0 and no flow-control pauses (block size 0),
so that the per-block request/response turnaround is a small share of the
wire time (``bench/flash.py``).

ISO-TP and UDS framing come from ``can-isotp`` and ``udsoncan``; this module
only sequences the services and turns their exceptions into
:class:`~client.secondaries.flashing.FlashError`\\ s. The transport uses
``blocking_send=True`` so a request is on the wire (or has failed) before the
response timer starts. A bus that refuses frames (bus-off) does not kill the
ISO-TP threads: the frame is counted as lost and reported as a
:class:`TransportError` if the step then times out.

For Uptane the same connection reads and writes arbitrary DIDs
(:meth:`UdsFlasher.read_did`, :meth:`UdsFlasher.write_did`, codecs in
:class:`UdsConfig`), including the reserved :data:`DID_VERSION_REPORT`
(the ECU's signed version report, opaque bytes) and :data:`DID_REPORT_NONCE`.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import logging
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO

import can
import isotp
import udsoncan
from udsoncan import DidCodec, MemoryLocation
from udsoncan.client import Client
from udsoncan.connections import PythonIsoTpConnection
from udsoncan.exceptions import (
    InvalidResponseException,
    NegativeResponseException,
    TimeoutException,
    UnexpectedResponseException,
)

from client.secondaries.flashing import (
    DependencyCheckFailed,
    EcuFlasher,
    EcuIdentity,
    EcuRejected,
    FlashError,
    FlashTimeout,
    ImageDidNotBoot,
    ProgressCallback,
    SecurityAccessDenied,
    TransportError,
    VerificationFailed,
    crc32_of,
    read_exactly,
)

# Data identifiers (ISO 14229-1 annex C where standard, 0xF1A0.. reserved by Uptake).
DID_FINGERPRINT = 0xF184
"""Application software fingerprint: the version string being programmed."""
DID_SOFTWARE_VERSION = 0xF189
DID_ECU_SERIAL = 0xF18C
DID_HARDWARE_NUMBER = 0xF191
DID_VERSION_REPORT = 0xF1A0
"""Uptane ECU version report (opaque bytes, may be a few KiB)."""
DID_REPORT_NONCE = 0xF1A1
"""Uptane report counter/nonce the primary writes before reading a report."""
DID_ACTIVE_IMAGE = 0xF1A2
"""Running image: bank index (u8), length (u32), CRC-32 (u32), big-endian."""
DID_DELTA_CAPABILITY = 0xF1A3
"""Sequential patches the ECU applies: format (u8, 1), largest LZMA2 dictionary as log2 (u8),
bank size (u32). Absent (request out of range) when the ECU takes full images only."""

ROUTINE_ERASE = 0xFF00
ROUTINE_CHECK_DEPENDENCIES = 0xFF01

APPLICATION_ADDRESS = 0x00000000
METADATA_ADDRESS = 0xE0000000
"""RequestDownload target of the metadata region (director metadata, in RAM)."""
PATCH_ADDRESS = 0xD0000000
"""RequestDownload target of a sequential patch (applied into the erased inactive bank)."""

SESSION_DEFAULT = 0x01
SESSION_PROGRAMMING = 0x02
RESET_HARD = 0x01

_NRC_SECURITY = {0x33, 0x35, 0x36, 0x37}

KeyAlgorithm = Callable[[int, bytes], bytes]
"""``key = algorithm(level, seed)``: the ECU maker's seed/key function."""


class HmacKeyAlgorithm:
    """Seed/key by HMAC-SHA256 of the seed under a shared secret, truncated.

    Real ECUs use their maker's (often secret) algorithm; plug it in as any
    :data:`KeyAlgorithm`. This one is what the simulators use.
    """

    def __init__(self, secret: bytes, key_length: int = 4) -> None:
        self._secret = secret
        self._key_length = key_length

    def __call__(self, level: int, seed: bytes) -> bytes:
        digest = hmac.new(self._secret, bytes([level]) + seed, hashlib.sha256).digest()
        return digest[: self._key_length]


class AsciiCodec(DidCodec):
    """A variable-length ASCII DID (read as the whole remaining payload)."""

    def encode(self, *did_value: Any) -> bytes:
        return str(did_value[0]).encode("ascii")

    def decode(self, did_payload: bytes) -> str:
        return did_payload.decode("ascii", errors="replace").rstrip("\x00 ")

    def __len__(self) -> int:
        raise DidCodec.ReadAllRemainingData


class BytesCodec(DidCodec):
    """A variable-length opaque DID (bytes in, bytes out)."""

    def encode(self, *did_value: Any) -> bytes:
        return bytes(did_value[0])

    def decode(self, did_payload: bytes) -> bytes:
        return bytes(did_payload)

    def __len__(self) -> int:
        raise DidCodec.ReadAllRemainingData


def default_did_codecs() -> dict[int, DidCodec]:
    """Codecs for the DIDs this module and the simulators know."""
    return {
        DID_FINGERPRINT: AsciiCodec(),
        DID_SOFTWARE_VERSION: AsciiCodec(),
        DID_ECU_SERIAL: AsciiCodec(),
        DID_HARDWARE_NUMBER: AsciiCodec(),
        DID_VERSION_REPORT: BytesCodec(),
        DID_REPORT_NONCE: BytesCodec(),
        DID_ACTIVE_IMAGE: DidCodec(">BII"),
        DID_DELTA_CAPABILITY: DidCodec(">BBI"),
    }


@dataclass(frozen=True)
class DeltaCapability:
    """What an ECU says about the sequential patches it applies (:data:`DID_DELTA_CAPABILITY`)."""

    patch_format: int
    max_dict_log: int
    bank_size: int


@dataclass(frozen=True)
class UdsTimeouts:
    """Seconds allowed per step (a flash erase takes far longer than a read)."""

    request: float = 2.0
    """Ordinary requests; also P2, the wait for a first answer to any request."""
    response_pending: float = 5.0
    """P2*: the wait after each 0x78 "response pending" answer."""
    erase: float = 60.0
    transfer_block: float = 2.0
    check_dependencies: float = 30.0
    boot: float = 10.0
    """From the reset until the ECU answers in its new image."""


@dataclass(frozen=True)
class UdsAddressing:
    """Normal 11-bit (or 29-bit) physical addressing and the CAN flavour."""

    request_id: int = 0x7E0
    response_id: int = 0x7E8
    extended_id: bool = False
    can_fd: bool = False
    bitrate_switch: bool = True
    """CAN FD only: send the data phase at the fast bit rate."""


@dataclass(frozen=True)
class UdsConfig:
    """Everything a :class:`UdsFlasher` needs besides the bus."""

    addressing: UdsAddressing = field(default_factory=UdsAddressing)
    timeouts: UdsTimeouts = field(default_factory=UdsTimeouts)
    security_level: int = 0x01
    key_algorithm: KeyAlgorithm | None = None
    application_address: int = APPLICATION_ADDRESS
    metadata_address: int = METADATA_ADDRESS
    block_retries: int = 3
    did_codecs: Mapping[int, DidCodec] = field(default_factory=default_did_codecs)


def isotp_params(addressing: UdsAddressing) -> dict[str, Any]:
    """ISO-TP parameters shared by the flasher and the ECU simulator."""
    return {
        "blocking_send": True,
        "stmin": 0,
        "blocksize": 0,
        "tx_padding": 0xCC,
        "tx_data_length": 64 if addressing.can_fd else 8,
        "can_fd": addressing.can_fd,
        "bitrate_switch": addressing.can_fd and addressing.bitrate_switch,
        "max_frame_size": 0xFFFF,
        "rx_flowcontrol_timeout": 1000,
        "rx_consecutive_frame_timeout": 1000,
    }


class _GuardedCan:
    """CAN send/receive for ISO-TP that survives a bus refusing frames.

    can-isotp's transmit thread dies if ``bus.send`` raises; a bus-off must
    instead look like lost frames (which is what it is on the wire) and be
    remembered so a later timeout can say why.
    """

    def __init__(self, bus: can.BusABC) -> None:
        self.bus = bus
        self._lock = threading.Lock()
        self.last_error: str | None = None
        self.last_error_time = 0.0

    def rx(self, timeout: float) -> isotp.CanMessage | None:
        try:
            msg = self.bus.recv(timeout)
        except can.CanError as exc:
            self._record(exc)
            time.sleep(timeout)
            return None
        if msg is None or msg.is_error_frame or msg.is_remote_frame:
            return None
        return isotp.CanMessage(
            arbitration_id=msg.arbitration_id,
            data=bytes(msg.data),
            extended_id=msg.is_extended_id,
            is_fd=msg.is_fd,
            bitrate_switch=msg.bitrate_switch,
        )

    def tx(self, msg: isotp.CanMessage) -> None:
        frame = can.Message(
            arbitration_id=msg.arbitration_id,
            data=msg.data,
            is_extended_id=msg.is_extended_id,
            is_fd=msg.is_fd,
            bitrate_switch=msg.bitrate_switch,
        )
        try:
            self.bus.send(frame)
        except can.CanError as exc:
            self._record(exc)

    def _record(self, exc: Exception) -> None:
        with self._lock:
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.last_error_time = time.monotonic()

    def error_since(self, start: float) -> str | None:
        with self._lock:
            return self.last_error if self.last_error_time >= start else None


def open_isotp_stack(
    bus: can.BusABC, addressing: UdsAddressing, *, ecu_side: bool = False
) -> tuple[isotp.TransportLayer, _GuardedCan]:
    """An ISO-TP transport layer on ``bus`` (the ECU side swaps the ids)."""
    guarded = _GuardedCan(bus)
    mode = (
        isotp.AddressingMode.Normal_29bits
        if addressing.extended_id
        else isotp.AddressingMode.Normal_11bits
    )
    if ecu_side:
        address = isotp.Address(mode, txid=addressing.response_id, rxid=addressing.request_id)
    else:
        address = isotp.Address(mode, txid=addressing.request_id, rxid=addressing.response_id)
    stack = isotp.TransportLayer(
        rxfn=guarded.rx, txfn=guarded.tx, address=address, params=isotp_params(addressing)
    )
    return stack, guarded


class UdsFlasher(EcuFlasher):
    """Flash and query one ECU over UDS on a python-can bus.

    The bus is the caller's (a ``socketcan`` interface in a vehicle, a
    ``virtual`` one in tests); the flasher opens an ISO-TP connection on it
    and closes only that, unless ``owns_bus`` hands the bus over.
    """

    transport_name = "uds"

    def __init__(
        self, bus: can.BusABC, config: UdsConfig | None = None, *, owns_bus: bool = False
    ) -> None:
        self.config = config or UdsConfig()
        self._bus = bus
        self._owns_bus = owns_bus
        self._stack, self._can = open_isotp_stack(bus, self.config.addressing)
        self._conn = PythonIsoTpConnection(self._stack)
        client_config = dict(udsoncan.configs.default_client_config)
        client_config.update(
            {
                "data_identifiers": dict(self.config.did_codecs),
                "use_server_timing": False,
                "request_timeout": self.config.timeouts.request,
                "p2_timeout": self.config.timeouts.request,
                "p2_star_timeout": self.config.timeouts.response_pending,
                "server_address_format": 32,
                "server_memorysize_format": 32,
            }
        )
        self._client = Client(self._conn, config=client_config)  # type: ignore[arg-type]
        self._client.open()

    def close(self) -> None:
        self._client.close()
        if self._owns_bus:
            self._bus.shutdown()

    # -- generic UDS services (also used by the Uptane layer) ---------------

    def read_did(self, did: int, *, step: str | None = None) -> Any:
        """Read one DID and decode it with its codec."""
        name = step or f"read-did-{did:04X}"
        with self._step(name, self.config.timeouts.request):
            response = self._client.read_data_by_identifier([did])
        return response.service_data.values[did]

    def write_did(self, did: int, value: Any, *, step: str | None = None) -> None:
        """Encode ``value`` with the DID's codec and write it."""
        name = step or f"write-did-{did:04X}"
        with self._step(name, self.config.timeouts.request):
            self._client.write_data_by_identifier(did, value)

    def read_version_report(self, nonce: bytes | None = None) -> bytes:
        """The ECU's (signed) version report, after writing ``nonce`` if given."""
        if nonce is not None:
            self.write_did(DID_REPORT_NONCE, nonce, step="write-report-nonce")
        report = self.read_did(DID_VERSION_REPORT, step="read-version-report")
        assert isinstance(report, bytes)
        return report

    def identify(self) -> EcuIdentity:
        serial = self.read_did(DID_ECU_SERIAL, step="read-identification")
        version = self.read_did(DID_SOFTWARE_VERSION, step="read-identification")
        hardware = self.read_did(DID_HARDWARE_NUMBER, step="read-identification")
        bank, length, crc = self.read_did(DID_ACTIVE_IMAGE, step="read-identification")
        return EcuIdentity(
            transport=self.transport_name,
            serial=serial,
            software_version=version,
            hardware=hardware,
            details={
                "active_bank": str(bank),
                "image_length": str(length),
                "image_crc32": f"{crc:08x}",
            },
        )

    # -- programming ----------------------------------------------------------

    def flash(
        self,
        image: BinaryIO,
        length: int,
        progress: ProgressCallback | None = None,
        *,
        metadata: bytes | None = None,
        version: str | None = None,
    ) -> None:
        """Program ``length`` bytes of ``image`` and boot them.

        ``metadata`` (director metadata for partial verification) goes to the
        metadata region first; ``version`` is written as the fingerprint the
        ECU reports as its software version once the image runs.
        """
        self._prepare(length, metadata, version)
        crc = self._download(self.config.application_address, image, length, progress, "")
        self._check_dependencies(struct.pack(">I", crc))
        self._reset_and_boot(length, crc)

    def flash_patch(
        self,
        patch: BinaryIO,
        patch_length: int,
        result: tuple[int, bytes],
        progress: ProgressCallback | None = None,
        *,
        metadata: bytes | None = None,
        version: str | None = None,
    ) -> None:
        """Program the image ``result = (length, sha256)`` by sending a sequential patch.

        The ECU applies ``patch_length`` bytes of ``patch`` from its active bank into its
        inactive bank and verifies the result's sha256 before it may boot it; its active
        bank is never written, so a failure (power loss included) leaves it bootable.
        """
        length, sha256 = result
        self._prepare(length, metadata, version)
        self._download(PATCH_ADDRESS, patch, patch_length, progress, "patch")
        crc = self._check_dependencies(sha256)
        if crc is None:
            raise EcuRejected("check-dependencies", "the ECU did not say what it verified")
        self._reset_and_boot(length, crc)

    def read_delta_capability(self) -> DeltaCapability | None:
        """The ECU's :data:`DID_DELTA_CAPABILITY`, or None when it takes full images only."""
        try:
            patch_format, max_dict_log, bank_size = self.read_did(
                DID_DELTA_CAPABILITY, step="read-delta-capability"
            )
        except EcuRejected as exc:
            if exc.code == 0x31:  # requestOutOfRange: no such DID
                return None
            raise
        return DeltaCapability(patch_format, max_dict_log, bank_size)

    def _prepare(self, length: int, metadata: bytes | None, version: str | None) -> None:
        """Programming session, security access, fingerprint, metadata, erase."""
        timeouts = self.config.timeouts
        with self._step("programming-session", timeouts.request):
            self._client.change_session(SESSION_PROGRAMMING)
        self.unlock()
        if version is not None:
            self.write_did(DID_FINGERPRINT, version, step="write-fingerprint")
        if metadata is not None:
            self._download(
                self.config.metadata_address,
                io.BytesIO(metadata),
                len(metadata),
                None,
                "metadata-download",
            )
        erase_record = bytes([0x44]) + struct.pack(">II", self.config.application_address, length)
        with self._step("erase", timeouts.erase):
            self._client.start_routine(ROUTINE_ERASE, erase_record)

    def _check_dependencies(self, record: bytes) -> int | None:
        """Routine 0xFF01; returns the CRC-32 the ECU reports it verified, if it reports one."""
        with self._step("check-dependencies", self.config.timeouts.check_dependencies):
            response = self._client.start_routine(ROUTINE_CHECK_DEPENDENCIES, record)
        assert response is not None  # exceptions are on: no response means an exception
        status = response.service_data.routine_status_record
        if not status or status[0] != 0:
            reason = status[1:].decode("utf-8", errors="replace") if status else "no status"
            raise DependencyCheckFailed(
                "check-dependencies", f"the ECU refused the image: {reason}"
            )
        return int.from_bytes(status[1:5], "big") if len(status) == 5 else None

    def _reset_and_boot(self, length: int, crc: int) -> None:
        with self._step("ecu-reset", self.config.timeouts.request):
            self._client.ecu_reset(RESET_HARD)
        self._wait_for_boot(length, crc)

    def unlock(self) -> None:
        """Security access at the configured level with the key algorithm."""
        level = self.config.security_level
        algorithm = self.config.key_algorithm
        if algorithm is None:
            raise SecurityAccessDenied(
                "security-access", "no key algorithm configured for this ECU"
            )
        with self._step("security-access", self.config.timeouts.request):
            seed = self._client.request_seed(level).service_data.seed
            if any(seed):  # an all-zero seed means "already unlocked"
                self._client.send_key(level + 1, algorithm(level, bytes(seed)))

    def verify(self, image: BinaryIO, length: int) -> None:
        """Compare the running image's length and CRC-32 with ``image``."""
        crc = crc32_of(image, length, "verify")
        _bank, ecu_length, ecu_crc = self.read_did(DID_ACTIVE_IMAGE, step="verify")
        if (ecu_length, ecu_crc) != (length, crc):
            raise VerificationFailed(
                "verify",
                f"ECU runs {ecu_length} bytes with CRC-32 {ecu_crc:08x}, image is {length} bytes with {crc:08x}",
            )

    def _download(
        self,
        address: int,
        source: BinaryIO,
        length: int,
        progress: ProgressCallback | None,
        prefix: str,
    ) -> int:
        """RequestDownload + TransferData blocks + RequestTransferExit; return the CRC-32."""

        def name(step: str) -> str:
            return f"{prefix}:{step}" if prefix else step

        timeouts = self.config.timeouts
        with self._step(name("request-download"), timeouts.request):
            response = self._client.request_download(MemoryLocation(address, length, 32, 32))
        assert response is not None
        # maxNumberOfBlockLength counts the service id and the block counter.
        block_data = int(response.service_data.max_length) - 2
        if block_data <= 0:
            raise EcuRejected(
                name("request-download"), f"ECU offered an unusable block length {block_data + 2}"
            )
        crc = 0
        done = 0
        counter = 1
        while done < length:
            block = read_exactly(source, min(block_data, length - done), name("transfer-data"))
            self._transfer_block(counter, block, name("transfer-data"))
            crc = zlib.crc32(block, crc)
            done += len(block)
            counter = (counter + 1) & 0xFF
            if progress is not None:
                progress(done, length)
        with self._step(name("transfer-exit"), timeouts.request):
            self._client.request_transfer_exit()
        return crc

    def _transfer_block(self, counter: int, block: bytes, step: str) -> None:
        """Send one block, again with the same counter while its answer is lost."""
        timeout = self.config.timeouts.transfer_block
        for attempt in range(self.config.block_retries + 1):
            try:
                with self._step(step, timeout):
                    self._client.transfer_data(counter, block)
                return
            except (FlashTimeout, TransportError):
                if attempt == self.config.block_retries:
                    raise

    def _wait_for_boot(self, length: int, crc: int) -> None:
        """Poll the running image until the rebooted ECU answers (or give up)."""
        deadline = time.monotonic() + self.config.timeouts.boot
        # polls are lost while the ECU reboots: ask again soon rather than wait long for each
        short = replace(self.config.timeouts, request=min(0.1, self.config.timeouts.request))
        # Unanswered polls are expected while the ECU reboots: keep udsoncan quiet.
        logger = self._client.logger
        level = logger.level
        logger.setLevel(logging.CRITICAL)
        try:
            while True:
                try:
                    with self._step("boot", short.request):
                        response = self._client.read_data_by_identifier([DID_ACTIVE_IMAGE])
                    break
                except FlashTimeout:
                    if time.monotonic() >= deadline:
                        raise FlashTimeout(
                            "boot",
                            self.config.timeouts.boot,
                            "ECU did not come back after the reset",
                        ) from None
        finally:
            logger.setLevel(level)
        bank, ecu_length, ecu_crc = response.service_data.values[DID_ACTIVE_IMAGE]
        if (ecu_length, ecu_crc) != (length, crc):
            raise ImageDidNotBoot(
                "boot",
                f"the ECU fell back: bank {bank} runs {ecu_length} bytes with CRC-32 {ecu_crc:08x}, "
                f"the new image is {length} bytes with {crc:08x}",
            )

    @contextlib.contextmanager
    def _step(self, step: str, timeout: float) -> Iterator[None]:
        """Run UDS requests with ``timeout``; turn library errors into FlashErrors."""
        self._client.set_config("request_timeout", timeout)
        self._client.set_config("p2_timeout", min(timeout, self.config.timeouts.request))
        started = time.monotonic()
        try:
            yield
        except TimeoutException:
            self._raise_bus_error(step, started)
            raise FlashTimeout(step, timeout) from None
        except isotp.BlockingSendFailure as exc:
            self._raise_bus_error(step, started)
            raise FlashTimeout(step, timeout, f"request not delivered: {exc}") from None
        except NegativeResponseException as exc:
            code = exc.response.code
            text = f"negative response 0x{code:02X} ({exc.response.code_name})"
            if step == "security-access" and code in _NRC_SECURITY:
                raise SecurityAccessDenied(step, f"key refused: {text}") from None
            raise EcuRejected(step, text, code) from None
        except (InvalidResponseException, UnexpectedResponseException) as exc:
            raise EcuRejected(step, f"malformed answer: {exc}") from None
        except can.CanError as exc:
            raise TransportError(step, f"CAN error: {exc}") from None
        except (ValueError, RuntimeError) as exc:  # e.g. can-isotp's "transmit queue is full"
            raise FlashError(step, f"{type(exc).__name__}: {exc}") from None

    def _raise_bus_error(self, step: str, started: float) -> None:
        error = self._can.error_since(started)
        if error is not None:
            raise TransportError(step, f"CAN bus refused frames ({error}); the ECU got no request")
