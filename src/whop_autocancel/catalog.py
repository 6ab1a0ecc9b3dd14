"""The merchant's catalog (TOML): the plans they sell as one-time products, and how each is
delivered. Only a listed plan is ever delivered or cancelled (DESIGN §1)."""

from __future__ import annotations

import functools
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import StrictUndefined, Template, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from whop_autocancel.errors import ConfigurationError

_ALLOWED_KEYS = {"name", "delivery", "subject", "message", "link", "cancel", "on_refund"}
_POOL_KEYS = {"low_stock"}
_PLAN_ID = re.compile(r"^plan_[A-Za-z0-9]+$")
POOL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
POOL_NAME_HELP = (
    "a pool name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
)
DEFAULT_LOW_STOCK = 5
ON_REFUND = ("keep", "void")

# Merchant text is a template too ({{ order_id }}, {{ email }}, …): sandboxed, since it is data.
# Strict: a typo such as {{ ordr_id }} stops start-up instead of mailing customers a blank.
_merchant_templates = SandboxedEnvironment(
    autoescape=False, keep_trailing_newline=True, undefined=StrictUndefined
)
_SAMPLE = {"order_id": "ord_sample", "email": "buyer@example.com", "plan_name": "Sample"}


@functools.lru_cache(maxsize=256)
def compiled(source: str) -> Template:
    """A merchant template, compiled once (compiling costs a millisecond or so, each delivery
    renders two; a compiled template is safe to render from many threads)."""
    return _merchant_templates.from_string(source)


@dataclass(frozen=True)
class CatalogPlan:
    plan_id: str
    name: str
    delivery: str  # "message" | "none" | "stock:<pool>"
    subject: str
    message: str
    link: str | None
    cancel: bool
    on_refund: str = "keep"  # stock plans: "void" retires the delivered item on a refund/dispute

    @property
    def method(self) -> str:
        """The delivery method's name without its argument (`stock:keys` → `stock`)."""
        return self.delivery.partition(":")[0]

    @property
    def pool(self) -> str | None:
        """The stock pool this plan delivers from (None for other methods)."""
        method, _, argument = self.delivery.partition(":")
        return argument if method == "stock" else None

    def render_message(self, **context: Any) -> str:
        return compiled(self.message).render(**context)

    def render_subject(self, **context: Any) -> str:
        return compiled(self.subject).render(**context)


@dataclass(frozen=True)
class Catalog:
    path: Path | None
    plans: dict[str, CatalogPlan]
    low_stock: dict[str, int] = field(default_factory=dict)  # per pool, from [pools.<name>]

    def get(self, plan_id: str | None) -> CatalogPlan | None:
        return self.plans.get(plan_id) if plan_id else None

    def is_listed(self, plan_id: str | None) -> bool:
        return self.get(plan_id) is not None

    def stock_pools(self) -> dict[str, list[CatalogPlan]]:
        """Every pool a plan delivers from, with those plans."""
        pools: dict[str, list[CatalogPlan]] = {}
        for plan in self.plans.values():
            if plan.pool is not None:
                pools.setdefault(plan.pool, []).append(plan)
        return pools

    def low_stock_threshold(self, pool: str) -> int:
        """Alert when a pool has this many available items or fewer."""
        return self.low_stock.get(pool, DEFAULT_LOW_STOCK)


