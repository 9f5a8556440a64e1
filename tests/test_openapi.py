"""The OpenAPI document the server serves matches what the server does (schemathesis).

A real server (plain HTTP on loopback, vehicles unauthenticated as in development) serves
``/api/v1/openapi.json``; schemathesis reads it and, for every operation (one test each, from
the route table, so a route added later is covered too), generates requests that fit the
document and requests that do not, sends them with an admin token, and checks that none
answers 5xx and that every answer fits the document's response schemas. The run is bounded:
``UPTAKE_SCHEMATHESIS_EXAMPLES`` examples per operation and mode (default 10); the number of
cases is printed at the end of the module (``pytest -s``).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
import urllib3
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance

from server.api.access import canonical_path
from server.api.application import ROUTES
from server.api.openapi import api_routes, openapi_document
from tests.uptake_fixtures import ServerProcess, Vehicle

EXAMPLES = int(os.environ.get("UPTAKE_SCHEMATHESIS_EXAMPLES", "10"))
CASES: Counter[str] = Counter()
STATUSES: Counter[str] = Counter()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    tmp = tmp_path_factory.mktemp("openapi")
    srv = ServerProcess(tmp)
    Vehicle(tmp, srv, secondaries=False)  # something to find: VIN0001, GW-VIN0001
    answer = srv.admin.request(
        "POST", "/api/v1/tokens", json_body={"name": "schemathesis-7f3a9c", "role": "admin"}
    )
    yield srv, answer["token"]
    srv.stop()
    print(
        f"\nschemathesis: {sum(CASES.values())} cases over {len(CASES)} operations; "
        f"answers {dict(sorted(STATUSES.items()))}"
    )
    assert "Traceback" not in srv.log(), srv.log()[-5000:]


@pytest.fixture(scope="module")
def api_schema(served: tuple[ServerProcess, str]) -> Any:
    srv, _ = served
    return schemathesis.openapi.from_url(f"{srv.url}/api/v1/openapi.json")


_OPERATIONS = sorted(
    (path, method) for path, ops in openapi_document(ROUTES)["paths"].items() for method in ops
)


@pytest.mark.parametrize(("path", "method"), _OPERATIONS, ids=lambda v: v)
def test_the_server_does_what_its_openapi_document_says(
    api_schema: Any, served: tuple[ServerProcess, str], path: str, method: str
) -> None:
    _, token = served
    operation = api_schema[path][method.upper()]
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)  # fmt: skip
        def run(case: Any) -> None:
            CASES[f"{method.upper()} {path}"] += 1
            response = case.call_and_validate(
                headers={"Authorization": f"Bearer {token}"},
                checks=[not_a_server_error, response_schema_conformance],
                timeout=30,
            )
            STATUSES[f"{response.status_code // 100}xx"] += 1

        try:
            run()
        except Unsatisfiable:
            # nothing of this operation can be made invalid (no parameters, no body)
            assert mode is GenerationMode.NEGATIVE, f"no valid request for {method} {path}"


def test_the_served_document_lists_every_route_and_anyone_may_read_it(
    served: tuple[ServerProcess, str],
) -> None:
    srv, _ = served
    response = urllib3.request("GET", f"{srv.url}/api/v1/openapi.json")  # no token
    assert response.status == 200
    document = response.json()
    assert document == openapi_document(ROUTES)
    assert document["openapi"].startswith("3.1")
    listed = {(method.upper(), path) for path, ops in document["paths"].items() for method in ops}
    assert listed == {(r.method, canonical_path(r.path)) for r in api_routes(ROUTES)}
    vehicles = document["paths"]["/api/v1/vehicles"]["get"]
    assert vehicles["security"] == [{"operatorToken": []}]
    assert vehicles["x-uptake-permission"] == "read-fleet"
    assert {p["name"] for p in vehicles["parameters"]} >= {"hardware_id", "image", "cursor"}
    assert document["paths"]["/health"]["get"]["security"] == []
    assert "4XX" in document["paths"]["/api/v1/vehicles"]["post"]["responses"]
