"""Stock pools: `stock keygen|import|levels|list|void|show|rekey`."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from whop_autocancel.admin.stock import DEFAULT_LIMIT
from whop_autocancel.cli.common import LimitOption, print_listing
from whop_autocancel.cli.output import (
    Column,
    JsonOption,
    WideOption,
    iso,
    out,
    print_json,
    print_json_lines,
    print_table,
    say,
)
from whop_autocancel.delivery.models import StockStatus

if TYPE_CHECKING:
    from whop_autocancel.delivery.stock import ImportPreview, ImportReport, ItemRow, PoolLevel
    from whop_autocancel.runtime import Runtime


def _stock_runtime() -> AbstractContextManager[Runtime]:
    """Importing stock may be the first thing done on a new machine: SQLite migrates itself."""
    from whop_autocancel.cli.common import open_runtime as runtime

    return runtime()


stock_app = typer.Typer(
    help="Stock pools: import, list, void and show items.", no_args_is_help=True
)


@stock_app.command("keygen")
def keygen() -> None:
    """Print a new STOCK_ENCRYPTION_KEY. Keep a copy somewhere safe: without it the stored
    items cannot be read."""
    from whop_autocancel.sealing import generate_key

    typer.echo(generate_key())


@stock_app.command("import")
def import_(
    pool: Annotated[
        str, typer.Argument(metavar="POOL", help="The pool, as in the catalog's stock:POOL.")
    ],
    file: Annotated[
        Path,
        typer.Argument(metavar="FILE", help="One item per line, or a CSV file with --column."),
    ],
    column: Annotated[
        str | None,
        typer.Option(
            "--column",
            metavar="COLUMN",
            help="Read this CSV column: its header name, or a number from 1.",
        ),
    ] = None,
    delimiter: Annotated[
        str, typer.Option("--delimiter", metavar="CHAR", help="The CSV field separator.")
    ] = ",",
    no_header: Annotated[
        bool,
        typer.Option("--no-header", help="The CSV file has no header row (--column N)."),
    ] = False,
    any_pool: Annotated[
        bool,
        typer.Option("--any-pool", help="Import into a pool no plan in the catalog uses yet."),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Show what would be added, masked; change nothing."),
    ] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="With --dry-run: print the preview as JSON.")
    ] = False,
) -> None:
    """Add items to a pool. Blank lines and duplicates (in the file, or already in stock in any
    pool) are skipped and counted. Orders waiting for the pool are then delivered, oldest
    payment first."""
    from whop_autocancel.admin.stock import import_stock, preview_import
    from whop_autocancel.delivery.stock import StockError, read_items

    if json_output and not dry_run:
        raise typer.BadParameter("--json goes with --dry-run", param_hint="--json")
    if len(delimiter) != 1:
        raise StockError("--delimiter must be one character")
    parsed = read_items(file, column=column, delimiter=delimiter, header=not no_header)
    with _stock_runtime() as runtime:
        threshold = runtime.catalog.low_stock_threshold(pool)
        if dry_run:
            preview = preview_import(runtime, pool, parsed, any_pool=any_pool)
        else:
            report = import_stock(runtime, pool, parsed, any_pool=any_pool)
    if not dry_run:
        _print_import(report, threshold)
    elif json_output:
        print_json(preview_document(preview, threshold))
    else:
        _print_preview(preview, threshold)


def _print_import(report: ImportReport, threshold: int) -> None:
    _print_summary(report, would=False)
    _print_effects(report, threshold, would=False)


def _print_summary(report: ImportReport, *, would: bool) -> None:
    """The import's counts, or (`would`) those the import would report."""
    added = "would be added" if would else "added"
    available = "Available after" if would else "Available now"
    _line(
        f"Pool {report.pool}: {report.added} item(s) {added}; skipped {report.skipped} "
        f"({report.blank} blank, {report.duplicate_in_file} repeated in the file, "
        f"{report.already_in_stock} already in stock). {available}: {report.available}."
    )


def _print_effects(report: ImportReport, threshold: int, *, would: bool) -> None:
    """The waiting orders the import serves, and whether it leaves the pool low."""
    if report.waiting:
        served = min(report.waiting, report.available)
        still = "would still wait" if would else "still wait"
        _line(
            f"{report.waiting} order(s) "
            + (
                f"are waiting for this pool: the worker would deliver {served} of them, "
                if would
                else f"were waiting for this pool: the worker delivers {served} of them now, "
            )
            + "oldest payment first"
            + (
                f"; {report.waiting - served} {still} for more stock."
                if served < report.waiting
                else "."
            )
        )
    left = report.left_after_waiting
    if left <= threshold:
        _line(
            ("Would still be low: " if would else "Still low: ")
            + f"{left} item(s) left once the waiting orders are served, at or below the "
            f"pool's low-stock threshold ({threshold})."
        )


