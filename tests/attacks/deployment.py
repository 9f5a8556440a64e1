"""A deployment under attack: server, malicious proxy, and a vehicle that only talks to the proxy.

Every attack test follows the same shape:

1. :class:`Deployment` installs a good gateway image (1.0.0) on the vehicle
   *through* the proxy, with no attack mounted, so there is something to keep;
2. the test publishes or directs something new and mounts the attack: proxy
   rewrites (an attacker on the network or a compromised CDN), or metadata
   re-signed with keys taken from the server's ``DATA/keys`` (a compromised
   director or online role), or with offline keys (a compromised release
   engineer);
3. one agent cycle runs (``uptake agent run --once``), and
   :meth:`Deployment.assert_refused` checks the four promises: the vehicle
   refused, still boots the image it had, named the attack in the
   ``attacks_detected`` of the manifest it sent right after, and the server
   recorded that as a security event.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import urllib3
from tuf.api.metadata import Metadata, TargetFile, Targets

from server.release import Published
from signing.keys import load_signer
from signing.manifest import ImageInfo
from signing.metadata import director_custom
from tests.malicious_proxy import MaliciousProxy, resign
from tests.uptake_fixtures import PASSWORD, ServerProcess, Vehicle, sample

GATEWAY = "rpi-gateway"
BMS = "stm32f4-bms"


class Deployment:
    """See module docstring. ``baseline`` is the gateway image installed before any attack."""

    def __init__(self, tmp: Path, server: ServerProcess, vin: str = "VIN0001") -> None:
        self.tmp = tmp
        self.server = server
        self.proxy = MaliciousProxy(server.url)
        self.vehicle = Vehicle(tmp, server, vin=vin, server_url=self.proxy.url)
        self._http = urllib3.PoolManager(retries=False, timeout=10.0)
        self.published: dict[tuple[str, str], Published] = {}
        self.baseline = self.publish(GATEWAY, "1.0.0")
        self.install(self.vehicle.primary, self.baseline)

    def close(self) -> None:
        self.proxy.close()

    # -- the legitimate side -----------------------------------------------------

    def publish(self, hardware_id: str, version: str, **kwargs: Any) -> Published:
        key = (hardware_id, version)
        if key not in self.published:
            self.published[key] = self.server.publish(
                sample(hardware_id, version), hardware_id, version, **kwargs
            )
        return self.published[key]

    def install(self, ecu: str, image: Published) -> None:
        """Assign ``image`` to ``ecu`` and run one honest cycle that installs it."""
        self.server.assign(self.vehicle.vin, ecu, image.filepath)
        report = self.vehicle.run_once().report
        assert report["outcomes"][ecu]["result"] == "installed", report
        if ecu == self.vehicle.primary:
            self.baseline = image

    def baseline_image_info(self) -> ImageInfo:
        return ImageInfo.of(
            self.baseline.filepath, self.baseline.length, {"sha256": self.baseline.sha256}
        )

    # -- the attacker's tools ------------------------------------------------------

    def online_signer(self, name: str) -> Any:
        """An online key (``director-targets``, ``image-timestamp``...) as an intruder on the server holds it."""
        return load_signer(self.server.data_dir / "keys" / f"{name}.key", PASSWORD.encode())

    def upstream(self, path: str) -> bytes:
        """GET ``path`` from the real server, bypassing the proxy (what the attacker can read)."""
        resp = self._http.request("GET", self.server.url + path)
        assert resp.status == 200, (path, resp.status)
        return bytes(resp.data)

    def image_target(self, filepath: str) -> TargetFile:
        """The image repository's signed entry for ``filepath``."""
        metadata = self.server.data_dir / "image-repo" / "metadata"
        latest = max(metadata.glob("*.targets.json"), key=lambda p: int(p.name.split(".")[0]))
        return Metadata[Targets].from_file(str(latest)).signed.targets[filepath]

    @staticmethod
    def director_target(
        image: TargetFile, ecus: dict[str, str], path: str | None = None
    ) -> TargetFile:
        """A director target entry installing ``image`` on ``ecus`` (serial -> hardware id)."""
        return TargetFile(
            image.length, dict(image.hashes), path or image.path, {"custom": director_custom(ecus)}
        )

    def director_path(self, vin: str | None = None) -> str:
        return f"/director/{vin or self.vehicle.vin}/metadata/"

    def on_director_targets(self, mutate: Callable[[Targets], None], signer: Any = None) -> None:
        """Rewrite every director targets metadata the vehicle fetches, re-signed (by default
        with the director's own online targets key: a compromised director)."""
        signer = signer or self.online_signer("director-targets")
        prefix = self.director_path()
        self.proxy.rewrites.append(
            lambda path, body: (
                resign(body, [signer], mutate)
                if path.startswith(prefix) and path.endswith(".targets.json")
                else None
            )
        )

    # -- the four promises -----------------------------------------------------------

    def attack(self) -> dict[str, Any]:
        """One agent cycle with the attack mounted; the agent itself must not crash."""
        return self.vehicle.run_once().report

    def assert_refused(self, report: dict[str, Any], needle: str, ecu: str | None = None) -> None:
        """Refused, kept the installed image, reported it, and the server recorded it."""
        vehicle, ecu = self.vehicle, ecu or self.vehicle.primary
        error = report["verification_error"] or report["outcomes"].get(ecu, {}).get("detail", "")
        assert needle.lower() in error.lower(), report
        assert report["outcomes"].get(ecu, {}).get("result", "refused") == "refused", report
        # keeps its installed image: same slot booted, committed, bytes intact
        assert vehicle.booted_image() == self.baseline.filepath
        env = vehicle.boot_env()
        assert env["upgrade_available"] == "0", env
        slot = (vehicle.state_dir / "slots" / f"{env['boot_slot']}.img").read_bytes()
        assert hashlib.sha256(slot[: self.baseline.length]).hexdigest() == self.baseline.sha256
        # reports it: attacks_detected of the primary, in the manifest sent right after
        detected = vehicle.state().ecu(vehicle.primary).attacks_detected
        assert needle.lower() in detected.lower(), detected
        assert report["manifest_accepted"], report
        # and the server recorded it
        record = self.server.vehicle(vehicle.vin)
        primary = next(e for e in record["ecus"] if e["serial"] == vehicle.primary)
        assert primary["installed"]["filepath"] == self.baseline.filepath
        assert needle.lower() in primary["attacks_detected"].lower(), primary
        events = [e for e in record["security_events"] if e["kind"] == "attack_reported"]
        assert events and needle.lower() in events[-1]["detail"].lower(), record["security_events"]
