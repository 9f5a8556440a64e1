"""``uptake audit``: a tampered audit log is named by the real CLI; key operations are audited.

A real server's SQLite database is edited behind its back (a record changed, deleted, or two
swapped) and ``uptake audit verify`` exits 1 naming the first broken record. Key operations
appear in the log too: the key ceremony of ``server init``, a rotation (server stopped), and a
delegation added with ``uptake delegation add``; ``uptake audit export`` writes all of it.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from signing.keys import generate_signer, save_public_key
from tests.uptake_fixtures import ENV, ServerProcess


def uptake(srv: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**ENV, "UPTAKE_SERVER": srv.url, "UPTAKE_TOKEN_FILE": str(srv.config.admin_token_path)}
    return subprocess.run([sys.executable, "-m", "uptake", *args], env=env, capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip


@pytest.mark.parametrize(
    ("tampering", "sql"),
    [
        ("change", ["UPDATE auditrecord SET actor = 'operator:nobody' WHERE seq = 3"]),
        ("delete", ["DELETE FROM auditrecord WHERE seq = 3"]),
        ("reorder", [
            "UPDATE auditrecord SET seq = 100 WHERE seq = 3",
            "UPDATE auditrecord SET seq = 3 WHERE seq = 4",
            "UPDATE auditrecord SET seq = 4 WHERE seq = 100",
        ]),
    ],
)  # fmt: skip
def test_audit_verify_names_the_tampered_record(
    tmp_path: Path, tampering: str, sql: list[str]
) -> None:
    srv = ServerProcess(tmp_path)
    try:
        for i in range(4):
            srv.admin.request(
                "POST", "/api/v1/tokens", json_body={"name": f"op{i}", "role": "viewer"}
            )
        intact = uptake(srv, "audit", "verify")
        assert intact.returncode == 0 and "intact" in intact.stdout, intact.stderr
        srv.stop()
        for statement in sql:  # straight into its database (SQLite or PostgreSQL)
            srv.sql(statement)
        srv.start()
        broken = uptake(srv, "audit", "verify", "--json")
        assert broken.returncode == 1, broken.stderr
        result = json.loads(broken.stdout)
        assert not result["intact"] and result["first_broken_seq"] == 3, result
        text = uptake(srv, "audit", "verify")
        assert text.returncode == 1 and "BROKEN at record 3" in text.stdout
        assert "Traceback" not in text.stderr
    finally:
        srv.stop()


def test_key_operations_are_audited_and_the_log_exports(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path)
    try:
        supplier = generate_signer()
        save_public_key(supplier.public_key, tmp_path / "acme.pub.json")
        added = uptake(srv, "delegation", "add", "acme", "--hardware-id", "stm32f4-bms",
                       "--path-pattern", "acme/*", "--key", str(tmp_path / "acme.pub.json"),
                       "--keys-dir", str(srv.offline_dir))  # fmt: skip
        assert added.returncode == 0, added.stderr
        srv.stop()
        rotated = uptake(srv, "keys", "rotate", "--data-dir", str(srv.data_dir),
                         "--offline-keys-dir", str(srv.offline_dir), "--repository", "director",
                         "--role", "timestamp")  # fmt: skip
        assert rotated.returncode == 0, rotated.stderr
        srv.start()

        out = tmp_path / "audit.json"
        exported = uptake(srv, "audit", "export", "--output", str(out))
        assert exported.returncode == 0, exported.stderr
        records = json.loads(out.read_text())
        by_action = {r["action"]: r for r in records}
        assert by_action["keys.init"]["actor"].startswith("local:")
        assert by_action["delegation.add"]["subject"] == "acme"
        assert by_action["delegation.add"]["detail"]["paths"] == ["acme/*"]
        assert by_action["targets.publish"]["detail"]["delegations_changed"] == ["acme"]
        rotation = by_action["keys.rotate"]
        assert rotation["detail"]["repository"] == "director"
        assert rotation["detail"]["roles"] == ["timestamp"]
        assert rotation["actor"].startswith("local:")
        assert [r["seq"] for r in records] == list(range(1, len(records) + 1))

        out_csv = tmp_path / "audit.csv"
        assert (
            uptake(srv, "audit", "export", "--format", "csv", "--output", str(out_csv)).returncode
            == 0
        )
        rows = list(csv.DictReader(out_csv.open(newline="")))
        assert [int(r["seq"]) for r in rows] == [r["seq"] for r in records]
        assert json.loads(rows[-1]["detail"]) == records[-1]["detail"]
        assert uptake(srv, "audit", "verify").returncode == 0
    finally:
        srv.stop()
