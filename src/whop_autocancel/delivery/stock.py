"""Stock pools: items handed out exactly once, imported and voided by the admin.

Exactly once, on every database: the item is taken inside the transaction that marks the order
delivered (the order row is locked first), by `SELECT … FOR UPDATE SKIP LOCKED` where the
database has it (PostgreSQL, MariaDB) and under SQLite's single writer elsewhere; the update is
a compare-and-set on `status = 'available'`, and `order_id` is UNIQUE, so even a bug above could
not give one item to two orders or two items to one order.
"""

from __future__ import annotations

import csv
import io
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import ColumnElement, and_, func, select, update
from sqlalchemy.orm import Session

from whop_autocancel.catalog import POOL_NAME, POOL_NAME_HELP, Catalog
from whop_autocancel.delivery.models import StockItem, StockStatus
from whop_autocancel.errors import WhopAutocancelError
from whop_autocancel.mail.models import Email
from whop_autocancel.orders.models import Order, OrderStatus
from whop_autocancel.sealing import Sealer, SealError

SERVE_TASK = "stock.serve"  # deliver the orders waiting for a pool, in payment order
MAX_ITEM_CHARS = 10_000
_LINE_BREAK = re.compile(r"\r\n|\n|\r")
_LOOKUP_BATCH = 500
# Items locked by deliveries still running are not "out of stock": wait for those to commit.
_BUSY_ROUNDS = 100
_BUSY_PAUSE = 0.02


class StockError(WhopAutocancelError):
    """A stock command cannot do what was asked; the message says why."""


class StockBusy(WhopAutocancelError):
    """Every available item stayed locked by other deliveries: try the delivery again later."""


def claim_item(
    session: Session, pool: str, order_id: str, now: datetime, *, skip_locked: bool
) -> StockItem | None:
    """Assign the oldest available item of `pool` to the order, or None when there is none."""
    for _ in range(_BUSY_ROUNDS):
        statement = (
            select(StockItem)
            .where(StockItem.pool == pool, StockItem.status == StockStatus.AVAILABLE.value)
            .order_by(StockItem.id)
            .limit(1)
        )
        if skip_locked:
            statement = statement.with_for_update(skip_locked=True)
        item = session.scalars(statement).first()
        if item is not None:
            taken = session.execute(
                update(StockItem)
                .where(StockItem.id == item.id, StockItem.status == StockStatus.AVAILABLE.value)
                .values(status=StockStatus.ASSIGNED.value, order_id=order_id, assigned_at=now)
                .execution_options(synchronize_session=False)
            )
            if taken.rowcount == 1:  # type: ignore[attr-defined]
                # What the update wrote, without reading the row back.
                item.status, item.order_id = StockStatus.ASSIGNED.value, order_id
                item.assigned_at = now
                session.expunge(item)  # (so the session does not write it again)
                return item
            continue  # (only without row locks) another delivery took it first
        if not skip_locked or not available_count(session, pool, 1):
            return None
        # Available items exist but other transactions hold them: if one of those rolls back,
        # its item is free again. Wait for them rather than call the pool empty.
        time.sleep(_BUSY_PAUSE)
    raise StockBusy(f"every available item of pool {pool!r} stayed locked; will retry")


def low_stock_key(pool: str) -> str:
    """The dedupe key of a pool's open low-stock alert (freed when the pool is refilled)."""
    return f"low_stock:{pool}:open"


def available_count(session: Session, pool: str, at_most: int | None = None) -> int:
    """The pool's available items; with `at_most`, counted up to that many only (enough for
    "is there one?" or the low-stock check, without scanning a big pool on every delivery)."""
    items = select(StockItem.id).where(
        StockItem.pool == pool, StockItem.status == StockStatus.AVAILABLE.value
    )
    if at_most is not None:
        items = items.limit(at_most)
    return int(session.scalar(select(func.count()).select_from(items.subquery())) or 0)


def item_for_order(session: Session, order_id: str) -> StockItem | None:
    return session.scalars(select(StockItem).where(StockItem.order_id == order_id)).first()


# Waiting orders are served in the order their customers paid (ties: by order id).
PAYMENT_ORDER = (Order.paid_at, Order.id)


def waiting(pool: str | None = None) -> ColumnElement[bool]:
    """Orders waiting for stock: of `pool`, or of any pool."""
    wanted = (
        Order.waiting_for_stock.is_not(None) if pool is None else Order.waiting_for_stock == pool
    )
    return and_(wanted, Order.status == OrderStatus.DELIVERY_FAILED.value)


