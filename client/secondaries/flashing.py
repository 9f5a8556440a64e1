"""The one interface every secondary-ECU transport implements.

The agent installs a secondary's image through an :class:`EcuFlasher`,
whatever the wire is (UDS over CAN, the STM32 ROM bootloader over a UART...):

1. :meth:`EcuFlasher.identify` reads who the ECU is (serial, software
   version, hardware) so the agent can match it with director metadata;
2. :meth:`EcuFlasher.flash` streams the image (``length`` bytes read from a
   binary file object, never the whole image in memory on the host side) and
   reports progress as ``(bytes_done, bytes_total)``;
3. :meth:`EcuFlasher.verify` checks what the ECU now holds against the image
   (read-back or a CRC reported by the ECU).

Every failure is a :class:`FlashError` that names the step that failed
(``FlashError.step``, e.g. ``"security-access"`` or ``"transfer-data"``), so
an operator or the agent's report says *where* an update stopped, never just
a traceback. Transport-specific exceptions (python-can, pyserial, udsoncan)
never escape a flasher.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import BinaryIO, Self

from signing.exceptions import UptakeError

ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(bytes_done, bytes_total)`` while an image is written."""

CHUNK_SIZE = 64 * 1024


@dataclass(frozen=True)
class EcuIdentity:
    """What an ECU says about itself.

    ``serial`` and ``software_version`` are ``None`` when the transport
    cannot tell (the STM32 ROM bootloader knows its chip, not the application).
    ``details`` holds transport-specific facts as text (bootloader version,
    supported commands, active bank...).
    """

    transport: str
    serial: str | None
    software_version: str | None
    hardware: str | None
    details: Mapping[str, str] = field(default_factory=dict)


class FlashError(UptakeError):
    """Flashing a secondary failed; ``step`` names the step that failed."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step
        self.message = message


class FlashTimeout(FlashError):
    """The ECU did not answer within the step's timeout."""

    def __init__(self, step: str, timeout: float, detail: str = "") -> None:
        text = f"no answer from the ECU within {timeout:g} s"
        if detail:
            text += f" ({detail})"
        super().__init__(step, text)
        self.timeout = timeout


class SecurityAccessDenied(FlashError):
    """The ECU refused the security-access key (wrong key algorithm or secret)."""


class EcuRejected(FlashError):
    """The ECU answered a request negatively (names the response code)."""

    def __init__(self, step: str, message: str, code: int | None = None) -> None:
        super().__init__(step, message)
        self.code = code


class DependencyCheckFailed(EcuRejected):
    """The ECU's check of the written image (CRC, metadata) failed."""


class ImageDidNotBoot(FlashError):
    """After the reset the ECU is not running the new image (it fell back)."""


class VerificationFailed(FlashError):
    """What the ECU holds does not match the image."""


class TransportError(FlashError):
    """The bus or serial line failed (bus-off, port closed, framing)."""


class EcuFlasher(ABC):
    """Writes images to one secondary ECU over one transport.

    Flashers are context managers: ``close()`` releases the transport
    (it does not shut down a bus or port that the caller passed in).
    """

    transport_name: str = "abstract"

    @abstractmethod
    def identify(self) -> EcuIdentity:
        """Read the ECU's identity."""

    @abstractmethod
    def flash(
        self,
        image: BinaryIO,
        length: int,
        progress: ProgressCallback | None = None,
    ) -> None:
        """Write ``length`` bytes read from ``image`` and make the ECU run them."""

    @abstractmethod
    def verify(self, image: BinaryIO, length: int) -> None:
        """Raise :class:`VerificationFailed` unless the ECU holds ``image``."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release what the flasher opened."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def read_exactly(image: BinaryIO, size: int, step: str) -> bytes:
    """Read ``size`` bytes from ``image`` or fail naming ``step`` (a short image)."""
    data = image.read(size)
    if len(data) != size:
        raise FlashError(step, f"image ended early: wanted {size} more bytes, got {len(data)}")
    return data


def crc32_of(image: BinaryIO, length: int, step: str = "crc") -> int:
    """CRC-32 (zlib, IEEE 802.3) of the next ``length`` bytes of ``image``, streamed."""
    crc = 0
    left = length
    while left:
        chunk = read_exactly(image, min(CHUNK_SIZE, left), step)
        crc = zlib.crc32(chunk, crc)
        left -= len(chunk)
    return crc
