"""Names in signed metadata never become paths outside the agent's download directory.

The agent names its downloads after hashes from signed metadata (``downloads/<sha256>``,
``downloads/<sha256>.delta``, their ``.part`` and ``.resume`` files). An attacker who holds
a key signing such a name (the ONLINE deltas key alone, for a delta's hash; a stolen
offline targets key with the director's online key, for an image's) puts a path there
instead: absolute, or climbing with ``..``. Every name from metadata follows the grammar of
:mod:`signing.names` and every download path is built with ``confined``, so:

* a delta whose ``hashes.sha256`` is a path is refused, reported as an attack, and the
  vehicle installs from the full image; no file appears outside its directory;
* an image or a director target whose hash or path is not of the grammar is refused and
  reported, and the vehicle keeps its image.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tuf.api.metadata import TargetFile, Targets

from signing.metadata import DeltaCustom, ImageCustom, delta_target_path
from tests.attacks.deployment import GATEWAY, Deployment
from tests.attacks.vehicle_checks import assert_attack_reported
from tests.malicious_proxy import resign


def _escape_dir(d: Deployment) -> Path:
    escape = d.tmp / "escape"
    escape.mkdir(exist_ok=True)
    return escape


def _bad_names(d: Deployment) -> dict[str, str]:
    """An absolute path and a climbing one, both aimed at an existing directory."""
    escape = _escape_dir(d)
    downloads = d.vehicle.state_dir / "downloads"
    climbing = Path("..", "..", escape.relative_to(d.tmp), "evil").as_posix()
    assert (downloads / climbing).resolve().parent == escape  # where the old agent wrote
    return {"absolute": str(escape / "evil"), "climbing": climbing}


@pytest.mark.parametrize("kind", ["absolute", "climbing"])
def test_delta_hash_that_is_a_path_is_refused_and_reported(
    deployment: Deployment, kind: str
) -> None:
    d = deployment
    new = d.publish(GATEWAY, "1.1.0")
    evil_name = _bad_names(d)[kind]
    deltas_key = d.online_signer("image-deltas")  # the ONLINE key alone
    path = delta_target_path(d.baseline.sha256, new.sha256)
    evil = TargetFile(100, {"sha256": evil_name}, path)
    evil.unrecognized_fields["custom"] = DeltaCustom(
        d.baseline.sha256, d.baseline.length, new.sha256, new.length, "bsdiff"
    ).to_custom()

    def add_evil(signed: Targets) -> None:
        signed.targets[path] = evil

    d.proxy.rewrites.append(
        lambda p, body: (
            resign(body, [deltas_key], add_evil)
            if p.startswith("/image/metadata/") and p.endswith(".deltas.json")
            else None
        )
    )
    d.server.assign(d.vehicle.vin, d.vehicle.primary, new.filepath)
    report = d.attack()
    outcome = report["outcomes"][d.vehicle.primary]
    assert outcome["result"] == "installed" and outcome["method"] == "full", report
    assert d.vehicle.booted_image() == new.filepath
    assert sorted(_escape_dir(d).iterdir()) == []  # nothing created (.delta.part, .resume)
    assert report["manifest_accepted"], report
    assert_attack_reported(d.server, d.vehicle, "lowercase hex")


_GRAMMAR_BREAKS = {
    "image hash is an absolute path": ("sha256", "absolute"),
    "image hash climbs out": ("sha256", "climbing"),
    "target path climbs out": ("path", "climbing"),
}


@pytest.mark.parametrize("case", list(_GRAMMAR_BREAKS))
def test_image_named_with_a_path_is_refused_and_reported(deployment: Deployment, case: str) -> None:
    """A stolen offline targets key signs the image entry, the director's online key directs it."""
    d = deployment
    field, kind = _GRAMMAR_BREAKS[case]
    evil_name = _bad_names(d)[kind]
    real = d.image_target(d.publish(GATEWAY, "1.1.0").filepath)
    sha = evil_name if field == "sha256" else real.hashes["sha256"]
    path = f"{GATEWAY}/{evil_name}" if field == "path" else "rpi-gateway/6.6.6/gateway.elf"
    evil = TargetFile(real.length, {"sha256": sha}, path)
    evil.unrecognized_fields["custom"] = ImageCustom((GATEWAY,), 99, "6.6.6").to_custom()

    def add_evil(signed: Targets) -> None:
        signed.targets[path] = evil

    offline_targets_key = d.server.targets_signer
    d.proxy.rewrites.append(
        lambda p, body: (
            resign(body, [offline_targets_key], add_evil)
            if p.startswith("/image/metadata/") and p.endswith(".targets.json")
            else None
        )
    )

    def direct_evil(signed: Targets) -> None:
        signed.targets = {path: d.director_target(evil, {d.vehicle.primary: GATEWAY})}

    d.on_director_targets(direct_evil)
    d.server.assign(d.vehicle.vin, d.vehicle.primary, d.publish(GATEWAY, "1.1.0").filepath)
    needle = "lowercase hex" if field == "sha256" else "not a target path"
    d.assert_refused(d.attack(), needle)
    assert sorted(_escape_dir(d).iterdir()) == []
