"""Render plans and checkout configurations as Whop JSON (WHOP.md §6).

The versioned shapes carry every field that whop-sdk 2.6's `Plan` and
`CreateCheckoutConfigurationsResponse` require. SDK 2.6 has no legacy plan model: the legacy
shapes follow the legacy membership's conventions (`company{id,title}` instead of `account`,
`company_id` instead of `account_id`) and are otherwise the same.
"""

from __future__ import annotations

from decimal import Decimal

from whop_autocancel.simulator.records import CheckoutConfigurationRecord, PlanRecord
from whop_autocancel.simulator.shapes import JSON, formatted_price, iso, money


def _prices(plan: PlanRecord) -> tuple[Decimal, Decimal]:
    """(initial, renewal): a one-time plan charges once, a renewal plan every period."""
    if plan.plan_type == "one_time":
        return plan.amount, Decimal("0")
    return Decimal("0"), plan.amount


def plan_summary(plan: PlanRecord) -> JSON:
    """The plan as embedded in a checkout configuration."""
    initial, renewal = _prices(plan)
    return {
        "id": plan.id,
        "plan_type": plan.plan_type,
        "release_method": "buy_now",
        "visibility": "visible",
        "currency": plan.currency,
        "initial_price": float(initial),
        "renewal_price": float(renewal),
        "billing_period": plan.billing_period_days,
        "expiration_days": None,
        "trial_period_days": None,
        "adaptive_pricing_enabled": False,
        "three_ds_level": None,
    }


def plan(record: PlanRecord, *, versioned: bool, purchase_url: str, member_count: int = 0) -> JSON:
    """The plan in the requested shape (`GET /plans/{id}`)."""
    initial, renewal = _prices(record)
    price = formatted_price(record.amount, record.currency)
    body: JSON = {
        "id": record.id,
        "title": record.title,
        "description": None,
        "plan_type": record.plan_type,
        "release_method": "buy_now",
        "visibility": "visible",
        "currency": record.currency,
        "initial_price": float(initial),
        "initial_price_due": money(initial, record.currency),
        "renewal_price": float(renewal),
        "formatted_price": price if record.plan_type == "one_time" else f"{price} / month",
        "billing_period": record.billing_period_days,
        "expiration_days": None,
        "trial_period_days": None,
        "adaptive_pricing_enabled": False,
        "collect_tax": False,
        "tax_type": "unspecified",
        "three_ds_level": None,
        "unlimited_stock": True,
        "stock": None,
        "member_count": member_count,
        "deletable": member_count == 0,
        "internal_notes": None,
        "metadata": {},
        "custom_fields": [],
        "sku": None,
        "split_pay_required_payments": None,
        "strike_through_initial_price": None,
        "strike_through_renewal_price": None,
        "offer_cancel_discount": False,
        "cancel_discount_intervals": None,
        "cancel_discount_percentage": None,
        "checkout_styling": None,
        "image": None,
        "invoice": None,
        "payment_method_configuration": None,
        "purchase_url": purchase_url,
        "product": {"id": record.product_id, "title": record.product_title},
        "created_at": iso(record.created_at),
        "updated_at": iso(record.updated_at),
    }
    company = {"id": record.company.id, "title": record.company.title}
    if versioned:
        body["account"] = company
    else:
        body["company"] = company
    return body


def checkout_configuration(config: CheckoutConfigurationRecord, *, versioned: bool) -> JSON:
    """The checkout configuration in the requested shape (`POST /checkout_configurations`)."""
    body: JSON = {"id": config.id}
    body["account_id" if versioned else "company_id"] = config.company.id
    body.update(
        {
            "plan": plan_summary(config.plan),
            "metadata": dict(config.metadata),
            "redirect_url": config.redirect_url,
            "mode": config.mode,
            "purchase_url": config.purchase_url,
            "affiliate_code": None,
            "currency": None,
            "three_ds_level": None,
            "payment_method_configuration": None,
            "effective_payment_method_configuration": None,
            "created_at": iso(config.created_at),
            "updated_at": iso(config.updated_at),
        }
    )
    return body
