"""Coverage-guided fuzzing (atheris / libFuzzer) of the parsers: on demand, not part of CI.

atheris is an optional dev tool (``.venv/bin/pip install atheris``; wheels
exist for CPython 3.11 on Linux x86-64). Each target takes the fuzzer's
bytes, feeds them to one parser, and lets through only the error type that
parser documents; anything else is a crash that libFuzzer reports, with the
input saved as ``crash-<sha1>``::

    .venv/bin/python -m tests.fuzz.atheris_targets manifest -max_total_time=60
    .venv/bin/python -m tests.fuzz.atheris_targets delta -atheris_runs=200000 corpus/

Targets: ``manifest`` (parse + verify a vehicle manifest), ``delta`` (the
input is a delta payload, re-framed with a valid header so every decoder is
reached), ``delta-header``, ``agent-config`` (TOML), ``server-config``
(JSON), ``metadata`` (TUF metadata + Uptane custom fields), ``state``
(the agent's state.json).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from tuf.api.metadata import Metadata, TargetFile, Targets
    from tuf.api.serialization import DeserializationError

    from client.config import AgentConfigError, load_config
    from client.delta_apply import DeltaError, apply_delta
    from client.state import StateError, StateStore
    from server.config import ConfigError, ServerConfig
    from signing import delta_format as fmt
    from signing.keys import generate_signer
    from signing.manifest import (
        EcuVersionReport,
        ImageInfo,
        InstallOutcome,
        InstallResult,
        ManifestError,
        VehicleManifest,
        parse_vehicle_manifest,
    )
    from signing.metadata import (
        ImageCustom,
        MetadataFormatError,
        director_custom,
        director_ecus,
        director_vin,
        image_custom,
        set_director_vin,
    )

_KEY = generate_signer()
_SAMPLES = Path(__file__).resolve().parents[2] / "firmware-samples" / "rpi-gateway"
_OLD = (_SAMPLES / "1.0.0" / "gateway.elf").read_bytes()
_SCRATCH = Path(tempfile.mkdtemp(prefix="uptake-atheris-"))


def manifest(data: bytes) -> None:
    with contextlib.suppress(ManifestError):
        envelope, parsed = parse_vehicle_manifest(data)
        envelope.verify(_KEY.public_key, "vehicle manifest")
        parsed.reports()


def delta(data: bytes) -> None:
    if not data:
        return
    method = ("bsdiff", "zstd-dict", "windows")[data[0] % 3]
    patch = fmt.encode_delta(
        method, (len(_OLD), hashlib.sha256(_OLD).digest()), (len(data) * 4, bytes(32)), data[1:]
    )
    with contextlib.suppress(DeltaError):
        apply_delta(io.BytesIO(_OLD), io.BytesIO(patch), io.BytesIO())


def delta_header(data: bytes) -> None:
    with contextlib.suppress(fmt.DeltaFormatError):
        fmt.decode_header(io.BytesIO(data))


def agent_config(data: bytes) -> None:
    path = _SCRATCH / "agent.toml"
    path.write_bytes(data)
    with contextlib.suppress(AgentConfigError):
        load_config(path)


def server_config(data: bytes) -> None:
    (_SCRATCH / "server.json").write_bytes(data)
    with contextlib.suppress(ConfigError):
        ServerConfig.load(_SCRATCH)


def metadata(data: bytes) -> None:
    try:
        md = Metadata.from_bytes(data)
    except DeserializationError:
        return
    if isinstance(md.signed, Targets):
        with contextlib.suppress(MetadataFormatError):
            director_vin(md.signed)
        for target in md.signed.targets.values():
            with contextlib.suppress(MetadataFormatError):
                image_custom(target)
            with contextlib.suppress(MetadataFormatError):
                director_ecus(target)


def state(data: bytes) -> None:
    path = _SCRATCH / "state.json"
    path.write_bytes(data)
    with contextlib.suppress(StateError):
        StateStore(path).load()


TARGETS: dict[str, Callable[[bytes], None]] = {
    "manifest": manifest,
    "delta": delta,
    "delta-header": delta_header,
    "agent-config": agent_config,
    "server-config": server_config,
    "metadata": metadata,
    "state": state,
}


def _seeds(name: str) -> list[bytes]:
    """Valid inputs to start from: JSON and TOML are parsed in C, invisible to coverage."""
    image = ImageInfo.of("rpi-gateway/1.0.0/gateway.elf", len(_OLD), {"sha256": "ab" * 32})
    report = EcuVersionReport(
        "GW-1", image, 3, "", InstallOutcome(image.filepath, InstallResult.INSTALLED)
    ).sign(_KEY)
    targets = Targets(version=2)
    target = TargetFile(
        3,
        {"sha256": "ab" * 32},
        "a/b.bin",
        {
            "custom": {
                **ImageCustom(("hw",), 1, "1.0").to_custom(),
                **director_custom({"GW-1": "hw"}),
            }
        },
    )
    targets.targets[target.path] = target
    set_director_vin(targets, "VIN1")
    example = Path(__file__).resolve().parents[2] / "client" / "agent.example.toml"
    return {
        "manifest": [VehicleManifest("VIN1", "GW-1", {"GW-1": report}).sign(_KEY).to_bytes()],
        "delta": [b"\x00" + bytes(64)],
        "delta-header": [fmt.encode_delta("bsdiff", (1, bytes(32)), (1, bytes(32)), b"x")],
        "agent-config": [example.read_bytes()],
        "server-config": [
            b'{"host": "127.0.0.1", "port": 8080, "database_url": "", "encrypt_images": false}'
        ],
        "metadata": [Metadata(targets).to_bytes()],
        "state": [
            b'{"ecus": {"GW-1": {"attacks_detected": "", "last_install": null, "release_counter": 2,'
            b' "report_counter": 9}}, "slot_images": {"a": null}, "journal": null}'
        ],
    }[name]


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        print(__doc__)
        sys.exit(2)
    name = sys.argv.pop(1)
    if not any(not a.startswith("-") for a in sys.argv[1:]):  # no corpus directory: seed one
        corpus = _SCRATCH / f"corpus-{name}"
        corpus.mkdir()
        for i, seed in enumerate(_seeds(name)):
            (corpus / f"seed-{i}").write_bytes(seed)
        sys.argv.append(str(corpus))
    atheris.Setup(sys.argv, TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
