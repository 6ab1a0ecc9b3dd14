"""Render simulator records as Whop JSON: the legacy shape and the versioned ("pinned") shape.

Field names and nesting follow `/work/shared/whop/fixtures/` (WHOP.md §2, §5.4, §5.5).
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from whop_autocancel.simulator.records import MembershipRecord, PaymentRecord

JSON = dict[str, Any]

#: The `Api-Version-Date` values the simulator accepts; anything else is a 400.
SUPPORTED_VERSIONS = ("2026-09-29", "2026-10-15-1")
#: The pin that "pinned" webhooks carry (`api_version_date` in the envelope).
WEBHOOK_PIN = "2026-09-29"

_CURRENCY_SYMBOLS = {"usd": "$", "eur": "€", "gbp": "£"}
_ERROR_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    402: "payment_required",
    403: "forbidden",
    404: "not_found",
    409: "conflict",
    422: "unprocessable_entity",
    429: "rate_limited",
    500: "internal_server_error",
    503: "service_unavailable",
    504: "gateway_timeout",
}


def iso(moment: datetime | None) -> str | None:
    """ISO-8601 UTC with milliseconds and a `Z` suffix, like Whop's timestamps."""
    if moment is None:
        return None
    text = moment.astimezone(UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def error_type(status: int) -> str:
    """Whop's machine-readable error `type` for an HTTP status."""
    return _ERROR_TYPES.get(status, "bad_request" if status < 500 else "internal_server_error")


def error_body(status: int, message: str, code: str | None = None) -> JSON:
    """Whop's v1 error body: `{"error": {"type", "message", "code"?}}`."""
    error: JSON = {"type": error_type(status), "message": message}
    if code is not None:
        error["code"] = code
    return {"error": error}


def money(amount: Decimal, currency: str) -> JSON:
    """A versioned Money object with a string amount."""
    return {
        "amount": f"{amount:.2f}",
        "currency": currency,
        "decimals": 2,
        "display_decimals": 2,
    }


def formatted_price(amount: Decimal, currency: str) -> str:
    """A legacy formatted price such as `$25.00`."""
    symbol = _CURRENCY_SYMBOLS.get(currency)
    if symbol is None:
        return f"{amount:.2f} {currency.upper()}"
    return f"{symbol}{amount:.2f}"


def _avatar(user_id: str) -> str:
    return f"https://example.invalid/avatars/{user_id}.png"


def _email(m: MembershipRecord) -> str | None:
    """The buyer's email, or None when Whop does not tell it (no member:email:read)."""
    return m.user.email if m.user.email_visible else None


def legacy_membership(m: MembershipRecord) -> JSON:
    """The legacy membership object (fixture membership.activated.legacy.json `data`)."""
    recurring = m.billing_period_days is not None
    return {
        "id": m.id,
        "status": m.status,
        "created_at": iso(m.created_at),
        "joined_at": iso(m.created_at),
        "updated_at": iso(m.updated_at),
        "manage_url": f"https://whop.com/billing/manage/{m.id}",
        "member": {"id": m.member_id},
        "user": {
            "id": m.user.id,
            "username": m.user.username,
            "name": m.user.name,
            "email": _email(m),
            "profile_pic": _avatar(m.user.id),
        },
        "renewal_period_start": iso(m.created_at) if recurring else None,
        "renewal_period_end": iso(m.period_end),
        "cancel_at_period_end": m.cancel_at_period_end,
        "cancel_option": None,
        "cancelation_status": m.cancelation_status,
        "cancellation_reason": m.cancellation_reason,
        "canceled_at": iso(m.canceled_at),
        "feedback_option": None,
        "currency": m.currency,
        "initial_price_paid": formatted_price(m.amount, m.currency),
        "formatted_renewal_price": (
            f"{formatted_price(m.amount, m.currency)} every {m.billing_period_days} days"
            if recurring
            else None
        ),
        "checkout_configuration_id": m.checkout_configuration_id,
        "company": {"id": m.company.id, "title": m.company.title},
        "plan": {"id": m.plan_id, "metadata": {}},
        "promo_code": None,
        "product": {"id": m.product_id, "title": m.product_title, "metadata": {}},
        "license_key": None,
        "metadata": dict(m.metadata),
        "payment_collection_paused": False,
        "custom_field_responses": [],
    }


def versioned_membership(m: MembershipRecord) -> JSON:
    """The versioned membership object (fixture membership.updated.pinned.canceled.json `data`)."""
    recurring = m.billing_period_days is not None
    return {
        "id": m.id,
        "status": m.status,
        "created_at": iso(m.created_at),
        "updated_at": iso(m.updated_at),
        "account": {
            "id": m.company.id,
            "route": m.company.route,
            "title": m.company.title,
            "logo_url": None,
        },
        "user_id": m.user.id,
        "member_id": m.member_id,
        "member": None,
        "plan_id": m.plan_id,
        "product_id": m.product_id,
        "product": {"id": m.product_id, "title": m.product_title, "logo_url": None},
        "promo_code_id": None,
        "affiliate": None,
        "initial_price": money(m.amount, m.currency),
        "renewal_price": money(m.amount, m.currency) if recurring else None,
        "billing_period_days": m.billing_period_days,
        "collection_method": "charge_automatically" if recurring else None,
        "current_period_start": iso(m.created_at),
        "current_period_end": iso(m.period_end),
        "expires_at": None,
        "cancel_at_period_end": m.cancel_at_period_end,
        "canceled_at": iso(m.canceled_at),
        "cancellation_reason": m.cancellation_reason,
        "cancel_option": None,
        "feedback_option": None,
        "most_recent_action": m.most_recent_action,
        "most_recent_action_at": iso(m.most_recent_action_at),
        "split_pay_current_payments": None,
        "split_pay_required_payments": None,
        "license_key": None,
        "manage_url": None,
        "phone_number": None,
        "metadata": dict(m.metadata),
    }


def membership(m: MembershipRecord, *, versioned: bool) -> JSON:
    """The membership in the requested shape."""
    return versioned_membership(m) if versioned else legacy_membership(m)


def legacy_payment(p: PaymentRecord) -> JSON:
    """The legacy payment object (fixture payment.succeeded.legacy.json `data`)."""
    m = p.membership
    amount, after_fees = float(m.amount), float(m.amount - p.fee)
    return {
        "id": p.id,
        "status": "paid",
        "substatus": p.substatus,
        "billing_reason": m.billing_reason,
        "created_at": iso(p.created_at),
        "paid_at": iso(p.paid_at),
        "updated_at": iso(p.updated_at),
        "currency": m.currency,
        "subtotal": amount,
        "total": amount,
        "usd_total": amount,
        "settlement_amount": amount,
        "settlement_currency": m.currency,
        "settlement_exchange_rate": None,
        "amount_after_fees": after_fees,
        "tax_amount": 0.0,
        "tax_refunded_amount": 0.0,
        "tax_behavior": None,
        "refunded_amount": float(p.refunded_amount),
        "refunded_at": iso(p.refunded_at),
        "refundable": True,
        "retryable": False,
        "voidable": False,
        "auto_refunded": False,
        "three_ds_verified": False,
        "payments_failed": 0,
        "failure_message": None,
        "decline_code": None,
        "last_payment_attempt": iso(p.paid_at),
        "next_payment_attempt": None,
        "dispute_alerted_at": None,
        "payment_method_type": "card",
        "card_brand": "visa",
        "card_last4": "4242",
        "checkout_configuration_id": m.checkout_configuration_id,
        "metadata": dict(m.metadata),
        "company": {"id": m.company.id, "title": m.company.title, "route": m.company.route},
        "member": {"id": m.member_id, "phone": None},
        "membership": (
            None if p.hide_membership_id else {"id": m.id, "status": m.status, "phone_number": None}
        ),
        "user": {
            "id": m.user.id,
            "username": m.user.username,
            "name": m.user.name,
            "email": _email(m),
        },
        "plan": {"id": m.plan_id, "internal_notes": None, "metadata": {}},
        "product": {
            "id": m.product_id,
            "title": m.product_title,
            "route": m.product_route,
            "metadata": {},
        },
        "promo_code": None,
        "billing_address": {
            "name": m.user.name,
            "line1": None,
            "line2": None,
            "city": None,
            "state": None,
            "postal_code": None,
            "country": "US",
        },
        "shipping_address": None,
        "payment_method": None,
        "application_fee": None,
        "fees": [],
        "refunds": [],
        "disputes": [],
        "resolutions": [],
        "financing_transactions": [],
        "financing_installments_count": None,
        "risk_score": 12,
        "risk_signals": None,
    }


def _icons(kind: str) -> JSON:
    base = f"https://example.invalid/icons/visa-{kind}"
    return {
        tone: {
            "svg": f"{base}-{tone}.svg",
            "png_1x": f"{base}-{tone}@1x.png",
            "png_2x": f"{base}-{tone}@2x.png",
            "png_4x": f"{base}-{tone}@4x.png",
        }
        for tone in ("light", "dark")
    }


def versioned_payment(p: PaymentRecord) -> JSON:
    """The versioned payment object (fixture payment.succeeded.pinned.json `data`)."""
    m = p.membership
    total = money(m.amount, m.currency)
    return {
        "id": p.id,
        "account_id": m.company.id,
        "status": "paid",
        "substatus": p.substatus,
        "billing_reason": m.billing_reason,
        "created_at": iso(p.created_at),
        "paid_at": iso(p.paid_at),
        "updated_at": iso(p.updated_at),
        "currency": m.currency,
        "subtotal": total,
        "total": dict(total),
        "usd_total": dict(total),
        "presentment_total": dict(total),
        "amount_after_fees": money(m.amount - p.fee, m.currency),
        "tax_amount": None,
        "tax_behavior": None,
        "tax_refunded_amount": money(Decimal("0"), m.currency),
        "refunded_amount": money(p.refunded_amount, m.currency) if p.refunded_amount else None,
        "refunded_at": iso(p.refunded_at),
        "refundable": True,
        "retryable": False,
        "voidable": False,
        "auto_refunded": False,
        "three_ds_verified": False,
        "payments_failed": 0,
        "failure_message": None,
        "decline_code": None,
        "last_payment_attempt_at": iso(p.paid_at),
        "next_payment_attempt_at": None,
        "checkout_configuration_id": m.checkout_configuration_id,
        "metadata": dict(m.metadata),
        "customer_email": _email(m),
        "customer_phone": None,
        "member_id": m.member_id,
        "membership_id": None if p.hide_membership_id else m.id,
        "plan_id": m.plan_id,
        "product_id": m.product_id,
        "promo_code_id": None,
        "payment_method_id": None,
        "payment_method_type": "card",
        "payment_instrument": {
            "payment_method_type": "card",
            "display_name": "Visa •••• 4242",
            "installment_count": None,
            "card": {
                "brand": "visa",
                "last4": "4242",
                "exp_month": 12,
                "exp_year": 2030,
                "issuer_identification_number": "424242",
            },
            "icons": {"card": _icons("card"), "square": _icons("square")},
        },
        "user": {
            "id": m.user.id,
            "username": m.user.username,
            "name": m.user.name,
            "profile_picture": {"url": _avatar(m.user.id)},
        },
        "line_items": [
            {
                "id": p.line_item_id,
                "label": m.product_title,
                "plan_id": m.plan_id,
                "plan_title": m.plan_title,
                "product_id": m.product_id,
                "product_title": m.product_title,
                "quantity": 1,
                "sku": None,
                "subtotal": dict(total),
            }
        ],
        "holds": [],
        "payment_rule_matches": [],
        "billing_address": None,
        "shipping_address": None,
        "shipment_id": None,
        "needs_tracking": None,
        "quote_id": None,
        "recovery_url": None,
        "settlement_time_at": None,
        "risk_score": 12,
        "risk_signals": None,
        "ip_address": "203.0.113.10",
    }


def payment(p: PaymentRecord, *, versioned: bool) -> JSON:
    """The payment in the requested shape."""
    return versioned_payment(p) if versioned else legacy_payment(p)


def envelope(
    *,
    msg_id: str,
    event_type: str,
    pinned: bool,
    company_id: str,
    timestamp: datetime,
    data: JSON,
    previous_attributes: JSON | None = None,
) -> JSON:
    """A v1 webhook envelope (WHOP.md §5.4): legacy uses `company_id`, pinned `account_id`."""
    body: JSON = {
        "id": msg_id,
        "api_version": "v1",
        "api_version_date": WEBHOOK_PIN if pinned else None,
        "timestamp": iso(timestamp),
        "type": event_type,
        ("account_id" if pinned else "company_id"): company_id,
    }
    if previous_attributes is not None:
        body["previous_attributes"] = previous_attributes
    body["data"] = data
    return body
