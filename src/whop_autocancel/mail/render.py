"""Email templates (Jinja2): every email has a plain-text and an HTML part."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    text: str
    html: str


@cache
def _environment() -> Environment:
    return Environment(
        loader=PackageLoader("whop_autocancel", "mail/templates"),
        autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render_email(template: str, subject: str, **context: Any) -> RenderedEmail:
    """Render `template.txt` and `template.html` with the same context."""
    environment = _environment()
    context = {"subject": subject, **context}
    return RenderedEmail(
        subject=subject,
        text=environment.get_template(f"{template}.txt").render(context),
        html=environment.get_template(f"{template}.html").render(context),
    )
