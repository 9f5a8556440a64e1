"""``uptake keys``: the key ceremony, key rotation, hardware keys and expiry upkeep."""

from __future__ import annotations

from pathlib import Path

import click

from server.cli_common import database_url_option, emit, password
from signing.keys import KEY_TYPES, PASSWORD_ENV


@click.group()
def keys() -> None:
    """Keys of both repositories: thresholds, rotation, HSM/KMS keys, expiry.

    \b
    Before 'uptake server init', choose how many keys each OFFLINE role has
    and how many must sign (M of N):
      uptake keys init --offline-keys-dir K --role image-targets=2/3 --role image-root=2/3
      uptake server init --data-dir D --offline-keys-dir K
    then hand each key (K/image-targets-1.key ...) to its holder.
    """


def _parse_role(value: str) -> tuple[str, tuple[int, int]]:
    from server.config import OFFLINE_KEYS

    role, sep, spec = value.partition("=")
    threshold, slash, count = spec.partition("/")
    if (
        not sep
        or not slash
        or role not in OFFLINE_KEYS
        or not threshold.isdigit()
        or not count.isdigit()
    ):
        raise click.BadParameter(
            f"{value!r} is not ROLE=M/N with ROLE one of {', '.join(OFFLINE_KEYS)} "
            "(e.g. image-targets=2/3: any 2 of 3 keys sign)",
            param_hint="--role",
        )
    return role, (int(count), int(threshold))


