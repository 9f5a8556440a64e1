"""``uptake agent`` commands: provision, run and inspect the in-vehicle agent."""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from client.agent import Agent, AgentError
from client.bootenv import BootEnvironmentError
from client.config import AgentConfigError, load_config
from client.cycle_result import CycleReport, CycleStatus
from client.installer import InstallError, check_slot
from client.provisioning import (
    EcuSpec,
    ProvisioningError,
    check_image_root_with_server,
    check_trust_anchors,
    provision_vehicle,
)
from client.secondaries.base import SecondaryError
from client.state import StateError
from signing.keys import PASSWORD_ENV, KeyFileError

_CONFIG_OPT = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="UPTAKE_AGENT_CONFIG",
    default="/etc/uptake/agent.toml",
    show_default=True,
    help="Agent configuration ($UPTAKE_AGENT_CONFIG).",
)
_AGENT_ERRORS = (
    AgentError,
    AgentConfigError,
    StateError,
    BootEnvironmentError,
    SecondaryError,
    KeyFileError,
)


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


@click.group()
def agent() -> None:
    """The in-vehicle agent (Uptane primary).

    \b
    uptake agent init --dir /var/lib/uptake --vin VIN --server URL --primary GW-1:rpi-gateway \\
        --secondary BMS-1:stm32f4-bms --image-root image-root.json --director-root director-root.json
    uptake agent run --config /var/lib/uptake/agent.toml          # poll forever (systemd)
    uptake agent run --config /var/lib/uptake/agent.toml --once   # one update cycle
    uptake agent status --config /var/lib/uptake/agent.toml --json
    ECU keys are encrypted with $UPTAKE_KEY_PASSWORD.
    """


@agent.command("init")
@click.option(
    "--dir",
    "state_dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="State directory of the agent (keys, metadata, slots, journal).",
)
@click.option("--vin", required=True)
@click.option("--server", "server_url", required=True, help="Server base URL.")
@click.option("--primary", required=True, help="SERIAL:HARDWARE_ID of the primary ECU.")
@click.option(
    "--secondary",
    "secondaries",
    multiple=True,
    help="SERIAL:HARDWARE_ID of a secondary (repeatable).",
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
    "--health-check",
    "health_checks",
    multiple=True,
    help="Health-check command (shell words; {slot_path} is replaced). Repeatable.",
)
@click.option("--bootlimit", type=click.IntRange(1, 100), default=3, show_default=True)
@click.option(
    "--offline",
    is_flag=True,
    help="Do not compare --image-root with the server's (a factory without network).",
)
def agent_init(
    state_dir: Path,
    vin: str,
    server_url: str,
    primary: str,
    secondaries: tuple[str, ...],
    image_root: Any,
    director_root: Any,
    health_checks: tuple[str, ...],
    bootlimit: int,
    offline: bool,
) -> None:
    """Provision a vehicle: ECU keys, trusted roots, configuration, registration.json.

    The trusted roots are checked first: both TUF roots signed by their own keys,
    two different roots, each of the repository it is given for and of one
    deployment, and (unless --offline) the image root the one the server serves.
    """
    try:
        checks = [shlex.split(c) for c in health_checks]
        image_root_bytes, director_root_bytes = image_root.read(), director_root.read()
        check_trust_anchors(image_root_bytes, director_root_bytes)
        note = (
            "not compared with the server (--offline)"
            if offline
            else check_image_root_with_server(server_url, image_root_bytes)
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
            health_check=checks,
            secondary_health_check=checks,
            bootlimit=bootlimit,
        )
    except (ProvisioningError, KeyFileError, OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(
        f"Provisioned {vin} in {state_dir}\n  trusted roots: {note}\n  configuration: {config}\n"
        f"  register it:   uptake fleet add-vehicle --from-agent {state_dir / 'registration.json'}"
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
    """
    try:
        config = load_config(config_path)
        narrate = None if as_json else (lambda m: click.echo(f"[agent] {m}"))
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
    except _AGENT_ERRORS as exc:
        raise click.ClickException(str(exc)) from exc


def _summary(report: CycleReport) -> str:
    installed = [f"{s} {o.filepath}" for s, o in sorted(report.outcomes.items())]
    return ("installed " + ", ".join(installed)) if installed else "nothing to install"


@agent.command("status")
@_CONFIG_OPT
@click.option("--json", "as_json", is_flag=True)
def agent_status(config_path: Path, as_json: bool) -> None:
    """Show the boot state, what each slot holds, and any install in progress."""
    from client.agent import make_boot_environment
    from client.state import StateStore

    try:
        config = load_config(config_path)
        state = StateStore(config.path(Path("state.json"))).load()
    except _AGENT_ERRORS as exc:
        raise click.ClickException(str(exc)) from exc
    problems = []
    env: dict[str, str] = {}
    try:
        env = make_boot_environment(config).read()
    except BootEnvironmentError as exc:
        problems.append(f"{config_path}: boot environment: {exc}")
    for slot, path in (("a", config.installer.slot_a), ("b", config.installer.slot_b)):
        try:
            check_slot(slot, config.path(path), config.installer.slot_type)
        except InstallError as exc:
            problems.append(f"{config_path}: {exc}")
    data = {"boot": env, **state.to_dict(), "problems": problems}
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
        sys.exit(1 if problems else 0)
    for problem in problems:
        click.echo(f"PROBLEM: {problem}", err=True)
    click.echo(
        f"boot slot {env.get('boot_slot', '?')}, upgrade_available={env.get('upgrade_available', '0')}, "
        f"bootcount={env.get('bootcount', '0')}"
    )
    for slot, image in sorted(state.slot_images.items()):
        click.echo(f"  slot {slot}: {image.filepath if image else '(empty or being written)'}")
    if state.journal:
        click.echo(f"  install in progress: {state.journal.filepath} (phase {state.journal.phase})")
    if problems:
        sys.exit(1)
