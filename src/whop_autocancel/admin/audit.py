"""Who did what: every admin operation records itself in the audit table (`db/audit.py`), in
the transaction that does it, and shows on the purchase's timeline."""

from __future__ import annotations

import getpass
import socket
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from whop_autocancel.db.audit import AdminAction, record_action

DONE = "done"
REFUSED = "refused"


def cli_actor() -> str:
    """`cli:<os user>@<host>`: who ran a command."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"cli:{user}@{socket.gethostname()}"


def record(
    session: Session,
    *,
    at: datetime,
    actor: str,
    action: str,
    target: str,
    order_id: str | None,
    outcome: str = DONE,
    detail: str = "",
) -> None:
    """Record one admin action. `detail` is one line and never holds a secret."""
    record_action(
        session,
        at=at,
        actor=actor,
        action=action,
        target=target,
        order_id=order_id,
        outcome=outcome,
        detail=" ".join(detail.split()),
    )


def actions_for(session: Session, order_id: str) -> list[AdminAction]:
    return list(
        session.scalars(
            select(AdminAction).where(AdminAction.order_id == order_id).order_by(AdminAction.id)
        )
    )


def recent_actions(session: Session, limit: int = 50) -> list[AdminAction]:
    return list(session.scalars(select(AdminAction).order_by(AdminAction.id.desc()).limit(limit)))
