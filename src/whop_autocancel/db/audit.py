"""The audit table: every admin action (who, when, what, on which purchase, with what outcome),
written in the transaction of the action itself. Shown on the purchase's timeline."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Integer, String, Text
from sqlalchemy.orm import Mapped, Session, mapped_column

from whop_autocancel.db.base import Base, UTCDateTime


class AdminAction(Base):
    __tablename__ = "admin_actions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    actor: Mapped[str] = mapped_column(String(200))  # `cli:<user>@<host>`, `web:<client>`
    action: Mapped[str] = mapped_column(String(50))  # `cancellation.retry`, `event.replay`, …
    target: Mapped[str] = mapped_column(String(255))  # the id acted on
    order_id: Mapped[str | None] = mapped_column(String(40), index=True, default=None)
    outcome: Mapped[str] = mapped_column(String(20))  # `done` or `refused`
    detail: Mapped[str] = mapped_column(Text, default="")  # one line; never a secret


def record_action(
    session: Session,
    *,
    at: datetime,
    actor: str,
    action: str,
    target: str,
    order_id: str | None,
    outcome: str,
    detail: str = "",
) -> AdminAction:
    row = AdminAction(
        at=at,
        actor=actor[:200],
        action=action[:50],
        target=target[:255],
        order_id=order_id,
        outcome=outcome[:20],
        detail=detail[:2000],
    )
    session.add(row)
    return row
