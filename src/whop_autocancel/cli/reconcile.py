"""Reconciling with Whop by hand: `sweep`, `backfill`, `recover`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from whop_autocancel.cli.common import open_runtime
from whop_autocancel.cli.output import (
    Column,
    JsonOption,
    Row,
    iso,
    out,
    print_json,
    print_table,
)
from whop_autocancel.clock import format_utc, parse_timestamp
from whop_autocancel.errors import WhopAutocancelError

if TYPE_CHECKING:
    from whop_autocancel.reconcile.backfill import BackfillSurvey, LiveMembership
    from whop_autocancel.reconcile.recover import RecoverablePayment, RecoverySurvey
    from whop_autocancel.reconcile.sweeps import SweepReport
    from whop_autocancel.reconcile.whop_sweep import WhopSweepReport


def sweep(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report what would be done; change nothing.")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Run the sweeps now. Stuck work (re-enqueue what a crash left), then Whop (recover
    purchases whose webhook never came, cancel memberships that are still live)."""
    with open_runtime() as runtime:
        stuck = runtime.stuck_sweep.run(force=True, dry_run=dry_run)
        if not json_output:
            _print_stuck(stuck, dry_run)
        whop = runtime.whop_sweep.run(force=True, dry_run=dry_run)
    if json_output:
        print_json(sweep_document(stuck, whop, dry_run))
    else:
        _print_whop(whop, dry_run)
    if whop.stopped:
        raise WhopAutocancelError(f"the Whop sweep stopped early: {whop.stopped}")


def sweep_document(stuck: SweepReport, whop: WhopSweepReport, dry_run: bool) -> dict[str, Any]:
    """What `sweep --json` prints: the counts of both sweeps, the payment and membership ids."""
    return {
        "dry_run": dry_run,
        "stuck": {
            "cancellations": stuck.cancellations,
            "deliveries": stuck.deliveries,
            "emails": stuck.emails,
            "events": stuck.events,
            "stock_pools": stuck.stock_pools,
        },
        "whop": {
            "payments_seen": whop.payments_seen,
            "recovered_payments": list(whop.recovered_payments),
            "skipped_payments": [
                {"payment_id": skipped.payment_id, "reason": skipped.reason}
                for skipped in whop.skipped_payments
            ],
            "memberships_seen": whop.memberships_seen,
            "recancelled_memberships": list(whop.recancelled),
            "stopped": whop.stopped,
        },
    }


def _print_stuck(stuck: SweepReport, dry_run: bool) -> None:
    would = "would re-enqueue" if dry_run else "re-enqueued"
    out.print(
        f"stuck work: {would} {stuck.cancellations} cancellation(s), {stuck.deliveries} "
        f"delivery(ies), {stuck.emails} email(s), {stuck.events} event(s), "
        f"{stuck.stock_pools} stock pool(s) with waiting orders",
        soft_wrap=True,
    )


def _print_whop(whop: WhopSweepReport, dry_run: bool) -> None:
    recovered = "would recover" if dry_run else "recovered"
    again = "would cancel again" if dry_run else "cancelling again"
    out.print(
        f"whop: {whop.payments_seen} payment(s) read, {recovered} "
        f"{len(whop.recovered_payments)} whose webhook never came"
        + (f" ({', '.join(whop.recovered_payments[:10])})" if whop.recovered_payments else ""),
        soft_wrap=True,
    )
    if whop.skipped_payments:
        skip = "would skip" if dry_run else "skipped"
        out.print(f"whop: {skip} {len(whop.skipped_payments)} payment(s), not delivered:")
        for skipped in whop.skipped_payments[:50]:
            out.print(f"  {skipped.payment_id}: {skipped.reason}", soft_wrap=True)
    out.print(
        f"whop: {whop.memberships_seen} membership(s) read, {again} "
        f"{len(whop.recancelled)} still live"
        + (f" ({', '.join(whop.recancelled[:10])})" if whop.recancelled else ""),
        soft_wrap=True,
    )


def whop_time(value: str | None) -> str | None:
    """A time as Whop wrote it, in our one format when it can be read (as written if not)."""
    try:
        moment = parse_timestamp(value)
    except (ValueError, OverflowError, OSError):
        return value
    return iso(moment)


