"""The dashboard's pages: Jinja2 templates with autoescape always on, and the headers every
admin response carries."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi.responses import HTMLResponse, Response
from jinja2 import Environment, PackageLoader, StrictUndefined

from whop_autocancel.clock import format_utc

# No inline script or style anywhere: the pages load /admin/static/admin.css and admin.js only.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # not no-referrer: Chromium then sends `Origin: null`
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def secure(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def when(moment: datetime | None) -> str:
    """A stored time as every page, command and JSON document shows it (`clock.format_utc`)."""
    return format_utc(moment) if moment else "-"


def duration(seconds: float | None) -> str:
    """`0.5 s`, `45 s`, `12 min`, `3 h 5 min`, `2 d 4 h`."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 10 and seconds != int(seconds):
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = int(seconds // 60)
    if minutes < 90:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def short(text: str | None, width: int = 140) -> str:
    if not text:
        return "-"
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


class Pages:
    def __init__(self) -> None:
        self.environment = Environment(
            loader=PackageLoader("whop_autocancel.admin.web", "templates"),
            autoescape=True,  # every template is HTML: escape everything not marked safe
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.environment.filters.update(when=when, duration=duration, short=short)

    def render(self, template: str, *, status: int = 200, **context: Any) -> HTMLResponse:
        html = self.environment.get_template(template).render(**context)
        response = HTMLResponse(html, status_code=status)
        secure(response)
        return response
