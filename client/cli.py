"""``uptake agent`` commands: provision, run, inspect and install the in-vehicle agent.

An integrator's path on a real board (a Raspberry Pi with U-Boot, say)::

    uptake agent init --dir /var/lib/uptake --vin VIN --server URL \\
        --primary GW-1:rpi-gateway --image-root image-root.json \\
        --director-root director-root.json --installer uboot \\
        --slot-a /dev/mmcblk0p2 --slot-b /dev/mmcblk0p3 --boot-env /etc/fw_env.config \\
        --reboot "systemctl reboot" --health-check "systemctl is-system-running --wait"
    uptake agent install-service --config /var/lib/uptake/agent.toml
    uptake agent status --config /var/lib/uptake/agent.toml

``init`` checks everything it is given before it writes anything (roots,
names, slots, boot environment, commands); the boot script that pairs with
the installer is in ``client/boot/`` (``boot.cmd`` for U-Boot,
``grub.cfg`` for GRUB).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import sys
import threading
from importlib import resources
from pathlib import Path
from typing import Any

import click

from client.agent import Agent
from client.config import (
    AgentConfig,
    AgentConfigError,
    InstallerConfig,
    InstallerType,
    SlotType,
    load_config,
)
from client.cycle_result import CycleReport, CycleStatus
from client.provisioning import (
    EcuSpec,
    check_image_root_with_server,
    check_trust_anchors,
    provision_vehicle,
)
from client.status import render_text, vehicle_status
from signing.atomic_file import write_atomic
from signing.exceptions import UptakeError
from signing.keys import PASSWORD_ENV

_CONFIG_OPT = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="UPTAKE_AGENT_CONFIG",
    default="/var/lib/uptake/agent.toml",
    show_default=True,
    help="Agent configuration ($UPTAKE_AGENT_CONFIG).",
)

#: Where each installer type keeps its boot variables, unless --boot-env says otherwise.
_DEFAULT_BOOT_ENV = {
    InstallerType.FILE: "bootenv.json",
    InstallerType.UBOOT: "/etc/fw_env.config",
    InstallerType.GRUB: "/boot/grub/grubenv",
    InstallerType.COMMAND: "bootenv.json",
}


def _password() -> bytes:
    value = os.environ.get(PASSWORD_ENV)
    if value:
        return value.encode()
    if not sys.stdin.isatty():
        raise click.ClickException(f"the ECU keys are encrypted: set {PASSWORD_ENV}")
    return str(click.prompt("ECU key password", hide_input=True)).encode()


def _ecu(value: str) -> EcuSpec:
    serial, sep, hw = value.partition(":")
    if not sep or not serial or not hw:
        raise click.BadParameter(f"{value!r}: expected SERIAL:HARDWARE_ID")
    return EcuSpec(serial, hw)


def _command(value: str | None, what: str) -> tuple[str, ...]:
    try:
        return tuple(shlex.split(value or ""))
    except ValueError as exc:
        raise click.BadParameter(f"{value!r}: {exc}", param_hint=what) from exc


def _load(config_path: Path) -> AgentConfig:
    try:
        return load_config(config_path)
    except AgentConfigError as exc:
        raise click.ClickException(str(exc)) from exc


@click.group()
def agent() -> None:
    """The in-vehicle agent (Uptane primary).

    \b
    uptake agent init --dir /var/lib/uptake --vin VIN --server URL --primary GW-1:rpi-gateway \\
        --image-root image-root.json --director-root director-root.json \\
        [--installer uboot --slot-a /dev/mmcblk0p2 --slot-b /dev/mmcblk0p3 \\
         --boot-env /etc/fw_env.config --reboot "systemctl reboot"]
    uptake agent install-service --config /var/lib/uptake/agent.toml   # systemd unit
    uptake agent run --config /var/lib/uptake/agent.toml          # poll forever (systemd)
    uptake agent run --config /var/lib/uptake/agent.toml --once   # one update cycle
    uptake agent status --config /var/lib/uptake/agent.toml [--json]
    ECU keys are encrypted with $UPTAKE_KEY_PASSWORD.
    """


@agent.command("init")
@click.option(
    "--dir",
    "state_dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="State directory of the agent (keys, metadata, journal; /var/lib/uptake on a device).",
)
@click.option("--vin", required=True)
@click.option("--server", "server_url", required=True, help="Server base URL.")
@click.option("--primary", required=True, help="SERIAL:HARDWARE_ID of the primary ECU.")
@click.option(
    "--secondary",
    "secondaries",
    multiple=True,
    help="SERIAL:HARDWARE_ID of a local secondary (repeatable).",
)
@click.option(
    "--image-root",
    type=click.File("rb"),
    required=True,
    help="Trusted image repository root (from the key ceremony).",
)
@click.option(
    "--director-root",
    type=click.File("rb"),
    required=True,
    help="Trusted director root (from the key ceremony).",
)
@click.option(
    "--installer",
    "installer_type",
    type=click.Choice([t.value for t in InstallerType]),
    default=InstallerType.FILE.value,
    show_default=True,
    help="uboot / grub: A/B partitions chosen by the bootloader (client/boot/); file: image "
    "files and a JSON boot environment (development); command: your own installer.",
)
@click.option("--slot-a", help="Slot A: a partition (uboot, grub) or an image file.")
@click.option("--slot-b", help="Slot B: a partition (uboot, grub) or an image file.")
@click.option(
    "--slot-type",
    type=click.Choice([t.value for t in SlotType]),
    help="Override what the slots must be (default: block for uboot and grub, file otherwise).",
)
@click.option(
    "--boot-env",
    help="uboot: fw_env.config (default /etc/fw_env.config); grub: the grubenv block "
    "(default /boot/grub/grubenv); file: the JSON file.",
)
@click.option(
    "--reboot",
    help='Command that reboots the machine (shell words), or "simulate" to play the bootloader '
    'in-process. Default: "systemctl reboot" for uboot and grub, simulate otherwise.',
)
@click.option("--install-command", help="--installer command: installs {image} (shell words).")
@click.option("--rollback-command", help="--installer command: undoes a failed install.")
@click.option(
    "--health-check",
    "health_checks",
    multiple=True,
    help="Health-check command (shell words; {slot} and {slot_path} are replaced). Repeatable.",
)
@click.option("--bootlimit", type=click.IntRange(1, 100), default=3, show_default=True)
@click.option(
    "--offline",
    is_flag=True,
    help="Do not compare --image-root with the server's (a factory without network).",
)
@click.option(
    "--ca-cert",
    type=click.File("rb"),
    envvar="UPTAKE_CA_CERT",
    help="CA that signed the server's TLS certificate (DATA/tls/server-ca.crt of a server with "
    "its own CA); copied to STATE/tls/server-ca.crt. Default: the system's CAs.",
)
@click.option(
    "--allow-plain-http",
    is_flag=True,
    help="Allow an http:// --server that is not on loopback (no TLS: development only).",
)
def agent_init(
    state_dir: Path,
    vin: str,
    server_url: str,
    primary: str,
    secondaries: tuple[str, ...],
    image_root: Any,
    director_root: Any,
    installer_type: str,
    slot_a: str | None,
    slot_b: str | None,
    slot_type: str | None,
    boot_env: str | None,
    reboot: str | None,
    install_command: str | None,
    rollback_command: str | None,
    health_checks: tuple[str, ...],
    bootlimit: int,
    offline: bool,
    ca_cert: Any,
    allow_plain_http: bool,
) -> None:
    """Provision a vehicle: ECU keys, its TLS key and CSR, trusted roots, configuration,
    registration.json.

    Everything is checked before anything is written: both TUF roots signed by
    their own keys, two different roots, each of the repository it is given
    for and of one deployment, and (unless --offline) the image root the one
    the server serves; the names; the slots (block devices for uboot and
    grub), the boot environment (read with fw_printenv or grub-editenv), and
    the reboot and install commands.
    """
    kind = InstallerType(installer_type)
    on_a_board = kind in (InstallerType.UBOOT, InstallerType.GRUB)
    if on_a_board and not (slot_a and slot_b):
        raise click.UsageError(f"--installer {kind} needs --slot-a and --slot-b (partitions)")
    if kind is InstallerType.COMMAND and not install_command:
        raise click.UsageError("--installer command needs --install-command")
    reboot_value: str | tuple[str, ...] = "simulate"
    if reboot is None and on_a_board:
        reboot_value = ("systemctl", "reboot")
    elif reboot is not None and reboot != "simulate":
        reboot_value = _command(reboot, "--reboot")
    try:
        installer = InstallerConfig(
            type=kind,
            slot_a=slot_a or "slots/a.img",
            slot_b=slot_b or "slots/b.img",
            slot_type=SlotType(slot_type) if slot_type else None,
            boot_env=boot_env or _DEFAULT_BOOT_ENV[kind],
            bootlimit=bootlimit,
            reboot=reboot_value,
            install_command=_command(install_command, "--install-command"),
            rollback_command=_command(rollback_command, "--rollback-command"),
        )
        checks = [_command(c, "--health-check") for c in health_checks]
        image_root_bytes, director_root_bytes = image_root.read(), director_root.read()
        check_trust_anchors(image_root_bytes, director_root_bytes)
        note = (
            "not compared with the server (--offline)"
            if offline
            else check_image_root_with_server(
                server_url, image_root_bytes, ca_cert=Path(ca_cert.name) if ca_cert else None
            )
        )
        config = provision_vehicle(
            state_dir,
            vin=vin,
            server_url=server_url,
            primary=_ecu(primary),
            secondaries=[_ecu(s) for s in secondaries],
            image_root=image_root_bytes,
            director_root=director_root_bytes,
            password=_password(),
            installer=installer,
            health_check=checks,
            secondary_health_check=checks,
            server_ca=ca_cert.read() if ca_cert else None,
            allow_plain_http=allow_plain_http,
        )
    except (UptakeError, OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(
        f"Provisioned {vin} in {state_dir}\n  trusted roots: {note}\n  installer:     {kind}"
        f" (slots {installer.slot_a}, {installer.slot_b}; boot environment {installer.boot_env})"
        f"\n  configuration: {config}\n"
        f"  register it:   uptake fleet add-vehicle --from-agent {state_dir / 'registration.json'}\n"
        f"  run it:        uptake agent install-service --config {config}"
    )


@agent.command("run")
@_CONFIG_OPT
@click.option("--once", is_flag=True, help="Run one update cycle and exit with its status (below).")
@click.option(
    "--json", "as_json", is_flag=True, help="With --once: print the cycle's result as JSON."
)
def agent_run(config_path: Path, once: bool, as_json: bool) -> None:
    """Poll the server, verify, install, report (until SIGTERM, or --once).

    \b
    Exit status of --once (also "status" and "exit_code" in --json):
      0   ok: everything directed is installed, or there was nothing to do
      75  postponed: server unreachable, download interrupted, a precondition
          unmet; the next poll retries
      1   failed: an attack was refused, an install failed or rolled back, the
          server refused the manifest, or a configuration mistake (unknown VIN,
          wrong trusted root, bad configuration file)

    Without --once (a service), every step is logged once, at INFO, to stderr
    (journald under systemd); --once prints the steps on stdout instead.
    """
    try:
        config = load_config(config_path)
        narrate = (lambda m: click.echo(f"[agent] {m}")) if once and not as_json else None
        the_agent = Agent(config, _password(), narrate=narrate)
        if once:
            report = the_agent.run_cycle()
            status = report.status
            if as_json:
                click.echo(json.dumps(report.to_json(), indent=2))
            elif status is CycleStatus.OK:
                click.echo(f"[agent] cycle ok: {_summary(report)}")
            else:
                click.echo(f"[agent] cycle {status.value.upper()}:", err=True)
                for reason in report.reasons():
                    click.echo(f"  {reason}", err=True)
            sys.exit(status.exit_code)
        logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        the_agent.run_forever(stop)
    except UptakeError as exc:
        raise click.ClickException(str(exc)) from exc


def _summary(report: CycleReport) -> str:
    installed = [f"{s} {o.filepath}" for s, o in sorted(report.outcomes.items())]
    return ("installed " + ", ".join(installed)) if installed else "nothing to install"


@agent.command("status")
@_CONFIG_OPT
@click.option("--json", "as_json", is_flag=True)
def agent_status(config_path: Path, as_json: bool) -> None:
    """Show every ECU: its image, slot and boot state, the install in progress, the last outcome.

    Reads the agent's files only (no keys, no network, nothing written). Exits 1
    when something is wrong (a missing slot, an unreadable boot environment).
    """
    status = vehicle_status(_load(config_path))
    problems = [f"{config_path}: {p}" for p in status["problems"]]
    status["problems"] = problems
    if as_json:
        click.echo(json.dumps(status, indent=2, sort_keys=True))
    else:
        for problem in problems:
            click.echo(f"PROBLEM: {problem}", err=True)
        for line in render_text(status):
            click.echo(line)
    if problems:
        sys.exit(1)


def _uptake_command() -> str:
    """How systemd should start this very installation of uptake (absolute paths)."""
    beside = Path(sys.executable).parent / "uptake"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return f"{Path(sys.executable).absolute()} -m uptake"


def render_service_unit(config_path: Path, env_file: Path) -> str:
    """The systemd unit for this install: the shipped template with its paths filled in."""
    template = resources.files("client").joinpath("systemd/uptake-agent.service").read_text()
    return (
        template.replace("@UPTAKE@", _uptake_command())
        .replace("@CONFIG@", str(config_path.absolute()))
        .replace("@ENV_FILE@", str(env_file.absolute()))
    )


@agent.command("install-service")
@_CONFIG_OPT
@click.option(
    "--unit-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default="/etc/systemd/system",
    show_default=True,
    help="Where to write uptake-agent.service.",
)
@click.option(
    "--env-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default="/etc/uptake/agent.env",
    show_default=True,
    help=f"File (mode 0600) holding {PASSWORD_ENV}=...; the unit reads it.",
)
def agent_install_service(config_path: Path, unit_dir: Path, env_file: Path) -> None:
    """Write the systemd unit that runs this agent (this uptake, this configuration).

    The configuration is loaded first, so a unit is never written for one the
    agent would refuse. Then: systemctl daemon-reload && systemctl enable --now
    uptake-agent.
    """
    _load(config_path)
    unit = unit_dir / "uptake-agent.service"
    try:
        write_atomic(unit, render_service_unit(config_path, env_file).encode())
    except OSError as exc:
        raise click.ClickException(f"cannot write {unit}: {exc.strerror}") from exc
    click.echo(f"wrote {unit}")
    if not env_file.exists():
        click.echo(f"  create {env_file} (mode 0600) with the line {PASSWORD_ENV}=...")
    click.echo("  then: systemctl daemon-reload && systemctl enable --now uptake-agent")
