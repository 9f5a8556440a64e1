"""Property-based fuzzing of every parser: nothing may fail but with our documented error types.

Each test feeds generated input (random bytes, random JSON, or valid
documents with one part replaced, re-signed where a signature would
otherwise stop the input at the door) to one parser and accepts exactly two
outcomes: success, or the error type that parser documents. Anything else
(KeyError, AttributeError, a 500, a Traceback in the server log) is a bug.

Bounded by default (:data:`EXAMPLES` per test, about a minute in all); set
``UPTAKE_FUZZ_EXAMPLES`` for longer runs, e.g.::

    UPTAKE_FUZZ_EXAMPLES=5000 .venv/bin/pytest tests/fuzz --hypothesis-show-statistics

Coverage-guided (atheris, optional dev tool) harnesses for the same parsers:
``python -m tests.fuzz.atheris_targets --help``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

#: Examples per fuzz test (hypothesis ``max_examples``).
EXAMPLES = int(os.environ.get("UPTAKE_FUZZ_EXAMPLES", "150"))

fuzz_settings = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)
