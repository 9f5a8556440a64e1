"""Make the previous release's fleet database fixtures (run once, by hand, with that release's code).

    git worktree add --detach /tmp/old 4b438cb
    cd /tmp/old && PYTHONPATH=/tmp/old python /path/to/make_release_database.py OUT_DIR [PG_DB]

Runs the release's own server and agents (its tests/uptake_fixtures.py): two
vehicles, two published images, assignments installed, one pending, one
refused manifest. Writes ``OUT_DIR/release-4b438cb.sqlite.sql`` (SQLite
``iterdump``) and, with ``PG_DB`` (an existing empty PostgreSQL database on
127.0.0.1), ``OUT_DIR/release-4b438cb.postgresql.sql`` (``pg_dump --inserts``).
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import urllib3

from tests.uptake_fixtures import ServerProcess, Vehicle, sample


def main(out_dir: Path, pg_db: str | None) -> None:
    for database in ("sqlite", "postgresql") if pg_db else ("sqlite",):
        with tempfile.TemporaryDirectory() as tmp:
            url = (
                f"postgresql+psycopg://postgres@127.0.0.1:5432/{pg_db}"
                if database != "sqlite"
                else ""
            )
            server = ServerProcess(Path(tmp), database_url=url)
            try:
                one = Vehicle(Path(tmp), server, vin="OLDVIN0001")
                two = Vehicle(Path(tmp), server, vin="OLDVIN0002")
                gw = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
                bms = server.publish(sample("stm32f4-bms", "1.1.0"), "stm32f4-bms", "1.1.0")
                server.assign(one.vin, one.primary, gw.filepath)
                server.assign(one.vin, one.secondary, bms.filepath)
                assert one.run_once().returncode == 0
                two.run_once()
                server.assign(two.vin, two.primary, gw.filepath)  # stays pending
                refused = urllib3.request(
                    "POST", f"{server.url}/api/v1/vehicles/{two.vin}/manifest", body=b"{}"
                )
                assert refused.status == 400, refused.status
            finally:
                server.stop()
            if database == "sqlite":
                with sqlite3.connect(server.data_dir / "uptake.db") as conn:
                    dump = "\n".join(conn.iterdump()) + "\n"
                (out_dir / "release-4b438cb.sqlite.sql").write_text(dump)
            else:
                assert pg_db  # "postgresql" is in the loop only with a database name
                dump = subprocess.run(
                    [
                        "pg_dump",
                        "-h",
                        "127.0.0.1",
                        "-U",
                        "postgres",
                        "--inserts",
                        "--no-owner",
                        "--no-privileges",
                        pg_db,
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                # psql's meta-commands (\\restrict) are no SQL: the test runs the dump as SQL
                dump = "".join(
                    line for line in dump.splitlines(keepends=True) if not line.startswith("\\")
                )
                (out_dir / "release-4b438cb.postgresql.sql").write_text(dump)


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve(), sys.argv[2] if len(sys.argv) > 2 else None)
