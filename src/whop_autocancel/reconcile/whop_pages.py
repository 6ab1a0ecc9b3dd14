"""Reading a Whop list page by page, the one way the Whop sweep, `recover` and `backfill` do:
every page respects the API key's shared "not before" time after a 429 (which the client's
pacer sets for every worker and every cancellation), and a bad answer ends the listing with its
reason."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from whop_autocancel.clock import Clock
from whop_autocancel.db import leases
from whop_autocancel.db.engine import Database
from whop_autocancel.errors import WhopAutocancelError
from whop_autocancel.whop.client import WhopClient, WhopReply
from whop_autocancel.whop.pacing import DEFAULT_RETRY_AFTER, NOT_BEFORE_KEY

PAGE_SIZE = 100

PageFetch = Callable[[WhopClient, str | None], WhopReply]


class ListingStopped(WhopAutocancelError):
    """Whop answered badly or asked us to wait: the listing ended early (the message says why);
    what was read before stays read."""


def whop_items(
    database: Database,
    clock: Clock,
    client: WhopClient,
    fetch: PageFetch,
    *,
    max_pages: int,
) -> Iterator[dict[str, Any]]:
    """Every item of a list, `fetch(client, cursor)` giving one page; raises ListingStopped."""
    for page in whop_pages(database, clock, client, fetch, max_pages=max_pages):
        yield from page


def whop_pages(
    database: Database,
    clock: Clock,
    client: WhopClient,
    fetch: PageFetch,
    *,
    max_pages: int,
) -> Iterator[list[dict[str, Any]]]:
    """The items of a list a page at a time (`whop_items`); raises ListingStopped."""
    cursor: str | None = None
    for _ in range(max_pages):
        not_before = database.run(lambda session: leases.read_until(session, NOT_BEFORE_KEY))
        if not_before is not None and not_before > clock.now():
            raise ListingStopped(f"Whop asked to wait until {not_before.isoformat()}")
        page = fetch(client, cursor)
        if page.status == 429:  # (the client's pacer made every process wait)
            wait = page.retry_after if page.retry_after is not None else DEFAULT_RETRY_AFTER
            raise ListingStopped(f"Whop rate-limited the listing for {wait:g} s")
        if not page.ok:
            raise ListingStopped(f"listing failed: {page.describe()}")
        yield list(page.items)
        cursor = page.next_cursor
        if cursor is None:
            return
    raise ListingStopped(f"more than {max_pages} pages")
