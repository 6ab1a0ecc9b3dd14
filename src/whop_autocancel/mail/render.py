"""Email templates (Jinja2): every email has a plain-text and an HTML part.

Customer emails (`delivery_*`) can be overridden by the merchant: `EMAIL_TEMPLATES_DIR` is
searched first, the package's templates after. Admin emails always use the package's."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from jinja2 import (
    BaseLoader,
    ChoiceLoader,
    Environment,
    FileSystemLoader,
    PackageLoader,
    StrictUndefined,
    TemplateError,
    TemplateSyntaxError,
    select_autoescape,
)

from whop_autocancel.errors import ConfigurationError

_COMMON_SAMPLE: dict[str, Any] = {
    "subject": "Your purchase: Sample",
    "plan_name": "Sample",
    "order_id": "ord_sample",
    "email": "buyer@example.com",
    "message": "Thank you for your purchase.",
    "link": "https://example.com/download",
    "support_email": "support@example.com",
}
OPTIONAL = ("link", "support_email")  # None when the merchant did not set them
# The customer templates and what each may use: an override is rendered with it at start-up,
# so a typo stops the service instead of mailing customers a broken email.
CUSTOMER_TEMPLATES: dict[str, dict[str, Any]] = {
    "delivery_message": _COMMON_SAMPLE,
    "delivery_stock": {**_COMMON_SAMPLE, "item": "user@example.com:correct-horse-battery"},
}


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    text: str
    html: str


def _blank_if_none(value: Any) -> Any:
    """An optional value that is not set prints as nothing, never as "None"."""
    return "" if value is None else value


def _environment_with(loader: BaseLoader) -> Environment:
    return Environment(
        loader=loader,
        autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined,
        finalize=_blank_if_none,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        # Templates are read once: an edit to an override takes effect at the next start, after
        # the start-up check, never half-checked in a running process.
        auto_reload=False,
    )


@cache
def _environment() -> Environment:
    return _environment_with(PackageLoader("whop_autocancel", "mail/templates"))


class EmailTemplates:
    """Renders emails from the package's templates, or the merchant's overrides first."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        if directory is None:
            self._environment = _environment()
        else:
            self._environment = _environment_with(
                ChoiceLoader(
                    [
                        FileSystemLoader(directory),
                        PackageLoader("whop_autocancel", "mail/templates"),
                    ]
                )
            )

    def render(self, template: str, subject: str, **context: Any) -> RenderedEmail:
        """Render `template.txt` and `template.html` with the same context."""
        context = {"subject": subject, **context}
        return RenderedEmail(
            subject=subject,
            text=self._environment.get_template(f"{template}.txt").render(context),
            html=self._environment.get_template(f"{template}.html").render(context),
        )

    def check(self) -> None:
        """Render every customer template once; a broken override is a `ConfigurationError`
        naming the file and line."""
        if self.directory is None:
            return
        for template, full in CUSTOMER_TEMPLATES.items():
            bare = {**full, **dict.fromkeys(OPTIONAL, None), "message": ""}
            for suffix, sample in itertools.product(("txt", "html"), (full, bare)):
                name = f"{template}.{suffix}"
                try:
                    self._environment.get_template(name).render(sample)
                except TemplateSyntaxError as error:
                    where = error.filename or name
                    raise ConfigurationError(
                        f"EMAIL_TEMPLATES_DIR: {where}:{error.lineno}: {error.message}"
                    ) from None
                except TemplateError as error:
                    raise ConfigurationError(
                        f"EMAIL_TEMPLATES_DIR: {name}: {error.message} ({template} may use: "
                        f"{', '.join(sorted(sample))})"
                    ) from None


def render_email(template: str, subject: str, **context: Any) -> RenderedEmail:
    """Render one of the package's own templates (admin emails, alerts)."""
    return PACKAGE_TEMPLATES.render(template, subject, **context)


PACKAGE_TEMPLATES = EmailTemplates()
