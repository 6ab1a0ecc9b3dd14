"""The guide-style cancellation worker, the baseline of bench/cancellations.py: what
origin/laravel-guide.md's `WhopApiService::cancelMembership` does, run by one queue worker.

One thread takes the memberships in order and, for each, calls
`POST /memberships/{id}/cancel` (the body and headers the service's client sends on the legacy
API, the same key, an Idempotency-Key per membership), up to 3 attempts with an in-job
`sleep(1)` and `sleep(2)` between them on a 429, a 5xx or a transport error, and gives up after
the 3rd. Another 4xx gives up at once. No pacing, no Retry-After: the guide has neither.

    python bench/guide_worker.py --api-url URL --api-key KEY --ids FILE   # one id a line

Plain httpx on purpose (no project code): it is the design the service replaces. Prints one
JSON line: `{"canceled", "gave_up", "attempts", "seconds"}`; the benchmark measures from the
simulator's records, not from this.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import httpx

ATTEMPTS = 3  # the guide's $maxRetries
DELAYS = (1.0, 2.0)  # its $retryDelays [1, 2, 4]: the 4 s sleep would follow the last attempt
TIMEOUT = 10.0  # its ->timeout(10)
BODY = {"cancellation_mode": "immediate"}  # the legacy API's immediate cancel


def cancel(http: httpx.Client, membership_id: str) -> tuple[bool, int]:
    """(cancelled, attempts made) for one membership, sleeping in the job between attempts."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            response = http.post(
                f"memberships/{membership_id}/cancel",
                json=BODY,
                headers={"Idempotency-Key": f"guide-{membership_id}"},
            )
        except httpx.TransportError:
            pass
        else:
            if response.is_success:
                return True, attempt
            if response.status_code != 429 and response.status_code < 500:
                return False, attempt  # "Client error … Not retrying."
        if attempt < ATTEMPTS:
            time.sleep(DELAYS[attempt - 1])
    return False, ATTEMPTS


def run(api_url: str, api_key: str, membership_ids: list[str]) -> dict[str, object]:
    headers = {
        "Authorization": f"Bearer {api_key}",
        "Accept": "application/json",
        "User-Agent": "whop-autocancel",
    }
    canceled, attempts, gave_up = 0, 0, []
    started = time.monotonic()
    with httpx.Client(base_url=api_url.rstrip("/") + "/", headers=headers, timeout=TIMEOUT) as http:
        for membership_id in membership_ids:
            done, made = cancel(http, membership_id)
            attempts += made
            if done:
                canceled += 1
            else:
                gave_up.append(membership_id)
    return {
        "canceled": canceled,
        "gave_up": gave_up,
        "attempts": attempts,
        "seconds": round(time.monotonic() - started, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api-url", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--ids", required=True, type=Path, help="membership ids, one a line")
    options = parser.parse_args(argv)
    membership_ids = options.ids.read_text().split()
    print(json.dumps(run(options.api_url, options.api_key, membership_ids)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