PREVIEW_LISTED = 10  # repeats and items in stock listed by a dry run (--json lists them all)


def _print_preview(preview: ImportPreview, threshold: int) -> None:
    """A dry run: the summary the import would print, the first new items masked, and where
    each skipped duplicate is."""
    report, unit = preview.report, preview.unit
    _print_summary(report, would=True)
    if preview.new_items:
        shown = len(preview.new_items)
        which = f"first {shown} of the {report.added}" if shown < report.added else f"{shown}"
        _line(f"The {which} new item(s), masked (first 2 characters and the length):")
        for item in preview.new_items:
            _line(f'  {unit} {item.position}: "{item.begins}…" ({item.length} characters)')
    if preview.repeats:
        _line("Repeated in the file (skipped):")
        for position, first in preview.repeats[:PREVIEW_LISTED]:
            _line(f"  {unit} {position} repeats {unit} {first}")
        _more(len(preview.repeats))
    if preview.in_stock:
        _line("Already in stock (skipped; in any pool and state):")
        for position, stocked in preview.in_stock[:PREVIEW_LISTED]:
            _line(
                f"  {unit} {position} is item #{stocked.item_id} "
                f"(pool {stocked.pool}, {stocked.status})"
            )
        _more(len(preview.in_stock))
    _print_effects(report, threshold, would=True)
    _line("Dry run: nothing was imported. Run the command without --dry-run to import.")


def _more(count: int) -> None:
    if count > PREVIEW_LISTED:
        _line(f"  … and {count - PREVIEW_LISTED} more (--json lists them all).")


def _line(text: str) -> None:
    out.print(text, soft_wrap=True)


def preview_document(preview: ImportPreview, threshold: int) -> dict[str, Any]:
    """What `stock import --dry-run --json` prints (new items masked, as in the text)."""
    report = preview.report
    return {
        "dry_run": True,
        "pool": report.pool,
        "would_add": report.added,
        "skipped": report.skipped,
        "blank": report.blank,
        "repeated_in_file": report.duplicate_in_file,
        "already_in_stock": report.already_in_stock,
        "available_now": preview.available_now,
        "available_after": report.available,
        "waiting": report.waiting,
        "low_stock_threshold": threshold,
        "unit": preview.unit,
        "new_items": [
            {"position": item.position, "begins": item.begins, "length": item.length}
            for item in preview.new_items
        ],
        "repeats": [{"position": position, "first": first} for position, first in preview.repeats],
        "in_stock": [
            {
                "position": position,
                "item_id": item.item_id,
                "pool": item.pool,
                "status": item.status,
            }
            for position, item in preview.in_stock
        ],
    }


@stock_app.command("levels")
def levels(json_output: JsonOption = False, wide: WideOption = False) -> None:
    """Show each pool's items and the orders waiting for it. Per pool: available, assigned,
    void, the low-stock threshold, waiting orders."""
    from whop_autocancel.admin.stock import stock_levels

    with _stock_runtime() as runtime:
        rows = [level_row(level) for level in stock_levels(runtime)]
    if json_output:
        print_json_lines(rows)
        return
    if not rows:
        out.print("No stock pools: no plan in the catalog uses stock:<pool>, and none is stored.")
        return
    print_table(LEVEL_COLUMNS, rows, title="Stock levels", wide=wide)
    if any(row["waiting"] for row in rows):
        say(
            "Orders are waiting for stock: `whop-autocancel stock import POOL FILE` adds "
            "items, and they are delivered oldest payment first."
        )


def level_row(level: PoolLevel) -> dict[str, Any]:
    """A pool as `stock levels` shows it."""
    return {
        "pool": level.pool,
        "available": level.available,
        "low": level.low,
        "assigned": level.assigned,
        "void": level.void,
        "threshold": level.threshold,
        "waiting": level.waiting,
        "plans": list(level.plans),
    }


LEVEL_COLUMNS = (
    Column("Pool", "pool", priority=100, identifier=True, keep=True),
    Column(
        "Available",
        "available",
        priority=90,
        right=True,
        cell=lambda row: f"{row['available']}" + (" LOW" if row["low"] else ""),
    ),
    Column("Assigned", "assigned", priority=60, right=True),
    Column("Void", "void", priority=50, right=True),
    Column("Threshold", "threshold", priority=70, right=True),
    Column("Waiting", "waiting", priority=80, right=True),
    Column(
        "Plans",
        "plans",
        priority=40,
        cell=lambda row: ", ".join(row["plans"]) or "(not in the catalog)",
    ),
)


