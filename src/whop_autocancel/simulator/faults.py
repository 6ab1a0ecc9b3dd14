"""Fault injection for the simulated API: outages, throttling, a rate limit, errors, timeouts.

`Faults` is plain state guarded by the simulator's lock. Nothing here sleeps: latency and
timeouts are waited out by the HTTP layer after the lock is released.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

#: The seed of the fault dice until `set_faults(seed=…)` changes it.
DEFAULT_SEED = 0


@dataclass
class TokenBucket:
    """`capacity` requests in a burst, refilled at `refill_per_second` (on real time)."""

    capacity: int
    refill_per_second: float
    tokens: float
    updated: float

    def take(self, moment: float) -> float | None:
        """Spend one token and return None, or return the seconds until one is available."""
        elapsed = max(0.0, moment - self.updated)
        self.tokens = min(float(self.capacity), self.tokens + elapsed * self.refill_per_second)
        self.updated = moment
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return None
        return (1.0 - self.tokens) / self.refill_per_second


@dataclass
class RateLimit:
    """A token bucket per API key (the bearer token the request presented); off by default."""

    capacity: int | None = None
    refill_per_second: float = 1.0
    buckets: dict[str, TokenBucket] = field(default_factory=dict)

    def configure(self, capacity: int | None, refill_per_second: float) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError("capacity must be at least 1 (or None to turn the limit off)")
        if capacity is not None and not refill_per_second > 0:
            raise ValueError("refill_per_second must be positive")
        self.capacity, self.refill_per_second = capacity, refill_per_second
        self.buckets.clear()

    def wait(self, key: str, moment: float) -> float | None:
        """None when the request may pass, else the seconds to wait (it is refused)."""
        if self.capacity is None:
            return None
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(
                self.capacity, self.refill_per_second, float(self.capacity), moment
            )
            self.buckets[key] = bucket
        return bucket.take(moment)


def retry_after_headers(seconds: float) -> dict[str, str]:
    """`Retry-After` in whole seconds (rounded up) and `retry-after-ms`."""
    return {
        "Retry-After": str(max(0, math.ceil(seconds))),
        "retry-after-ms": str(max(0, math.ceil(seconds * 1000))),
    }


@dataclass
class Faults:
    """Every fault the control API can switch on; a fresh instance has them all off."""

    outage_until: float | None = None
    forbidden: bool = False
    latency: float = 0.0
    throttled_requests: int = 0
    retry_after: float = 1.0
    rejections: dict[str, int] = field(default_factory=dict)
    read_rejections: dict[str, int] = field(default_factory=dict)
    answer_as: dict[str, str] = field(default_factory=dict)  # membership -> the one answered
    error_rate: float = 0.0
    timeout_rate: float = 0.0
    timeout_seconds: float = 10.0
    seed: int = DEFAULT_SEED
    rate_limit: RateLimit = field(default_factory=RateLimit)
    plan_filter_ignored: bool = False
    missing_permissions: frozenset[str] = frozenset()
    rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def outage(self) -> bool:
        """Whether an outage is on now; a window that has ended switches itself off."""
        if self.outage_until is None:
            return False
        if time.monotonic() < self.outage_until:
            return True
        self.outage_until = None
        return False

    def set_outage(self, enabled: bool, for_seconds: float | None) -> None:
        """On (until switched off, or for `for_seconds` real seconds) or off."""
        if for_seconds is not None and for_seconds < 0:
            raise ValueError("for_seconds must not be negative")
        if not enabled:
            self.outage_until = None
        elif for_seconds is None:
            self.outage_until = math.inf
        else:
            self.outage_until = time.monotonic() + for_seconds

    def set_random(
        self,
        *,
        error_rate: float | None,
        timeout_rate: float | None,
        timeout_seconds: float | None,
        seed: int | None,
    ) -> None:
        """Change the random faults; None leaves a setting as it is."""
        for name, rate in (("error_rate", error_rate), ("timeout_rate", timeout_rate)):
            if rate is not None and not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        if timeout_seconds is not None and timeout_seconds < 0:
            raise ValueError("timeout_seconds must not be negative")
        if error_rate is not None:
            self.error_rate = error_rate
        if timeout_rate is not None:
            self.timeout_rate = timeout_rate
        if timeout_seconds is not None:
            self.timeout_seconds = timeout_seconds
        if seed is not None:
            self.seed = seed
            self.rng.seed(seed)

    def roll(self, rate: float) -> bool:
        """True with probability `rate`; draws nothing when the rate is 0 or 1."""
        if rate <= 0.0:
            return False
        if rate >= 1.0:
            return True
        return self.rng.random() < rate

    def describe(self) -> dict[str, object]:
        """The current settings, as the control API reports them."""
        limit = self.rate_limit
        return {
            "outage": self.outage(),
            "forbidden": self.forbidden,
            "latency": self.latency,
            "error_rate": self.error_rate,
            "timeout_rate": self.timeout_rate,
            "timeout_seconds": self.timeout_seconds,
            "seed": self.seed,
            "plan_filter_ignored": self.plan_filter_ignored,
            "missing_permissions": sorted(self.missing_permissions),
            "rate_limit": {
                "capacity": limit.capacity,
                "refill_per_second": limit.refill_per_second,
            },
        }
