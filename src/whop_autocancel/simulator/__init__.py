"""A minimal but faithful Whop simulator: a real HTTP server on loopback (DESIGN.md §6, §9).

`SimulatorServer` serves Whop's `/api/v1` (legacy and versioned shapes, lists with cursor
pagination, plans, checkout configurations, idempotency, a rate limit and fault injection) and a
`/_sim` control API; `Simulator` is its thread-safe in-memory state, also usable in-process.
See docs/simulator.md.
"""

from whop_autocancel.simulator.server import SimulatorServer
from whop_autocancel.simulator.shapes import SUPPORTED_VERSIONS, WEBHOOK_PIN
from whop_autocancel.simulator.state import (
    ApiRequest,
    ApiResponse,
    Simulator,
    UnknownCheckoutConfigurationError,
    UnknownMembershipError,
)

__all__ = [
    "SUPPORTED_VERSIONS",
    "WEBHOOK_PIN",
    "ApiRequest",
    "ApiResponse",
    "Simulator",
    "SimulatorServer",
    "UnknownCheckoutConfigurationError",
    "UnknownMembershipError",
]
