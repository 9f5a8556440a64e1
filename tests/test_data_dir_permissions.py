"""The server's data directory is private to its user (attacker review, minor).

``uptake server init`` leaves the data directory 0700 and the SQLite database, keys and admin
token 0600 (SQLite itself makes its file 0644); ``uptake server run`` tightens whatever was
loosened since, and says so in its log.
"""

from __future__ import annotations

from pathlib import Path

from tests.uptake_fixtures import ServerProcess


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _private(server: ServerProcess) -> list[tuple[Path, int]]:
    data = server.data_dir
    keys = sorted(p for p in (data / "keys").iterdir() if p.is_file())
    files = [data / "uptake.db", server.config.admin_token_path, *keys]
    return [(data, 0o700), (data / "keys", 0o700)] + [(f, 0o600) for f in files]


def test_init_and_run_keep_the_data_directory_private(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, tls=True)
    try:
        assert len(_private(server)) > 5
        for path, mode in _private(server):
            assert _mode(path) == mode, (path, oct(_mode(path)))
        server.stop()
        (server.data_dir / "uptake.db").chmod(0o644)
        server.data_dir.chmod(0o755)
        server.start()
        for path, mode in _private(server):
            assert _mode(path) == mode, (path, oct(_mode(path)))
        assert "permissions were looser than the server's own" in server.log()
    finally:
        server.stop()
