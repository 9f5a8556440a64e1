"""Assertions shared by the attack tests: the vehicle refused, kept its image, and both sides know."""

from __future__ import annotations

from typing import Any

from signing.keys import load_signer
from tests.uptake_fixtures import PASSWORD, ServerProcess, Vehicle


def online_signer(server: ServerProcess, name: str) -> Any:
    """The server's online key ``name`` as an attacker who took ``DATA/keys`` holds it."""
    return load_signer(server.data_dir / "keys" / f"{name}.key", PASSWORD.encode())


def assert_attack_reported(server: ServerProcess, vehicle: Vehicle, needle: str) -> None:
    """The primary kept ``needle`` in attacks_detected, its manifest said so, the server recorded it."""
    state = vehicle.state()
    assert needle.lower() in state.ecu(vehicle.primary).attacks_detected.lower(), state.ecu(
        vehicle.primary
    ).attacks_detected
    record = server.vehicle(vehicle.vin)
    primary = next(e for e in record["ecus"] if e["serial"] == vehicle.primary)
    assert needle.lower() in primary["attacks_detected"].lower(), primary["attacks_detected"]
    events = [e for e in record["security_events"] if e["kind"] == "attack_reported"]
    assert events and needle.lower() in events[-1]["detail"].lower(), events


def installed_on_server(server: ServerProcess, vehicle: Vehicle) -> dict[str, str]:
    return {e["serial"]: e["installed"]["filepath"] for e in server.vehicle(vehicle.vin)["ecus"]}
