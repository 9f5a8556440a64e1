"""``uptake release``: publish firmware to the image repository (signed with OFFLINE keys)."""

from __future__ import annotations

from pathlib import Path

import click
from securesystemslib.signer import Signer

from server.cli_common import client, emit, password, server_options
from signing.keys import PASSWORD_ENV, KeyFileError, load_signer


@click.group()
def release() -> None:
    """Publish firmware to the image repository (signed with OFFLINE targets keys).

    \b
    uptake release publish bms.bin --hardware-id stm32f4-bms --version 1.1.0 \\
        --keys-dir /media/usb/uptake-keys --token-file /srv/uptake/admin-token
    """


@release.command("publish")
@click.argument("image", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--hardware-id",
    "hardware_ids",
    multiple=True,
    required=True,
    help="ECU hardware id the image fits (repeatable).",
)
@click.option("--version", required=True, help="Human version, e.g. 1.1.0.")
@click.option(
    "--release-counter",
    type=click.IntRange(0),
    default=None,
    help="Anti-rollback counter; default: one above the highest published for these hardware ids.",
)
@click.option("--filepath", default=None, help="Target name; default HARDWARE_ID/VERSION/FILENAME.")
@click.option(
    "--requires",
    "requires",
    multiple=True,
    metavar="HARDWARE_ID=SPEC",
    help="What the image needs of the vehicle's other ECUs, e.g. 'stm32f4-bms=>=1.1.0,<2' (repeatable): "
    "the director never directs, and vehicles never install, a combination that breaks it.",
)
@click.option(
    "--keys-dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Directory with image-targets.key and the trusted image-root.json.",
)
@click.option(
    "--targets-key",
    "targets_keys",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Targets key file(s) to sign with, for thresholds > 1 (default KEYS_DIR/image-targets.key).",
)
@server_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def release_publish(
    image: Path,
    hardware_ids: tuple[str, ...],
    version: str,
    release_counter: int | None,
    filepath: str | None,
    requires: tuple[str, ...],
    keys_dir: Path,
    targets_keys: tuple[Path, ...],
    server_url: str,
    ca_cert: Path | None,
    token_file: Path | None,
    as_json: bool,
) -> None:
    """Sign IMAGE into the image repository's targets and publish it."""
    from server.release import TRUSTED_ROOT_NAME, PublishError, publish_image

    needs = {}
    for item in requires:
        hw, sep, spec = item.partition("=")
        if not sep or not hw or not spec:
            raise click.BadParameter(
                f"{item!r} is not HARDWARE_ID=SPEC (e.g. stm32f4-bms=>=1.1.0)",
                param_hint="--requires",
            )
        needs[hw] = spec
    key_password = password(PASSWORD_ENV, "the offline targets key")
    try:
        signers: list[Signer] = [
            load_signer(p, key_password)
            for p in (targets_keys or (keys_dir / "image-targets.key",))
        ]
        trusted_root = (keys_dir / TRUSTED_ROOT_NAME).read_bytes()
    except (KeyFileError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        published = publish_image(
            client(server_url, ca_cert, token_file),
            image,
            list(hardware_ids),
            version,
            signers,
            trusted_root,
            release_counter=release_counter,
            filepath=filepath,
            requires=needs or None,
        )
    except PublishError as exc:
        raise click.ClickException(str(exc)) from exc
    emit(
        published.__dict__,
        as_json,
        f"Published {published.filepath} ({published.length} bytes, sha256 {published.sha256[:16]}…, "
        f"release counter {published.release_counter}) in targets v{published.targets_version}",
    )