@stock_app.command("list")
def list_(
    pool: Annotated[str, typer.Argument(metavar="POOL", help="The pool.")],
    status: Annotated[
        StockStatus | None,
        typer.Option("--status", metavar="STATUS", help="Only items in this status."),
    ] = None,
    limit: LimitOption = DEFAULT_LIMIT,
    json_output: JsonOption = False,
    wide: WideOption = False,
) -> None:
    """List a pool's item numbers and states (never contents)."""
    from whop_autocancel.admin.stock import list_stock

    with _stock_runtime() as runtime:
        rows = [
            item_row(item)
            for item in list_stock(
                runtime, pool, status=status.value if status else None, limit=limit
            )
        ]
    if json_output:
        print_json_lines(rows)
        return
    print_listing(
        "stock item",
        {"pool": pool, "status": status.value if status else None},
        ITEM_COLUMNS,
        rows,
        wide=wide,
    )


def item_row(item: ItemRow) -> dict[str, Any]:
    """An item as `stock list` shows it: never its content."""
    return {
        "id": item.id,
        "pool": item.pool,
        "status": item.status,
        "order_id": item.order_id,
        "created_at": iso(item.created_at),
        "assigned_at": iso(item.assigned_at),
        "voided_at": iso(item.voided_at),
        "void_reason": item.void_reason,
    }


ITEM_COLUMNS = (
    Column("ID", "id", priority=100, identifier=True, keep=True, right=True),
    Column("Status", "status", priority=90),
    Column("Order", "order_id", priority=80, identifier=True),
    Column("Created", "created_at", priority=60),
    Column("Assigned", "assigned_at", priority=50),
    Column("Voided", "voided_at", priority=55),
    Column("Void reason", "void_reason", priority=70, free_text=True),
)


@stock_app.command("void")
def void(
    item_ids: Annotated[list[int], typer.Argument(metavar="ITEM", help="The items' numbers.")],
    reason: Annotated[
        str, typer.Option("--reason", metavar="TEXT", help="Why (kept with the items).")
    ] = "voided by the admin",
) -> None:
    """Void items for good: all of them, or none if a number is unknown.

    An available item is never handed out; an assigned one stays with its
    order, marked void (rotate it where it lives)."""
    from whop_autocancel.admin.stock import void_stocks

    with _stock_runtime() as runtime:
        results = void_stocks(runtime, item_ids, reason)
    for result in results:
        name = f"Stock item #{result.item_id} (pool {result.pool})"
        if not result.changed:
            _line(f"{name} is already void; nothing to do.")
        elif result.order_id:
            _line(
                f"{name} is void now. It was delivered to order {result.order_id}: rotate it "
                "where it lives (password, license server) so that copy stops working."
            )
        else:
            _line(f"{name} is void now; it will never be handed out.")


@stock_app.command("show")
def show(
    reference: Annotated[
        str,
        typer.Argument(
            metavar="ITEM|ORDER", help="The item's number, or the order (ord_…) that holds it."
        ),
    ],
    json_output: JsonOption = False,
) -> None:
    """Print one item, decrypted, with its status and order. For support; it is never
    logged. With --json the item is in `content`: that is what the command is for."""
    from whop_autocancel.admin.stock import show_item

    with _stock_runtime() as runtime:
        item, content = show_item(runtime, reference)
    if json_output:
        print_json(
            {
                "id": item.id,
                "pool": item.pool,
                "status": item.status,
                "order_id": item.order_id,
                "void_reason": item.void_reason,
                "created_at": iso(item.created_at),
                "assigned_at": iso(item.assigned_at),
                "voided_at": iso(item.voided_at),
                "content": content,
            }
        )
        return
    out.print(
        f"Stock item #{item.id} · pool {item.pool} · {item.status}"
        + (f" · order {item.order_id}" if item.order_id else "")
        + (f" · void: {item.void_reason}" if item.void_reason else ""),
        soft_wrap=True,
    )
    typer.echo(content)


@stock_app.command("rekey")
def rekey() -> None:
    """Encrypt every stored item again with the newest key. After a key rotation (new key
    first in STOCK_ENCRYPTION_KEY, old keys after): every item and stored email, so that the
    old keys can be removed."""
    from whop_autocancel.admin.stock import rekey_stock

    with _stock_runtime() as runtime:
        keys = runtime.sealer.key_count if runtime.sealer else 0
        report = rekey_stock(runtime)
    out.print(
        f"Re-encrypted {report.items} item(s) and {report.emails} email(s) with the first "
        "key of STOCK_ENCRYPTION_KEY."
        + (
            " You can now remove the older key(s) from the setting, on every machine."
            if keys > 1
            else ""
        ),
        soft_wrap=True,
    )
