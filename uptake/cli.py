"""The ``uptake`` command.

One click group whose subcommands live next to the code they drive
(``server.cli``, ``client.cli``, ``hil.cli``...). They are imported lazily so
that a vehicle with only ``uptake[client]`` installed can run ``uptake agent``
without the server's dependencies, and gets a clear message (not a traceback)
when it asks for a command whose extra is missing.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys

import click

# command name -> ("module:attribute", extra that provides its dependencies)
_LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "server": ("server.cli:server", "server"),
    "release": ("server.release_cli:release", "server"),
    "keys": ("server.keys_cli:keys", "server"),
    "delegation": ("server.delegation_cli:delegation", "server"),
    "fleet": ("server.fleet_cli:fleet", "server"),
    "admin": ("server.admin_cli:admin", "server"),
    "campaign": ("server.campaign_cli:campaign", "server"),
    "audit": ("server.audit_cli:audit", "server"),
    "agent": ("client.cli:agent", "client"),
    "delta": ("uptake.delta_cli:delta", "client"),
    "hil": ("hil.cli:hil", "hil"),
    "demo": ("uptake.demo:demo", "server,client"),
}


class _LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def __init__(self, *args: object, lazy: dict[str, tuple[str, str]], **kwargs: object):
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._lazy))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self._lazy:
            return super().get_command(ctx, cmd_name)
        target, extra = self._lazy[cmd_name]
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Only a missing third-party dependency means "extra not installed".
            if exc.name and exc.name.split(".")[0] in {
                "signing",
                "server",
                "client",
                "hil",
                "uptake",
            }:
                raise
            missing = exc.name

            @click.command(cmd_name, help=f"(unavailable: install uptake[{extra}])")
            def unavailable() -> None:
                raise click.ClickException(
                    f"'uptake {cmd_name}' needs the '{missing}' package: "
                    f"install it with: pip install 'uptake[{extra}]'"
                )

            return unavailable
        command = getattr(module, attr)
        assert isinstance(command, click.Command)
        return command


@click.group(
    cls=_LazyGroup,
    lazy=_LAZY_COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    envvar="UPTAKE_LOG_FORMAT",
    show_default=True,
    help="json: one JSON object per line (journald, log shippers).",
)
@click.version_option(package_name="uptake")
def cli(verbose: int, log_format: str) -> None:
    """Uptake: secure over-the-air updates for vehicles (Uptane on TUF).

    \b
    Quick start:
      uptake demo                      run a whole update cycle on loopback
      uptake server init/run           the image repository + director
      uptake release publish IMAGE     publish firmware (signed offline)
      uptake delegation add/publish    suppliers sign their own images, within limits
      uptake fleet add-vehicle/assign  register vehicles, direct updates
      uptake fleet list/export         vehicles, and their inventory ledger (CSV, JSON)
      uptake admin token create        operator tokens with roles
      uptake audit verify/export       the hash-chained audit log
      uptake agent run                 the in-vehicle agent (Uptane primary)
      uptake delta create/apply        binary deltas between images
      uptake hil run BENCH.toml        hardware-in-the-loop bench scenarios
    """
    handler = logging.StreamHandler(sys.stderr)
    # under systemd (stderr goes to the journal), journald stamps each line itself
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    handler.setFormatter(
        _JsonFormatter()
        if log_format == "json"
        else logging.Formatter(f"{stamp}%(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(
        level=max(logging.WARNING - 10 * verbose, logging.DEBUG), handlers=[handler]
    )


class _JsonFormatter(logging.Formatter):
    """Structured logs: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def main() -> None:
    cli(prog_name="uptake")


if __name__ == "__main__":
    main()
