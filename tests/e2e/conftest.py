"""End-to-end runs use a diagonal of (database, queue) pairs so CI stays short; set
WA_FULL_MATRIX=1 to run all nine."""

from __future__ import annotations

import itertools
import os
import uuid
from pathlib import Path

import pytest

from support import backends

DIAGONAL = [("sqlite", "sqlite"), ("postgresql", "redis"), ("mariadb", "postgresql")]
FULL = list(
    itertools.product(["sqlite", "postgresql", "mariadb"], ["sqlite", "postgresql", "redis"])
)
PAIRS = FULL if os.environ.get("WA_FULL_MATRIX") == "1" else DIAGONAL


@pytest.fixture(params=PAIRS, ids=[f"{db}+{queue}-queue" for db, queue in PAIRS])
def backend_pair(
    request: pytest.FixtureRequest, tmp_path: Path, server_databases: dict[str, str]
) -> dict[str, str]:
    """DATABASE_URL, QUEUE_URL and QUEUE_NAME for processes of one deployment."""
    database_kind, queue_kind = request.param
    if database_kind == "sqlite":
        database_url = f"sqlite:///{tmp_path / 'service.db'}"
    else:
        if database_kind not in server_databases:
            server_databases[database_kind] = backends.create_database(database_kind)
        database_url = server_databases[database_kind]
        backends.empty_tables(database_url)
    return {
        "DATABASE_URL": database_url,
        "QUEUE_URL": backends.queue_url(queue_kind, tmp_path),
        "QUEUE_NAME": f"{backends.RUN_ID}-{uuid.uuid4().hex[:8]}",
    }
