"""Slow retrieval: a server that trickles bytes cannot hold the vehicle's update hostage.

The proxy answers with the genuine bytes at a few dozen bytes per second,
then keeps the connection open dribbling more: never silent long enough for
a read timeout. The agent's fetcher (``client.fetcher``) aborts any download
whose average rate over ``[download] rate_window`` falls below
``min_rate`` with ``SlowRetrievalError``, which is reported as an attack.
The vehicle's config sets a short window so the test takes seconds, not the
production 30 s.
"""

from __future__ import annotations

import pytest

from tests.attacks.deployment import GATEWAY, Deployment
from tests.malicious_proxy import trickle


def _impatient(d: Deployment) -> None:
    d.vehicle.configure(download={"min_rate": 1000, "rate_window": 2.0})


@pytest.mark.parametrize("what", ["image", "image metadata", "director metadata"])
def test_trickling_server_is_abandoned_and_reported(deployment: Deployment, what: str) -> None:
    d = deployment
    _impatient(d)
    new = d.publish(GATEWAY, "1.1.0")
    director = d.director_path()
    matches = {
        "image": lambda path: path.startswith("/image/targets/"),
        "image metadata": lambda path: path == "/image/metadata/timestamp.json",
        "director metadata": lambda path: (
            path.startswith(director) and path.endswith(".targets.json")
        ),
    }[what]
    d.proxy.streams.append(trickle(matches, bytes_per_second=50))
    d.server.assign(d.vehicle.vin, d.vehicle.primary, new.filepath)
    report = d.vehicle.run_once(timeout=60).report
    d.assert_refused(report, "SlowRetrievalError")
