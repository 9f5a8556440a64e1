"""Prove that each attack test depends on the defence it is about.

For every entry of :data:`MUTATIONS`, in a scratch copy of the repository
(and of python-tuf, placed first on ``sys.path``), one defence is disabled by
an exact textual edit, the attack tests that rely on it are run there, and
every one of them must FAIL. The working tree is never modified: the scratch copy is
made once, each edit is undone before the next, and everything is deleted at
the end.

    .venv/bin/python -m tests.attacks.defence_mutations            # all
    .venv/bin/python -m tests.attacks.defence_mutations rollback    # names containing "rollback"

Prints one line per mutation (``defence proven`` when the tests failed with
the defence disabled) and exits non-zero if any test still passed without
its defence, or if the unmutated copy does not pass first.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tuf

REPO = Path(__file__).resolve().parents[2]
TUF = Path(tuf.__file__).resolve().parent
A = "tests/attacks/"
TMS = "tuf/ngclient/_internal/trusted_metadata_set.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the scratch copy ("tuf/..." is python-tuf)
    old: str
    new: str
    tests: tuple[str, ...]
    also: tuple[tuple[str, str], ...] = ()  # further (old, new) edits in the same file
    #: further (file, old, new) edits elsewhere: a defence with two layers is disabled whole
    elsewhere: tuple[tuple[str, str, str], ...] = ()

    def edits(self) -> list[tuple[str, str, str]]:
        return [
            (self.file, self.old, self.new),
            *((self.file, old, new) for old, new in self.also),
            *self.elsewhere,
        ]

    def apply(self, texts: dict[str, str]) -> tuple[dict[str, str], str]:
        """The files' texts with every edit made, and why not ("" when each applied once)."""
        mutated = dict(texts)
        for file, old, new in self.edits():
            if mutated[file].count(old) != 1:
                return mutated, f"{old[:60]!r} does not occur exactly once in {file}"
            mutated[file] = mutated[file].replace(old, new)
        return mutated, ""


def source_file(file: str) -> Path:
    """Where a mutation's file is in this checkout ("tuf/..." is the installed python-tuf)."""
    return TUF.parent / file if file.startswith("tuf/") else REPO / file


def stale_mutations() -> list[str]:
    """Mutations whose edits no longer apply to the code, or whose tests are gone.

    The code moves on; an edit that no longer matches would silently test nothing, so
    the default test run checks this (``tests/test_code_quality.py``).
    """
    stale = []
    for m in MUTATIONS:
        texts = {file: source_file(file).read_text() for file, _, _ in m.edits()}
        _, broken = m.apply(texts)
        missing = [t for t in m.tests if not (REPO / t.split("::")[0]).is_file()]
        if broken or missing:
            stale.append(f"{m.name}: {broken or f'no test file {missing[0]}'}")
    return stale


def _off(condition: str) -> str:
    """``if <condition>:`` → ``if False:`` (the check never fires)."""
    return condition.replace("if ", "if False and ", 1)


# signing.names.confined with both of its checks off (for defences it backs up)
_CONFINED_OFF = (
    "signing/names.py",
    "    if resolved != base and base not in resolved.parents:",
    _off("    if resolved != base and base not in resolved.parents:"),
)
_CONFINED_PARTS_OFF = (
    "signing/names.py",
    "    for part in parts:\n        _check_file_name(part, where)",
    "    for part in parts:\n        pass",
)

