"""``uptake-tuf-client``: the agent's TUF client behind the tuf-conformance CLI.

The tuf-conformance suite (github.com/theupdateframework/tuf-conformance)
tests a TUF client through a small command-line protocol (its
``CLIENT-CLI.md``)::

    uptake-tuf-client --metadata-dir DIR init TRUSTED_ROOT
    uptake-tuf-client --metadata-dir DIR --metadata-url URL refresh
    uptake-tuf-client --metadata-dir DIR --metadata-url URL \\
        --target-name PATH [--target-name PATH ...] \\
        --target-base-url URL --target-dir DIR download

This command answers it with exactly what the agent uses to verify each
repository: a ``tuf.ngclient.Updater`` downloading through
:class:`client.fetcher.ResumableFetcher`. Running the suite against it
therefore measures the agent's own verification and download path.

Exit status is 0 on success and 1 on any failure, with a one-line reason on
standard error. Metadata is kept under non-versioned names
(``root.json``...) in ``--metadata-dir``; targets are stored in
``--target-dir`` under their URL-quoted target path, and a target already
there with matching hashes is not downloaded again.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click
from tuf.ngclient.updater import Updater

from client.fetcher import FetcherConfig, ResumableFetcher
from signing.atomic_file import write_atomic

_NAME = "uptake-tuf-client"


def _updater(
    metadata_dir: Path,
    metadata_url: str | None,
    target_dir: Path | None = None,
    target_base_url: str | None = None,
) -> Updater:
    if not metadata_url:
        raise click.UsageError("--metadata-url is required for this command")
    if not (metadata_dir / "root.json").is_file():
        raise click.ClickException(
            f"no trusted root in {metadata_dir}: run '{_NAME} --metadata-dir DIR init ROOT' first"
        )
    return Updater(
        metadata_dir=str(metadata_dir),
        metadata_base_url=metadata_url,
        target_dir=None if target_dir is None else str(target_dir),
        target_base_url=target_base_url,
        fetcher=ResumableFetcher(FetcherConfig(user_agent=f"{_NAME} (uptake)")),
        bootstrap=None,
    )


@click.group(
    name=_NAME,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option(
    "--metadata-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where trusted metadata is kept (root.json, timestamp.json, ...).",
)
@click.option("--metadata-url", help="Base URL of the repository's metadata.")
@click.option(
    "--target-name",
    "target_names",
    multiple=True,
    help="Target path to download; repeat for several, processed in order.",
)
@click.option("--target-base-url", help="Base URL of the repository's targets.")
@click.option(
    "--target-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where downloaded, verified targets are stored.",
)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.pass_context
def cli(
    ctx: click.Context,
    metadata_dir: Path,
    metadata_url: str | None,
    target_names: tuple[str, ...],
    target_base_url: str | None,
    target_dir: Path | None,
    verbose: int,
) -> None:
    """A TUF client for the tuf-conformance suite, verifying as the Uptake agent does.

    \b
    Example:
      uptake-tuf-client --metadata-dir /tmp/md init root.json
      uptake-tuf-client --metadata-dir /tmp/md --metadata-url http://127.0.0.1:8080/metadata refresh
    """
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format=f"{_NAME}: %(levelname)s %(name)s: %(message)s")
    ctx.obj = {
        "metadata_dir": metadata_dir,
        "metadata_url": metadata_url,
        "target_names": target_names,
        "target_base_url": target_base_url,
        "target_dir": target_dir,
    }


@cli.command()
@click.argument("trusted_root", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.pass_obj
def init(obj: dict[str, object], trusted_root: Path) -> None:
    """Trust TRUSTED_ROOT (a root.json) as the initial root. No network access."""
    metadata_dir = obj["metadata_dir"]
    assert isinstance(metadata_dir, Path)
    metadata_dir.mkdir(parents=True, exist_ok=True)
    # As the agent's provisioning does: the initial root is trusted as given
    # and verified (self-signed, not expired) by the first refresh.
    write_atomic(metadata_dir / "root.json", trusted_root.read_bytes())
    click.echo(f"{_NAME}: initialised {metadata_dir} with {trusted_root}")


@cli.command()
@click.pass_obj
def refresh(obj: dict[str, object]) -> None:
    """Update the top-level metadata by the TUF client workflow."""
    metadata_dir = obj["metadata_dir"]
    metadata_url = obj["metadata_url"]
    assert isinstance(metadata_dir, Path)
    assert metadata_url is None or isinstance(metadata_url, str)
    _updater(metadata_dir, metadata_url).refresh()
    click.echo(f"{_NAME}: refreshed metadata in {metadata_dir}")


@cli.command()
@click.pass_obj
def download(obj: dict[str, object]) -> None:
    """Refresh, then download and verify each --target-name in order."""
    metadata_dir, metadata_url = obj["metadata_dir"], obj["metadata_url"]
    target_dir, target_base_url = obj["target_dir"], obj["target_base_url"]
    target_names = obj["target_names"]
    assert isinstance(metadata_dir, Path)
    assert metadata_url is None or isinstance(metadata_url, str)
    assert isinstance(target_names, tuple)
    if not target_names or target_dir is None or not target_base_url:
        raise click.UsageError("download needs --target-name, --target-dir and --target-base-url")
    assert isinstance(target_dir, Path)
    assert isinstance(target_base_url, str)
    target_dir.mkdir(parents=True, exist_ok=True)
    updater = _updater(metadata_dir, metadata_url, target_dir, target_base_url)
    for name in target_names:
        info = updater.get_targetinfo(name)
        if info is None:
            raise click.ClickException(f"target {name!r} is not in the repository")
        path = updater.find_cached_target(info)
        if path is None:
            path = updater.download_target(info)
            click.echo(f"{_NAME}: downloaded {name} to {path}")
        else:
            click.echo(f"{_NAME}: {name} already up to date in {path}")


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: run the CLI, exit 0 on success and 1 on any failure."""
    try:
        cli.main(args=argv, prog_name=_NAME, standalone_mode=False)
    except click.exceptions.Exit as exc:  # --help
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return 1
    except click.Abort:
        click.echo(f"{_NAME}: aborted", err=True)
        return 1
    except Exception as exc:
        # Every TUF or download failure lands here: name it, no traceback.
        logging.getLogger(__name__).debug("failure", exc_info=True)
        click.echo(f"{_NAME}: error: {type(exc).__name__}: {exc}", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
