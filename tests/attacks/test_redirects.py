"""Redirects: the vehicle follows one only within the origin it asked.

A network attacker (or a compromised CDN) answers the vehicle with ``302 Found`` pointing at
another host. Everything the vehicle downloads is verified, but a followed redirect still
sends its requests (and, with client certificates, its identity) where the operator never
configured it to go. The agent's fetcher follows redirects only within the scheme, host and
port it asked, refuses any other as a configuration error, and never contacts that origin.
"""

from __future__ import annotations

import pytest

from tests.attacks.deployment import GATEWAY, Deployment
from tests.malicious_proxy import MaliciousProxy


@pytest.mark.parametrize("what", ["image download", "director timestamp"])
def test_redirect_to_another_origin_is_refused(deployment: Deployment, what: str) -> None:
    d = deployment
    elsewhere = MaliciousProxy(d.server.url)  # another origin that would serve the same bytes
    try:
        new = d.publish(GATEWAY, "1.1.0")
        d.server.assign(d.vehicle.vin, d.vehicle.primary, new.filepath)
        prefix = "/image/targets/" if what == "image download" else d.director_path()

        def redirect(path_qs: str) -> str | None:
            if path_qs.startswith(prefix) and (
                what == "image download" or path_qs.endswith("timestamp.json")
            ):
                return elsewhere.url + path_qs
            return None

        d.proxy.redirects.append(redirect)
        run = d.vehicle.run_once()
        report = run.report
        assert run.returncode == 1 and report["status"] == "failed", report
        assert "redirect to another origin refused" in " ".join(report["reasons"]), report
        assert elsewhere.requests == []  # never contacted
        assert d.vehicle.booted_image() == d.baseline.filepath
        # a deployment mistake, not an attack: nothing goes into attacks_detected
        assert d.vehicle.state().ecu(d.vehicle.primary).attacks_detected == ""
    finally:
        elsewhere.close()


def test_redirect_within_the_origin_is_followed(deployment: Deployment) -> None:
    d = deployment
    new = d.publish(GATEWAY, "1.1.0")
    d.server.assign(d.vehicle.vin, d.vehicle.primary, new.filepath)
    d.proxy.redirects.append(
        lambda path_qs: (
            f"{path_qs}?moved=1"
            if path_qs.startswith("/image/targets/") and "?" not in path_qs
            else None
        )
    )
    d.proxy.requests.clear()
    report = d.vehicle.run_once().report
    assert report["outcomes"][d.vehicle.primary]["result"] == "installed", report
    # the image, or the delta to it if the server has made one by now
    wanted = (
        f"{new.sha256}.gateway.elf"
        if report["outcomes"][d.vehicle.primary]["method"] == "full"
        else new.sha256
    )
    image_requests = [
        r for r in d.proxy.requests if r.startswith("GET /image/targets/") and r.endswith(wanted)
    ]
    # redirected, then followed (the proxy records the path, not the ?moved=1 query)
    assert len(image_requests) == 2 and image_requests[0] == image_requests[1], image_requests
    assert d.vehicle.booted_image() == new.filepath