def waiting_orders(session: Session, pool: str) -> list[str]:
    """Ids of the orders waiting for stock from `pool`, in payment order."""
    return list(session.scalars(select(Order.id).where(waiting(pool)).order_by(*PAYMENT_ORDER)))


def pools_to_serve(session: Session) -> list[str]:
    """Pools that have orders waiting and items available: their `stock.serve` job is due (a
    lost job, or stock that came back from a rolled-back delivery)."""
    pools = session.scalars(select(Order.waiting_for_stock).where(waiting()).distinct()).all()
    return [pool for pool in pools if pool is not None and available_count(session, pool, 1)]


def follow_renamed_pools(session: Session, catalog: Catalog) -> int:
    """Orders waiting for a pool their plan no longer uses (the catalog changed while they
    waited) wait for the plan's current pool instead; returns how many moved."""
    moved = 0
    pairs = session.execute(
        select(Order.plan_id, Order.waiting_for_stock).where(waiting()).distinct()
    ).all()
    for plan_id, pool in pairs:
        plan = catalog.get(plan_id)
        if plan is None or plan.pool is None or plan.pool == pool:
            continue
        result = session.execute(
            update(Order)
            .where(Order.plan_id == plan_id, waiting(pool))
            .values(waiting_for_stock=plan.pool)
            .execution_options(synchronize_session=False)
        )
        moved += result.rowcount  # type: ignore[attr-defined]
    return moved


def waits_behind(session: Session, pool: str, order: Order) -> int:
    """How many orders paid before `order` are still waiting for this pool."""
    assert order.paid_at is not None
    earlier = (Order.paid_at < order.paid_at) | (
        (Order.paid_at == order.paid_at) & (Order.id < order.id)
    )
    return int(
        session.scalar(
            select(func.count())
            .select_from(Order)
            .where(waiting(pool), Order.id != order.id, earlier)
        )
        or 0
    )


# Import ------------------------------------------------------------------------------------


@dataclass
class ParsedItems:
    items: list[str] = field(default_factory=list)
    blank: int = 0
    duplicate_in_file: int = 0
    # Where each item and each repeat was, for a dry run's report: `unit` and its number.
    unit: str = field(default="line", compare=False)
    positions: list[int] = field(default_factory=list, compare=False)
    repeats: list[tuple[int, int]] = field(default_factory=list, compare=False)  # (at, first)


