"""Names that come from outside, and the files they may become.

Every name Uptake receives from metadata, manifests, registrations,
configuration or URLs is checked once, where it enters, against the one
grammar below; and every file the agent or the server writes under a name
it did not make up itself is placed with :func:`confined`, which refuses a
result outside its directory. Together they make path traversal impossible
by construction rather than case by case.

The grammar (``docs/threat-model.md`` repeats it for operators):

**Name** (VIN, ECU serial, hardware id, and each component of a target
path): 1 to 128 characters from ``A-Z a-z 0-9 . _ - : +``, starting with a
letter or a digit. So never ``.`` or ``..``, never a hidden file, never an
option-like ``-x``, and never ``/``, ``\\``, NUL, whitespace or any other
control or non-ASCII character (no look-alike Unicode either).

**Target path**: 1 to 16 names joined by ``/`` (no leading, trailing or
doubled ``/``), at most 512 characters.

**Number** (a database id, a cursor, a metadata version in a URL): 1 to
:data:`MAX_NUMBER_DIGITS` ASCII digits, so it always fits a signed 64-bit
database integer (:func:`parse_number`).

**Hash**: an algorithm from :data:`HASH_HEX_LENGTHS` and its digest in
lowercase hex of exactly that algorithm's length.

A violation raises :class:`InvalidNameError` (a ``ValueError``) naming what
was wrong and where. Callers decide what it means: in signed metadata it is
an attack; in a request it is a 400; in a configuration file it is a
configuration error.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from signing.exceptions import UptakeError

__all__ = [
    "HASH_HEX_LENGTHS",
    "MAX_NAME_LENGTH",
    "MAX_NUMBER",
    "MAX_NUMBER_DIGITS",
    "MAX_TARGET_PATH_LENGTH",
    "NAME_PATTERN",
    "SHA256_PATTERN",
    "TARGET_PATH_PATTERN",
    "InvalidNameError",
    "PathEscapeError",
    "check_hashes",
    "check_name",
    "check_sha256",
    "check_target_path",
    "confined",
    "is_name",
    "parse_number",
]

MAX_NAME_LENGTH = 128
MAX_TARGET_PATH_LENGTH = 512
#: A number from outside has at most 18 digits: below 2**63, any database's largest integer.
MAX_NUMBER_DIGITS = 18
MAX_NUMBER = 10**MAX_NUMBER_DIGITS - 1
_MAX_PATH_COMPONENTS = 16
_NAME = r"[A-Za-z0-9][A-Za-z0-9._:+\-]{0,127}"
_NAME_RE = re.compile(_NAME)
#: The grammar as anchored regular expressions, for schemas (JSON Schema, OpenAPI).
NAME_PATTERN = f"^{_NAME}$"
TARGET_PATH_PATTERN = f"^{_NAME}(/{_NAME}){{0,{_MAX_PATH_COMPONENTS - 1}}}$"
SHA256_PATTERN = "^[0-9a-f]{64}$"

#: Hash algorithms (securesystemslib names) and the length of their hex digests.
HASH_HEX_LENGTHS: Mapping[str, int] = {
    "sha224": 56,
    "sha256": 64,
    "sha384": 96,
    "sha512": 128,
    "blake2s": 64,
    "blake2b-256": 64,
    "blake2b": 128,
}
_HEX_RE = re.compile(r"[0-9a-f]+")


class InvalidNameError(UptakeError, ValueError):
    """A name, target path or hash from outside breaks the grammar; says what and where."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


class PathEscapeError(InvalidNameError):
    """A file path would resolve outside the directory it must stay in."""


