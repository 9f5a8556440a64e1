"""ruff check and ruff format over the whole tree, mypy --strict over every package, bench/ and tests/.

mypy checks the ``files`` of ``[tool.mypy]`` in pyproject.toml: signing/, client/, hil/, server/,
uptake/, bench/ and tests/. Part of the test command, so CI enforces all three.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]')")
    return found


def test_ruff_is_clean() -> None:
    proc = subprocess.run(
        [_tool("ruff"), "check", "."], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format_is_enforced() -> None:
    proc = subprocess.run(
        [_tool("ruff"), "format", "--check", "."],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, "run: ruff format .\n" + proc.stdout + proc.stderr


def test_mypy_strict_is_clean_on_every_package_bench_and_the_tests() -> None:
    proc = subprocess.run([_tool("mypy")], cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_server_and_client_do_not_import_each_other() -> None:
    for package, forbidden in (
        ("client", "server"),
        ("server", "client"),
        ("signing", "server"),
        ("signing", "client"),
        ("hil", "server"),
    ):
        for source in (REPO / package).rglob("*.py"):
            for line in source.read_text().splitlines():
                stripped = line.strip()
                assert not stripped.startswith(
                    (f"import {forbidden}", f"from {forbidden}.", f"from {forbidden} ")
                ), f"{source.relative_to(REPO)} imports {forbidden}: {stripped}"


def test_every_defence_mutation_still_applies() -> None:
    """Each mutation of ``tests.attacks.defence_mutations`` still disables real code.

    Three had gone stale as the code moved (their text no longer matched, so the
    defence they prove went unchecked); this catches the next one in the default run.
    """
    from tests.attacks.defence_mutations import stale_mutations

    assert stale_mutations() == []
