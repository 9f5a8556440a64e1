"""Fuzz metadata loading: Uptane custom fields, TUF metadata, the repository's and secondaries' checks.

* ``signing.metadata`` parsers of ``custom`` → ``MetadataFormatError`` only;
* ``Metadata.from_bytes`` (python-tuf) → ``DeserializationError`` only;
* ``ImageRepository.accept_targets`` with edited targets metadata *re-signed
  with the offline targets key* (so the fuzz reaches the checks past the
  signature) → ``ImageRepositoryError`` only, and the repository keeps serving;
* ``client.partial_verification.verify_director_targets`` (what a secondary
  runs) with edited director targets re-signed by the director's key →
  ``PartialVerificationError`` only;
* the agent's ``state.json`` → ``StateError`` only.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st
from securesystemslib.exceptions import FormatError
from tuf.api.metadata import Metadata, Root, TargetFile, Targets
from tuf.api.serialization import DeserializationError, SerializationError
from tuf.api.serialization.json import JSONSerializer

from client.fetcher import ResumableFetcher
from client.partial_verification import PartialVerificationError, verify_director_targets
from client.state import StateError, StateStore
from client.verification import ForeignMetadataError, VehicleBoundFetcher
from server.config import ServerConfig
from server.image_repository import ImageRepository, ImageRepositoryError
from server.service import init_server, open_server
from signing.keys import load_signer
from signing.metadata import (
    ImageCustom,
    MetadataFormatError,
    check_target,
    delta_custom,
    director_custom,
    director_ecus,
    director_vin,
    expiry,
    image_custom,
    parse_requires,
    root_identity,
    set_director_vin,
)
from signing.names import confined, is_name
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

PASSWORD = b"fuzz-password"
_SER = JSONSerializer(compact=False)


@fuzz_settings
@given(
    json_values
    | edited(
        ImageCustom(
            ("rpi-gateway",), 3, "1.1.0", parse_requires({"stm32f4-bms": ">=1.1.0"}, "seed")
        ).to_custom()
    )
)
def test_image_custom(custom: Any) -> None:
    with contextlib.suppress(MetadataFormatError):
        image_custom(TargetFile(1, {"sha256": "00" * 32}, "a/b", {"custom": custom}))


@fuzz_settings
@given(json_values | edited(director_custom({"GW-1": "rpi-gateway", "BMS-1": "stm32f4-bms"})))
def test_director_custom(custom: Any) -> None:
    with contextlib.suppress(MetadataFormatError):
        director_ecus(TargetFile(1, {"sha256": "00" * 32}, "a/b", {"custom": custom}))


@fuzz_settings
@given(json_values | edited({"vin": "VIN1"}))
def test_director_vin(custom: Any) -> None:
    targets = Targets()
    targets.unrecognized_fields["custom"] = custom
    with contextlib.suppress(MetadataFormatError):
        director_vin(targets)


_hashes = st.dictionaries(  # TargetFile itself refuses an empty dict
    st.sampled_from(["sha256", "sha512", "md5"]) | hostile_strings,
    st.sampled_from(["ab" * 32, "ab" * 64, "AB" * 32]) | hostile_strings,
    min_size=1,
    max_size=3,
)


@fuzz_settings
@given(target_paths | hostile_strings, _hashes)
def test_target_names_and_hashes(tmp_path: Path, path: str, hashes: dict[str, str]) -> None:
    """What passes check_target can name a file: inside its directory, whatever it was."""
    try:
        check_target(TargetFile(1, hashes, path), "fuzzed target")
    except MetadataFormatError:
        return
    for digest in hashes.values():
        assert confined(tmp_path, digest).parent == tmp_path
        assert confined(tmp_path, f"{digest}.delta.part").parent == tmp_path
    for part in path.split("/"):
        assert confined(tmp_path, part).parent == tmp_path


@fuzz_settings
@given(hostile_strings | names, hostile_strings | st.just("ab" * 32), _hashes)
def test_delta_custom_names(base: str, result: str, hashes: dict[str, str]) -> None:
    custom = {
        "delta": {
            "base": {"sha256": base, "length": 1},
            "result": {"sha256": result, "length": 2},
            "method": "bsdiff",
        }
    }
    target = TargetFile(10, hashes, f"deltas/{base}-{result}", {"custom": custom})
    try:
        parsed = delta_custom(target)
    except MetadataFormatError:
        return
    assert is_name(parsed.base_sha256) and is_name(parsed.result_sha256)
    assert all(is_name(h) for h in target.hashes.values())


@fuzz_settings
@given(json_values | edited({"repository": "image", "deployment": "abc123"}))
def test_root_identity(custom: Any) -> None:
    root = Root()
    root.unrecognized_fields["custom"] = custom
    with contextlib.suppress(MetadataFormatError):
        root_identity(root)


@fuzz_settings
@given(
    st.binary(max_size=256)
    | deeply_nested()
    | st.builds(
        lambda vin: json.dumps({"signed": {"custom": {"vin": vin}}}).encode(),
        hostile_strings | names | huge_integers,
    )
)
def test_vehicle_bound_fetcher_refuses_only_with_its_error(data: bytes) -> None:
    class Canned(ResumableFetcher):
        def download_bytes(self, url: str, max_length: int) -> bytes:
            return data

    fetcher = VehicleBoundFetcher(Canned(), "VIN1")
    try:
        fetcher.download_bytes("http://x/director/VIN1/metadata/timestamp.json", 1000)
    except ForeignMetadataError:
        return
    assert json.loads(data)["signed"]["custom"]["vin"] == "VIN1"


@dataclass
class Repos:
    image: ImageRepository
    image_targets_key: Any
    director_root: Metadata[Root]
    director_targets_key: Any


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Repos]:
    tmp = tmp_path_factory.mktemp("fuzz-repos")
    config = ServerConfig(tmp / "data", "127.0.0.1", 1, "")
    init_server(config, tmp / "offline", PASSWORD, PASSWORD)
    components = open_server(config, PASSWORD)
    yield Repos(
        components.image_repo,
        load_signer(tmp / "offline" / "image-targets.key", PASSWORD),
        Metadata[Root].from_file(str(tmp / "offline" / "director-root.json")),
        load_signer(config.keys_dir / "director-targets.key", PASSWORD),
    )
    components.engine.dispose()


_NEXT = 10**9  # stands for "the repository's next version" in the template below


def _image_targets_template() -> dict[str, Any]:
    targets = Targets(version=_NEXT, expires=expiry("targets"))
    target = TargetFile(
        3,
        {"sha256": "ab" * 32},
        "rpi-gateway/9.9.9/gateway.elf",
        {"custom": ImageCustom(("rpi-gateway",), 9, "9.9.9").to_custom()},
    )
    targets.targets[target.path] = target
    result: dict[str, Any] = Metadata(targets).to_dict()["signed"]
    return result


def _signed(signed: Any, key: Any) -> bytes:
    """``signed`` wrapped and signed by ``key`` as TUF metadata, or the raw JSON when TUF cannot."""
    try:
        md = Metadata.from_dict({"signed": signed, "signatures": []})
        md.sign(key)
        return md.to_bytes(_SER)
    except (ValueError, KeyError, TypeError, AttributeError, FormatError, SerializationError):
        return json.dumps({"signed": signed, "signatures": []}).encode()


@fuzz_settings
@given(edited(_image_targets_template(), max_edits=3))
@example({**_image_targets_template(), "custom": 0.5})  # once a 500: floats have no canonical JSON
def test_accept_targets(repos: Repos, signed: Any) -> None:
    before = repos.image.targets.signed.version
    if isinstance(signed, dict) and signed.get("version") == _NEXT:
        signed["version"] = before + 1
    try:
        repos.image.accept_targets(_signed(signed, repos.image_targets_key))
    except ImageRepositoryError:
        assert repos.image.targets.signed.version == before
    assert repos.image.metadata_path("timestamp.json") is not None


@fuzz_settings
@given(st.binary(max_size=1024))
def test_accept_targets_bytes(repos: Repos, data: bytes) -> None:
    with contextlib.suppress(ImageRepositoryError):
        repos.image.accept_targets(data)


def _valid_director_targets() -> dict[str, Any]:
    targets = Targets(version=5, expires=expiry("targets"))
    targets.targets["rpi-gateway/1.1.0/gateway.elf"] = TargetFile(
        2664,
        {"sha256": "cd" * 32},
        "rpi-gateway/1.1.0/gateway.elf",
        {"custom": director_custom({"GW-1": "rpi-gateway", "BMS-1": "stm32f4-bms"})},
    )
    set_director_vin(targets, "VIN1")
    result: dict[str, Any] = Metadata(targets).to_dict()["signed"]
    return result


@fuzz_settings
@given(edited(_valid_director_targets(), max_edits=3))
def test_secondary_partial_verification(repos: Repos, signed: Any) -> None:
    assume(isinstance(signed, dict))
    data = _signed(signed, repos.director_targets_key)
    with contextlib.suppress(PartialVerificationError):
        verify_director_targets(
            data,
            repos.director_root,
            vin="VIN1",
            ecu_serial="BMS-1",
            hardware_id="stm32f4-bms",
            min_version=2,
        )


@fuzz_settings
@given(
    st.binary(max_size=512)
    | edited(json.loads(_SER.serialize(Metadata(Targets())))).map(lambda d: json.dumps(d).encode())
)
def test_tuf_metadata_from_bytes(data: bytes) -> None:
    with contextlib.suppress(DeserializationError):
        md = Metadata.from_bytes(data)
        if isinstance(md.signed, Targets):
            for target in md.signed.targets.values():
                with contextlib.suppress(MetadataFormatError):
                    image_custom(target)
                with contextlib.suppress(MetadataFormatError):
                    director_ecus(target)


_STATE = {
    "ecus": {
        "GW-1": {
            "attacks_detected": "",
            "last_install": None,
            "release_counter": 2,
            "report_counter": 9,
        }
    },
    "slot_images": {
        "a": None,
        "b": {"filepath": "x", "fileinfo": {"length": 3, "hashes": {"sha256": "ab" * 32}}},
    },
    "journal": None,
}


@fuzz_settings
@given(
    data=st.binary(max_size=256) | edited(_STATE, max_edits=3).map(lambda d: json.dumps(d).encode())
)
def test_agent_state(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(data)
    with contextlib.suppress(StateError):
        StateStore(path).load()
