"""A thin typed Whop API client (httpx) for the few endpoints we use.

It never retries by itself: the cancellation state machine decides what a reply means
(`whop.outcomes`), so every attempt is recorded and nothing is retried twice over.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from whop_autocancel import metrics
from whop_autocancel.clock import Clock


@dataclass(frozen=True)
class WhopReply:
    """What one call produced: an HTTP answer, or a transport error (status None)."""

    status: int | None
    body: Any = None
    transport_error: str | None = None
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def items(self) -> list[dict[str, Any]]:
        """The `data` of a list page (empty when the body is not one)."""
        data = self.body.get("data") if isinstance(self.body, dict) else None
        return [item for item in data if isinstance(item, dict)] if isinstance(data, list) else []

    @property
    def next_cursor(self) -> str | None:
        info = self.body.get("page_info") if isinstance(self.body, dict) else None
        if isinstance(info, dict) and info.get("has_next_page") and info.get("end_cursor"):
            return str(info["end_cursor"])
        return None

    @property
    def membership_status(self) -> str | None:
        if isinstance(self.body, dict):
            status = self.body.get("status")
            return status if isinstance(status, str) else None
        return None

    @property
    def membership_id(self) -> str | None:
        """The id of the membership in the body (legacy and versioned objects both carry it
        at the top), to check that Whop answered for the membership we asked about."""
        if isinstance(self.body, dict):
            value = self.body.get("id")
            return value if isinstance(value, str) and value else None
        return None

    def describe(self) -> str:
        """A short, log-safe description: HTTP status and Whop's error message."""
        if self.status is None:
            return f"no answer from Whop ({self.transport_error})"
        if self.ok:
            return f"HTTP {self.status}"
        error = self.body.get("error") if isinstance(self.body, dict) else None
        if isinstance(error, dict):
            message = error.get("message") or error.get("type") or ""
            return f"HTTP {self.status}: {message}".strip()
        if isinstance(self.body, dict) and isinstance(self.body.get("message"), str):
            return f"HTTP {self.status}: {self.body['message']}"
        return f"HTTP {self.status}"


class WhopClient:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        version_date: str | None,
        timeout: float,
        clock: Clock,
    ) -> None:
        headers = {
            "Authorization": f"Bearer {api_key}",
            "Accept": "application/json",
            "User-Agent": "whop-autocancel",
        }
        if version_date:
            headers["Api-Version-Date"] = version_date
        self.version_date = version_date
        self._clock = clock
        self._http = httpx.Client(
            base_url=base_url.rstrip("/") + "/", headers=headers, timeout=timeout
        )

    def close(self) -> None:
        self._http.close()

    def cancel_membership(self, membership_id: str, idempotency_key: str) -> WhopReply:
        """Cancel immediately, in the body the configured API version expects."""
        body: dict[str, Any] = (
            {"cancel_at_period_end": False}
            if self.version_date
            else {"cancellation_mode": "immediate"}
        )
        return self._call(
            "POST",
            f"memberships/{membership_id}/cancel",
            "POST /memberships/{id}/cancel",
            json=body,
            headers={"Idempotency-Key": idempotency_key},
        )

    def retrieve_membership(self, membership_id: str) -> WhopReply:
        return self._call("GET", f"memberships/{membership_id}", "GET /memberships/{id}")

    def retrieve_plan(self, plan_id: str) -> WhopReply:
        return self._call("GET", f"plans/{plan_id}", "GET /plans/{id}")

    def list_memberships(
        self,
        *,
        company_id: str | None,
        first: int = 10,
        after: str | None = None,
        user_id: str | None = None,
        plan_id: str | None = None,
        created_after: datetime | None = None,
    ) -> WhopReply:
        """One page of memberships, with the filters named the way the API version wants."""
        params = self._page(first, after, company_id, created_after)
        params += [("plan_ids", plan_id)] if plan_id else []
        if user_id:
            params.append(("user_id" if self.version_date else "user_ids", user_id))
        return self._call("GET", "memberships", "GET /memberships", params=params)

    def list_payments(
        self,
        *,
        company_id: str | None,
        first: int = 10,
        after: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
    ) -> WhopReply:
        """One page of payments, newest first."""
        params = self._page(first, after, company_id, created_after)
        if created_before is not None:
            params.append(("created_before", _iso(created_before)))
        return self._call("GET", "payments", "GET /payments", params=params)

    def _page(
        self, first: int, after: str | None, company_id: str | None, created_after: datetime | None
    ) -> list[tuple[str, str]]:
        params: list[tuple[str, str]] = [("first", str(first))]
        if after:
            params.append(("after", after))
        if company_id:
            params.append(("account_id" if self.version_date else "company_id", company_id))
        if created_after is not None:
            params.append(("created_after", _iso(created_after)))
        return params

    def create_checkout_configuration(
        self,
        *,
        plan_id: str,
        metadata: dict[str, str],
        redirect_url: str | None,
        company_id: str | None,
        timeout: float,
    ) -> WhopReply:
        """A checkout for one order: Whop copies `metadata` onto its payment and membership."""
        body: dict[str, Any] = {"plan_id": plan_id, "metadata": metadata, "mode": "payment"}
        if redirect_url:
            body["redirect_url"] = redirect_url
        if company_id:
            body["account_id" if self.version_date else "company_id"] = company_id
        return self._call(
            "POST",
            "checkout_configurations",
            "POST /checkout_configurations",
            json=body,
            timeout=timeout,
        )

    def _call(self, method: str, path: str, endpoint: str, **options: Any) -> WhopReply:
        """One request. `endpoint` names it for the metrics as a route template (never an
        id): `POST /memberships/{id}/cancel`."""
        started = time.monotonic()
        try:
            response = self._http.request(method, path, **options)
        except httpx.TimeoutException as error:
            metrics.observe_whop_call(endpoint, None, time.monotonic() - started)
            return WhopReply(status=None, transport_error=f"timeout ({type(error).__name__})")
        except httpx.HTTPError as error:
            metrics.observe_whop_call(endpoint, None, time.monotonic() - started)
            return WhopReply(status=None, transport_error=f"{type(error).__name__}: {error}")
        metrics.observe_whop_call(endpoint, response.status_code, time.monotonic() - started)
        try:
            body = response.json()
        except ValueError:
            body = None
        return WhopReply(
            status=response.status_code,
            body=body,
            retry_after=self._retry_after(response.headers),
        )

    def _retry_after(self, headers: httpx.Headers) -> float | None:
        milliseconds = headers.get("retry-after-ms")
        if milliseconds:
            try:
                return max(0.0, float(milliseconds) / 1000)
            except ValueError:
                pass
        value = headers.get("retry-after")
        if not value:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            pass
        try:
            moment = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, (moment - self._clock.now()).total_seconds())


def _iso(moment: datetime) -> str:
    """Whop's timestamp form: UTC, milliseconds, `Z`."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
