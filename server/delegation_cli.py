"""``uptake delegation``: supplier delegations (add/remove offline-signed; suppliers publish)."""

from __future__ import annotations

from pathlib import Path

import click

from server.cli_common import (
    arch_option,
    client,
    emit,
    load_signers,
    offline_key_options,
    offline_signers,
    server_options,
)
from signing.keys import KeyFileError, load_public_key


@click.group()
def delegation() -> None:
    """Let suppliers sign their own images, limited to hardware ids and path patterns.

    \b
    Release engineer (offline targets key(s); re-signs the image targets):
      uptake delegation add acme --hardware-id stm32f4-bms --path-pattern 'acme/*' \\
          --key acme.pub.json --keys-dir /media/usb/uptake-keys
      uptake delegation remove acme --keys-dir /media/usb/uptake-keys
      uptake delegation list --json
    Supplier (its own key, its 'supplier' token bound to its hardware ids):
      uptake delegation publish acme bms.bin --hardware-id stm32f4-bms --version 2.0.0 \\
          --key acme.key --trusted-root image-root.json --token-file acme-token
    Vehicles check every image found through a delegation against its hardware ids.
    """


@delegation.command("add")
@click.argument("name")
@click.option(
    "--hardware-id", "hardware_ids", multiple=True, required=True,
    help="Hardware id the supplier may publish for (repeatable).",
)  # fmt: skip
@click.option(
    "--path-pattern", "path_patterns", multiple=True,
    help="Target path pattern the supplier may sign, 'NAME/*' by default (repeatable).",
)  # fmt: skip
@click.option(
    "--key", "keys", multiple=True, required=True,
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="The supplier's public key file (.pub.json; repeatable).",
)  # fmt: skip
@click.option(
    "--threshold", type=click.IntRange(1), default=1, help="Supplier keys that must sign."
)
@offline_key_options
@server_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def delegation_add(
    name: str,
    hardware_ids: tuple[str, ...],
    path_patterns: tuple[str, ...],
    keys: tuple[Path, ...],
    threshold: int,
    keys_dir: Path,
    targets_keys: tuple[Path, ...],
    server_url: str,
    ca_cert: Path | None,
    token_file: Path | None,
    as_json: bool,
) -> None:
    """Delegate NAME/* (or --path-pattern) for --hardware-id to the supplier's --key."""
    from server.delegation import DelegationError, add_delegation

    try:
        public = [load_public_key(k) for k in keys]
    except KeyFileError as exc:
        raise click.ClickException(str(exc)) from exc
    signers, root = offline_signers(keys_dir, targets_keys, "the targets key")
    try:
        added = add_delegation(
            client(server_url, ca_cert, token_file), name, hardware_ids,
            path_patterns or (f"{name}/*",), public, threshold, signers, root,
        )  # fmt: skip
    except DelegationError as exc:
        raise click.ClickException(str(exc)) from exc
    emit(
        added,
        as_json,
        f"Delegated {', '.join(added['paths'])} for {', '.join(added['hardware_ids'])} to "
        f"{name} ({added['threshold']} of {len(added['keyids'])} keys) in targets "
        f"v{added['targets_version']}",
    )


@delegation.command("remove")
@click.argument("name")
@offline_key_options
@server_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def delegation_remove(
    name: str,
    keys_dir: Path,
    targets_keys: tuple[Path, ...],
    server_url: str,
    ca_cert: Path | None,
    token_file: Path | None,
    as_json: bool,
) -> None:
    """Take delegation NAME out of the image targets: its images are no longer installable."""
    from server.delegation import DelegationError, remove_delegation

    signers, root = offline_signers(keys_dir, targets_keys, "the targets key")
    try:
        removed = remove_delegation(client(server_url, ca_cert, token_file), name, signers, root)
    except DelegationError as exc:
        raise click.ClickException(str(exc)) from exc
    emit(removed, as_json, f"Removed delegation {name} in targets v{removed['targets_version']}")


@delegation.command("list")
@server_options
@click.option("--json", "as_json", is_flag=True, help="Print the delegations as JSON.")
def delegation_list(
    server_url: str, ca_cert: Path | None, token_file: Path | None, as_json: bool
) -> None:
    """The supplier delegations the image repository publishes."""
    from server.delegation import DelegationError, list_delegations

    try:
        found = list_delegations(client(server_url, ca_cert, token_file))
    except DelegationError as exc:
        raise click.ClickException(str(exc)) from exc
    text = "\n".join(
        f"{d['name']}: {', '.join(d['paths'])} for {', '.join(d['hardware_ids'])}, "
        f"{d['threshold']} of {len(d['keyids'])} keys, v{d['version']}, {len(d['images'])} images"
        for d in found
    )
    emit({"delegations": found}, as_json, text or "No supplier delegations")


@delegation.command("publish")
@click.argument("name")
@click.argument("image", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--hardware-id", "hardware_ids", multiple=True, required=True,
    help="ECU hardware id the image fits (repeatable; within the delegation).",
)  # fmt: skip
@click.option("--version", required=True, help="Human version, e.g. 2.0.0.")
@click.option(
    "--release-counter", type=click.IntRange(0), default=None, help="Anti-rollback counter."
)
@click.option("--filepath", default=None, help="Target name within the delegation's patterns.")
@arch_option
@click.option(
    "--key", "keys", multiple=True, required=True, type=click.Path(path_type=Path),
    help="The supplier's private key file(s) to sign with.",
)  # fmt: skip
@click.option(
    "--trusted-root", type=click.Path(path_type=Path, dir_okay=False, exists=True), required=True,
    help="The trusted image-root.json to verify the repository with.",
)  # fmt: skip
@server_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def delegation_publish(
    name: str,
    image: Path,
    hardware_ids: tuple[str, ...],
    version: str,
    release_counter: int | None,
    filepath: str | None,
    arch: str | None,
    keys: tuple[Path, ...],
    trusted_root: Path,
    server_url: str,
    ca_cert: Path | None,
    token_file: Path | None,
    as_json: bool,
) -> None:
    """(Supplier) sign IMAGE into delegated role NAME with --key and publish it."""
    from server.delegation import DelegationError, publish_supplier_image
    from server.release import PublishError, ReleaseImage

    signers = load_signers(keys, "the supplier key")
    spec = ReleaseImage(image, list(hardware_ids), version, release_counter, filepath, arch=arch)
    try:
        published = publish_supplier_image(
            client(server_url, ca_cert, token_file), name, spec, signers,
            trusted_root.read_bytes(),
        )  # fmt: skip
    except (DelegationError, PublishError) as exc:
        raise click.ClickException(str(exc)) from exc
    emit(
        published.__dict__,
        as_json,
        f"Published {published.filepath} ({published.length} bytes) in {name} "
        f"v{published.targets_version}",
    )
