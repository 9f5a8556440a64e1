"""The ``requires`` format and compatibility check, and the per-ECU encryption format (signing/)."""

from __future__ import annotations

import io
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tuf.api.metadata import TargetFile

from signing.encryption import (
    DecryptionError,
    EncryptionFormatError,
    decrypt_stream,
    encrypt_stream,
    encryption_info,
    generate_encryption_key,
)
from signing.metadata import (
    EcuImage,
    ImageCustom,
    MetadataFormatError,
    check_arch,
    image_custom,
    parse_requires,
    unmet_requirements,
)

# -- requires --------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, version, ok",
    [
        (">=1.1.0", "1.1.0", True),
        (">=1.1.0", "1.0.9", False),
        (">=1.1", "1.10.0", True),
        (">=1.1.0,<2", "1.9.9", True),
        (">=1.1.0,<2", "2.0.0", False),
        ("==2", "2.0.0.0", True),
        ("!=1.2.3", "1.2.3", False),
        (">1", "1.0.1", True),
        ("<=3.0", "3.0.1", False),
        (">=1.0", "1.0.0-rc1", False),  # not a dotted decimal version: never satisfies
    ],
)
def test_requirement_specs(spec: str, version: str, ok: bool) -> None:
    (req,) = parse_requires({"stm32f4-bms": spec}, "t")
    assert req.allows(version) is ok


@pytest.mark.parametrize(
    "value",
    [
        {},
        [],
        "x",
        {"bms": ""},
        {"bms": "1.0"},
        {"bms": ">=x"},
        {"bms": ">=01.0"},
        {"bad id": ">=1"},
        {"bms": ">= 1.0"},
        {"bms": ">=1.0,"},
        {"bms": 3},
        {"bms": ">=1.2.3.4.5"},
        {f"h{i}": ">=1" for i in range(33)},
    ],
)
def test_malformed_requires_are_refused_naming_the_entry(value: object) -> None:
    with pytest.raises(MetadataFormatError, match=r"t: custom\.requires"):
        parse_requires(value, "t")


def _image(version: str, **requires: str) -> ImageCustom:
    return ImageCustom(
        ("x",), 1, version, requires=parse_requires(requires, "t") if requires else ()
    )


def test_unmet_requirements_sees_the_whole_vehicle() -> None:
    gw = EcuImage("GW", "rpi-gateway", "gw/1.1.0", _image("1.1.0", **{"stm32f4-bms": ">=1.1.0"}))
    assert (
        unmet_requirements([gw, EcuImage("BMS", "stm32f4-bms", "bms/1.1.0", _image("1.1.0"))]) == []
    )
    old_bms = EcuImage("BMS", "stm32f4-bms", "bms/1.0.0", _image("1.0.0"))
    assert (
        "GW requires stm32f4-bms >=1.1.0, but BMS would run bms/1.0.0"
        in unmet_requirements([gw, old_bms])[0]
    )
    unknown = EcuImage("BMS", "stm32f4-bms", "", None)
    assert "no known image" in unmet_requirements([gw, unknown])[0]
    assert "has no stm32f4-bms ECU" in unmet_requirements([gw])[0]
    # every ECU of that hardware id must comply
    second = EcuImage("BMS2", "stm32f4-bms", "bms/1.0.0", _image("1.0.0"))
    new_bms = EcuImage("BMS", "stm32f4-bms", "bms/1.1.0", _image("1.1.0"))
    assert len(unmet_requirements([gw, new_bms, second])) == 1


def test_requires_round_trips_through_custom() -> None:
    custom = _image("1.1.0", **{"stm32f4-bms": ">=1.1.0,<2"}).to_custom()
    assert custom["requires"] == {"stm32f4-bms": ">=1.1.0,<2"}
    assert parse_requires(custom["requires"], "t")[0].spec == ">=1.1.0,<2"


@pytest.mark.parametrize("arch", ["armt", "arm64", "x86"])
def test_arch_round_trips_through_custom(arch: str) -> None:
    custom = ImageCustom(("x",), 1, "1.0", arch=arch).to_custom()
    assert image_custom(TargetFile(1, {"sha256": "0" * 64}, "x", {"custom": custom})).arch == arch