def membership_row(membership: LiveMembership) -> dict[str, Any]:
    return {
        "membership_id": membership.membership_id,
        "status": membership.status,
        "plan_id": membership.plan_id,
        "email": membership.email,
        "user_id": membership.user_id,
        "created_at": whop_time(membership.created_at),
    }


def backfill_document(survey: BackfillSurvey, since: str | None) -> dict[str, Any]:
    """What `backfill --dry-run --json` prints: what it would cancel, and what it leaves."""
    return {
        "plan_id": survey.plan_id,
        "since": since,
        "watching_since": iso(survey.watching_since),
        "to_cancel": [membership_row(membership) for membership in survey.to_cancel],
        "skipped": [
            {**membership_row(item.membership), "reason": item.reason} for item in survey.skipped
        ],
    }


MEMBERSHIP_COLUMNS = (
    Column("Membership", "membership_id", priority=100, identifier=True, keep=True),
    Column("Status", "status", priority=60),
    Column("Customer", "email", priority=80),
    Column("Created", "created_at", priority=70),
)


def backfill(
    plan: Annotated[
        str, typer.Option("--plan", metavar="PLAN", help="A listed one-time plan (plan_…).")
    ],
    since: Annotated[
        str | None,
        typer.Option(
            "--since", metavar="DATE", help="Only memberships created after DATE (YYYY-MM-DD)."
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List them; cancel nothing.")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="With --dry-run: print the survey as JSON.")
    ] = False,
) -> None:
    """Cancel the memberships a plan sold before the install. Those of a listed one-time
    plan, still live, sold before the service started watching, that belong to no order of
    ours; everything else is listed as skipped."""
    from datetime import UTC, datetime

    from rich.progress import Progress

    from whop_autocancel.reconcile.backfill import BackfillRefused

    if json_output and not dry_run:
        raise typer.BadParameter(
            "--json goes with --dry-run (the real run asks and shows its progress)",
            param_hint="--json",
        )
    try:
        start = datetime.strptime(since, "%Y-%m-%d").replace(tzinfo=UTC) if since else None
    except ValueError:
        raise typer.BadParameter("use YYYY-MM-DD", param_hint="--since") from None
    with open_runtime(required=lambda settings: settings.whop_listing_settings) as runtime:
        job = runtime.backfill()
        try:
            job.check_plan(plan)
            survey = job.survey(plan, start)
        except BackfillRefused as error:
            raise WhopAutocancelError(f"Not backfilling: {error}") from None
        if json_output:
            print_json(backfill_document(survey, iso(start)))
            return
        live, skipped = survey.to_cancel, survey.skipped
        out.print(
            f"{len(live) + len(skipped)} live membership(s) of {plan}"
            + (f" created after {since}" if since else "")
            + f": {len(live)} to cancel, {len(skipped)} skipped. The service started watching "
            f"at {format_utc(survey.watching_since)}: only memberships sold before "
            "then, of no order of ours, are cancelled.",
            soft_wrap=True,
        )
        if live:
            rows = [membership_row(membership) for membership in live[:50]]
            print_table(MEMBERSHIP_COLUMNS, rows)
        if len(live) > 50:
            out.print(f"… and {len(live) - 50} more.")
        if skipped:
            out.print("Skipped (left alone):")
            for item in skipped:
                created = whop_time(item.membership.created_at) or "at an unknown time"
                out.print(
                    f"  {item.membership.membership_id} (created {created}): {item.reason}",
                    soft_wrap=True,
                )
        if dry_run or not live:
            out.print("Dry run: nothing cancelled." if dry_run else "Nothing to cancel.")
            return
        if not yes and not typer.confirm(f"Cancel these {len(live)} membership(s) now?"):
            raise WhopAutocancelError("Not cancelled.")
        outcomes: dict[str, int] = {}
        with Progress(console=out) as progress:
            task = progress.add_task("cancelling", total=len(live))
            for membership in live:
                status = job.cancel(plan, membership)
                outcomes[status] = outcomes.get(status, 0) + 1
                progress.advance(task)
        out.print(
            "Done: "
            + ", ".join(f"{count} {status}" for status, count in sorted(outcomes.items()))
            + "."
            + (f" {len(skipped)} skipped (above)." if skipped else "")
        )
        if outcomes.get("scheduled"):
            out.print("Scheduled ones are retried by the workers (Whop asked to wait or failed).")
        if outcomes.get("failed"):
            raise WhopAutocancelError(
                f"{outcomes['failed']} failed: see `whop-autocancel cancellations failed`"
            )


def recoverable_row(payment: RecoverablePayment) -> dict[str, Any]:
    facts = payment.facts
    return {
        "payment_id": facts.payment_id,
        "created_at": iso(facts.created_at),
        "paid_at": iso(facts.paid_at),
        "plan_id": facts.plan_id,
        "plan_name": payment.plan_name,
        "email": facts.email,
        "membership_id": facts.membership_id,
        "delivery": payment.delivery,
        "cancels_membership": payment.cancels,
        "note": payment.note,
    }


def recover_document(survey: RecoverySurvey, applied: list[str] | None) -> dict[str, Any]:
    """What `recover --json` prints: the purchases it would deliver (or, with --apply, did),
    and the payments it leaves alone."""
    return {
        "since": iso(survey.since),
        "until": iso(survey.until),
        "payments_seen": survey.payments_seen,
        "recoverable": [recoverable_row(payment) for payment in survey.recoverable],
        "skipped": [
            {"payment_id": skipped.payment_id, "reason": skipped.reason}
            for skipped in survey.skipped
        ],
        "applied": applied,
    }


def _delivery_cell(row: Row) -> str:
    if row["note"]:
        return str(row["note"])
    kept = "then cancel the membership" if row["cancels_membership"] else "membership kept"
    return f"{row['delivery']}, {kept}"


RECOVERABLE_COLUMNS = (
    Column("Payment", "payment_id", priority=100, identifier=True, keep=True),
    Column("Created", "created_at", priority=60),
    Column("Plan", "plan_id", priority=50, identifier=True),
    Column("Customer", "email", priority=80),
    Column("Delivery", "delivery", priority=70, free_text=True, cell=_delivery_cell),
)


def recover(
    since: Annotated[
        str,
        typer.Option(
            "--since",
            metavar="DATE",
            help="From when (UTC): YYYY-MM-DD or YYYY-MM-DDTHH:MM.",
            show_default=False,
        ),
    ],
    apply: Annotated[
        bool, typer.Option("--apply", help="Deliver them now (without it: a dry run).")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Deliver the purchases paid before the install. Lists those paid since --since, before
    the service started watching Whop, that it would deliver; with --apply, delivers them as
    the Whop sweep would. Dry run first."""
    from datetime import UTC, datetime

    from whop_autocancel.reconcile.recover import RecoverRefused

    start: datetime | None = None
    for form in ("%Y-%m-%d", "%Y-%m-%dT%H:%M"):
        try:
            start = datetime.strptime(since, form).replace(tzinfo=UTC)
            break
        except ValueError:
            continue
    if start is None:
        raise typer.BadParameter("use YYYY-MM-DD or YYYY-MM-DDTHH:MM (UTC)", param_hint="--since")
    with open_runtime(required=lambda settings: settings.whop_listing_settings) as runtime:
        job = runtime.recovery()
        try:
            survey = job.survey(start)
        except RecoverRefused as error:
            raise WhopAutocancelError(f"Not recovering: {error}") from None
        if json_output:
            applied = job.apply(survey) if apply else None
            print_json(recover_document(survey, applied))
            return
        out.print(
            f"Payments created from {format_utc(survey.since)} until the service started "
            f"watching ({format_utc(survey.until)}): {survey.payments_seen} read.",
            soft_wrap=True,
        )
        found = survey.recoverable
        verb = "were" if apply else "would be"
        out.print(f"{len(found)} purchase(s) {verb} delivered:" if found else "Nothing to deliver.")
        if found:
            print_table(RECOVERABLE_COLUMNS, [recoverable_row(payment) for payment in found])
        if survey.skipped:
            out.print(f"{len(survey.skipped)} skipped (left alone):")
            for skipped in survey.skipped:
                out.print(f"  {skipped.payment_id}: {skipped.reason}", soft_wrap=True)
        if not apply:
            if found:
                out.print("Dry run: nothing changed. Run it again with --apply to deliver them.")
            else:
                out.print("Dry run: nothing changed.")
            return
        applied = job.apply(survey)
        out.print(
            f"Recovered {len(applied)} purchase(s): their delivery is queued; a running worker "
            "delivers them and then cancels their memberships."
        )
