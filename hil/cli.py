"""``uptake hil``: run hardware-in-the-loop benches.

``uptake hil run BENCH.toml`` brings up the bench's secondaries (simulated
ECUs for ``virtual`` ones, real CAN interfaces and serial ports otherwise),
runs its scenarios, prints one line per scenario and a total, and exits
non-zero if any failed. ``--junit OUT.xml`` writes results for lab CI;
``--json`` prints them for scripts instead of the table.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from hil.bench_file import BenchFileError, load_bench
from hil.junit import write_junit
from hil.runner import BenchError, BenchRunner, ScenarioResult

_MARK = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP", "error": "ERROR"}


@click.group("hil")
def hil() -> None:
    """Hardware-in-the-loop benches: flash secondaries, inject faults, report.

    A bench file (TOML) lists the secondaries (UDS over CAN, STM32 over
    serial; virtual simulators or real devices) and the scenarios to run
    (update, rollback, power-loss, wrong-key, mute). See
    hil/benches/sample.toml.
    """


@hil.command("run")
@click.argument("bench_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--junit",
    "junit_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write JUnit XML here (for CI).",
)
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON instead of a table.")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep simulator state (flash banks) here instead of a temporary directory.",
)
def run(bench_file: Path, junit_path: Path | None, as_json: bool, state_dir: Path | None) -> None:
    """Run the scenarios of BENCH_FILE and report.

    \b
      uptake hil run hil/benches/sample.toml --junit hil-results.xml

    Virtual secondaries are simulated in this process (a UDS ECU on a virtual
    CAN bus, an STM32 bootloader on a pty), at real wire speed unless the file
    says wire_time = false; real ones use the socketcan interface or serial
    device the file names. Each scenario ends PASS, FAIL (the ECU or the
    flasher misbehaved), SKIP (this bench cannot do it, e.g. a power loss
    without a relay) or ERROR (the bench itself broke).

    Exit status: 0 when every scenario passed or was skipped, 1 otherwise.
    """
    _quiet_transport_libraries()
    try:
        bench = load_bench(bench_file)
    except BenchFileError as exc:
        raise click.ClickException(str(exc)) from None
    log = (lambda _line: None) if as_json else (lambda line: click.echo(line, err=True))
    try:
        results = BenchRunner(bench, state_dir=state_dir, log=log).run()
    except BenchError as exc:
        raise click.ClickException(f"bench {bench.name}: {exc}") from None
    if junit_path is not None:
        write_junit(junit_path, bench.name, results)
    if as_json:
        click.echo(
            json.dumps({"bench": bench.name, "results": [r.as_json() for r in results]}, indent=2)
        )
    else:
        _print_table(bench.name, results)
    if any(r.status in ("failed", "error") for r in results):
        sys.exit(1)


def _quiet_transport_libraries() -> None:
    """Expected timeouts and NRCs are reported per scenario; the libraries need not shout them.

    ``uptake -v hil run`` keeps their logs.
    """
    if logging.getLogger().getEffectiveLevel() >= logging.WARNING:
        for name in ("UdsClient", "isotp", "can"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _print_table(name: str, results: list[ScenarioResult]) -> None:
    width = max([len(r.name) for r in results] + [8])
    click.echo(f"bench {name}: {len(results)} scenarios")
    for result in results:
        click.echo(
            f"  {_MARK[result.status]:<5} {result.name:<{width}} {result.seconds:7.2f} s  {result.message}"
        )
    counts = {status: sum(r.status == status for r in results) for status in _MARK}
    click.echo(
        ", ".join(f"{counts[s]} {s}" for s in _MARK if counts[s] or s in ("passed", "failed"))
    )
