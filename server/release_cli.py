"""``uptake release``: publish firmware to the image repository (signed with OFFLINE keys).

Two ways to sign: ``publish`` signs on this machine with every ``--targets-key``
given (the shortcut when one person holds a threshold of keys); with keys on
separate machines, ``stage`` -> ``export`` -> ``sign`` (each key holder, offline)
-> ``import`` -> the server publishes at the threshold (``status`` says who is
missing).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from server.cli_common import (
    arch_option,
    client,
    emit,
    offline_key_options,
    offline_signers,
    password,
    server_options,
)
from signing.keys import PASSWORD_ENV, KeyFileError, is_signer_reference, load_key

if TYPE_CHECKING:
    from server.release import Published, ReleaseImage


@click.group()
def release() -> None:
    """Publish firmware to the image repository (signed with OFFLINE targets keys).

    \b
    One machine holds a threshold of targets keys:
      uptake release publish bms.bin --hardware-id stm32f4-bms --version 1.1.0 \\
          --keys-dir /media/usb/uptake-keys --token-file /srv/uptake/admin-token
    Keys on separate machines (threshold M of N):
      uptake release stage bms.bin --hardware-id stm32f4-bms --version 1.1.0 --trusted-root image-root.json
      uptake release export release.json          # carry it to each key holder
      uptake release sign release.json --key /media/alice/image-targets-1.key   # (offline)
      uptake release import release.json          # published once M signed
      uptake release status                       # who signed, who is missing
    Name a set of published images for campaigns (uptake campaign):
      uptake release create fw-2 --image stm32f4-bms=stm32f4-bms/1.1.0/bms.bin
      uptake release list
    """


_F = TypeVar("_F", bound=Callable[..., Any])


def _image_options(
    *, release_counter_help: str, requires_help: str, allow_lower_help: str
) -> Callable[[_F], _F]:
    """IMAGES and the options that describe them, for ``publish`` and ``stage``
    (``_release_images`` reads them); the help of three options differs between the two."""
    decorators = (
        click.argument("images", nargs=-1, type=click.Path(path_type=Path, exists=True)),
        click.option(
            "--manifest",
            type=click.Path(path_type=Path, dir_okay=False, exists=True),
            default=None,
            help="A TOML file listing the release's images, each with its own hardware ids and "
            "version (instead of IMAGES, --hardware-id and --version).",
        ),
        click.option(
            "--hardware-id",
            "hardware_ids",
            multiple=True,
            help="ECU hardware id the image fits (repeatable; required with IMAGES).",
        ),
        click.option(
            "--version", default=None, help="Human version, e.g. 1.1.0 (required with IMAGES)."
        ),
        click.option(
            "--release-counter",
            type=click.IntRange(0),
            default=None,
            help=release_counter_help,
        ),
        click.option(
            "--filepath",
            default=None,
            help="Target name (one IMAGE only); default HARDWARE_ID/VERSION/FILENAME.",
        ),
        click.option(
            "--requires",
            "requires",
            multiple=True,
            metavar="HARDWARE_ID=SPEC",
            help=requires_help,
        ),
        arch_option,
        click.option("--allow-lower", is_flag=True, help=allow_lower_help),
    )

    def decorate(command: _F) -> _F:
        for decorator in reversed(decorators):  # the first listed is shown first
            command = decorator(command)
        return command

    return decorate


@release.command("publish")
@_image_options(
    release_counter_help="Anti-rollback counter; default: one above the highest published for "
    "these hardware ids.",
    requires_help="What the image needs of the vehicle's other ECUs, e.g. "
    "'stm32f4-bms=>=1.1.0,<2' (repeatable): the director never directs, and vehicles never "
    "install, a combination that breaks it.",
    allow_lower_help="Publish even though a higher version is published for these hardware ids "
    "(recorded in the audit log as a lower version).",
)
@offline_key_options
@server_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def release_publish(
    images: tuple[Path, ...],
    manifest: Path | None,
    hardware_ids: tuple[str, ...],
    version: str | None,
    release_counter: int | None,
    filepath: str | None,
    requires: tuple[str, ...],
    arch: str | None,
    allow_lower: bool,
    keys_dir: Path,
    targets_keys: tuple[Path, ...],
    server_url: str,
    ca_cert: Path | None,
    token_file: Path | None,
    as_json: bool,
) -> None:
    """Sign IMAGES (files, or directories of them) into the image repository's targets and
    publish them in one new targets version.

    \b
    One image, or a whole release at once (one upload, one signature):
      uptake release publish bms.bin --hardware-id stm32f4-bms --version 1.1.0 --keys-dir KEYS
      uptake release publish build/ecus/ --hardware-id bench-ecu --version 2.0.0 --keys-dir KEYS
    Images with their own hardware ids and versions, from a TOML manifest:
      uptake release publish --manifest release.toml --keys-dir KEYS
      # release.toml: one table per image, files relative to it
      [[image]]
      file = "bms/bms.bin"
      hardware_ids = ["stm32f4-bms"]
      version = "1.1.0"
      # optional: release_counter, filepath, requires = {"rpi-gateway" = ">=1.1.0"}, arch
    Each image is read once: hashed while it is uploaded. A path already
    published with the same bytes is reported as such (nothing changes); a
    version below one published for the same hardware ids is refused without
    --allow-lower; 'uptake release revert' re-releases older bytes instead.
    """
    from server.release import PublishError, publish_images

    specs = _release_images(
        images, manifest, hardware_ids, version, release_counter, filepath,
        _parse_requires(requires), arch,
    )  # fmt: skip
    signers, trusted_root = offline_signers(keys_dir, targets_keys, "the offline targets key")
    with _upload_progress(specs) as progress:
        try:
            published = publish_images(
                client(server_url, ca_cert, token_file), specs, signers, trusted_root,
                allow_lower=allow_lower, progress=progress,
            )  # fmt: skip
        except PublishError as exc:
            raise click.ClickException(str(exc)) from exc
    if len(published) == 1:
        emit(published[0].__dict__, as_json, _published_text(published[0]))
    else:
        emit(
            {"images": [p.__dict__ for p in published]},
            as_json,
            "\n".join(_published_text(p) for p in published),
        )


@release.command("revert")
@click.argument("filepath")
@click.option(
    "--filepath",
    "new_filepath",
    default=None,
    help="Name of the re-release; default DIR/revert-COUNTER/NAME.",
)
@offline_key_options
@server_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def release_revert(
    filepath: str,
    new_filepath: str | None,
    keys_dir: Path,
    targets_keys: tuple[Path, ...],
    server_url: str,
    ca_cert: Path | None,
    token_file: Path | None,
    as_json: bool,
) -> None:
    """Go back to the published image FILEPATH: re-release its bytes with a new, higher
    release counter, in a new targets version.

    \b
    Vehicles refuse a lower release counter (rollback protection), so a revert is a
    new release of the old bytes, never older metadata. Nothing is uploaded. Then
    assign the new path (printed) to the vehicles that should go back:
      uptake release revert stm32f4-bms/1.1.0/bms.bin --keys-dir /media/usb/uptake-keys
      uptake fleet assign --vin VIN --ecu BMS-001 --image stm32f4-bms/1.1.0/revert-3/bms.bin
    """
    from server.release import PublishError, revert_image

    signers, trusted_root = offline_signers(keys_dir, targets_keys, "the offline targets key")
    try:
        published = revert_image(
            client(server_url, ca_cert, token_file), filepath, signers, trusted_root,
            new_filepath=new_filepath,
        )  # fmt: skip
    except PublishError as exc:
        raise click.ClickException(str(exc)) from exc
    emit(
        published.__dict__,
        as_json,
        f"Re-released the bytes of {filepath} as {published.filepath} (release counter "
        f"{published.release_counter}) in targets v{published.targets_version}",
    )


def _published_text(published: Published) -> str:
    if published.already_published:
        return (
            f"{published.filepath} is already published with these bytes (release counter "
            f"{published.release_counter}, targets v{published.targets_version}): nothing changed"
        )
    return (
        f"Published {published.filepath} ({published.length} bytes, sha256 "
        f"{published.sha256[:16]}…, release counter {published.release_counter}) in targets "
        f"v{published.targets_version}"
    )


def _release_images(
    images: tuple[Path, ...],
    manifest: Path | None,
    hardware_ids: tuple[str, ...],
    version: str | None,
    release_counter: int | None,
    filepath: str | None,
    requires: dict[str, str],
    arch: str | None,
) -> list[ReleaseImage]:
    """The images of ``manifest``, else one per file given or per file in each directory."""
    from server.release import PublishError, ReleaseImage, read_manifest

    if manifest is not None:
        if (
            images
            or hardware_ids
            or version
            or release_counter is not None
            or filepath
            or requires
            or arch
        ):
            raise click.UsageError(
                "--manifest lists every image with its fields: give no IMAGES, --hardware-id, "
                "--version, --release-counter, --filepath, --requires or --arch with it"
            )  # fmt: skip
        try:
            return read_manifest(manifest)
        except PublishError as exc:
            raise click.ClickException(str(exc)) from exc
    if not images or not hardware_ids or version is None:
        raise click.UsageError("give IMAGES, --hardware-id and --version (or --manifest)")

    files: list[Path] = []
    for image in images:
        files.extend(
            sorted(p for p in image.iterdir() if p.is_file()) if image.is_dir() else [image]
        )
    if not files:
        raise click.BadParameter("no file in the directories given", param_hint="IMAGES")
    if filepath is not None and len(files) > 1:
        raise click.BadParameter("names one image: give one IMAGE", param_hint="--filepath")
    return [
        ReleaseImage(
            f, list(hardware_ids), version, release_counter, filepath, requires or None, arch
        )
        for f in files
    ]


@contextlib.contextmanager
def _upload_progress(specs: list[ReleaseImage]) -> Iterator[Callable[[int], None]]:
    """A progress bar (on stderr) over the bytes of ``specs`` being hashed and uploaded."""
    total = sum(spec.path.stat().st_size for spec in specs if spec.path.is_file())
    with click.progressbar(
        length=total,
        label=f"Hashing and uploading {len(specs)} image(s)",
        file=sys.stderr,
        show_eta=True,
    ) as bar:
        yield bar.update


def _parse_requires(requires: tuple[str, ...]) -> dict[str, str]:
    needs = {}
    for item in requires:
        hw, sep, spec = item.partition("=")
        if not sep or not hw or not spec:
            raise click.BadParameter(
                f"{item!r} is not HARDWARE_ID=SPEC (e.g. stm32f4-bms=>=1.1.0)",
                param_hint="--requires",
            )
        needs[hw] = spec
    return needs


def _status_text(status: dict[str, object]) -> str:
    signed = ", ".join(status["signed_by"]) or "nobody"  # type: ignore[arg-type]
    missing = ", ".join(status["missing"]) or "nobody"  # type: ignore[arg-type]
    if status["published"]:
        return f"Published targets v{status['targets_version']} (signed by {signed})"
    return (
        f"Targets v{status['targets_version']} waits for {status['signatures_needed']} more "
        f"signature(s) (threshold {status['threshold']}): signed by {signed}; "
        f"not yet signed by {missing}"
    )


@release.command("stage")
@_image_options(
    release_counter_help="Anti-rollback counter; default: one above the highest published.",
    requires_help="What the image needs of the vehicle's other ECUs (repeatable).",
    allow_lower_help="Stage even though a higher version is published for these hardware ids.",
)
@click.option(
    "--trusted-root",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    required=True,
    help="Your trusted copy of the image repository root (image-root.json).",
)
@server_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def release_stage(
    images: tuple[Path, ...],
    manifest: Path | None,
    hardware_ids: tuple[str, ...],
    version: str | None,
    release_counter: int | None,
    filepath: str | None,
    requires: tuple[str, ...],
    arch: str | None,
    allow_lower: bool,
    trusted_root: Path,
    server_url: str,
    ca_cert: Path | None,
    token_file: Path | None,
    as_json: bool,
) -> None:
    """Upload IMAGES (files, or directories of them) and stage unsigned targets naming them,
    for signers on other machines.

    Needs no key. Replaces a release staged before. Then 'uptake release export'.
    """  # fmt: skip
    from server.release import PublishError, stage_release

    specs = _release_images(
        images, manifest, hardware_ids, version, release_counter, filepath,
        _parse_requires(requires), arch,
    )  # fmt: skip
    with _upload_progress(specs) as progress:
        try:
            published, status = stage_release(
                client(server_url, ca_cert, token_file), specs, trusted_root.read_bytes(),
                allow_lower=allow_lower, progress=progress,
            )  # fmt: skip
        except PublishError as exc:
            raise click.ClickException(str(exc)) from exc
    emit(
        {"images": [p.__dict__ for p in published], "status": status},
        as_json,
        "".join(f"Staged {p.filepath} (release counter {p.release_counter})\n" for p in published)
        + f"in targets v{status['targets_version']}\n{_status_text(status)}",
    )


@release.command("export")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@server_options
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def release_export(
    file: Path, server_url: str, ca_cert: Path | None, token_file: Path | None, as_json: bool
) -> None:
    """Write the staged release to FILE, for key holders to sign offline."""
    from server.release import PublishError, export_release

    try:
        status = export_release(client(server_url, ca_cert, token_file), file)
    except PublishError as exc:
        raise click.ClickException(str(exc)) from exc
    emit(status, as_json, f"Wrote {file}\n{_status_text(status)}")


@release.command("sign")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option(
    "--key",
    "key_path",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    required=True,
    help="Your targets key: NAME.key (encrypted, $UPTAKE_KEY_PASSWORD) or NAME.signer.json "
    "(HSM/YubiKey/SoftHSM2 or key service; PIN in $UPTAKE_HSM_PIN).",
)
@click.option(
    "--trusted-root",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="Your trusted image-root.json: checks the targets this release follows.",
)
@click.option("--yes", is_flag=True, help="Sign without asking (after printing the summary).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def release_sign(
    file: Path, key_path: Path, trusted_root: Path | None, yes: bool, as_json: bool
) -> None:
    """Show what the release in FILE contains, then add your signature to FILE (offline).

    Needs no server. The summary lists every image added, changed or removed
    (path, size, SHA-256, hardware ids, version, release counter) and the expiry.
    """  # fmt: skip
    from server.release import PublishError, read_release_file, release_summary, sign_release_file

    try:
        summary = release_summary(
            read_release_file(file), trusted_root.read_bytes() if trusted_root else None
        )
    except PublishError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(summary, err=as_json)
    if not yes and not click.confirm("Sign this release?", err=as_json):
        raise click.ClickException("not signed")
    key_password = (
        None if is_signer_reference(key_path) else password(PASSWORD_ENV, f"key {key_path}")
    )
    try:
        signature = sign_release_file(file, load_key(key_path, key_password))
    except (KeyFileError, PublishError) as exc:
        raise click.ClickException(str(exc)) from exc
    except Exception as exc:  # an HSM or key service refusing (wrong PIN, token absent...)
        raise click.ClickException(f"signing with {key_path} failed: {exc}") from exc
    emit(
        {"keyid": signature.keyid, "file": str(file)},
        as_json,
        f"Signed with key {signature.keyid[:16]}…; take {file} back for 'uptake release import'",
    )


@release.command("import")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@server_options
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def release_import(
    file: Path, server_url: str, ca_cert: Path | None, token_file: Path | None, as_json: bool
) -> None:
    """Send the signatures in FILE; the server publishes once a threshold signed.

    Exit status 0 when published, 3 when signatures are still missing.
    """
    from server.release import PublishError, import_signatures

    try:
        status = import_signatures(client(server_url, ca_cert, token_file), file)
    except PublishError as exc:
        raise click.ClickException(str(exc)) from exc
    emit(status, as_json, _status_text(status))
    if not status["published"]:
        raise SystemExit(3)


@release.command("status")
@server_options
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def release_status(
    server_url: str, ca_cert: Path | None, token_file: Path | None, as_json: bool
) -> None:
    """Who signed the staged release and who is still missing."""
    from server.release import PublishError, staged_status

    try:
        status = staged_status(client(server_url, ca_cert, token_file))["status"]
    except PublishError as exc:
        raise click.ClickException(str(exc)) from exc
    emit(status, as_json, _status_text(status))


@release.command("discard")
@server_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def release_discard(
    server_url: str, ca_cert: Path | None, token_file: Path | None, as_json: bool
) -> None:
    """Drop the staged release (its uploaded images stay staged until published)."""
    from server.cli_common import call

    answer = call(client(server_url, ca_cert, token_file), "DELETE", "/api/v1/image/staged")
    emit(answer, as_json, f"Discarded staged targets v{answer['discarded']}")


# -- releases: named sets of published images that campaigns roll out ------------------


def _release_text(r: dict[str, object]) -> str:
    images = r["images"]
    assert isinstance(images, list)
    lines = [f"release {r['name']} (by {r['created_by']}, {r['created_at']})"]
    for image in images:
        requires = image.get("requires") or {}
        lines.append(
            f"  {image['hardware_id']:20} {image['filepath']}"
            + (
                f"  {image['version']} (counter {image['release_counter']})"
                if image.get("published")
                else "  NOT PUBLISHED"
            )
            + (f"  requires {requires}" if requires else "")
        )
    return "\n".join(lines)


@release.command("create")
@click.argument("name")
@click.option(
    "--image",
    "images",
    multiple=True,
    required=True,
    help="HARDWARE_ID=TARGET_PATH of a published image (repeat: one per hardware id).",
)
@click.option("--description", default="")
@server_options
@click.option("--json", "as_json", is_flag=True, help="Print the release as JSON.")
def release_create(
    name: str,
    images: tuple[str, ...],
    description: str,
    server_url: str,
    ca_cert: Path | None,
    token_file: Path | None,
    as_json: bool,
) -> None:
    """Name a set of published images, one per hardware id, for campaigns to roll out.

    \b
    uptake release create fw-2 --image stm32f4-bms=stm32f4-bms/1.1.0/bms.bin \\
        --image rpi-gateway=rpi-gateway/1.1.0/gateway.elf
    Their 'requires' (signed into the images) decide the install order per vehicle.
    """
    from server.cli_common import call

    mapping = {}
    for item in images:
        hardware_id, sep, filepath = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r}: use HARDWARE_ID=TARGET_PATH", param_hint="--image")
        mapping[hardware_id] = filepath
    body = {"name": name, "images": mapping, "description": description}
    answer = call(client(server_url, ca_cert, token_file), "POST", "/api/v1/releases", body)
    emit(answer, as_json, _release_text(answer))


@release.command("list")
@server_options
@click.option("--json", "as_json", is_flag=True, help="Print the releases as JSON.")
def release_list(
    server_url: str, ca_cert: Path | None, token_file: Path | None, as_json: bool
) -> None:
    """Every release (named set of images), by name."""
    from urllib.parse import urlencode

    from server.cli_common import call

    api = client(server_url, ca_cert, token_file)
    rows: list[dict[str, object]] = []
    cursor = None
    while True:
        query = {"limit": "500", **({"cursor": cursor} if cursor else {})}
        page = call(api, "GET", f"/api/v1/releases?{urlencode(query)}")
        rows += page["releases"]
        cursor = page["next"]
        if not cursor:
            break
    emit(rows, as_json, "\n".join(_release_text(r) for r in rows) or "no releases")