def read_items(
    path: Path, *, column: str | None = None, delimiter: str = ",", header: bool = True
) -> ParsedItems:
    """Read one item per line, or (with `column`) one column of a CSV file: `column` is a
    header name, or a 1-based number (`header=False`: the file has no header row). Blank
    entries and repeats within the file are skipped and counted."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise StockError(f"{path} does not exist") from None
    except UnicodeDecodeError as error:
        raise StockError(f"{path} is not UTF-8 (byte {error.start}); save it as UTF-8") from None
    except OSError as error:
        raise StockError(f"cannot read {path}: {error.strerror}") from None
    if column is None:  # lines end in \n, \r\n or \r; nothing else splits an item
        lines = _LINE_BREAK.split(text)
        if lines and not lines[-1]:
            lines.pop()  # the break that ends the last line starts no new one
        return items_for(lines, where=str(path))
    values = _csv_values(text, column, delimiter, header, path)
    return items_for(values, where=str(path), unit="row", first=2 if header else 1)


def _csv_values(text: str, column: str, delimiter: str, header: bool, path: Path) -> list[str]:
    try:
        rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True))
    except csv.Error as error:
        raise StockError(f"{path}: not valid CSV: {error}") from None
    names = [name.strip() for name in rows[0]] if header and rows else []
    body = rows[1:] if header else rows
    if column.isascii() and column.isdigit():
        index = int(column) - 1
        if index < 0:
            raise StockError("--column counts from 1")
    elif not header:
        raise StockError("--column must be a number when the file has no header row")
    elif column in names:
        index = names.index(column)
    else:
        raise StockError(
            f"{path}: no column {column!r} in the header (columns: {', '.join(names) or '-'})"
        )
    values = []
    for number, row in enumerate(body, start=2 if header else 1):
        if not any(cell.strip() for cell in row):
            values.append("")
        elif index >= len(row):
            raise StockError(f"{path}: row {number} has no column {column}")
        else:
            values.append(row[index])
    return values


def items_for(
    values: Iterable[str], *, where: str = "input", unit: str = "line", first: int = 1
) -> ParsedItems:
    """Skip and count blank entries and repeats; refuse an entry too long to be an item.
    Each item keeps its position in the file (`unit` `first` for the first value)."""
    parsed = ParsedItems(unit=unit)
    seen: dict[str, int] = {}
    for number, raw in enumerate(values, start=1):
        position = first + number - 1
        value = raw.strip()
        if not value:
            parsed.blank += 1
            continue
        if len(value) > MAX_ITEM_CHARS:
            raise StockError(
                f"{where}: entry {number} is {len(value)} characters long (at most "
                f"{MAX_ITEM_CHARS}); is this the right file or column?"
            )
        if value in seen:
            parsed.duplicate_in_file += 1
            parsed.repeats.append((position, seen[value]))
            continue
        seen[value] = position
        parsed.items.append(value)
        parsed.positions.append(position)
    return parsed


@dataclass(frozen=True)
class ImportReport:
    pool: str
    added: int
    blank: int
    duplicate_in_file: int
    already_in_stock: int
    available: int  # in the pool after the import
    waiting: int  # orders waiting for this pool, now served in payment order

    @property
    def skipped(self) -> int:
        return self.blank + self.duplicate_in_file + self.already_in_stock

    @property
    def left_after_waiting(self) -> int:
        """Available once the waiting orders are served."""
        return self.available - min(self.waiting, self.available)


@dataclass(frozen=True)
class StockedItem:
    """An item already in stock, as a duplicate is reported: its number, pool and status."""

    item_id: int
    pool: str
    status: str


def find_in_stock(session: Session, sealer: Sealer, items: Sequence[str]) -> dict[str, StockedItem]:
    """The items already in stock, in any pool and any state, found by their fingerprint under
    every configured key (so without decrypting anything): the one duplicate rule of an import
    and of its dry run."""
    lookups: dict[str, str] = {}  # every key's fingerprint → the item
    for item in items:
        for fingerprint in sealer.fingerprints(item):
            lookups[fingerprint] = item
    found: dict[str, StockedItem] = {}
    candidates = list(lookups)
    for start in range(0, len(candidates), _LOOKUP_BATCH):
        batch = candidates[start : start + _LOOKUP_BATCH]
        for fingerprint, item_id, pool, status in session.execute(
            select(StockItem.fingerprint, StockItem.id, StockItem.pool, StockItem.status).where(
                StockItem.fingerprint.in_(batch)
            )
        ):
            found[lookups[fingerprint]] = StockedItem(item_id=item_id, pool=pool, status=status)
    return found


def import_items(
    session: Session, sealer: Sealer, pool: str, parsed: ParsedItems, now: datetime
) -> ImportReport:
    """Add the items that are not in stock yet (in any pool, under any configured key)."""
    check_pool_name(pool)
    known = find_in_stock(session, sealer, parsed.items)
    new = list(dict.fromkeys(item for item in parsed.items if item not in known))
    session.add_all(
        StockItem(
            pool=pool,
            content=sealer.seal(item),
            fingerprint=sealer.fingerprint(item),
            status=StockStatus.AVAILABLE.value,
            created_at=now,
        )
        for item in new
    )
    session.flush()
    return ImportReport(
        pool=pool,
        added=len(new),
        blank=parsed.blank,
        duplicate_in_file=parsed.duplicate_in_file,
        already_in_stock=len(known),
        available=available_count(session, pool),
        waiting=len(waiting_orders(session, pool)),
    )


# A dry run shows this much of an item, and only of an item this long (a quarter of it at most):
# enough to recognise the wrong file (a README's "# …"), too little to use any item.
MASK_SHOWN = 2
MASK_MIN_LENGTH = 8
PREVIEW_ITEMS = 5


@dataclass(frozen=True)
class MaskedItem:
    """A new item as a dry run shows it: where it is, how it begins, how long it is."""

    position: int
    begins: str
    length: int


def mask(item: str, position: int) -> MaskedItem:
    """`item` reduced to its first characters (none for a short item) and its length."""
    shown = item[:MASK_SHOWN] if len(item) >= MASK_MIN_LENGTH else ""
    return MaskedItem(
        position=position,
        begins="".join(char if char.isprintable() else "?" for char in shown),
        length=len(item),
    )


@dataclass(frozen=True)
class ImportPreview:
    """What `import_items` would do with the same input, and why each entry is skipped."""

    report: ImportReport  # as the import would report it (`available`: after the import)
    available_now: int
    unit: str  # "line" (a text file) or "row" (a CSV file)
    new_items: list[MaskedItem]  # the first few new items, masked
    repeats: list[tuple[int, int]]  # (position, position of its first occurrence)
    in_stock: list[tuple[int, StockedItem]]  # (position, the item in stock)


def preview_import(
    session: Session,
    sealer: Sealer,
    pool: str,
    parsed: ParsedItems,
    *,
    shown: int = PREVIEW_ITEMS,
) -> ImportPreview:
    """Everything `import_items` would report, by the same rules, changing nothing; new items
    only masked (the first `shown` of them)."""
    check_pool_name(pool)
    known = find_in_stock(session, sealer, parsed.items)
    placed = list(zip(parsed.positions, parsed.items, strict=True))
    new = [(position, item) for position, item in placed if item not in known]
    available = available_count(session, pool)
    return ImportPreview(
        report=ImportReport(
            pool=pool,
            added=len(new),
            blank=parsed.blank,
            duplicate_in_file=parsed.duplicate_in_file,
            already_in_stock=len(known),
            available=available + len(new),
            waiting=len(waiting_orders(session, pool)),
        ),
        available_now=available,
        unit=parsed.unit,
        new_items=[mask(item, position) for position, item in new[:shown]],
        repeats=list(parsed.repeats),
        in_stock=[(position, known[item]) for position, item in placed if item in known],
    )


def check_pool_name(pool: str) -> None:
    if not POOL_NAME.match(pool):
        raise StockError(f"pool {pool!r}: {POOL_NAME_HELP}")


# Levels and voiding ------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolLevel:
    pool: str
    available: int
    assigned: int
    void: int
    threshold: int
    waiting: int
    plans: list[str]

    @property
    def low(self) -> bool:
        return self.available <= self.threshold


def stock_levels(session: Session, catalog: Catalog) -> list[PoolLevel]:
    """One row per pool in the catalog or in the database."""
    counts: dict[str, dict[str, int]] = {}
    for pool, status, count in session.execute(
        select(StockItem.pool, StockItem.status, func.count()).group_by(
            StockItem.pool, StockItem.status
        )
    ):
        counts.setdefault(pool, {})[status] = count
    waiting_by_pool: dict[str, int] = dict(
        session.execute(  # type: ignore[arg-type]
            select(Order.waiting_for_stock, func.count())
            .where(waiting())
            .group_by(Order.waiting_for_stock)
        ).all()
    )
    in_catalog = catalog.stock_pools()
    return [
        PoolLevel(
            pool=pool,
            available=counts.get(pool, {}).get(StockStatus.AVAILABLE.value, 0),
            assigned=counts.get(pool, {}).get(StockStatus.ASSIGNED.value, 0),
            void=counts.get(pool, {}).get(StockStatus.VOID.value, 0),
            threshold=catalog.low_stock_threshold(pool),
            waiting=waiting_by_pool.get(pool, 0),
            plans=[plan.name for plan in in_catalog.get(pool, [])],
        )
        for pool in sorted(set(counts) | set(in_catalog) | set(waiting_by_pool))
    ]


def empty_pools(levels: Iterable[PoolLevel]) -> list[str]:
    """The pools a listed plan sells from that have no item to hand out: its buyers pay, then
    wait (their memberships untouched) until items are imported. `check` fails on them and
    `serve` warns of them at start."""
    return [level.pool for level in levels if level.plans and level.available == 0]


def restock_command(pool: str) -> str:
    """What fills an empty pool."""
    return f"whop-autocancel stock import {pool} FILE"


@dataclass(frozen=True)
class VoidResult:
    item_id: int
    pool: str
    was: str
    order_id: str | None

    @property
    def changed(self) -> bool:
        return self.was != StockStatus.VOID.value


def void_item(
    session: Session, item_id: int, reason: str, now: datetime, *, lock: bool = True
) -> VoidResult:
    """Take an item out of circulation (an available one is never handed out; an assigned one
    stays with its order, marked void so everyone knows it must be rotated)."""
    item = session.get(StockItem, item_id, with_for_update=lock)
    if item is None:
        raise StockError(f"no stock item #{item_id} (see `whop-autocancel stock list POOL`)")
    was = item.status
    if was != StockStatus.VOID.value:
        item.status = StockStatus.VOID.value
        item.voided_at = now
        item.void_reason = reason
    return VoidResult(item_id=item.id, pool=item.pool, was=was, order_id=item.order_id)


def void_items(
    session: Session, item_ids: Sequence[int], reason: str, now: datetime
) -> list[VoidResult]:
    """Void several items at once, in the caller's transaction: all of them, or (when one of
    the numbers is unknown) none. One locking read and one update per batch, not a
    transaction per item. A repeated number counts once; results follow the order given."""
    wanted = list(dict.fromkeys(item_ids))
    found: dict[int, tuple[str, str, str | None]] = {}
    for start in range(0, len(wanted), _LOOKUP_BATCH):
        batch = wanted[start : start + _LOOKUP_BATCH]
        rows = session.execute(
            select(StockItem.id, StockItem.pool, StockItem.status, StockItem.order_id)
            .where(StockItem.id.in_(batch))
            .order_by(StockItem.id)  # (rows locked in one order: no deadlock between voids)
            .with_for_update()
        )
        for item_id, pool, status, order_id in rows:
            found[item_id] = (pool, status, order_id)
    missing = [item_id for item_id in wanted if item_id not in found]
    if missing:
        names = " or ".join(", ".join(f"#{item_id}" for item_id in missing).rsplit(", ", 1))
        raise StockError(
            f"no stock item {names} (see `whop-autocancel stock list POOL`): nothing was voided"
        )
    results = [
        VoidResult(
            item_id=item_id,
            pool=found[item_id][0],
            was=found[item_id][1],
            order_id=found[item_id][2],
        )
        for item_id in wanted
    ]
    changed = [result.item_id for result in results if result.changed]
    for start in range(0, len(changed), _LOOKUP_BATCH):
        session.execute(
            update(StockItem)
            .where(
                StockItem.id.in_(changed[start : start + _LOOKUP_BATCH]),
                StockItem.status != StockStatus.VOID.value,
            )
            .values(status=StockStatus.VOID.value, voided_at=now, void_reason=reason)
            .execution_options(synchronize_session=False)
        )
    return results


# Listing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ItemRow:
    """An item as `stock list` shows it: never its content (not even encrypted)."""

    id: int
    pool: str
    status: str
    order_id: str | None
    created_at: datetime
    assigned_at: datetime | None
    voided_at: datetime | None
    void_reason: str | None


def list_items(session: Session, pool: str, *, status: str | None, limit: int) -> list[ItemRow]:
    """The pool's items, newest first (the content column is not even read)."""
    check_pool_name(pool)
    statement = (
        select(
            StockItem.id,
            StockItem.pool,
            StockItem.status,
            StockItem.order_id,
            StockItem.created_at,
            StockItem.assigned_at,
            StockItem.voided_at,
            StockItem.void_reason,
        )
        .where(StockItem.pool == pool)
        .order_by(StockItem.id.desc())
        .limit(limit)
    )
    if status is not None:
        statement = statement.where(StockItem.status == status)
    return [ItemRow(*row) for row in session.execute(statement)]