def _shown(value: Any) -> str:
    """A short, printable rendering of an untrusted value for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def is_name(value: object) -> bool:
    """Whether ``value`` is a name of the grammar (see module docstring)."""
    return isinstance(value, str) and _NAME_RE.fullmatch(value) is not None


def parse_number(text: str) -> int | None:
    """The number ``text`` spells in 1 to :data:`MAX_NUMBER_DIGITS` ASCII digits, else None
    (``"²".isdigit()`` is True too, and 19 digits overflow a 64-bit database integer)."""
    if 1 <= len(text) <= MAX_NUMBER_DIGITS and text.isascii() and text.isdigit():
        return int(text)
    return None


def check_name(value: object, where: str) -> str:
    """``value`` if it is a name (VIN, ECU serial, hardware id); else :class:`InvalidNameError`."""
    if not isinstance(value, str):
        raise InvalidNameError(where, f"must be a string, got {type(value).__name__}")
    if _NAME_RE.fullmatch(value) is None:
        raise InvalidNameError(
            where,
            f"{_shown(value)} is not a name: 1-{MAX_NAME_LENGTH} of A-Z a-z 0-9 . _ - : + "
            "starting with a letter or digit",
        )
    return value


def check_target_path(value: object, where: str) -> str:
    """``value`` if it is a target path (names joined by ``/``); else :class:`InvalidNameError`."""
    if not isinstance(value, str):
        raise InvalidNameError(where, f"must be a string, got {type(value).__name__}")
    if not value or len(value) > MAX_TARGET_PATH_LENGTH:
        raise InvalidNameError(where, f"a target path has 1 to {MAX_TARGET_PATH_LENGTH} characters")
    parts = value.split("/")
    if len(parts) > _MAX_PATH_COMPONENTS:
        raise InvalidNameError(
            where, f"a target path has at most {_MAX_PATH_COMPONENTS} components"
        )
    for part in parts:
        if _NAME_RE.fullmatch(part) is None:
            raise InvalidNameError(
                where,
                f"{_shown(value)} is not a target path: each '/'-separated part must be a name "
                f"(1-{MAX_NAME_LENGTH} of A-Z a-z 0-9 . _ - : + starting with a letter or digit)",
            )
    return value


def check_sha256(value: object, where: str) -> str:
    """``value`` if it is a lowercase hex SHA-256 digest; else :class:`InvalidNameError`."""
    if not isinstance(value, str) or len(value) != 64 or _HEX_RE.fullmatch(value) is None:
        raise InvalidNameError(
            where, f"{_shown(value)} is not a lowercase hex SHA-256 (64 characters)"
        )
    return value


def check_hashes(hashes: object, where: str, *, require_sha256: bool = True) -> dict[str, str]:
    """``hashes`` if every entry is a known algorithm with a well-formed digest."""
    if not isinstance(hashes, dict) or not hashes:
        raise InvalidNameError(where, "must be a non-empty object of algorithm -> hex digest")
    for alg, digest in hashes.items():
        length = HASH_HEX_LENGTHS.get(alg) if isinstance(alg, str) else None
        if length is None:
            raise InvalidNameError(
                f"{where}.{_shown(alg)}",
                f"unknown hash algorithm (known: {', '.join(HASH_HEX_LENGTHS)})",
            )
        if (
            not isinstance(digest, str)
            or len(digest) != length
            or _HEX_RE.fullmatch(digest) is None
        ):
            raise InvalidNameError(
                f"{where}.{alg}",
                f"{_shown(digest)} is not a lowercase hex {alg} digest ({length} characters)",
            )
    if require_sha256 and "sha256" not in hashes:
        raise InvalidNameError(where, "has no sha256")
    return dict(hashes)


def _check_file_name(part: str, where: str) -> None:
    """A single path component we are about to create: no separators, controls, '.' or '..'."""
    if (
        not part
        or part in (".", "..")
        or "/" in part
        or "\\" in part
        or any(ord(c) < 0x20 or ord(c) == 0x7F for c in part)
        or len(part.encode("utf-8", "surrogatepass")) > 255
    ):
        raise PathEscapeError(
            where, f"{_shown(part)} is not a file name that stays in its directory"
        )


def confined(directory: Path | str, *parts: str, where: str = "file") -> Path:
    """``directory/part/...``, refused unless it resolves inside ``directory``.

    Each part is one path component (no ``/``, ``\\``, NUL or control
    characters, never ``.`` or ``..``), so a name taken from outside cannot
    climb out; the result is also resolved (symbolic links included) and
    must stay under the resolved ``directory``.
    """
    if not parts:
        raise PathEscapeError(where, "no file name given")
    for part in parts:
        _check_file_name(part, where)
    base = Path(os.path.realpath(directory))
    path = base.joinpath(*parts)
    # realpath(path) walks every component from "/"; below the resolved base, only a
    # symbolic link among ``parts`` can lead elsewhere (each is one plain name), so look
    # for one there and resolve the whole path only when there is one
    current = base
    for part in parts:
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except OSError:
            break  # missing (or below a file): nothing further down can be a link
        if stat.S_ISLNK(mode):
            resolved = Path(os.path.realpath(path))
            if resolved != base and base not in resolved.parents:
                raise PathEscapeError(where, f"{path} resolves to {resolved}, outside {base}")
            break
    return path
