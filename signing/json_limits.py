"""Parsing JSON that nobody vouches for yet, with every dimension bounded.

Python's ``json`` parser recurses once per nesting level, so a couple of
kilobytes of ``[[[[…`` end in ``RecursionError`` deep inside whatever
parses them, and it turns digits into integers of any size, which end in a
database overflow later. :func:`parse_json` is the one door for untrusted
JSON (request bodies, manifests, uploaded metadata): it refuses, before any
recursion happens, a document that is

* larger than ``max_bytes``;
* nested deeper than ``max_depth`` (counted on the document's bracket
  skeleton with C-speed regular expressions, one pass per level);
* holding an integer outside the signed 64-bit range, a number that
  overflows a float, ``NaN`` or ``Infinity``, or not UTF-8 JSON at all;

each with :class:`UntrustedJsonError` naming where the document came from.
"""

from __future__ import annotations

import json
import re
from typing import Any

from signing.exceptions import UptakeError

#: Deepest nesting any Uptake document needs (a manifest is about 7 levels deep).
MAX_DEPTH = 32
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1

# A JSON string token (escapes included), as json itself tokenizes it.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")
_INNERMOST = re.compile(rb"\[\]|\{\}")


class UntrustedJsonError(UptakeError, ValueError):
    """Untrusted JSON is malformed or exceeds a bound; says where and which."""


def _too_deep(data: bytes, max_depth: int) -> bool | None:
    """True when nested deeper than ``max_depth``, None when the brackets do not balance."""
    skeleton = _NOT_BRACKET.sub(b"", _STRING.sub(b"", data))
    for _ in range(max_depth):
        if not skeleton:
            return False
        skeleton, removed = _INNERMOST.subn(b"", skeleton)
        if not removed:
            return None  # "[}" or an unclosed "[": not JSON
    return bool(skeleton)


def _bounded_int(text: str) -> int:
    value = int(text)
    if not _INT_MIN <= value <= _INT_MAX:
        raise ValueError(
            f"integer {text[:24]}{'…' if len(text) > 24 else ''} is outside the 64-bit range"
        )
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:24]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(data: bytes, *, where: str, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``data`` as JSON within the bounds of the module docstring."""
    if len(data) > max_bytes:
        raise UntrustedJsonError(f"{where}: larger than {max_bytes} bytes")
    depth = _too_deep(data, max_depth)
    if depth is None:
        raise UntrustedJsonError(f"{where}: not valid JSON (brackets do not balance)")
    if depth:
        raise UntrustedJsonError(f"{where}: nested deeper than {max_depth} levels")
    try:
        return json.loads(
            data.decode("utf-8"),
            parse_int=_bounded_int,
            parse_float=_finite_float,
            parse_constant=_no_constant,
        )
    except RecursionError as exc:  # unreachable after the depth check; kept as a last fence
        raise UntrustedJsonError(f"{where}: nested too deeply") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise UntrustedJsonError(f"{where}: not valid JSON ({exc})") from exc
