"""Reconciliation: the stuck-work sweep, the Whop sweep, backfill and recovery. They drive
the inbox, orders, delivery and cancellation below them; nothing below imports them."""
