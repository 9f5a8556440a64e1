"""``uptake campaign``: roll a release out to the fleet in phases, and watch it go."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import click

from server.api_client import AdminClient
from server.cli_common import call, client, emit, server_options

_STATES = ["draft", "approved", "running", "paused", "completed", "aborted", "cancelled"]
_FINAL = {"completed", "aborted", "cancelled"}


@click.group()
def campaign() -> None:
    """Roll a release out to the fleet in phases, with approval, pause and cancel.

    \b
    uptake release create fw-2 --image stm32f4-bms=stm32f4-bms/1.1.0/bms.bin
    uptake campaign create spring --release fw-2 \\
        --phase 1:0.95:0.1 --phase 10:0.95:0.1 --phase 100 --model roadster --region eu
    uptake campaign approve spring          # by another operator than its creator
    uptake campaign start spring
    uptake campaign show spring --watch     # live progress per phase
    uptake campaign pause spring --reason "waiting for the field report"
    uptake campaign cancel spring           # unfinished vehicles' images withdrawn

    States: draft → approved → running ⇄ paused → completed | aborted | cancelled
    (docs/campaigns.md). A phase PERCENT[:SUCCESS[:FAILURE]] opens the next phase once
    SUCCESS (a share, default 1.0) of its vehicles succeeded, and aborts the campaign
    when more than FAILURE (default 0.0) of its finished vehicles failed.
    """


def _phase(text: str) -> dict[str, Any]:
    parts = text.split(":")
    try:
        if not 1 <= len(parts) <= 3:
            raise ValueError
        phase: dict[str, Any] = {"percent": float(parts[0])}
        if len(parts) > 1:
            phase["success_threshold"] = float(parts[1])
        if len(parts) > 2:
            phase["failure_threshold"] = float(parts[2])
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: use PERCENT[:SUCCESS[:FAILURE]], e.g. 10:0.95:0.05"
        ) from None
    return phase


def _window(text: str) -> dict[str, str]:
    start, sep, end = text.partition("-")
    if not sep:
        raise click.BadParameter(f"{text!r}: use HH:MM-HH:MM (UTC), e.g. 01:00-05:00")
    return {"start": start.strip(), "end": end.strip()}


def _progress_lines(record: dict[str, Any]) -> list[str]:
    lines = [
        f"campaign {record['name']}: {record['state']}"
        + (f" (paused from {record['paused_from']})" if record.get("paused_from") else "")
        + f", release {record['release']}, phase {record['current_phase'] + 1}/"
        f"{len(record['phases'])}",
    ]
    if record.get("reason"):
        lines.append(f"  reason: {record['reason']}")
    lines.append(
        f"  created by {record['created_by']}"
        + (f", approved by {record['approved_by']}" if record.get("approved_by") else "")
    )
    for p in record["phases"]:
        eligible = p["joined"] - p["skipped"] - p["cancelled"]
        width = 30
        done = round(width * p["succeeded"] / eligible) if eligible else 0
        bar = "#" * done + "-" * (width - done)
        marker = ">" if p["index"] == record["current_phase"] else " "
        lines.append(
            f" {marker}phase {p['index'] + 1} ({p['percent']:g}%): [{bar}] "
            f"{p['succeeded']}/{eligible} succeeded, {p['failed']} failed, "
            f"{p['in_progress']} in progress, {p['skipped']} skipped "
            f"(advance at {p['success_threshold']:.0%}, stop above {p['failure_threshold']:.0%} "
            "failed)"
        )
    if record.get("withdrawing"):
        lines.append("  withdrawing unfinished vehicles' assignments...")
    return lines


def _act(action: str, name: str, reason: str, api: AdminClient, as_json: bool) -> None:
    record = call(api, "POST", f"/api/v1/campaigns/{quote(name)}/{action}", {"reason": reason})
    emit(record, as_json, "\n".join(_progress_lines(record)))


@campaign.command("create")
@click.argument("name")
@click.option("--release", required=True, help="Release name (uptake release create).")
@click.option(
    "--phase",
    "phases",
    multiple=True,
    help="PERCENT[:SUCCESS[:FAILURE]], cumulative; repeat in order, the last is 100. "
    "Default: one phase of 100.",
)
@click.option("--pause-on-failure", is_flag=True, help="Pause instead of abort past FAILURE.")
@click.option("--min-finished", type=int, default=1, show_default=True,
              help="Finished vehicles a phase needs before its failure rate counts.")  # fmt: skip
@click.option("--model", "models", multiple=True, help="Only vehicles of this model (repeat).")
@click.option("--region", "regions", multiple=True, help="Only vehicles of this region (repeat).")
@click.option("--tag", "tags", multiple=True, help="Only vehicles with this tag (repeat: all).")
@click.option("--year-min", type=int)
@click.option("--year-max", type=int)
@click.option("--installed", multiple=True,
              help='HARDWARE_ID=SPEC: only vehicles whose ECUs run such a version, e.g. '
              '"stm32f4-bms=<1.1.0".')  # fmt: skip
@click.option("--window", "windows", multiple=True,
              help="HH:MM-HH:MM UTC maintenance window when vehicles are offered (repeat).")  # fmt: skip
@click.option("--install-on-consent", is_flag=True,
              help="Vehicles install only once their 'consent' precondition holds.")  # fmt: skip
@click.option("--description", default="")
@server_options
@click.option("--json", "as_json", is_flag=True, help="Print the campaign as JSON.")
def campaign_create(
    name: str, release: str, phases: tuple[str, ...], pause_on_failure: bool, min_finished: int,
    models: tuple[str, ...], regions: tuple[str, ...], tags: tuple[str, ...],
    year_min: int | None, year_max: int | None, installed: tuple[str, ...],
    windows: tuple[str, ...], install_on_consent: bool, description: str,
    server_url: str, ca_cert: Path | None, token_file: Path | None, as_json: bool,
) -> None:  # fmt: skip
    """Create a draft campaign of RELEASE over the vehicles the filters select."""
    phase_list = [_phase(p) for p in phases] or [{"percent": 100.0}]
    for p in phase_list:
        p["on_failure"] = "pause" if pause_on_failure else "abort"
        p["min_finished"] = min_finished
    installed_specs = {}
    for item in installed:
        hw, sep, spec = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r}: use HARDWARE_ID=SPEC", param_hint="--installed")
        installed_specs[hw] = spec
    body = {
        "name": name,
        "release": release,
        "phases": phase_list,
        "selection": {
            "models": list(models), "regions": list(regions), "tags": list(tags),
            "year_min": year_min, "year_max": year_max, "installed": installed_specs,
        },
        "maintenance_windows": [_window(w) for w in windows],
        "install_on_consent": install_on_consent,
        "description": description,
    }  # fmt: skip
    record = call(client(server_url, ca_cert, token_file), "POST", "/api/v1/campaigns", body)
    emit(record, as_json, "\n".join(_progress_lines(record)))


def _action_command(action: str, help_text: str) -> None:
    @campaign.command(action, help=help_text)
    @click.argument("name")
    @click.option("--reason", default="", help="Why (kept in the audit log).")
    @server_options
    @click.option("--json", "as_json", is_flag=True, help="Print the campaign as JSON.")
    def command(
        name: str, reason: str, server_url: str, ca_cert: Path | None,
        token_file: Path | None, as_json: bool,
    ) -> None:  # fmt: skip
        _act(action, name, reason, client(server_url, ca_cert, token_file), as_json)


_action_command("approve", "Approve a draft campaign (the approver must not be its creator).")
_action_command("start", "Start an approved campaign: its first phase opens.")
_action_command("pause", "Pause: no new offers or phase changes until resumed.")
_action_command("resume", "Resume a paused campaign in the state it was paused from.")
_action_command("cancel", "Cancel: unfinished vehicles' assignments are withdrawn.")


@campaign.command("show")
@click.argument("name")
@click.option("--watch", is_flag=True, help="Refresh until the campaign ends (Ctrl-C stops).")
@click.option("--interval", type=float, default=2.0, show_default=True, help="Seconds (--watch).")
@server_options
@click.option("--json", "as_json", is_flag=True, help="Print the campaign as JSON.")
def campaign_show(
    name: str, watch: bool, interval: float, server_url: str, ca_cert: Path | None,
    token_file: Path | None, as_json: bool,
) -> None:  # fmt: skip
    """A campaign's state and per-phase progress; --watch follows it live."""
    api = client(server_url, ca_cert, token_file)
    path = f"/api/v1/campaigns/{quote(name)}"
    while True:
        record = call(api, "GET", path)
        if as_json:
            click.echo(
                json.dumps(record, sort_keys=True) if watch else json.dumps(record, indent=2)
            )
        else:
            if watch:
                click.clear()
            click.echo("\n".join(_progress_lines(record)))
        if not watch or (record["state"] in _FINAL and not record["withdrawing"]):
            return
        try:
            time.sleep(max(0.2, interval))
        except KeyboardInterrupt:
            return


@campaign.command("list")
@click.option("--state", type=click.Choice(_STATES), help="Only campaigns in this state.")
@click.option("--limit", type=click.IntRange(1, 500), default=100, show_default=True)
@server_options
@click.option("--json", "as_json", is_flag=True, help="Print the campaigns as JSON.")
def campaign_list(
    state: str | None, limit: int, server_url: str, ca_cert: Path | None,
    token_file: Path | None, as_json: bool,
) -> None:  # fmt: skip
    """Campaigns, oldest first (every page)."""
    api = client(server_url, ca_cert, token_file)
    rows: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {"limit": limit, **({"state": state} if state else {})}
        if cursor:
            query["cursor"] = cursor
        page = call(api, "GET", f"/api/v1/campaigns?{urlencode(query)}")
        rows += page["campaigns"]
        cursor = page["next"]
        if not cursor:
            break
    text = "\n".join(
        f"{c['name']:24} {c['state']:10} {c['release']:20} phase "
        f"{c['current_phase'] + 1}/{len(c['phases'])} "
        f"{c['totals']['succeeded']} succeeded, {c['totals']['failed']} failed"
        for c in rows
    )
    emit(rows, as_json, text or "no campaigns")
