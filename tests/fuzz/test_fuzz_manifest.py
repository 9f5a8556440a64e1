"""Fuzz manifest parsing and verification (signing.manifest, server side of Uptane 5.3.2).

Accepted outcomes: a parsed manifest (whose signatures then verify or raise
``ManifestSignatureError``), or ``ManifestFormatError``. Both are
``ManifestError``; nothing else may escape.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from hypothesis import assume, given
from hypothesis import strategies as st
from securesystemslib.exceptions import FormatError

from signing.keys import KeyFileError, generate_signer, public_key_from_dict
from signing.manifest import (
    EcuVersionReport,
    ImageInfo,
    InstallOutcome,
    InstallResult,
    ManifestError,
    SignedEnvelope,
    VehicleManifest,
    parse_vehicle_manifest,
)
from tests.fuzz import fuzz_settings
from tests.fuzz.strategies import (
    deeply_nested,
    edited,
    hostile_strings,
    huge_integers,
    json_values,
    names,
    target_paths,
)

PRIMARY, SECONDARY = generate_signer(), generate_signer()
_IMAGE = ImageInfo.of("rpi-gateway/1.0.0/gateway.elf", 2592, {"sha256": "ab" * 32})


def _valid() -> bytes:
    reports = {
        "GW-1": EcuVersionReport(
            "GW-1", _IMAGE, 7, "", InstallOutcome(_IMAGE.filepath, InstallResult.INSTALLED)
        ).sign(PRIMARY),
        "BMS-1": EcuVersionReport("BMS-1", ImageInfo.of("", 0, {}), 3, "hash differs").sign(
            SECONDARY
        ),
    }
    return VehicleManifest("VIN1", "GW-1", reports).sign(PRIMARY).to_bytes()


VALID = _valid()


def _parse_and_verify(data: bytes) -> None:
    try:
        envelope, manifest = parse_vehicle_manifest(data)
        envelope.verify(PRIMARY.public_key, "vehicle manifest")
        for serial, report in manifest.ecu_version_reports.items():
            report.verify(
                (PRIMARY if serial == "GW-1" else SECONDARY).public_key, f"ECU report of {serial}"
            )
            report.ecu_report()
        manifest.reports()
    except ManifestError:
        pass


def test_valid_manifest_verifies() -> None:
    envelope, manifest = parse_vehicle_manifest(VALID)
    envelope.verify(PRIMARY.public_key, "vehicle manifest")
    assert manifest.reports()["BMS-1"].attacks_detected == "hash differs"


@fuzz_settings
@given(st.binary(max_size=2048))
def test_arbitrary_bytes(data: bytes) -> None:
    _parse_and_verify(data)


@fuzz_settings
@given(json_values)
def test_arbitrary_json(doc: Any) -> None:
    _parse_and_verify(json.dumps(doc).encode())


@fuzz_settings
@given(edited(json.loads(VALID), max_edits=4))
def test_edited_manifest(doc: Any) -> None:
    _parse_and_verify(json.dumps(doc).encode())


@fuzz_settings
@given(edited(json.loads(VALID)["signed"], max_edits=4))
def test_edited_manifest_signed_again(signed: Any) -> None:
    # re-signed by the primary: the parser, not the signature, must catch every bad field
    assume(isinstance(signed, dict))
    try:
        data = SignedEnvelope.create(signed, PRIMARY).to_bytes()
    except FormatError:  # a float: cannot be signed in the first place
        assume(False)
    _parse_and_verify(data)


@fuzz_settings
@given(deeply_nested())
def test_deeply_nested_json(data: bytes) -> None:
    _parse_and_verify(data)


def _fields(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            found += [(*prefix, k), *_fields(v, (*prefix, k))]
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            found += [(*prefix, i), *_fields(v, (*prefix, i))]
    return found


@fuzz_settings
@given(st.data(), hostile_strings | huge_integers)
def test_every_field_with_hostile_values_re_signed(data: st.DataObject, value: Any) -> None:
    # each field of a valid manifest, in turn, gets a path-like or odd string or a huge number;
    # re-signed, so only the parser stands between it and the server's database and disk
    signed = json.loads(VALID)["signed"]
    path = data.draw(st.sampled_from(_fields(signed)))
    parent = signed
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = value
    _parse_and_verify(SignedEnvelope.create(signed, PRIMARY).to_bytes())


@fuzz_settings
@given(st.binary(max_size=64), st.integers(0, len(VALID)))
def test_spliced_bytes(junk: bytes, at: int) -> None:
    _parse_and_verify(VALID[:at] + junk + VALID[at + len(junk) :])


@fuzz_settings
@given(
    serial=names,
    counter=st.integers(0, 2**63 - 1),
    attacks=st.text(max_size=200),
    filepath=target_paths | st.just(""),
    length=st.integers(0, 2**40),
    result=st.sampled_from(
        [
            InstallResult.INSTALLED,
            InstallResult.ROLLED_BACK,
            InstallResult.REFUSED,
            InstallResult.FAILED,
        ]
    ),
    detail=st.text(max_size=200),
)
def test_any_valid_report_roundtrips(
    serial: str,
    counter: int,
    attacks: str,
    filepath: str,
    length: int,
    result: InstallResult,
    detail: str,
) -> None:
    image = ImageInfo.of(filepath, length, {"sha256": "cd" * 32})
    report = EcuVersionReport(
        serial, image, counter, attacks, InstallOutcome(filepath or "x", result, detail)
    )
    data = VehicleManifest("VIN1", serial, {serial: report.sign(PRIMARY)}).sign(PRIMARY).to_bytes()
    envelope, manifest = parse_vehicle_manifest(data)
    envelope.verify(PRIMARY.public_key, "vehicle manifest")
    assert manifest.reports()[serial] == report


@fuzz_settings
@given(json_values | edited(json.loads(json.dumps(PRIMARY.public_key.to_dict()))))
def test_public_key_parsing(doc: Any) -> None:
    with contextlib.suppress(KeyFileError):
        public_key_from_dict(doc)