@keys.command("init")
@click.option(
    "--offline-keys-dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Empty directory for the offline keys (then 'uptake server init' uses them).",
)
@click.option(
    "--role",
    "roles",
    multiple=True,
    metavar="ROLE=M/N",
    help="N keys for ROLE (image-root, image-targets, director-root), any M of which sign "
    "(repeatable; default 1/1).",
)
@click.option("--key-type", type=click.Choice(KEY_TYPES), default="ed25519", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the key set as JSON.")
def keys_init(offline_keys_dir: Path, roles: tuple[str, ...], key_type: str, as_json: bool) -> None:
    """Generate the OFFLINE keys with a threshold per role, for 'uptake server init'.

    Keys are encrypted with $UPTAKE_KEY_PASSWORD. Each key is NAME.key + NAME.pub.json;
    the holders take their NAME.key away after 'uptake server init'.
    """
    from server.offline_keys import KeySetError, generate_key_set

    counts = dict(_parse_role(r) for r in roles)
    if offline_keys_dir.exists() and any(offline_keys_dir.iterdir()):
        raise click.ClickException(f"{offline_keys_dir} is not empty: refusing to overwrite keys")
    try:
        for role, (count, threshold) in counts.items():
            if not 1 <= threshold <= count:
                raise KeySetError(f"{role}: threshold {threshold} of {count} keys is impossible")
        secret = password(PASSWORD_ENV, "the offline keys", confirm=True)
        key_set = generate_key_set(offline_keys_dir, counts, secret, key_type)
    except KeySetError as exc:
        raise click.ClickException(str(exc)) from exc
    result = {
        role: {"threshold": k.threshold, "keys": list(k.names)} for role, k in key_set.roles.items()
    }
    emit(
        result,
        as_json,
        "\n".join(
            f"{role}: any {k.threshold} of {', '.join(k.names)}"
            for role, k in key_set.roles.items()
        )
        + f"\nNext: uptake server init --offline-keys-dir {offline_keys_dir} --data-dir …",
    )


@keys.command("rotate")
@click.option(
    "--data-dir", type=click.Path(path_type=Path), required=True, envvar="UPTAKE_DATA_DIR"
)
@click.option(
    "--offline-keys-dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="The offline keys directory (keyset.json, root keys, trusted REPO-root.json).",
)
@click.option("--repository", type=click.Choice(["image", "director"]), required=True)
@click.option(
    "--role",
    "roles",
    type=click.Choice(["root", "targets", "snapshot", "timestamp", "online"]),
    required=True,
    multiple=True,
    help="The role whose keys are replaced (image targets and both roots are offline); "
    "repeatable for online roles; 'online': every online role of the repository "
    "(director targets, snapshot, timestamp; image snapshot, timestamp).",
)
@click.option(
    "--keys",
    "count",
    type=click.IntRange(1, 16),
    default=1,
    show_default=True,
    help="How many new keys to generate (offline roles).",
)
@click.option(
    "--threshold",
    type=click.IntRange(1, 16),
    default=1,
    show_default=True,
    help="How many of the new keys must sign.",
)
@click.option(
    "--new-key",
    "new_keys",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Use this key instead of generating one (repeatable): NAME.key, NAME.pub.json, "
    "or NAME.signer.json (HSM, YubiKey, SoftHSM2, cloud KMS).",
)
@click.option(
    "--root-key",
    "root_keys",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Current root key(s) to sign with (default: those in the offline keys directory).",
)
@click.option("--key-type", type=click.Choice(KEY_TYPES), default="ed25519", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@database_url_option
def keys_rotate(
    data_dir: Path,
    offline_keys_dir: Path,
    repository: str,
    roles: tuple[str, ...],
    count: int,
    threshold: int,
    new_keys: tuple[Path, ...],
    root_keys: tuple[Path, ...],
    key_type: str,
    as_json: bool,
    database_url: str | None,
) -> None:
    """Replace every key of one role through a new root (run with the server STOPPED).

    \b
    Root:       signed by a threshold of the old AND of the new root keys.
    Targets:    the image targets are re-signed at once with the new keys
                (the delegation to the online deltas role is kept).
    Online:     revokes a compromised key: everything is re-signed with the new one.
    Vehicles follow root N -> N+1 on their next poll; metadata signed with a
    replaced key is refused from then on.
    After a compromise of the server, replace all its keys at once:
      uptake keys rotate --data-dir D --offline-keys-dir K --repository director --role online
    Interrupted? Run the same command again: it finishes the rotation it started.
    Each rotation is recorded in the server's audit log (action keys.rotate).
    """  # fmt: skip
    from server.cli_common import require_server_extra
    from server.config import SERVER_PASSWORD_ENV, ConfigError, ServerConfig
    from server.rotation import ONLINE_ROLES, RotationError, rotate_online_keys, rotate_role

    require_server_extra()
    chosen = tuple(
        dict.fromkeys(
            r for role in roles for r in (ONLINE_ROLES[repository] if role == "online" else (role,))
        )
    )
    try:
        config = ServerConfig.load(data_dir, database_url=database_url)
        online = password(SERVER_PASSWORD_ENV, "the server's online keys")
        offline = password(PASSWORD_ENV, "the offline keys")
        if len(chosen) > 1:
            if new_keys:
                raise click.BadParameter(
                    "with --new-key, rotate one role at a time", param_hint="--role"
                )
            result = rotate_online_keys(
                config, offline_keys_dir, repository, chosen, online, offline,
                root_keys=root_keys, key_type=key_type,
            )  # fmt: skip
        else:
            result = rotate_role(
                config, offline_keys_dir, repository, chosen[0], online, offline,
                count=count, threshold=threshold, root_keys=root_keys, new_keys=new_keys,
                key_type=key_type,
            )  # fmt: skip
    except (ConfigError, RotationError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    emit(
        result.__dict__,
        as_json,
        f"{'Finished' if result.resumed else 'Rotated'} {repository} {', '.join(result.roles)}: "
        f"new keys {', '.join(result.new_keyids.values())} in root v{result.root_version}"
        + (
            f", director metadata of {result.vehicles_resigned} vehicle(s) re-signed"
            if repository == "director"
            else ""
        )
        + f"\nStart the server again: uptake server run --data-dir {data_dir}",
    )


@keys.command("import-hsm")
@click.argument("reference", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--hsm-keyid",
    type=click.IntRange(0),
    default=1,
    show_default=True,
    help="CKA_ID of the key pair on the token (PIV slot 9c is 2).",
)
@click.option("--token-label", default=None, help="Label of the token (default: the only one).")
@click.option("--json", "as_json", is_flag=True, help="Print the reference as JSON.")
def keys_import_hsm(
    reference: Path, hsm_keyid: int, token_label: str | None, as_json: bool
) -> None:
    """Write a signer reference (NAME.signer.json) for an ECDSA P-256 key on a PKCS#11 token.

    \b
    The PKCS#11 module comes from $PYKCS11LIB (e.g. /usr/lib/softhsm/libsofthsm2.so,
    a YubiKey's libykcs11.so), the PIN from $UPTAKE_HSM_PIN. Use the reference
    wherever a key is asked for: 'uptake release sign --key', 'uptake keys rotate --new-key'.
    """  # fmt: skip
    from signing.keys import SIGNER_REFERENCE_SUFFIX, KeyFileError, save_signer_reference

    if not reference.name.endswith(SIGNER_REFERENCE_SUFFIX):
        raise click.BadParameter(f"the file name must end with {SIGNER_REFERENCE_SUFFIX}")
    try:
        from securesystemslib.signer import HSMSigner

        from signing.keys import hsm_pin

        uri, key = HSMSigner.import_(hsm_keyid, token_label, hsm_pin)
        save_signer_reference(uri, key, reference)
    except (KeyFileError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    except Exception as exc:  # no PKCS#11 library, no token, no such key, wrong PIN...
        raise click.ClickException(
            f"cannot read key {hsm_keyid} from the PKCS#11 token (is $PYKCS11LIB set, "
            f"'uptake[hsm]' installed, the key pair on the token?): {exc}"
        ) from exc
    emit(
        {"uri": uri, "keyid": key.keyid, "file": str(reference)},
        as_json,
        f"Wrote {reference}: {uri}, key id {key.keyid}",
    )


@keys.command("status")
@click.option(
    "--data-dir", type=click.Path(path_type=Path), required=True, envvar="UPTAKE_DATA_DIR"
)
@click.option("--json", "as_json", is_flag=True, help="Print the roles as JSON.")
def keys_status(data_dir: Path, as_json: bool) -> None:
    """Every role of both repositories: keys, threshold, version, expiry; warns ahead of
    OFFLINE and SUPPLIER expiries (online ones the server re-signs by itself).

    Supplier roles (delegated by the image targets) are listed by name, with the
    first 16 characters of their key ids; their suppliers re-publish them.
    """
    from server.config import ConfigError, ServerConfig
    from server.key_status import as_dicts, key_status

    try:
        statuses = key_status(ServerConfig.load(data_dir))
    except (ConfigError, OSError, IndexError) as exc:
        raise click.ClickException(f"cannot read the repositories in {data_dir}: {exc}") from exc
    lines = []
    for s in statuses:
        version = (
            f"v{s.version}"
            if s.version is not None
            else "nothing published"
            if s.supplier
            else "per vehicle"
        )
        kind = "SUPPLIER" if s.supplier else "online  " if s.online else "OFFLINE "
        lines.append(
            f"{s.repository:8} {s.role:9} {kind} "
            f"{s.threshold} of {', '.join(s.keys)}; {version}"
            + (f", expires {s.expires}" if s.expires else "")
            + (f"\n  WARNING: {s.warning}" if s.warning else "")
        )
    emit(as_dicts(statuses), as_json, "\n".join(lines))