MUTATIONS = [
    Mutation(
        "image hash check on download (agent)",
        "client/downloads.py",
        "                target.verify_length_and_hashes(f)",
        "                pass",
        (A + "test_arbitrary_software.py::test_image_not_signed_by_image_repository_is_refused",),
    ),
    Mutation(
        "director target must exist in the image repository",
        "client/verification.py",
        "        if itarget is None:",
        _off("        if itarget is None:"),
        (A + "test_arbitrary_software.py::test_image_signed_by_director_only_is_refused",),
    ),
    Mutation(
        "only offline-signed top-level targets vouch for images (not the deltas role)",
        "client/verification.py",
        # whatever python-tuf's walk finds in the deltas role is taken as an image
        "        if role.name == DELTAS_ROLE:\n            raise AttackDetected(",
        "        if role.name == DELTAS_ROLE:\n            return image.get_targetinfo(path)\n"
        "        if False:\n            raise AttackDetected(",
        (A + "test_arbitrary_software.py::test_image_signed_by_the_online_deltas_role_is_refused",),
    ),
    Mutation(
        "TUF signature threshold (verify_delegate)",
        "tuf/api/_payload.py",
        "        if not result:\n            raise UnsignedMetadataError(",
        "        if False:\n            raise UnsignedMetadataError(",
        (A + "test_arbitrary_software.py::test_image_signed_by_image_repository_only_is_refused",),
    ),
    Mutation(
        "release counter never lower (agent)",
        "client/verification.py",
        "            if custom.release_counter < installed:",
        _off("            if custom.release_counter < installed:"),
        (
            A + "test_rollback.py::test_older_image_is_refused",
            A + "test_rollback.py::test_lower_release_counter_is_refused",
        ),
    ),
    Mutation(
        "TUF snapshot may not lower a metadata version",
        TMS,
        "                if new_fileinfo.version < fileinfo.version:",
        _off("                if new_fileinfo.version < fileinfo.version:"),
        (A + "test_rollback.py::test_older_metadata_versions_are_refused",),
    ),
    Mutation(
        "TUF timestamp version never goes back",
        TMS,
        "            if new_timestamp.version < self.timestamp.version:",
        _off("            if new_timestamp.version < self.timestamp.version:"),
        (A + "test_freeze.py::test_replayed_old_metadata_is_refused",),
    ),
    Mutation(
        "TUF targets expiry",
        TMS,
        "        if new_delegate.is_expired(self.reference_time):",
        _off("        if new_delegate.is_expired(self.reference_time):"),
        (A + "test_freeze.py::test_expired_metadata_is_refused[director targets]",),
    ),
    Mutation(
        "TUF timestamp expiry",
        TMS,
        "        if self.timestamp.is_expired(self.reference_time):",
        _off("        if self.timestamp.is_expired(self.reference_time):"),
        (A + "test_freeze.py::test_expired_metadata_is_refused[image timestamp]",),
    ),
    Mutation(
        "director targets bound to this VIN",
        "client/verification.py",
        "        if vin != self.vin:",
        _off("        if vin != self.vin:"),
        (A + "test_freeze.py::test_director_targets_for_another_vin_are_refused",),
        also=(("        if vin != self._vin:", _off("        if vin != self._vin:")),),
    ),
    Mutation(
        "director timestamp and snapshot bound to this VIN before python-tuf trusts them",
        "client/verification.py",
        "        if vin != self._vin:",
        _off("        if vin != self._vin:"),
        (
            A + "test_freeze.py::"
            "test_another_vehicles_newer_timestamp_and_snapshot_cannot_freeze_this_one",
        ),
    ),
    Mutation(
        "TUF targets version must match snapshot",
        TMS,
        "        if version != meta.version:",
        _off("        if version != meta.version:"),
        (
            A
            + "test_mix_and_match.py::test_targets_of_another_version_than_snapshot_names_are_refused",
        ),
    ),
    Mutation(
        "director hash == image repository hash",
        "client/verification.py",
        "            if itarget.hashes.get(alg) != digest:",
        _off("            if itarget.hashes.get(alg) != digest:"),
        (
            A
            + "test_mix_and_match.py::test_director_target_differing_from_image_repository_is_refused[hash]",
        ),
    ),
    Mutation(
        "director length == image repository length",
        "client/verification.py",
        "        if dtarget.length != itarget.length:",
        _off("        if dtarget.length != itarget.length:"),
        (
            A
            + "test_mix_and_match.py::test_director_target_differing_from_image_repository_is_refused[length]",
        ),
    ),
    Mutation(
        "image must list the hardware id",
        "client/verification.py",
        "            if hw not in custom.hardware_ids:",
        _off("            if hw not in custom.hardware_ids:"),
        (
            A
            + "test_mix_and_match.py::test_hardware_id_mismatch_is_refused[image for other hardware]",
        ),
    ),
    Mutation(
        "ECU must have the hardware id the director names",
        "client/verification.py",
        "            if ecus[serial] != hw:",
        _off("            if ecus[serial] != hw:"),
        (A + "test_mix_and_match.py::test_hardware_id_mismatch_is_refused[ECU hardware id]",),
    ),
    Mutation(
        "director may only name this vehicle's ECUs",
        "client/verification.py",
        "            if serial not in ecus:",
        _off("            if serial not in ecus:"),
        (A + "test_mix_and_match.py::test_ecu_serial_of_another_vehicle_is_refused",),
    ),
    Mutation(
        "fetcher length cap while streaming",
        "client/fetcher.py",
        "            if self.max_length is not None and self.received + len(chunk) > self.max_length:",
        _off(
            "            if self.max_length is not None and self.received + len(chunk) > self.max_length:"
        ),
        (
            A + "test_endless_data.py::test_endless_data_is_cut_off_and_refused[endless image]",
            A
            + "test_endless_data.py::test_endless_data_is_cut_off_and_refused[endless image metadata]",
        ),
    ),
    Mutation(
        "fetcher length caps, declared and streamed",
        "client/fetcher.py",
        "        if self.max_length is not None and total is not None and total > self.max_length:",
        _off(
            "        if self.max_length is not None and total is not None and total > self.max_length:"
        ),
        (
            A
            + "test_endless_data.py::test_endless_data_is_cut_off_and_refused[image longer than signed]",
            A
            + "test_endless_data.py::test_endless_data_is_cut_off_and_refused[oversized director metadata]",
        ),
        also=(
            (
                "            if self.max_length is not None and self.received + len(chunk) > self.max_length:",
                _off(
                    "            if self.max_length is not None and self.received + len(chunk) > self.max_length:"
                ),
            ),
        ),
    ),
    Mutation(
        "server manifest size limit",
        "server/api/boundary.py",
        "        if size > limit:",
        _off("        if size > limit:"),
        (A + "test_endless_data.py::test_oversized_manifest_is_refused_by_server[streamed]",),
    ),
    Mutation(
        "fetcher minimum rate",
        "client/fetcher.py",
        "        if rate < self._min_rate:",
        _off("        if rate < self._min_rate:"),
        (
            A
            + "test_slow_retrieval.py::test_trickling_server_is_abandoned_and_reported[image metadata]",
        ),
    ),
    Mutation(
        "server checks the primary's manifest signature",
        "server/fleet.py",
        "        envelope.verify(\n",
        "        (lambda *a: None)(\n",
        (A + "test_manifest_forgery.py::test_manifest_tampered_in_flight_is_rejected",),
    ),
    Mutation(
        "server checks each ECU report signature",
        "server/fleet.py",
        "            report_env.verify(\n",
        "            (lambda *a: None)(\n",
        (A + "test_manifest_forgery.py::test_ecu_report_with_bad_signature_is_rejected",),
    ),
    Mutation(
        "server report counter must grow",
        "server/fleet.py",
        "    if counter <= last:",
        _off("    if counter <= last:"),
        (A + "test_manifest_forgery.py::test_replayed_report_counter_is_rejected",),
    ),
    Mutation(
        "server refuses reports from unknown ECUs",
        "server/fleet.py",
        "        if ecu is None:\n            raise ManifestRejectedError(",
        "        if False:\n            raise ManifestRejectedError(",
        (A + "test_manifest_forgery.py::test_report_from_unknown_ecu_is_rejected",),
    ),
    Mutation(
        "server checks the manifest's VIN",
        "server/fleet.py",
        "    if manifest.vin != vin:",
        _off("    if manifest.vin != vin:"),
        (A + "test_manifest_forgery.py::test_manifest_of_another_vehicle_is_rejected",),
    ),
    # -- issue 9: names from outside never become paths; truthful outcomes ---------------
    Mutation(
        "delta names: hash grammar, and every download path confined to its directory",
        "signing/metadata.py",
        """        check_hashes(target.hashes, f"delta target {target.path!r} hashes")""",
        "        pass",
        (A + "test_path_traversal.py::test_delta_hash_that_is_a_path_is_refused_and_reported",),
        elsewhere=(_CONFINED_OFF, _CONFINED_PARTS_OFF),
    ),
    Mutation(
        "image and director target names: grammar, and downloads confined",
        "client/verification.py",
        """                check_target(dtarget, "director target")""",
        "                pass",
        (A + "test_path_traversal.py::test_image_named_with_a_path_is_refused_and_reported",),
        also=(("""            check_target(itarget, "image target")""", "            pass"),),
        elsewhere=(_CONFINED_OFF, _CONFINED_PARTS_OFF),
    ),
    Mutation(
        "redirects followed only within the origin",
        "client/fetcher.py",
        "            if _origin(location) != origin:",
        _off("            if _origin(location) != origin:"),
        (A + "test_redirects.py::test_redirect_to_another_origin_is_refused",),
    ),
    Mutation(
        "a slot must exist and be what its installer writes to",
        "client/installer.py",
        """            raise InstallError(f"{where}: no such block device") from None""",
        "            return",
        (
            "tests/test_agent_outcomes.py::test_a_slot_that_does_not_exist_stops_the_agent_and_status_says_so",
        ),
        also=(
            (
                """    if Path(os.path.realpath(path)).is_relative_to("/dev"):""",
                _off("""    if Path(os.path.realpath(path)).is_relative_to("/dev"):"""),
            ),
        ),
    ),
    Mutation(
        "agent run --once exits with the cycle's status",
        "client/cli.py",
        "            sys.exit(status.exit_code)",
        "            sys.exit(0)",
        (
            "tests/test_agent_outcomes.py::test_unreachable_server_exits_75_postponed",
            "tests/test_agent_outcomes.py::test_an_install_that_rolls_back_exits_1_and_says_why",
        ),
    ),
    Mutation(
        "a manifest that was not sent is not reported as accepted",
        "client/reporting.py",
        """            return ManifestDelivery.UNCHANGED, """ "",
        """            return ManifestDelivery.ACCEPTED, """ "",
        (
            "tests/test_agent_outcomes.py::"
            "test_nothing_to_do_exits_0_and_an_unneeded_manifest_is_not_called_accepted",
        ),
    ),
    Mutation(
        "a root that never verified anything is a configuration error, not an attack",
        "client/verification.py",
        "    if first_contact and isinstance(exc, UnsignedMetadataError):",
        _off("    if first_contact and isinstance(exc, UnsignedMetadataError):"),
        (
            "tests/test_provisioning.py::"
            "test_a_wrong_trusted_root_at_first_contact_is_a_configuration_error_not_an_attack",
        ),
    ),
    Mutation(
        "agent init checks the trusted roots it is given",
        "client/provisioning.py",
        "    check_trust_anchors(image_root, director_root)\n",
        "",
        ("tests/test_provisioning.py::test_wrong_roots_are_refused",),
        elsewhere=(
            (
                "client/cli.py",
                "        check_trust_anchors(image_root_bytes, director_root_bytes)\n",
                "",
            ),
            (
                "client/cli.py",
                "            else check_image_root_with_server(\n",
                '            else (lambda *a, **k: "")(\n',
            ),
        ),
    ),
    Mutation(
        "agent init checks names and unique serials",
        "client/provisioning.py",
        "    check_names(vin, [primary, *secondaries])\n",
        "",
        ("tests/test_provisioning.py::test_bad_names_are_refused",),
        # the configuration schema checks names with the same grammar: a second layer
        elsewhere=(
            (
                "signing/names.py",
                "    if _NAME_RE.fullmatch(value) is None:",
                _off("    if _NAME_RE.fullmatch(value) is None:"),
            ),
        ),
    ),
    Mutation(
        "refused manifests are rate-limited per vehicle",
        "server/fleet.py",
        "    wait = limiter.take(vehicle.vin)\n",
        "    wait = 0.0\n",
        (
            "tests/test_server_hardening.py::test_garbage_manifests_are_counted_rate_limited_and_bounded",
        ),
    ),
    Mutation(
        "a report counter may not jump past the bound",
        "server/fleet.py",
        "    if ecu.report_counter_state != ReportCounterState.REBASELINE and (",
        "    if False and (",
        (
            "tests/test_server_hardening.py::test_report_counter_jump_is_bounded_and_an_operator_can_reset_it",
        ),
    ),
    Mutation(
        "names in requests follow the grammar",
        "signing/names.py",
        "    if _NAME_RE.fullmatch(value) is None:\n",
        "    if False:\n",
        ("tests/test_server_hardening.py::test_dot_names_are_refused_at_registration",),
        elsewhere=(
            (
                "server/api/schemas.py",
                'Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN, description="VIN, ECU serial, id")]',
                "Name = str",
            ),
        ),
    ),
    Mutation(
        "request bodies have a deadline",
        "server/api/boundary.py",
        "        async with asyncio.timeout(deadline):\n",
        "        async with asyncio.timeout(None):\n",
        (
            "tests/test_server_hardening.py::test_dropped_and_stalled_bodies_cost_one_line_and_are_timed_out",
        ),
    ),
    Mutation(
        "untrusted JSON is bounded in depth",
        "signing/json_limits.py",
        "    if depth:\n",
        "    if False:\n",
        ("tests/fuzz/test_fuzz_http.py::test_deeply_nested_bodies_answer_400",),
        also=(
            (
                "    except RecursionError as exc:  # unreachable after the depth check; kept as a last fence\n        raise UntrustedJsonError(",
                "    except ZeroDivisionError as exc:\n        raise UntrustedJsonError(",
            ),
        ),
    ),
    Mutation(
        "a trusted root link lost to a kill is restored",
        "client/verification.py",
        "        _restore_trusted_root_link(directory)\n",
        "",
        ("tests/test_end_to_end.py::test_a_trusted_root_link_lost_to_a_kill_is_restored",),
    ),
    Mutation(
        "vehicle routes need the certificate of the VIN in the URL",
        "server/api/access.py",
        "    if identity is None or not identity.vin or (vin is not None and identity.vin != vin):",
        "    if identity is None:",
        (
            "tests/test_identity.py::"
            "test_a_vehicle_cannot_read_or_post_for_another_nor_learn_which_vins_exist",
        ),
    ),
    Mutation(
        "revoked vehicles and certificates are refused",
        "server/api/access.py",
        "    if vehicle_revoked is not None or parent_revoked is not None:",
        _off("    if vehicle_revoked is not None or parent_revoked is not None:"),
        (
            "tests/test_identity.py::test_a_revoked_vehicle_and_a_revoked_certificate_are_refused_at_once",
        ),
        also=(
            (
                "        certificate.revoked_at is not None\n        or certificate.vin",
                "        False\n        or certificate.vin",
            ),
        ),
    ),
    Mutation(
        "identity headers believed only from trusted proxies",
        "server/api/access.py",
        "    elif access.mode is VehicleIdentityMode.PROXY and access.from_trusted_proxy(request.remote):",
        "    elif access.mode is VehicleIdentityMode.PROXY:",
        ("tests/test_nginx.py::test_identity_headers_are_believed_only_from_the_proxy",),
    ),
    Mutation(
        "operator routes need a token whose role grants them",
        # every role check, the route table's and the publishing handlers' own
        "server/roles.py",
        "        return permission in ROLE_PERMISSIONS[self.role]",
        "        return True",
        ("tests/test_access.py::test_a_viewer_gets_403_on_every_route_that_changes_state",),
    ),
    Mutation(
        "suppliers publish only for their hardware ids",
        "server/roles.py",
        "        return self.role is not Role.SUPPLIER or set(hardware_ids) <= set(self.hardware_ids)",
        "        return True",
        ("tests/test_access.py::test_a_supplier_publishes_only_for_its_hardware_ids",),
    ),
    Mutation(
        "audit records are hash-chained and verified",
        "server/audit.py",
        "        if computed != record.hash:",
        _off("        if computed != record.hash:"),
        ("tests/test_access.py::test_a_tampered_audit_log_is_detected[change]",),
    ),
    Mutation(
        "the agent refuses plain HTTP to a non-loopback host",
        "client/config.py",
        "            and not self.tls.allow_plain_http\n",
        "            and False\n",
        (
            "tests/test_identity.py::test_the_agent_refuses_plain_http_to_a_host_that_is_not_loopback",
        ),
    ),
]


