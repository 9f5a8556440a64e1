"""``uptake audit``: check the audit log's hash chain, and export it (over the API).

The server appends a record for every publish, key operation, delegation
change, assignment and token change (:mod:`server.audit`), chained by
hashes. ``uptake audit verify`` asks the server to walk the chain and exits
non-zero naming the first record changed, deleted or moved; keep the head
hash it prints somewhere else and pass it back with ``--expected-head`` to
detect a chain rewritten from some point on. ``uptake audit export`` pages
through the log and writes it as JSON or CSV, atomically.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlencode

import click

from server.api_client import AdminClient
from server.cli_common import call, client, emit, server_options
from signing.atomic_file import atomic_writer

_PAGE = 500
_COLUMNS = ("seq", "at", "actor", "action", "subject", "detail", "prev_hash", "hash")


@click.group()
def audit() -> None:
    """The audit log: who published, rotated, assigned, cancelled, changed tokens, and when.

    \b
    uptake audit verify                        exit 1 and the broken record if tampered
    uptake audit verify --expected-head HASH   also detect a chain rewritten to its end
    uptake audit export --format csv --output audit.csv
    Needs a token that may read the fleet (viewer and up).
    """


@audit.command("verify")
@click.option("--expected-head", help="The head hash an earlier verify printed (kept elsewhere).")
@server_options
@click.option("--json", "as_json", is_flag=True, help="The verification as JSON.")
def audit_verify(
    expected_head: str | None, server_url: str, ca_cert: Path | None, token_file: Path | None,
    as_json: bool,
) -> None:  # fmt: skip
    """Walk the hash chain: exit 0 if intact, 1 naming the first broken record."""
    query = f"?{urlencode({'expected_head': expected_head})}" if expected_head else ""
    result = call(client(server_url, ca_cert, token_file), "GET", f"/api/v1/audit/verify{query}")
    if result["intact"]:
        text = (
            f"Audit log intact: {result['records']} record(s), head {result['head_seq']} "
            f"{result['head_hash']}"
        )
    else:
        text = "\n".join(
            [f"Audit log BROKEN at record {result['first_broken_seq']}:"]
            + [f"  {p}" for p in result["problems"]]
        )
    emit(result, as_json, text)
    if not result["intact"]:
        sys.exit(1)


def _pages(api: AdminClient, params: dict[str, str]) -> Iterator[list[dict[str, Any]]]:
    cursor = None
    while True:
        query = {**params, "limit": str(_PAGE), **({"cursor": cursor} if cursor else {})}
        page = call(api, "GET", f"/api/v1/audit?{urlencode(query)}")
        yield page["records"]
        cursor = page["next"]
        if cursor is None:
            return


def _write(out: BinaryIO, pages: Iterator[list[dict[str, Any]]], fmt: str) -> int:
    count = 0
    if fmt == "json":
        out.write(b"[")
    else:
        text = io.StringIO()
        csv.writer(text, lineterminator="\r\n").writerow(_COLUMNS)
        out.write(text.getvalue().encode())
    for records in pages:
        if fmt == "json":
            for r in records:
                out.write((",\n" if count else "\n").encode() + json.dumps(r).encode())
                count += 1
            continue
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\r\n")
        for r in records:
            writer.writerow([json.dumps(r[c]) if c == "detail" else r[c] for c in _COLUMNS])
            count += 1
        out.write(text.getvalue().encode())
    if fmt == "json":
        out.write(b"\n]\n")
    return count


@audit.command("export")
@click.option("--format", "fmt", type=click.Choice(["json", "csv"]), default="json",
              show_default=True)  # fmt: skip
@click.option("--output", type=click.Path(path_type=Path, dir_okay=False),
              help="Write here (atomically: all or nothing); default: standard output.")  # fmt: skip
@click.option("--action", help="Only records of this action (e.g. assignment.create).")
@click.option("--subject", help="Only records about this subject (e.g. a VIN).")
@server_options
def audit_export(
    fmt: str, output: Path | None, action: str | None, subject: str | None, server_url: str,
    ca_cert: Path | None, token_file: Path | None,
) -> None:  # fmt: skip
    """Export the audit log, oldest first, a page at a time (each record with its hashes).

    CSV cells: seq, at, actor, action, subject, detail (as JSON), prev_hash, hash.
    """
    params: dict[str, str] = {}
    if action is not None:
        params["action"] = action
    if subject is not None:
        params["subject"] = subject
    api = client(server_url, ca_cert, token_file)
    if output is None:
        _write(sys.stdout.buffer, _pages(api, params), fmt)
        return
    try:
        with atomic_writer(output) as out:
            count = _write(out, _pages(api, params), fmt)
    except OSError as exc:
        raise click.ClickException(f"cannot write {output}: {exc}") from exc
    click.echo(f"Wrote {count} audit record(s) to {output}", err=True)
