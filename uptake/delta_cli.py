"""``uptake delta``: create and apply Uptake deltas from the command line.

``create`` runs the server's engine (``server.delta``, imported lazily so that
``apply`` works on a vehicle with only ``uptake[client]`` installed); ``apply``
runs the agent's streaming applier (``client.delta_apply``) and writes the
result atomically, after verifying it against the hashes in the delta header.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from signing.delta_format import ARCH_NAMES, MAX_RECOMPRESS_MEMORY

_EPILOG = """\b
Examples:
  uptake delta create fw-1.0.bin fw-1.1.bin -o fw-1.0-to-1.1.delta
  uptake delta create old.img new.img -o up.delta --json
  uptake delta apply fw-1.0.bin fw-1.0-to-1.1.delta -o fw-1.1.bin
  uptake delta info fw-1.0-to-1.1.delta
"""


@click.group(epilog=_EPILOG)
def delta() -> None:
    """Binary deltas between two firmware images.

    A delta makes one exact NEW image from one exact OLD image. `create` tries
    several methods (bsdiff with recompressed streams, zstd with OLD as
    dictionary, windowed bsdiff for large images) and keeps the smallest.
    `apply` streams the result with bounded memory and refuses a delta that is
    corrupted, made for another OLD, or does not produce the promised image.
    The format is documented in docs/delta-format.md.
    """


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{size} B"
        value /= 1024
    return f"{size} B"


@delta.command()
@click.argument("old", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("new", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the delta (written atomically).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report instead of text.")
@click.option(
    "--workers",
    default=2,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Worker processes for candidates and windows.",
)
@click.option(
    "--whole-limit-mib",
    default=64,
    show_default=True,
    type=click.IntRange(0),
    help="Old images up to this size are diffed in one piece (bsdiff needs ~17x "
    "that in memory); larger ones in windows.",
)
@click.option(
    "--window-mib",
    default=8,
    show_default=True,
    type=click.IntRange(1, 1024),
    help="Window size for large images.",
)
@click.option(
    "--arch",
    type=click.Choice(sorted(ARCH_NAMES.values())),
    default=None,
    help="The machine code of raw images (ELF images say it by themselves): relative "
    "branches are made absolute before diffing when that gives a smaller delta.",
)
@click.option(
    "--max-recompress-mib",
    default=MAX_RECOMPRESS_MEMORY >> 20,
    show_default=True,
    type=click.IntRange(0, MAX_RECOMPRESS_MEMORY >> 20),
    help="Most memory the vehicle may need to recompress expanded streams (a "
    "compression-aware delta); streams needing more are diffed compressed.",
)
def create(
    old: Path,
    new: Path,
    output: Path,
    as_json: bool,
    workers: int,
    whole_limit_mib: int,
    window_mib: int,
    arch: str | None,
    max_recompress_mib: int,
) -> None:
    """Create a delta that turns OLD into NEW.

    Prints the method chosen, the sizes of every candidate tried, and the time.
    """
    try:
        from server.delta import DeltaCreationError, create_delta
    except ModuleNotFoundError as exc:
        raise click.ClickException(
            f"'uptake delta create' needs the '{exc.name}' package: pip install 'uptake[server]'"
        ) from None
    try:
        report = create_delta(
            old,
            new,
            output,
            workers=workers,
            whole_limit=whole_limit_mib << 20,
            window_size=window_mib << 20,
            base_budget=2 * (window_mib << 20),
            arch_hint=arch,
            max_recompress_memory=max_recompress_mib << 20,
        )
    except (DeltaCreationError, OSError) as exc:
        raise click.ClickException(f"cannot create delta: {exc}") from None
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
        return
    click.echo(f"method:   {report.method} ({report.detail})")
    click.echo(f"old:      {_human(report.old_length)}  new: {_human(report.new_length)}")
    click.echo(
        f"delta:    {_human(report.delta_length)} "
        f"({100 * report.delta_length / max(1, report.new_length):.2f} % of new)"
    )
    tried = ", ".join(
        f"{name} {_human(size)} payload" for name, size in sorted(report.candidates.items())
    )
    click.echo(f"tried:    {tried}")
    click.echo(f"time:     {report.seconds:.2f} s")
    click.echo(f"written:  {output}")


@delta.command()
@click.argument("old", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("patch", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the new image; it appears only once verified.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report instead of text.")
def apply(old: Path, patch: Path, output: Path, as_json: bool) -> None:
    """Apply PATCH to OLD and write the verified result.

    Exits non-zero, leaving no output file, if the delta is corrupted, was made
    for another base image, or does not produce the image its header names.
    """
    from client.delta_apply import DeltaError, apply_delta_file

    started = time.monotonic()
    try:
        result = apply_delta_file(old, patch, output)
    except DeltaError as exc:
        raise click.ClickException(f"delta refused ({type(exc).__name__}): {exc}") from None
    except OSError as exc:
        raise click.ClickException(f"cannot apply delta: {exc}") from None
    seconds = time.monotonic() - started
    if as_json:
        click.echo(
            json.dumps(
                {
                    "method": result.method,
                    "result_sha256": result.result_sha256,
                    "result_bytes": result.result_length,
                    "seconds": round(seconds, 3),
                    "output": str(output),
                },
                indent=2,
            )
        )
        return
    click.echo(
        f"verified: {output} ({_human(result.result_length)}, sha256 {result.result_sha256})"
    )
    click.echo(f"method:   {result.method}, {seconds:.2f} s")


@delta.command()
@click.argument("patch", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def info(patch: Path) -> None:
    """Show a delta's header (method, base and result hashes and sizes)."""
    from client.delta_apply import DeltaError, read_delta_header

    try:
        with open(patch, "rb") as stream:
            header = read_delta_header(stream)
    except DeltaError as exc:
        raise click.ClickException(str(exc)) from None
    json.dump(
        {
            "format_version": header.format_version,
            "method": header.method,
            "base_bytes": header.base_length,
            "base_sha256": header.base_sha256.hex(),
            "result_bytes": header.result_length,
            "result_sha256": header.result_sha256.hex(),
            "payload_bytes": header.payload_length,
        },
        sys.stdout,
        indent=2,
    )
    click.echo()
