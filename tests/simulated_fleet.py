"""Lightweight simulated vehicles for campaign tests: real keys, real signed manifests, real HTTP.

A :class:`SimVehicle` is not an agent: it holds an ed25519 key per ECU,
registers through the API, reads its director targets over HTTP
(timestamp → snapshot → targets) and answers with a vehicle version
manifest in the :mod:`signing.manifest` format, signed by each ECU and by
its primary, saying it installed what it was directed to (or that the
install failed, or waits for consent). Thousands fit in one process.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import urllib3

from signing.keys import generate_signer, public_key_to_dict
from signing.manifest import (
    NO_IMAGE,
    EcuVersionReport,
    ImageInfo,
    InstallOutcome,
    InstallResult,
    VehicleManifest,
)

_HTTP = urllib3.PoolManager(maxsize=32, timeout=urllib3.Timeout(connect=10, read=120))


class HttpError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:300]!r}")
        self.status = status


def http(
    base: str, method: str, path: str, token: str = "", body: Any = None, raw: bytes | None = None
) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = raw
    if body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    resp = _HTTP.request(method, base + path, body=data, headers=headers)
    if resp.status >= 400:
        raise HttpError(resp.status, resp.data)
    return json.loads(resp.data) if resp.data else None


@dataclass
class SimEcu:
    serial: str
    hardware_id: str
    signer: Any = field(default_factory=generate_signer)
    installed: ImageInfo = NO_IMAGE
    counter: int = 0
    last_install: InstallOutcome | None = None


@dataclass
class SimVehicle:
    vin: str
    ecus: list[SimEcu]
    #: what the vehicle does with a directed image: "install", "fail" or "postpone"
    behaviour: str = "install"
    targets_version: int = 0

    @property
    def primary(self) -> SimEcu:
        return self.ecus[0]

    def registration(self, attributes: dict[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "vin": self.vin,
            "primary_ecu_serial": self.primary.serial,
            "ecus": [
                {
                    "serial": e.serial,
                    "hardware_id": e.hardware_id,
                    "public_key": public_key_to_dict(e.signer.public_key),
                }
                for e in self.ecus
            ],
        }
        if attributes:
            body["attributes"] = attributes
        return body

    def manifest(self) -> bytes:
        reports = {}
        for e in self.ecus:
            e.counter += 1
            reports[e.serial] = EcuVersionReport(
                e.serial, e.installed, e.counter, last_install=e.last_install
            ).sign(e.signer)
        signed = VehicleManifest(self.vin, self.primary.serial, reports).sign(self.primary.signer)
        return signed.to_bytes()

    def director_targets(self, base: str) -> dict[str, Any]:
        """The vehicle's current director targets (``signed.targets``), read over HTTP."""
        prefix = f"/director/{self.vin}/metadata"
        timestamp = http(base, "GET", f"{prefix}/timestamp.json")
        snap_version = timestamp["signed"]["meta"]["snapshot.json"]["version"]
        snapshot = http(base, "GET", f"{prefix}/{snap_version}.snapshot.json")
        version = snapshot["signed"]["meta"]["targets.json"]["version"]
        targets = http(base, "GET", f"{prefix}/{version}.targets.json")
        self.targets_version = version
        result: dict[str, Any] = targets["signed"]["targets"]
        return result

    def cycle(self, base: str, heartbeat: bool = False) -> bool:
        """Poll, act on what is directed, report; True when the manifest said something new.

        Like the agent, it reports when something changed, or with ``heartbeat`` anyway.
        """
        changed = False
        for path, entry in self.director_targets(base).items():
            serials = entry["custom"]["ecuIdentifiers"]
            for e in self.ecus:
                if e.serial not in serials or e.installed.filepath == path:
                    continue
                if e.last_install is not None and e.last_install.filepath == path:
                    continue  # reported already (installed, failed, or waiting for consent)
                if self.behaviour == "install":
                    e.installed = ImageInfo.of(path, entry["length"], dict(entry["hashes"]))
                    e.last_install = InstallOutcome(path, InstallResult.INSTALLED)
                elif self.behaviour == "fail":
                    e.last_install = InstallOutcome(path, InstallResult.FAILED, "flash failed")
                else:
                    e.last_install = InstallOutcome(
                        path, InstallResult.POSTPONED, "waiting for precondition consent"
                    )
                changed = True
        if changed or heartbeat:
            self.report(base)
        return changed

    def report(self, base: str) -> Any:
        return http(base, "POST", f"/api/v1/vehicles/{self.vin}/manifest", raw=self.manifest())


def make_fleet(
    count: int, hardware: Iterable[str] = ("stm32f4-bms",), prefix: str = "SIM"
) -> list[SimVehicle]:
    hw = list(hardware)
    return [
        SimVehicle(
            f"{prefix}{i:06d}",
            [SimEcu(f"{prefix}{i:06d}-E{j}", h) for j, h in enumerate(hw)],
        )
        for i in range(count)
    ]


def in_parallel(fn: Callable[[SimVehicle], Any], vehicles: Iterable[SimVehicle]) -> list[Any]:
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(fn, vehicles))