def load_catalog(path: Path, known_methods: frozenset[str]) -> Catalog:
    """Read and check the catalog; any problem is one `ConfigurationError` with file:line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigurationError(
            f"CATALOG_PATH: {path} does not exist (copy catalog.example.toml and list your plans)"
        ) from None
    except OSError as error:
        raise ConfigurationError(f"CATALOG_PATH: cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigurationError(
            f"{path}: is not UTF-8 (byte {error.start}); save the catalog as UTF-8"
        ) from None
    return parse_catalog(text, known_methods, path)


def parse_catalog(text: str, known_methods: frozenset[str], path: Path | None = None) -> Catalog:
    where = str(path) if path else "catalog"
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        found = re.search(r"\(at line (\d+), column \d+\)", str(error))
        line = found.group(1) if found else "1"
        raise ConfigurationError(f"{where}:{line}: invalid TOML: {error}") from None

    unknown_top = set(document) - {"plans", "pools"}
    if unknown_top:
        name = sorted(unknown_top)[0]
        raise ConfigurationError(
            f"{where}:{_line_of(text, name)}: unknown top-level key {name!r} "
            "(expected [plans.…] or [pools.…])"
        )
    raw_plans = document.get("plans", {})
    if not isinstance(raw_plans, dict):
        raise ConfigurationError(f"{where}:{_line_of(text, 'plans')}: 'plans' must be a table")
    plans: dict[str, CatalogPlan] = {}
    for plan_id, entry in raw_plans.items():
        line = _line_of(text, plan_id)
        try:
            plans[plan_id] = _parse_plan(plan_id, entry, known_methods)
        except ValueError as error:
            raise ConfigurationError(f"{where}:{line}: plan {plan_id}: {error}") from None
    return Catalog(path=path, plans=plans, low_stock=_parse_pools(document, text, where))


def _parse_pools(document: dict[str, Any], text: str, where: str) -> dict[str, int]:
    raw_pools = document.get("pools", {})
    if not isinstance(raw_pools, dict):
        raise ConfigurationError(f"{where}:{_line_of(text, 'pools')}: 'pools' must be a table")
    thresholds: dict[str, int] = {}
    for pool, entry in raw_pools.items():
        line = _line_of(text, pool)
        if not POOL_NAME.match(pool):
            raise ConfigurationError(f"{where}:{line}: pool {pool!r}: {POOL_NAME_HELP}")
        if not isinstance(entry, dict):
            raise ConfigurationError(f"{where}:{line}: pool {pool}: must be a table")
        unknown = set(entry) - _POOL_KEYS
        if unknown:
            raise ConfigurationError(
                f"{where}:{line}: pool {pool}: unknown key {sorted(unknown)[0]!r} "
                f"(allowed: {', '.join(sorted(_POOL_KEYS))})"
            )
        threshold = entry.get("low_stock", DEFAULT_LOW_STOCK)
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
            raise ConfigurationError(
                f"{where}:{line}: pool {pool}: low_stock must be a whole number ≥ 0"
            )
        thresholds[pool] = threshold
    return thresholds


def _parse_plan(plan_id: str, entry: Any, known_methods: frozenset[str]) -> CatalogPlan:
    if not _PLAN_ID.match(plan_id):
        raise ValueError("the table name must be a Whop plan id such as plan_Bq2Wx9Zt4KmNr")
    if not isinstance(entry, dict):
        raise ValueError("must be a table")
    unknown = set(entry) - _ALLOWED_KEYS
    if unknown:
        raise ValueError(
            f"unknown key {sorted(unknown)[0]!r} (allowed: {', '.join(sorted(_ALLOWED_KEYS))})"
        )
    delivery = entry.get("delivery")
    if not isinstance(delivery, str) or not delivery:
        raise ValueError('needs delivery = "message", "none" or "stock:<pool>"')
    method, colon, pool = delivery.partition(":")
    if method not in known_methods:
        raise ValueError(
            f"unknown delivery method {delivery!r} (known: {', '.join(sorted(known_methods))})"
        )
    if method == "stock" and not POOL_NAME.match(pool):
        raise ValueError(f'delivery = "stock:<pool>" needs a pool name: {POOL_NAME_HELP}')
    if method != "stock" and colon:
        raise ValueError(f"delivery method {method!r} takes no ':' argument")
    on_refund = entry.get("on_refund", "keep")
    if on_refund not in ON_REFUND:
        raise ValueError('on_refund must be "keep" or "void"')
    if on_refund == "void" and method != "stock":
        raise ValueError('on_refund = "void" applies to stock plans only (nothing to void)')
    name = _string(entry, "name", plan_id)
    message = _string(entry, "message", "")
    if delivery == "message" and not message.strip():
        raise ValueError('delivery = "message" needs a message = "…" text for the customer')
    subject = _string(entry, "subject", f"Your purchase: {name}")
    link = entry.get("link")
    if link is not None and (
        not isinstance(link, str) or not link.startswith(("https://", "http://"))
    ):
        raise ValueError("link must be an http(s) URL")
    cancel = entry.get("cancel", True)
    if not isinstance(cancel, bool):
        raise ValueError("cancel must be true or false")
    for key, template in (("message", message), ("subject", subject)):
        try:  # compile and render once: unknown filters and names fail now, not per order
            compiled(template).render(**{**_SAMPLE, "plan_name": name})
        except TemplateError as error:
            raise ValueError(f"{key} is not a valid template: {error.message}") from None
    return CatalogPlan(
        plan_id=plan_id,
        name=name,
        delivery=delivery,
        subject=subject,
        message=message,
        link=link,
        cancel=cancel,
        on_refund=on_refund,
    )


def _string(entry: dict[str, Any], key: str, default: str) -> str:
    value = entry.get(key, default)
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string")
    return value


def _line_of(text: str, name: str) -> int:
    """The 1-based line of the table header that names `name`, else of a key of that name
    (1 if neither is found)."""
    quoted = rf"[\"']?{re.escape(name)}[\"']?"
    header = re.compile(rf"^\s*\[\s*(plans\s*\.\s*)?{quoted}\s*[\].]")
    for number, line in enumerate(text.splitlines(), start=1):
        if header.search(line):
            return number
    pattern = re.compile(rf"^\s*{quoted}\s*[.=]")
    for number, line in enumerate(text.splitlines(), start=1):
        if pattern.search(line):
            return number
    return 1