# Key rotation --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RekeyReport:
    items: int
    emails: int


def rekey(session: Session, sealer: Sealer, *, batch: int = 500) -> RekeyReport:
    """Encrypt every item (and every email that carries one) again with the first key, and
    fingerprint it under that key: afterwards the older keys can be removed."""
    items = emails = 0
    last = 0
    while True:
        rows = list(
            session.scalars(
                select(StockItem)
                .where(StockItem.id > last)
                .order_by(StockItem.id)
                .limit(batch)
                .with_for_update()
            )
        )
        if not rows:
            break
        for item in rows:
            content = sealer.open(item.content)
            item.content = sealer.seal(content)
            item.fingerprint = sealer.fingerprint(content)
        items += len(rows)
        last = rows[-1].id
        session.flush()
    last = 0
    while True:
        messages = list(
            session.scalars(
                select(Email)
                .where(Email.sealed.is_(True), Email.id > last)
                .order_by(Email.id)
                .limit(batch)
                .with_for_update()
            )
        )
        if not messages:
            break
        for message in messages:
            message.text_body = sealer.seal(sealer.open(message.text_body))
            if message.html_body:
                message.html_body = sealer.seal(sealer.open(message.html_body))
        emails += len(messages)
        last = messages[-1].id
        session.flush()
    return RekeyReport(items=items, emails=emails)


def unreadable_items(session: Session, sealer: Sealer) -> list[tuple[str, int]]:
    """For each pool, its newest item if the configured keys cannot open it (a wrong key)."""
    newest = session.execute(
        select(StockItem.pool, func.max(StockItem.id)).group_by(StockItem.pool)
    ).all()
    failing = []
    for pool, item_id in newest:
        item = session.get(StockItem, item_id)
        assert item is not None
        try:
            sealer.open(item.content)
        except SealError:
            failing.append((pool, item_id))
    return failing
