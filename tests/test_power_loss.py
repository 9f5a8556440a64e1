"""Fault injection: SIGKILL the agent at random instants of an install (and of a rollback).

After every kill the device must be bootable (the slot the bootloader will
boot holds a complete, verified image, or is on trial with one), and after
the agent restarts, the device must end committed on the right image with
the server's record (built from the next signed manifest) telling the truth.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import time
from pathlib import Path

import pytest

from client.installer import Slot
from tests.uptake_fixtures import SELFTEST, ServerProcess, Vehicle, sample

KILLS = int(os.environ.get("UPTAKE_POWER_LOSS_KILLS", "200"))


def _slot_sha256(vehicle: Vehicle, slot: str, length: int) -> str:
    with open(vehicle.state_dir / "slots" / f"{slot}.img", "rb") as f:
        return hashlib.sha256(f.read(length)).hexdigest()


def _assert_bootable(vehicle: Vehicle) -> None:
    env = vehicle.boot_env()
    state = vehicle.state()
    boot_slot = env.get("boot_slot", "a")  # no env yet: the factory default
    assert boot_slot in ("a", "b")
    slot: Slot = "a" if boot_slot == "a" else "b"
    image = state.slot_images.get(slot)
    if image is None:
        # only the factory state (nothing ever installed) boots an unrecorded slot
        assert not any(state.slot_images.values()) or (
            env["upgrade_available"] == "0" and slot == "a"
        ), (env, state)
        return
    assert _slot_sha256(vehicle, slot, image.length) == image.hashes["sha256"], (
        f"slot {slot} is not the image the state claims"
    )


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_random_sigkill_during_updates_and_rollbacks(server: ServerProcess, tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("UPTAKE_POWER_LOSS_SEED", "20261121")))
    vehicle = Vehicle(tmp_path, server, secondaries=False, health_check=[SELFTEST])
    good, broken = (
        sample("rpi-gateway", "1.1.0").read_bytes(),
        sample("rpi-gateway", "2.0.0").read_bytes(),
    )
    current = ""
    kills = iteration = 0
    phases: dict[str, int] = {}
    install_window = 0.0  # measured by the first install, which runs uninterrupted
    while kills < KILLS:
        iteration += 1
        is_broken = iteration % 3 == 0  # every third release fails its health check: a rollback
        image = tmp_path / "image.elf"
        image.write_bytes((broken if is_broken else good) + rng.randbytes(6 * 1024 * 1024))
        pub = server.publish(image, "rpi-gateway", f"3.{iteration}.0")
        server.assign(vehicle.vin, vehicle.primary, pub.filepath)

        proc = vehicle.spawn()
        # aim at the install itself: wait for its journal, then kill somewhere in the window
        # (one kill in five lands earlier, during start-up, verification or download)
        early = bool(install_window) and rng.random() < 0.2
        journal_seen = time.monotonic()
        while not early and proc.poll() is None and vehicle.state().journal is None:
            time.sleep(0.002)
            journal_seen = time.monotonic()
        if install_window:
            time.sleep(rng.uniform(0.0, 1.0 if early else install_window))
            if proc.poll() is None:
                journal = vehicle.state().journal
                proc.send_signal(signal.SIGKILL)
                kills += 1
                phase = journal.phase.value if journal else "none"
                phases[phase] = phases.get(phase, 0) + 1
        proc.wait()
        if not install_window:
            install_window = time.monotonic() - journal_seen
        _assert_bootable(vehicle)

        vehicle.run_once()  # power back on
        vehicle.run_once()  # and one more poll: nothing may be left half-done
        env, state = vehicle.boot_env(), vehicle.state()
        assert state.journal is None and env["upgrade_available"] == "0"
        if not is_broken:
            current = pub.filepath
        assert vehicle.booted_image() == current, f"iteration {iteration}: expected {current}"
        _assert_bootable(vehicle)
        primary = next(
            e for e in server.vehicle(vehicle.vin)["ecus"] if e["serial"] == vehicle.primary
        )
        assert primary["installed"]["filepath"] == current, "the manifest does not tell the truth"
    print(f"\n{kills} SIGKILLs over {iteration} installs; journal phase at the kill: {phases}")
