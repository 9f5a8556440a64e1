"""Server → primary agent → UDS secondary over CAN, with the secondary's own signed report."""

from __future__ import annotations

import json
import uuid
from collections.abc import Generator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import can
import pytest

from client.agent import Agent
from client.config import load_config
from client.provisioning import EcuSpec, provision_vehicle
from hil.uds_ecu import SIMULATOR_SECRET, EcuConfig, UdsEcuSimulator
from hil.uptane_ecu import UptaneEcuFirmware
from signing.keys import load_public_key, public_key_to_dict
from tests.malicious_proxy import resign
from tests.uptake_fixtures import PASSWORD, SELFTEST, ServerProcess, sample

VIN = "VIN-UDS-1"
ECU = "BMS-UDS-1"


@dataclass
class UdsVehicle:
    agent: Agent
    ecu: UdsEcuSimulator
    firmware: UptaneEcuFirmware


def _vehicle(
    server: ServerProcess, tmp_path: Path, server_url: str
) -> Generator[UdsVehicle, None, None]:
    channel = f"uptake-{uuid.uuid4().hex[:8]}"
    director_root = (server.offline_dir / "director-root.json").read_bytes()
    state_dir = tmp_path / "vehicle"
    config_path = provision_vehicle(
        state_dir,
        vin=VIN,
        server_url=server_url,
        primary=EcuSpec("GW-UDS-1", "rpi-gateway"),
        secondaries=[],
        image_root=(server.offline_dir / "image-root.json").read_bytes(),
        director_root=director_root,
        password=PASSWORD.encode(),
        health_check=[SELFTEST],
    )
    # the secondary's key is made at its own factory; only the public key reaches the fleet
    ecu_dir = tmp_path / "ecu"
    public = UptaneEcuFirmware.provision(ecu_dir, director_root, PASSWORD.encode())
    registration = json.loads((state_dir / "registration.json").read_bytes())
    registration["ecus"].append(
        {
            "serial": ECU,
            "hardware_id": "stm32f4-bms",
            "public_key": public_key_to_dict(load_public_key(public)),
        }
    )
    server.admin.request("POST", "/api/v1/vehicles", json_body=registration)
    with open(config_path, "a") as f:
        f.write(
            f'\n[[secondaries]]\necu_serial = "{ECU}"\nhardware_id = "stm32f4-bms"\ntransport = "uds"\n'
            f'options = {{ interface = "virtual", channel = "{channel}", security_secret = "{SIMULATOR_SECRET.hex()}" }}\n'
        )
    firmware = UptaneEcuFirmware(ecu_dir, ECU, "stm32f4-bms", VIN, PASSWORD.encode())
    bus = can.Bus(interface="virtual", channel=channel)
    ecu = UdsEcuSimulator(
        bus,
        ecu_dir / "flash",
        EcuConfig(
            serial=ECU,
            hardware="stm32f4-bms",
            dependency_check=firmware.dependency_check,
            version_report=firmware.version_report,
        ),
    )
    ecu.power_on()
    try:
        yield UdsVehicle(Agent(load_config(config_path), PASSWORD.encode()), ecu, firmware)
    finally:
        ecu.power_off()
        bus.shutdown()


@pytest.fixture
def uds_vehicle(server: ServerProcess, tmp_path: Path) -> Iterator[UdsVehicle]:
    yield from _vehicle(server, tmp_path, server.url)


def _one_mib_image(tmp_path: Path) -> Path:
    image = tmp_path / "bms-1mib.bin"
    data = sample("stm32f4-bms", "1.1.0").read_bytes()
    image.write_bytes(data + bytes((i * 7) & 0xFF for i in range(1024 * 1024 - len(data))))
    return image


def test_primary_flashes_uds_secondary_and_forwards_its_signed_report(
    server: ServerProcess, uds_vehicle: UdsVehicle, tmp_path: Path
) -> None:
    image = _one_mib_image(tmp_path)
    pub = server.publish(image, "stm32f4-bms", "1.1.0")
    server.assign(VIN, ECU, pub.filepath)
    report = uds_vehicle.agent.run_cycle()
    assert report.outcomes[ECU].result == "installed", report
    status = uds_vehicle.ecu.status
    assert uds_vehicle.ecu.read_bank(status.active_bank, status.length) == image.read_bytes()
    record = server.vehicle(VIN)
    ecu = next(e for e in record["ecus"] if e["serial"] == ECU)
    # the server believed it because the ECU's own key signed it (the primary cannot forge it)
    assert ecu["installed"]["filepath"] == pub.filepath and ecu["installed"]["sha256"] == pub.sha256
    assert ecu["last_install"]["result"] == "installed" and ecu["report_counter"] > 0
    assert next(a for a in record["assignments"] if a["ecu_serial"] == ECU)["status"] == "installed"
    assert uds_vehicle.agent.run_cycle().directed == []


def test_uds_secondary_refuses_director_metadata_signed_by_an_attacker(
    server: ServerProcess, tmp_path: Path
) -> None:
    """A primary fooled (or compromised) into passing forged director targets: the ECU's own check refuses."""
    from signing.keys import generate_signer

    image = _one_mib_image(tmp_path)
    pub = server.publish(image, "stm32f4-bms", "1.1.0")
    vehicle_gen = _vehicle(server, tmp_path, server.url)
    vehicle = next(vehicle_gen)
    try:
        server.assign(VIN, ECU, pub.filepath)
        stranger = generate_signer()
        # run verification on the primary, then hand the ECU targets re-signed by a stranger
        agent = vehicle.agent
        state = agent.store.load()
        verified = agent.verify(state)
        assert [d.ecu_serial for d in verified.to_install] == [ECU]
        forged = replace(
            verified,
            director_targets=resign(verified.director_targets, [stranger], lambda s: None),
        )
        outcome = agent.install(state, verified.to_install[0], forged)
        assert outcome.result == "refused" and "signature" in outcome.detail
        report = agent.secondaries[ECU].version_report().ecu_report()
        assert "signature" in report.attacks_detected
        assert report.installed_image.filepath == ""  # still the factory image
    finally:
        vehicle_gen.close()
