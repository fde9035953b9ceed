"""Fuzzing ModelInfer on BOTH real servers (in-process, port 0): every malformed request
gets the precise status it is owed, never UNKNOWN or INTERNAL, in one line without a
traceback; huge declared shapes are refused before anything is allocated; a message over
the limit is RESOURCE_EXHAUSTED; and the servers answer as before afterwards.

The cases and their owed statuses are ``loadtest.tools.fuzz``'s (its docstring lists them);
``python -m loadtest fuzz --server torch,tf --requests 10000`` is the full run. Here
``FUZZ_EXAMPLES`` (default 300) requests per server keep CI within seconds.
"""

from __future__ import annotations

import os
import tracemalloc
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings

from loadtest.tools.fuzz import catalogue, runner
from tests.helpers.servers import FRAMEWORKS, BackgroundServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
MiB = 1 << 20


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_malformed_requests_get_their_precise_status(real_servers: dict[str, BackgroundServer], framework: str) -> None:
    seen: Counter[str] = Counter()
    with runner.Connection(real_servers[framework].target) as connection:
        models = connection.models()
        before = connection.answers(models)

        @settings(
            max_examples=FUZZ_EXAMPLES,
            database=None,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        )
        @given(case=catalogue.cases(models))
        def answered_as_owed(case: catalogue.Case) -> None:
            outcome = connection.send(case)
            seen[outcome.code.name] += 1
            assert outcome.ok, f"{outcome.problems}; message {outcome.message!r}; {case.describe()}"

        answered_as_owed()
        assert connection.health() == "SERVING"
        assert connection.answers(models) == before
    assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND"} <= set(seen), seen


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_huge_declared_shapes_are_refused_before_allocating(
    real_servers: dict[str, BackgroundServer], framework: str
) -> None:
    """Shapes of 2**26 to 2**62 elements with 16 bytes of contents: INVALID_ARGUMENT, and
    neither the traced (numpy included) nor the resident memory of the process serving
    them moves by more than a few MB (512 MB would be the smallest allocation)."""
    with runner.Connection(real_servers[framework].target) as connection:
        cases = catalogue.huge_shape_cases(connection.models())
        tracemalloc.start()
        try:
            baseline, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            with runner.RssSampler(os.getpid()) as rss:
                outcomes = [(case, connection.send(case)) for case in cases]
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert len(cases) >= 20
    for case, outcome in outcomes:
        assert outcome.ok, f"{outcome.problems}; message {outcome.message!r}; {case.describe()}"
    assert peak - baseline < 16 * MiB
    assert rss.growth_bytes < 64 * MiB


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_message_over_the_limit_is_resource_exhausted(
    real_servers: dict[str, BackgroundServer], framework: str
) -> None:
    with runner.Connection(real_servers[framework].target) as connection:
        models = connection.models()
        case = catalogue.oversized_case(models[0], real_servers[framework].settings.max_message_bytes)
        outcome = connection.send(case)
        assert outcome.ok, f"{outcome.problems}; message {outcome.message!r}"
        assert connection.answers(models)  # and it still answers
