"""The simulator's records and how purchases, plans and checkout configurations create them.

No locking and no webhooks here: `Simulator` calls these methods while holding its lock and
sends the webhooks itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from whop_autocancel.simulator.records import (
    PLAN_TYPES,
    RENEWAL_PERIOD_DAYS,
    CheckoutConfigurationRecord,
    Company,
    MembershipRecord,
    PaymentRecord,
    PlanRecord,
    PlanType,
    Shape,
    UserRecord,
    new_id,
    now,
)

DEFAULT_AMOUNT = "25.00"
DEFAULT_CURRENCY = "usd"
#: Where purchase URLs point until the HTTP server knows its own address.
DEFAULT_PUBLIC_URL = "https://whop.com"


def parse_amount(amount: str) -> Decimal:
    """A price such as `25` or `9.5` as a two-decimal amount; ValueError otherwise."""
    try:
        price = Decimal(amount).quantize(Decimal("0.01"))
    except InvalidOperation as exc:
        raise ValueError(f"amount must be a decimal string, not {amount!r}") from exc
    if not price.is_finite() or price < 0:
        raise ValueError(f"amount must not be negative, not {amount!r}")
    return price


@dataclass(frozen=True)
class PurchaseSpec:
    """What a buyer paid for; `Store.purchase` turns it into a membership and a payment."""

    plan: PlanRecord
    product_id: str
    email: str | None
    billing_reason: str
    shape: Shape
    metadata: dict[str, Any]
    checkout_configuration_id: str | None
    amount: Decimal
    currency: str
    payment_has_membership_id: bool
    at: datetime | None = None  # when the buyer paid (None: now); the past for old sales
    email_visible: bool = True


class Store:
    """Memberships, payments, plans and checkout configurations, by id."""

    def __init__(self, company: Company, clock: Callable[[], datetime] | None = None) -> None:
        self.company = company
        self.clock = clock
        self.public_url = DEFAULT_PUBLIC_URL
        self.memberships: dict[str, MembershipRecord] = {}
        self.payments: dict[str, PaymentRecord] = {}
        self.plans: dict[str, PlanRecord] = {}
        self.checkout_configurations: dict[str, CheckoutConfigurationRecord] = {}
        self._seq = 0

    def now(self) -> datetime:
        """The simulator's time: its clock's (a test's frozen clock), else the wall clock."""
        return now(self.clock)

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def clear(self) -> None:
        """Forget memberships, payments and checkout configurations; plans stay (catalog)."""
        self.memberships.clear()
        self.payments.clear()
        self.checkout_configurations.clear()

    def purchase_url(self, record_id: str) -> str:
        """Where a buyer would go to buy a plan or a checkout configuration."""
        return f"{self.public_url}/checkout/{record_id}"

    def member_count(self, plan_id: str) -> int:
        return sum(1 for m in self.memberships.values() if m.plan_id == plan_id)

    # ----- plans and checkout configurations -------------------------------------------------

    def create_plan(
        self,
        plan_id: str,
        plan_type: PlanType,
        *,
        product_id: str | None = None,
        title: str | None = None,
        amount: Decimal | None = None,
        currency: str | None = None,
    ) -> PlanRecord:
        """Create the plan, or redefine it in place (keeping its id, product and creation time)."""
        if plan_type not in PLAN_TYPES:
            raise ValueError(f"plan_type must be one of {', '.join(PLAN_TYPES)}, not {plan_type!r}")
        if not plan_id:
            raise ValueError("plan_id must not be empty")
        moment = self.now()
        old = self.plans.get(plan_id)
        plan = PlanRecord(
            seq=old.seq if old else self.next_seq(),
            id=plan_id,
            plan_type=plan_type,
            product_id=product_id or (old.product_id if old else new_id("prod_", 13)),
            product_title=old.product_title if old else "Sim Product",
            title=title or ("Lifetime" if plan_type == "one_time" else "Monthly"),
            amount=amount if amount is not None else parse_amount(DEFAULT_AMOUNT),
            currency=(currency or DEFAULT_CURRENCY).lower(),
            company=self.company,
            created_at=old.created_at if old else moment,
            updated_at=moment,
        )
        self.plans[plan_id] = plan
        return plan

    def plan_for_purchase(
        self,
        plan_id: str,
        billing_reason: str,
        *,
        product_id: str | None,
        amount: Decimal | None,
        currency: str | None,
    ) -> PlanRecord:
        """The known plan, or a new one whose type follows the purchase's billing reason."""
        plan = self.plans.get(plan_id)
        if plan is not None:
            return plan
        plan_type: PlanType = "one_time" if billing_reason == "one_time" else "renewal"
        return self.create_plan(
            plan_id, plan_type, product_id=product_id, amount=amount, currency=currency
        )

    def create_checkout_configuration(
        self,
        plan: PlanRecord,
        *,
        metadata: dict[str, Any],
        redirect_url: str | None,
        mode: str = "payment",
    ) -> CheckoutConfigurationRecord:
        moment = self.now()
        config_id = new_id("ch_", 16)
        config = CheckoutConfigurationRecord(
            seq=self.next_seq(),
            id=config_id,
            plan=plan,
            metadata=dict(metadata),
            redirect_url=redirect_url,
            mode=mode,
            purchase_url=self.purchase_url(config_id),
            company=self.company,
            created_at=moment,
            updated_at=moment,
        )
        self.checkout_configurations[config_id] = config
        return config

    # ----- purchases -------------------------------------------------------------------------

    def purchase(self, spec: PurchaseSpec) -> PaymentRecord:
        """A buyer paid (now, or at `spec.at`): a new user, member, membership and payment."""
        moment = spec.at or self.now()
        local = (spec.email or "buyer@example.com").split("@", 1)[0]
        user_id = new_id("user_")
        user = UserRecord(
            id=user_id,
            username=f"{local.lower()}{user_id[-4:].lower()}",
            name=local.replace(".", " ").title(),
            email=spec.email or f"buyer-{user_id[5:].lower()}@example.com",
            email_visible=spec.email_visible,
        )
        one_time = spec.billing_reason == "one_time"
        plan = spec.plan
        membership = MembershipRecord(
            id=new_id("mem_"),
            status="completed" if one_time else "active",
            shape=spec.shape,
            user=user,
            member_id=new_id("mber_", 12),
            company=self.company,
            plan_id=plan.id,
            product_id=spec.product_id,
            product_title=plan.product_title,
            product_route="sim-product",
            amount=spec.amount,
            currency=spec.currency,
            billing_reason=spec.billing_reason,
            metadata=dict(spec.metadata),
            checkout_configuration_id=spec.checkout_configuration_id,
            created_at=moment - timedelta(milliseconds=30),
            updated_at=moment,
            billing_period_days=None if one_time else RENEWAL_PERIOD_DAYS,
            period_end=None if one_time else moment + timedelta(days=RENEWAL_PERIOD_DAYS),
            plan_title=plan.title,
            seq=self.next_seq(),
        )
        payment = PaymentRecord(
            id=new_id("pay_"),
            membership=membership,
            created_at=moment - timedelta(seconds=2),
            paid_at=moment - timedelta(milliseconds=50),
            updated_at=moment,
            fee=(spec.amount * Decimal("0.0488") + Decimal("0.30")).quantize(Decimal("0.01")),
            line_item_id=new_id("li_", 13),
            hide_membership_id=not spec.payment_has_membership_id,
            seq=self.next_seq(),
        )
        self.memberships[membership.id] = membership
        self.payments[payment.id] = payment
        return payment

    def refund(self, payment_id: str, amount: Decimal | None) -> PaymentRecord:
        """Refund `amount` more of the payment (None: all that is left); KeyError if unknown,
        ValueError past its total."""
        payment = self.payments[payment_id]
        total = payment.membership.amount
        refunded = payment.refunded_amount + (
            amount if amount is not None else total - payment.refunded_amount
        )
        if refunded > total or (amount is not None and amount <= 0):
            raise ValueError(f"a refund must be positive and at most the total {total}")
        moment = self.now()
        payment.refunded_amount, payment.refunded_at, payment.updated_at = refunded, moment, moment
        return payment
