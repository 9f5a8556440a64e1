from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.attacks.deployment import Deployment
from tests.uptake_fixtures import ServerProcess


@pytest.fixture
def deployment(tmp_path: Path, server: ServerProcess) -> Iterator[Deployment]:
    """A server, a malicious proxy and a vehicle behind it with gateway 1.0.0 installed."""
    d = Deployment(tmp_path, server)
    yield d
    d.close()
