"""Imports every table so `Base.metadata` knows them all (migrations, tests)."""

from whop_autocancel.alerts.models import Alert
from whop_autocancel.cancellation.models import Cancellation, CancellationAttempt
from whop_autocancel.db.audit import AdminAction
from whop_autocancel.db.base import Base
from whop_autocancel.db.buckets import RateBucket
from whop_autocancel.db.install import ServiceMarker
from whop_autocancel.db.leases import Lease
from whop_autocancel.db.locks import Lock
from whop_autocancel.db.throttle import LoginFailure
from whop_autocancel.delivery.models import StockItem
from whop_autocancel.mail.models import Email
from whop_autocancel.orders.models import Order
from whop_autocancel.webhooks.models import WebhookEvent

__all__ = [
    "AdminAction",
    "Alert",
    "Base",
    "Cancellation",
    "CancellationAttempt",
    "Email",
    "Lease",
    "Lock",
    "LoginFailure",
    "Order",
    "RateBucket",
    "ServiceMarker",
    "StockItem",
    "WebhookEvent",
]
