"""The merchant's catalog (TOML): the plans they sell as one-time products, and how each is
delivered. Only a listed plan is ever delivered or cancelled (DESIGN §1)."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from whop_autocancel.errors import ConfigurationError

_ALLOWED_KEYS = {"name", "delivery", "subject", "message", "link", "cancel"}
_PLAN_ID = re.compile(r"^plan_[A-Za-z0-9]+$")

# Merchant text is a template too ({{ order_id }}, {{ email }}, …): sandboxed, since it is data.
# Strict: a typo such as {{ ordr_id }} stops start-up instead of mailing customers a blank.
_merchant_templates = SandboxedEnvironment(
    autoescape=False, keep_trailing_newline=True, undefined=StrictUndefined
)
_SAMPLE = {"order_id": "ord_sample", "email": "buyer@example.com", "plan_name": "Sample"}


@dataclass(frozen=True)
class CatalogPlan:
    plan_id: str
    name: str
    delivery: str  # "message" | "none" (later: "stock:<pool>")
    subject: str
    message: str
    link: str | None
    cancel: bool

    @property
    def method(self) -> str:
        """The delivery method's name without its argument (`stock:keys` → `stock`)."""
        return self.delivery.partition(":")[0]

    def render_message(self, **context: Any) -> str:
        return _merchant_templates.from_string(self.message).render(**context)

    def render_subject(self, **context: Any) -> str:
        return _merchant_templates.from_string(self.subject).render(**context)


@dataclass(frozen=True)
class Catalog:
    path: Path | None
    plans: dict[str, CatalogPlan]

    def get(self, plan_id: str | None) -> CatalogPlan | None:
        return self.plans.get(plan_id) if plan_id else None

    def is_listed(self, plan_id: str | None) -> bool:
        return self.get(plan_id) is not None


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

    unknown_top = set(document) - {"plans"}
    if unknown_top:
        name = sorted(unknown_top)[0]
        raise ConfigurationError(
            f"{where}:{_line_of(text, name)}: unknown top-level key {name!r} (expected [plans.…])"
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
    return Catalog(path=path, plans=plans)


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
        raise ValueError('needs delivery = "message" or "none"')
    if delivery.partition(":")[0] not in known_methods:
        raise ValueError(
            f"unknown delivery method {delivery!r} (known: {', '.join(sorted(known_methods))})"
        )
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
    for field, template in (("message", message), ("subject", subject)):
        try:  # compile and render once: unknown filters and names fail now, not per order
            _merchant_templates.from_string(template).render(**{**_SAMPLE, "plan_name": name})
        except TemplateError as error:
            raise ValueError(f"{field} is not a valid template: {error.message}") from None
    return CatalogPlan(
        plan_id=plan_id,
        name=name,
        delivery=delivery,
        subject=subject,
        message=message,
        link=link,
        cancel=cancel,
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
