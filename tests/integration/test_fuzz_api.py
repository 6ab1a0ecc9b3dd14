"""Schemathesis against the app's own OpenAPI schema, over real HTTP: no generated input gets a
5xx. (Parsing and the order state machine have their own Hypothesis properties in tests/unit.)"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from support.harness import (
    API_KEY,
    KEEP_PLAN,
    MESSAGE_PLAN,
    NONE_PLAN,
    SECRET,
    ServiceServer,
    make_runtime,
    make_settings,
)
from whop_autocancel.app import create_app
from whop_autocancel.runtime import Runtime
from whop_autocancel.simulator import SimulatorServer


@pytest.fixture(scope="module")
def live_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Runtime, str]]:
    folder = tmp_path_factory.mktemp("fuzz")
    with SimulatorServer(api_key=API_KEY, webhook_secret=SECRET, time_scale=0.01) as simulator:
        for plan in (MESSAGE_PLAN, NONE_PLAN, KEEP_PLAN):
            simulator.state.create_plan(plan)
        runtime = make_runtime(
            make_settings(
                folder,
                WHOP_API_URL=simulator.api_url,
                CHECKOUT_RATE_LIMIT="off",
                SWEEP_INTERVAL=1,
                WORKER_HEARTBEAT_MAX_AGE=30,
            )
        )
        server = ServiceServer(runtime, with_worker=True)  # a worker, so /readyz is ready
        with server.running():
            yield runtime, server.url
        runtime.close()


def test_no_generated_input_gets_a_5xx(live_service: tuple[Runtime, str]) -> None:
    runtime, url = live_service
    schema = schemathesis.openapi.from_dict(create_app(runtime).openapi())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /webhooks/whop",
        "POST /api/checkouts",
        "GET /api/checkouts/{order_id}",
        "GET /healthz",
        "GET /readyz",
    }
    answered: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=60,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        def call(case: Any) -> None:
            response = case.call(base_url=url)
            answered.append(response.status_code)
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path} -> {response.status_code}: "
                f"{response.text[:300]}"
            )

        call()
    assert len(answered) >= 100
    assert 200 in answered
    assert any(400 <= status < 500 for status in answered)  # refused cleanly, not crashed