@pytest.mark.parametrize("arch", ["", "a b", "../x", 7, ["armt"], None])
def test_an_arch_that_is_no_name_is_refused_naming_the_field(arch: object) -> None:
    custom = {**ImageCustom(("x",), 1, "1.0").to_custom(), "arch": arch}
    with pytest.raises(MetadataFormatError, match=r"image target 'x': custom\.arch"):
        image_custom(TargetFile(1, {"sha256": "0" * 64}, "x", {"custom": custom}))


def test_vehicles_accept_an_arch_a_newer_server_knows_and_servers_check_theirs() -> None:
    # a vehicle never uses the field (a delta names its own filter): refusing an unknown
    # name would report an attack for every image of a newer server's architecture
    custom = ImageCustom(("x",), 1, "1.0", arch="riscv").to_custom()
    assert (
        image_custom(TargetFile(1, {"sha256": "0" * 64}, "x", {"custom": custom})).arch == "riscv"
    )
    with pytest.raises(
        MetadataFormatError, match="must be one of arm, arm64, armt, ppc, sparc, x86"
    ):
        check_arch("riscv", "image 'x': arch")
    assert check_arch("armt", "image 'x': arch") == "armt"


# -- encryption ------------------------------------------------------------------

KEY = generate_encryption_key()


def _encrypt(data: bytes, chunk: int = 64) -> tuple[bytes, object]:
    out = io.BytesIO()
    info = encrypt_stream(io.BytesIO(data), out, KEY.public_key(), len(data), chunk)
    assert len(out.getvalue()) == info.ciphertext_length
    return out.getvalue(), info


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=1000), st.integers(1, 300))
def test_encryption_round_trips(data: bytes, chunk: int) -> None:
    ct, info = _encrypt(data, chunk)
    out = io.BytesIO()
    decrypt_stream(io.BytesIO(ct), out, KEY, info)  # type: ignore[arg-type]
    assert out.getvalue() == data
    assert data[:32] not in ct or len(data) < 16


@pytest.mark.parametrize(
    "tamper",
    [
        lambda ct: ct[:-1],  # truncated
        lambda ct: ct + b"\0",  # extended
        lambda ct: ct[:10] + bytes([ct[10] ^ 1]) + ct[11:],  # bit flip
        lambda ct: ct[80:160] + ct[:80] + ct[160:],  # chunks reordered (64 + 16 bytes each)
        lambda ct: ct[:80] + ct[160:],  # a chunk dropped
    ],
)
def test_tampered_ciphertext_does_not_decrypt(tamper: object) -> None:
    ct, info = _encrypt(os.urandom(300))
    with pytest.raises(DecryptionError):
        decrypt_stream(io.BytesIO(tamper(ct)), io.BytesIO(), KEY, info)  # type: ignore[operator, arg-type]


def test_another_ecus_key_cannot_decrypt() -> None:
    ct, info = _encrypt(b"firmware" * 50)
    with pytest.raises(DecryptionError, match="authentication"):
        decrypt_stream(io.BytesIO(ct), io.BytesIO(), generate_encryption_key(), info)  # type: ignore[arg-type]


def test_encryption_info_is_parsed_strictly() -> None:
    from tuf.api.metadata import TargetFile

    _, info = _encrypt(b"abc")
    good = info.to_custom()  # type: ignore[attr-defined]
    target = TargetFile(1, {"sha256": "0" * 64}, "a/b", {"custom": {"encryption": good}})
    assert encryption_info(target) == info
    for bad in (
        {**good, "scheme": "aes-ecb"},
        {**good, "chunkSize": 0},
        {**good, "extra": 1},
        {**good, "ephemeralPublicKey": "00"},
        {**good, "plaintextLength": -1},
        "x",
    ):
        target = TargetFile(1, {"sha256": "0" * 64}, "a/b", {"custom": {"encryption": bad}})
        with pytest.raises(EncryptionFormatError, match="a/b"):
            encryption_info(target)
