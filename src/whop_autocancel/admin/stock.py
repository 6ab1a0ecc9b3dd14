"""The admin's stock operations (`whop-autocancel stock …`), on top of `stock.py`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import structlog
from sqlalchemy.exc import IntegrityError

from whop_autocancel.admin.audit import cli_actor, record
from whop_autocancel.delivery import stock
from whop_autocancel.delivery.models import StockItem
from whop_autocancel.delivery.stock import (
    SERVE_TASK,
    ImportPreview,
    ImportReport,
    ParsedItems,
    PoolLevel,
    StockError,
    VoidResult,
)
from whop_autocancel.sealing import Sealer

if TYPE_CHECKING:
    from whop_autocancel.runtime import Runtime

log = structlog.get_logger(__name__)

DEFAULT_LIMIT = 50


def _sealer(runtime: Runtime) -> Sealer:
    if runtime.sealer is None:
        runtime.settings.require("STOCK_ENCRYPTION_KEY")  # stops, naming the setting
    assert runtime.sealer is not None
    return runtime.sealer


def import_stock(
    runtime: Runtime,
    pool: str,
    parsed: ParsedItems,
    *,
    any_pool: bool = False,
    actor: str | None = None,
) -> ImportReport:
    """Add items to `pool` in one transaction; waiting orders are then served in payment order
    and an open low-stock alert is resolved when the pool is above its threshold again."""
    _check_import_pool(runtime, pool, any_pool=any_pool)
    sealer = _sealer(runtime)
    now = runtime.clock.now()
    try:
        with runtime.database.transaction() as session:
            report = stock.import_items(session, sealer, pool, parsed, now)
            if report.left_after_waiting > runtime.catalog.low_stock_threshold(pool):
                runtime.alerts.resolve(session, stock.low_stock_key(pool), now)
            if report.waiting and report.available:
                runtime.jobs.defer(session, SERVE_TASK, pool)
            record(
                session,
                at=now,
                actor=actor or cli_actor(),
                action="stock.import",
                target=pool,
                order_id=None,
                detail=f"added {report.added}, skipped {report.skipped} already in stock",
            )
    except IntegrityError:
        raise StockError(
            "another import added some of the same items at the same moment; run this import "
            "again (items already in stock are skipped)"
        ) from None
    log.info(
        "stock_imported",
        pool=pool,
        added=report.added,
        skipped=report.skipped,
        available=report.available,
        waiting=report.waiting,
    )
    return report


def preview_import(
    runtime: Runtime, pool: str, parsed: ParsedItems, *, any_pool: bool = False
) -> ImportPreview:
    """What `import_stock` would do with the same input (`stock import --dry-run`): refused
    for the same reasons, found duplicates by the same rule; nothing written, not even the
    audit (nothing was done)."""
    _check_import_pool(runtime, pool, any_pool=any_pool)
    sealer = _sealer(runtime)
    preview = runtime.database.read(
        lambda session: stock.preview_import(session, sealer, pool, parsed)
    )
    report = preview.report
    log.info(
        "stock_import_previewed",
        pool=pool,
        would_add=report.added,
        skipped=report.skipped,
        available=preview.available_now,
        waiting=report.waiting,
    )
    return preview


def _check_import_pool(runtime: Runtime, pool: str, *, any_pool: bool) -> None:
    stock.check_pool_name(pool)
    pools = runtime.catalog.stock_pools()
    if pool not in pools and not any_pool:
        known = ", ".join(sorted(pools)) or "none"
        raise StockError(
            f"no plan in the catalog delivers from pool {pool!r} (stock pools in the catalog: "
            f"{known}); check the name, or pass --any-pool to import into it anyway"
        )


def stock_levels(runtime: Runtime) -> list[PoolLevel]:
    with runtime.database.transaction() as session:
        return stock.stock_levels(session, runtime.catalog)


def empty_listed_pools(runtime: Runtime) -> list[str]:
    """The catalog's pools with no item to hand out (`stock.empty_pools`); no query when the
    catalog sells nothing from stock."""
    if not runtime.catalog.stock_pools():
        return []
    return stock.empty_pools(stock_levels(runtime))


def void_stock(
    runtime: Runtime, item_id: int, reason: str, *, actor: str | None = None
) -> VoidResult:
    [result] = void_stocks(runtime, [item_id], reason, actor=actor)
    return result


def void_stocks(
    runtime: Runtime, item_ids: Sequence[int], reason: str, *, actor: str | None = None
) -> list[VoidResult]:
    """Void the items in one transaction: all of them, or none when a number is unknown (a
    typo must not leave half a list voided)."""
    with runtime.database.transaction() as session:
        now = runtime.clock.now()
        results = stock.void_items(session, item_ids, reason, now)
        who = actor or cli_actor()
        for result in results:
            record(
                session,
                at=now,
                actor=who,
                action="stock.void",
                target=f"#{result.item_id}",
                order_id=result.order_id,
                detail=f"{result.was} -> void: {reason}" if result.changed else "void already",
            )
    for result in results:
        if result.changed:
            log.warning(
                "stock_item_voided",
                item_id=result.item_id,
                pool=result.pool,
                was=result.was,
                order_id=result.order_id,
            )
    return results


def list_stock(
    runtime: Runtime, pool: str, *, status: str | None = None, limit: int = DEFAULT_LIMIT
) -> list[stock.ItemRow]:
    """A pool's items, newest first: numbers and states, never contents."""
    return runtime.database.read(
        lambda session: stock.list_items(session, pool, status=status, limit=limit)
    )


def show_item(
    runtime: Runtime, reference: int | str, *, actor: str | None = None
) -> tuple[StockItem, str]:
    """An item (by number, or the order id that holds it) and its decrypted content, for the
    admin (never logged; who looked is audited)."""
    sealer = _sealer(runtime)
    reference = str(reference)
    with runtime.database.transaction() as session:
        if reference.isdigit():
            item = session.get(StockItem, int(reference))
            missing = f"no stock item #{reference} (see `whop-autocancel stock list POOL`)"
        else:
            item = stock.item_for_order(session, reference)
            missing = f"order {reference} holds no stock item (see `whop-autocancel orders`)"
        if item is None:
            raise StockError(missing)
        record(
            session,
            at=runtime.clock.now(),
            actor=actor or cli_actor(),
            action="stock.show",
            target=f"#{item.id}",
            order_id=item.order_id,
            detail=f"content of item #{item.id} ({item.pool}) shown",
        )
        session.flush()
        session.expunge(item)
    content = sealer.open(item.content)
    log.info("stock_item_shown", item_id=item.id, pool=item.pool, order_id=item.order_id)
    return item, content


def rekey_stock(runtime: Runtime) -> stock.RekeyReport:
    """Re-encrypt everything under the first key of STOCK_ENCRYPTION_KEY (after a rotation)."""
    sealer = _sealer(runtime)
    with runtime.database.transaction() as session:
        report = stock.rekey(session, sealer)
    log.warning("stock_rekeyed", items=report.items, emails=report.emails)
    return report