def _pytest(cwd: Path, tests: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rf",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            *tests,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def _scratch_copy(into: Path) -> Path:
    repo = into / "repo"
    shutil.copytree(
        REPO,
        repo,
        ignore=shutil.ignore_patterns(
            ".venv",
            ".git",
            ".hypothesis",
            ".mypy_cache",
            ".ruff_cache",
            ".pytest_cache",
            "__pycache__",
        ),
    )
    shutil.copytree(TUF, repo / "tuf", ignore=shutil.ignore_patterns("__pycache__"))
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import client.verification, tuf; print(client.verification.__file__, tuf.__file__)",
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(Path(p).is_relative_to(repo) for p in where), (
        f"scratch copy not imported first: {where}"
    )
    return repo


def main(argv: list[str]) -> int:
    chosen = [
        m
        for m in MUTATIONS
        if not argv
        or any(a.lower() in m.name.lower() or any(a in t for t in m.tests) for a in argv)
    ]
    failures = 0
    with tempfile.TemporaryDirectory(prefix="uptake-mutants-") as tmp:
        repo = _scratch_copy(Path(tmp))
        every_test = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        baseline = _pytest(repo, every_test)
        if baseline.returncode != 0:
            print(f"the unmutated copy does not pass:\n{baseline.stdout[-3000:]}")
            return 2
        for m in chosen:
            originals = {file: (repo / file).read_text() for file, _, _ in m.edits()}
            mutated, broken = m.apply(originals)
            if broken:
                print(f"SKIP  {m.name}: {broken}")
                failures += 1
                continue
            for file, text in mutated.items():
                (repo / file).write_text(text)
            start = time.monotonic()
            try:
                run = _pytest(repo, m.tests)
            finally:
                for file, text in originals.items():
                    (repo / file).write_text(text)
            took = time.monotonic() - start
            summary = (
                run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-200:]
            )
            if run.returncode == 0 or " passed" in summary:
                failures += 1
                print(f"FAIL  {m.name} ({m.file}): a test still passes without it [{summary}]")
            else:
                print(
                    f"ok    {m.name} ({m.file}) disabled -> defence proven, tests failed "
                    f"[{summary}] {took:.0f}s"
                )
                for line in run.stdout.splitlines():
                    if line.startswith("FAILED"):
                        print(f"        {line[:220]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
