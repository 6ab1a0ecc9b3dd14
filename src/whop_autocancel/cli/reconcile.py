"""Reconciling with Whop by hand: `sweep`, `backfill`, `recover`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from whop_autocancel.cli.common import open_runtime, out
from whop_autocancel.errors import WhopAutocancelError


def sweep(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report what would be done; change nothing.")
    ] = False,
) -> None:
    """Run the sweeps now: stuck work (re-enqueue what a crash left), then Whop (recover
    purchases whose webhook never came, cancel memberships that are still live)."""
    with open_runtime() as runtime:
        stuck = runtime.stuck_sweep.run(force=True, dry_run=dry_run)
        would = "would re-enqueue" if dry_run else "re-enqueued"
        out.print(
            f"stuck work: {would} {stuck.cancellations} cancellation(s), {stuck.deliveries} "
            f"delivery(ies), {stuck.emails} email(s), {stuck.events} event(s), "
            f"{stuck.stock_pools} stock pool(s) with waiting orders"
        )
        whop = runtime.whop_sweep.run(force=True, dry_run=dry_run)
        recovered = "would recover" if dry_run else "recovered"
        again = "would cancel again" if dry_run else "cancelling again"
        out.print(
            f"whop: {whop.payments_seen} payment(s) read, {recovered} "
            f"{len(whop.recovered_payments)} whose webhook never came"
            + (f" ({', '.join(whop.recovered_payments[:10])})" if whop.recovered_payments else "")
        )
        if whop.skipped_payments:
            skip = "would skip" if dry_run else "skipped"
            out.print(f"whop: {skip} {len(whop.skipped_payments)} payment(s), not delivered:")
            for skipped in whop.skipped_payments[:50]:
                out.print(f"  {skipped.payment_id}: {skipped.reason}", soft_wrap=True)
        out.print(
            f"whop: {whop.memberships_seen} membership(s) read, {again} "
            f"{len(whop.recancelled)} still live"
            + (f" ({', '.join(whop.recancelled[:10])})" if whop.recancelled else "")
        )
        if whop.stopped:
            raise WhopAutocancelError(f"the Whop sweep stopped early: {whop.stopped}")


def backfill(
    plan: Annotated[str, typer.Option("--plan", help="A listed one-time plan (plan_…).")],
    since: Annotated[
        str | None, typer.Option("--since", help="Only memberships created after YYYY-MM-DD.")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List them; cancel nothing.")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Cancel the live memberships of a listed one-time plan sold before the service started
    watching, that belong to no order of ours. Everything else is listed as skipped."""
    from datetime import UTC, datetime

    from rich.progress import Progress

    from whop_autocancel.reconcile.backfill import BackfillRefused

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
        live, skipped = survey.to_cancel, survey.skipped
        out.print(
            f"{len(live) + len(skipped)} live membership(s) of {plan}"
            + (f" created after {since}" if since else "")
            + f": {len(live)} to cancel, {len(skipped)} skipped. The service started watching "
            f"at {survey.watching_since:%Y-%m-%d %H:%M:%S} UTC: only memberships sold before "
            "then, of no order of ours, are cancelled.",
            soft_wrap=True,
        )
        table = Table()
        for column in ("Membership", "Status", "Customer", "Created"):
            table.add_column(column, no_wrap=True)
        for membership in live[:50]:
            table.add_row(
                membership.membership_id,
                membership.status,
                membership.email or "-",
                membership.created_at or "-",
            )
        if live:
            out.print(table)
        if len(live) > 50:
            out.print(f"… and {len(live) - 50} more.")
        if skipped:
            out.print("Skipped (left alone):")
            for item in skipped:
                out.print(
                    f"  {item.membership.membership_id} (created "
                    f"{item.membership.created_at or 'at an unknown time'}): {item.reason}",
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


def recover(
    since: Annotated[
        str,
        typer.Option(
            "--since", help="From when (UTC): YYYY-MM-DD or YYYY-MM-DDTHH:MM.", show_default=False
        ),
    ],
    apply: Annotated[
        bool, typer.Option("--apply", help="Deliver them now (without it: a dry run).")
    ] = False,
) -> None:
    """List the purchases paid before the service started watching Whop (since --since) that
    it would deliver; with --apply, deliver them as the Whop sweep would. Dry run first."""
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
        out.print(
            f"Payments created from {survey.since:%Y-%m-%d %H:%M} UTC until the service started "
            f"watching ({survey.until:%Y-%m-%d %H:%M:%S} UTC): {survey.payments_seen} read.",
            soft_wrap=True,
        )
        found = survey.recoverable
        verb = "were" if apply else "would be"
        out.print(f"{len(found)} purchase(s) {verb} delivered:" if found else "Nothing to deliver.")
        if found:
            table = Table()
            for column in ("Payment", "Created", "Plan", "Customer", "Delivery"):
                table.add_column(column, overflow="fold")
            for payment in found:
                facts = payment.facts
                delivery = payment.note or (
                    f"{payment.delivery}, then cancel the membership"
                    if payment.cancels
                    else f"{payment.delivery}, membership kept"
                )
                table.add_row(
                    facts.payment_id,
                    f"{facts.created_at:%Y-%m-%d %H:%M:%S}" if facts.created_at else "-",
                    f"{payment.plan_name} ({facts.plan_id})",
                    facts.email or "-",
                    delivery,
                )
            out.print(table)
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
