"""Hypothesis strategies shared by the fuzz tests: JSON values and edits of valid documents."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import strategies as st

#: Names of the grammar in :mod:`signing.names` (VINs, serials, hardware ids, path parts).
names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:+\-]{0,19}", fullmatch=True)
#: Target paths of that grammar.
target_paths = st.lists(names, min_size=1, max_size=4).map("/".join)

#: Strings an attacker tries where a name or path is expected: traversal, absolute paths,
#: separators, NUL and control characters, look-alike and odd Unicode, huge or empty.
hostile_strings = st.sampled_from(
    [
        ".", "..", "../../etc/passwd", "/etc/passwd", "/tmp/x", "a/../../b", "a//b", "a/./b",
        "./a", "..\\..\\windows", "a\\b", "a\x00b", "\x00", "a\nb", "\t", "\x7f", " a", "a ",
        "-rf", ".hidden", "\u2024\u2024", "\uff0e\uff0e/x", "\u202e", "\u0663", "\u00b2",
        "\U0001f600", "x" * 300, "%2e%2e%2f", "~root", "$(id)", "C:\\x", "a" * 129, "",
    ]
) | st.text(st.characters(codec="utf-8"), max_size=12)  # fmt: skip

#: Datetimes at and past the ends of what Python and databases hold, with and without zones
#: (offsets that push them past datetime.min/max once in UTC), and some that are not dates.
hostile_datetimes = st.sampled_from(
    [
        "9999-12-31T23:59:59-05:00", "9999-12-31T23:59:59+00:00", "0001-01-01T00:00:00+14:00",
        "0001-01-01T00:00:00Z", "2999-01-01T00:00:00Z", "1970-01-01T00:00:00Z",
        "2030-01-01T00:00:00", "2030-02-30T00:00:00Z", "2030-01-01T24:00:00Z",
        "2030-01-01T00:00:00+25:00", "+10000-01-01T00:00:00Z", "2030-01-01T00:00:00.9999999999Z",
    ]
)  # fmt: skip

#: Integers that fit no 64-bit database column, and some that do.
huge_integers = st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**30, -(10**30)]) | st.integers(
    min_value=-(2**70), max_value=2**70
)

_scalars = (
    st.none()
    | st.booleans()
    | huge_integers
    | st.integers(min_value=-(2**31), max_value=2**31)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
    | hostile_strings
    | hostile_datetimes
    | st.sampled_from(
        ["", "sha256", "rpi-gateway", "GW-VIN0001", "0" * 64, "installed", "full", "delta"]
    )
)

#: Any JSON value, small.
json_values = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=12) | hostile_strings, children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def deeply_nested(draw: st.DrawFn) -> bytes:
    """JSON (or nearly JSON) nested far deeper than any document: ``[[[…``, ``{"signed": {…``."""
    depth = draw(st.sampled_from([33, 64, 200, 1000, 3000, 20000]))
    kind = draw(st.sampled_from(["list", "object", "signed", "unclosed", "mixed"]))
    if kind == "list":
        return b"[" * depth + b"]" * depth
    if kind == "object":
        return b'{"a":' * depth + b"1" + b"}" * depth
    if kind == "signed":
        return b'{"signed":' * depth + b"{}" + b"}" * depth
    if kind == "unclosed":
        return b"[" * depth
    return b'{"signed":[' * (depth // 2) + b'"x"' + b"]}" * (depth // 2)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            found += _paths(v, (*prefix, i))
    return found


@st.composite
def edited(draw: st.DrawFn, doc: Any, max_edits: int = 3) -> Any:
    """``doc`` with up to ``max_edits`` of its values replaced, keys removed, or keys added."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, max_edits))):
        paths = _paths(doc)
        path = draw(st.sampled_from(paths))
        if not path:
            doc = draw(json_values)
            continue
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace" or isinstance(parent, list):
            parent[path[-1]] = draw(json_values)
        elif action == "delete":
            del parent[path[-1]]
        else:
            parent[draw(st.text(max_size=12))] = draw(json_values)
    return doc
