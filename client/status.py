"""What ``uptake agent status`` shows: every ECU, read from disk, nothing changed.

:func:`vehicle_status` gathers, without keys, without the network and
without writing anything:

* the **primary**: the image in the slot its bootloader boots, both slots,
  the boot variables (``boot_slot``, ``upgrade_available``, ``bootcount``,
  ``bootlimit``), the install in progress (its journal phase, method, target
  slot, and how many bytes of the image or delta are on disk), the last
  outcome not yet acknowledged by the server, and attacks detected;
* each **secondary**: a local one's running image, bank, boot variables and
  last outcome from its own files; a UDS one only as configured, since
  reading its report over CAN makes it sign one;
* **problems**: a slot that is not what the installer writes to, a boot
  environment its tools cannot read, a state file that does not parse.

:func:`render_text` turns it into the lines the command prints.
"""

from __future__ import annotations

import time
from typing import Any

from client.bootenv import BootEnvironmentError, open_boot_environment
from client.config import AgentConfig, LocalSecondaryConfig
from client.downloads import bytes_held
from client.installer import SlotInstaller
from client.secondaries.base import SecondaryError
from client.secondaries.local import inspect_local_secondary
from client.state import AgentState, StateError, StateStore
from signing.manifest import InstallMethod


def _primary(config: AgentConfig, state: AgentState, problems: list[str]) -> dict[str, Any]:
    serial = config.primary.ecu_serial
    env: dict[str, str] = {}
    try:
        env = open_boot_environment(config).read()
    except BootEnvironmentError as exc:
        problems.append(f"boot environment: {exc}")
    problems.extend(SlotInstaller.from_config(config).check_slots())
    slot = env.get("boot_slot", "a")
    running = state.slot_images.get("a" if slot == "a" else "b")
    ecu = state.ecus.get(serial)
    pending = None
    j = state.journal
    if j is not None:
        delta = j.method is InstallMethod.DELTA
        name = f"{j.delta_sha256}.delta" if delta else j.sha256
        pending = {
            "filepath": j.filepath,
            "phase": j.phase.value,
            "method": j.method.value,
            "target_slot": j.target_slot,
            "bytes_done": bytes_held(config.path("downloads"), name),
            "bytes_total": j.delta_length if delta else j.length,
            "health_failures": list(j.health_failures),
        }
    return {
        "serial": serial,
        "hardware_id": config.primary.hardware_id,
        "role": "primary",
        "installer": config.installer.type.value,
        "installed": running.to_dict() if running else None,
        "slot": slot,
        "slots": {s: (i.to_dict() if i else None) for s, i in sorted(state.slot_images.items())},
        "boot": env,
        "release_counter": ecu.release_counter if ecu else 0,
        "attacks_detected": ecu.attacks_detected if ecu else "",
        "last_install": ecu.last_install.to_dict() if ecu and ecu.last_install else None,
        "pending": pending,
    }


def _secondaries(
    config: AgentConfig, state: AgentState, problems: list[str]
) -> list[dict[str, Any]]:
    result = []
    for sec in config.secondaries:
        ecu = state.ecus.get(sec.ecu_serial)
        entry: dict[str, Any] = {
            "serial": sec.ecu_serial,
            "hardware_id": sec.hardware_id,
            "role": "secondary",
            "transport": sec.transport,
            "release_counter": ecu.release_counter if ecu else 0,
        }
        if isinstance(sec, LocalSecondaryConfig):
            try:
                entry.update(inspect_local_secondary(config.path(sec.state_directory)))
            except (SecondaryError, BootEnvironmentError) as exc:
                problems.append(f"secondary {sec.ecu_serial}: {exc}")
        else:
            entry["bus"] = f"{sec.options.interface} {sec.options.channel}"
            entry["installed"] = None  # only its signed report says, and asking costs a signature
        result.append(entry)
    return result


def vehicle_status(config: AgentConfig) -> dict[str, Any]:
    """Everything ``uptake agent status`` shows (see module docstring); writes nothing."""
    problems: list[str] = []
    try:
        state = StateStore(config.path("state.json")).load()
    except StateError as exc:
        problems.append(str(exc))
        state = AgentState()
    return {
        "vin": config.agent.vin,
        "state_dir": str(config.state_dir),
        "ecus": [_primary(config, state, problems), *_secondaries(config, state, problems)],
        "manifest_sent_at": state.manifest_sent_at or None,
        "problems": problems,
    }


def _image(image: dict[str, Any] | None) -> str:
    return image["filepath"] if image else "(nothing installed)"


def _outcome(outcome: dict[str, Any] | None) -> str:
    if not outcome:
        return "none pending report"
    detail = f": {outcome['detail']}" if outcome.get("detail") else ""
    return f"{outcome['result']} {outcome['filepath']} ({outcome['method']}){detail}"


def render_text(status: dict[str, Any]) -> list[str]:
    """The lines of ``uptake agent status`` for a person."""
    lines = [f"vehicle {status['vin']} (state in {status['state_dir']})"]
    for ecu in status["ecus"]:
        boot = ecu.get("boot") or {}
        lines.append(f"{ecu['role']} {ecu['serial']} ({ecu['hardware_id']})")
        if ecu.get("bus"):
            lines.append(f"  transport uds on {ecu['bus']}: reports only when the agent asks")
            continue
        lines.append(
            f"  running       {_image(ecu.get('installed'))} (slot {ecu.get('slot', '?')})"
        )
        lines.append(
            f"  boot          boot_slot={boot.get('boot_slot', '?')} "
            f"upgrade_available={boot.get('upgrade_available', '0')} "
            f"bootcount={boot.get('bootcount', '0')} bootlimit={boot.get('bootlimit', '?')}"
        )
        for slot, image in sorted((ecu.get("slots") or {}).items()):
            lines.append(
                f"  slot {slot}        {_image(image) if image else '(empty or being written)'}"
            )
        pending = ecu.get("pending")
        if pending:
            progress = ""
            if "bytes_done" in pending:
                progress = f", {pending['bytes_done']}/{pending['bytes_total']} bytes on disk"
            lines.append(
                f"  installing    {pending['filepath']} (phase {pending['phase']}"
                f"{', ' + pending['method'] if 'method' in pending else ''}{progress})"
            )
        lines.append(f"  last outcome  {_outcome(ecu.get('last_install'))}")
        if ecu.get("attacks_detected"):
            lines.append(f"  ATTACK        {ecu['attacks_detected']}")
    sent = status.get("manifest_sent_at")
    lines.append(
        "last manifest accepted "
        + (time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(sent)) if sent else "never")
    )
    return lines
