"""The dashboard's login throttle store: failed logins counted in the database (so every web
process on every machine sees them), per client address, in a sliding window."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from whop_autocancel.db import throttle
from whop_autocancel.db.engine import Database
from whop_autocancel.schema.migrate import upgrade

NOW = datetime(2026, 12, 5, 12, 0, 0, tzinfo=UTC)
WINDOW = timedelta(minutes=15)


def test_failures_are_counted_per_key_in_the_window(database_url: str) -> None:
    database = Database(database_url)
    upgrade(database)
    try:
        with database.transaction() as session:
            throttle.record_failure(session, "203.0.113.7", NOW - timedelta(minutes=20))
            for minutes in (10, 5, 1):
                throttle.record_failure(session, "203.0.113.7", NOW - timedelta(minutes=minutes))
            throttle.record_failure(session, "198.51.100.1", NOW)
        with database.transaction() as session:
            seen = throttle.recent_failures(session, "203.0.113.7", NOW - WINDOW)
            other = throttle.recent_failures(session, "198.51.100.1", NOW - WINDOW)
            nobody = throttle.recent_failures(session, "192.0.2.1", NOW - WINDOW)
        assert seen.count == 3
        assert seen.oldest == NOW - timedelta(minutes=10)
        assert other.count == 1
        assert nobody.count == 0
        assert nobody.oldest is None
        with database.transaction() as session:
            throttle.forget(session, "203.0.113.7")
        with database.transaction() as session:
            assert throttle.recent_failures(session, "203.0.113.7", NOW - WINDOW).count == 0
            assert throttle.recent_failures(session, "198.51.100.1", NOW - WINDOW).count == 1
    finally:
        database.dispose()


def test_old_failures_are_pruned_when_a_new_one_is_recorded(database_url: str) -> None:
    database = Database(database_url)
    upgrade(database)
    try:
        with database.transaction() as session:
            throttle.record_failure(session, "a", NOW - timedelta(days=2))
            throttle.record_failure(session, "b", NOW - timedelta(days=2))
            throttle.record_failure(session, "a", NOW, prune_before=NOW - timedelta(days=1))
        with database.transaction() as session:
            assert throttle.recent_failures(session, "a", NOW - timedelta(days=7)).count == 1
            assert throttle.recent_failures(session, "b", NOW - timedelta(days=7)).count == 0
    finally:
        database.dispose()


def test_a_long_key_is_stored_whole_enough_to_count() -> None:
    assert (
        throttle.client_key("2001:db8:1234:5678:aaaa:bbbb:cccc:dddd") == "2001:db8:1234:5678::/64"
    )
    assert throttle.client_key("2001:db8:1234:5678::1") == "2001:db8:1234:5678::/64"
    assert throttle.client_key("203.0.113.7") == "203.0.113.7"
    assert throttle.client_key("::ffff:203.0.113.7") == "203.0.113.7"
    assert throttle.client_key(None) == "unknown"
    assert throttle.client_key("not an address") == "not an address"
    assert len(throttle.client_key("x" * 500)) <= throttle.KEY_CHARS


def test_an_attempt_counts_before_the_password_is_checked(database_url: str) -> None:
    database = Database(database_url)
    upgrade(database)
    try:
        admitted = []
        for _ in range(7):
            with database.transaction() as session:
                admitted.append(
                    throttle.admit(session, "203.0.113.7", NOW, window=WINDOW, limit=5) is None
                )
        assert admitted == [True] * 5 + [False] * 2
        with database.transaction() as session:
            held = throttle.admit(session, "203.0.113.7", NOW, window=WINDOW, limit=5)
            assert held is not None
            assert (held.count, held.oldest) == (5, NOW)
            later = NOW + WINDOW + timedelta(seconds=1)
            assert throttle.admit(session, "203.0.113.7", later, window=WINDOW, limit=5) is None
    finally:
        database.dispose()
