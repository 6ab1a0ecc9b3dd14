"""The email outbox against a real SMTP server on loopback (aiosmtpd)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import event, func, select, update

from support.harness import drain, free_port, make_runtime, make_settings, wait_for
from support.statements import recorded, sqlite_plan, sqlite_steps, verbs
from whop_autocancel.clock import FrozenClock
from whop_autocancel.errors import ConfigurationError
from whop_autocancel.mail.models import Email
from whop_autocancel.mail.outbox import SEND_BATCH, SEND_TASK, Outbox
from whop_autocancel.mail.render import RenderedEmail, render_email
from whop_autocancel.mail.sink import ReceivedEmail, SmtpSink
from whop_autocancel.mail.smtp import SMTP_IDLE_SECONDS, SmtpPool, build_message
from whop_autocancel.runtime import Runtime
from whop_autocancel.settings import parse_smtp_url

CREDENTIALS = ("shop", "s3cret-pa55")


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def runtime(tmp_path: Path, clock: FrozenClock, port: int, database_url: str) -> Iterator[Runtime]:
    runtime = make_runtime(
        make_settings(
            tmp_path,
            DATABASE_URL=database_url,
            SMTP_URL=f"smtp://shop:s3cret-pa55@127.0.0.1:{port}",
            RETRY_SCHEDULE="10,20",
        ),
        clock,
    )
    yield runtime
    runtime.close()


def queue(
    runtime: Runtime,
    to: str = "buyer@example.com",
    key: str | None = None,
    kind: str = "test",
    *,
    wake: bool = True,
) -> int | None:
    email = render_email(
        "alert",
        "Test subject",
        kind="test",
        summary="Hello <b>there</b>",
        details=[("Order", "ord_1")],
        steps=["Do this."],
    )
    with runtime.database.transaction() as session:
        row = runtime.outbox.queue(
            session,
            kind=kind,
            to=to,
            email=email,
            now=runtime.clock.now(),
            dedupe_key=key,
            wake=wake,
        )
        return row.id if row else None


def row(runtime: Runtime, email_id: int) -> Email:
    with runtime.database.transaction() as session:
        found = session.get(Email, email_id)
        assert found is not None
        return found


def test_a_queued_email_is_sent_with_text_and_html(runtime: Runtime, port: int) -> None:
    email_id = queue(runtime)
    assert email_id is not None
    with SmtpSink(port=port, credentials=CREDENTIALS) as sink:
        runtime.outbox.send(email_id)
    [message] = sink.messages
    assert message.recipients == ("buyer@example.com",)
    assert message.sender == "shop@shop.test"
    assert message.subject == "Test subject"
    assert "Hello <b>there</b>" in message.text
    assert "Hello &lt;b&gt;there&lt;/b&gt;" in message.html  # escaped in HTML
    assert row(runtime, email_id).sent_at is not None
    runtime.outbox.send(email_id)  # a duplicate job sends nothing more
    assert len(sink.messages) == 1


def test_a_dedupe_key_queues_once(runtime: Runtime) -> None:
    assert queue(runtime, key="once") is not None
    assert queue(runtime, key="once") is None


def test_smtp_down_retries_later_and_delivers_after_recovery(
    runtime: Runtime, port: int, clock: FrozenClock
) -> None:
    email_id = queue(runtime)
    assert email_id is not None
    runtime.outbox.send(email_id)  # nothing listens on the port
    failed = row(runtime, email_id)
    assert failed.sent_at is None
    assert failed.attempts == 1
    assert "s3cret-pa55" not in (failed.last_error or "")
    assert "shop:***@127.0.0.1" in (failed.last_error or "")
    assert 9 <= (failed.next_attempt_at - clock.now()).total_seconds() <= 11
    with SmtpSink(port=port, credentials=CREDENTIALS) as sink:
        runtime.outbox.send(email_id)  # not due yet
        assert sink.messages == []
        clock.advance(11)
        runtime.outbox.send(email_id)
        assert len(sink.messages) == 1
    assert row(runtime, email_id).sent_at is not None


def test_a_refusing_server_is_retried(runtime: Runtime, port: int, clock: FrozenClock) -> None:
    email_id = queue(runtime)
    assert email_id is not None
    with SmtpSink(port=port, credentials=CREDENTIALS) as sink:
        sink.refusing = True
        runtime.outbox.send(email_id)
        assert "451" in (row(runtime, email_id).last_error or "")
        sink.refusing = False
        clock.advance(11)
        runtime.outbox.send(email_id)
        assert len(sink.messages) == 1


def test_a_wrong_password_is_a_retryable_failure_that_never_shows_the_password(
    runtime: Runtime, port: int
) -> None:
    email_id = queue(runtime)
    assert email_id is not None
    with SmtpSink(port=port, credentials=("shop", "another")) as sink:
        runtime.outbox.send(email_id)
        assert sink.messages == []
    failed = row(runtime, email_id)
    error = failed.last_error or ""
    assert "Authentication" in error
    assert "s3cret-pa55" not in error
    # A 535 is about our settings, not this message: retried (it goes once they are fixed).
    assert failed.failed_at is None


def sends_queued(runtime: Runtime) -> int:
    return sum(1 for task in runtime.jobs.huey.pending() if task.name == "mail.send") + sum(
        1 for task in runtime.jobs.huey.scheduled() if task.name == "mail.send"
    )


def test_a_permanent_rejection_ends_the_email_at_once(
    runtime: Runtime, port: int, clock: FrozenClock
) -> None:
    email_id = queue(runtime, to="gone@example.com")
    assert email_id is not None
    runtime.jobs.huey.flush()
    with SmtpSink(port=port, credentials=CREDENTIALS) as sink:
        sink.reject("gone@example.com")
        runtime.outbox.send(email_id)
        failed = row(runtime, email_id)
        assert failed.failed_at is not None
        assert failed.sent_at is None
        assert failed.attempts == 1
        assert (failed.last_error or "").startswith("550 5.1.1 <gone@example.com>")
        assert "s3cret-pa55" not in (failed.last_error or "")
        assert sends_queued(runtime) == 0  # no retry scheduled
        # Never tried again: not by a duplicate job, not by the stuck-work sweep.
        sink.accept("gone@example.com")
        clock.advance(3600)
        runtime.outbox.send(email_id)
        assert runtime.stuck_sweep.run(force=True).emails == 0
        assert sink.messages == []
    assert row(runtime, email_id).attempts == 1


def test_only_a_delivery_email_is_given_up_by_time(
    runtime: Runtime, port: int, clock: FrozenClock
) -> None:
    """SMTP down for longer than EMAIL_GIVE_UP_AFTER (3600 s): the customer's delivery email
    ends `failed` at its next failed try; an admin's email keeps trying until it goes."""
    delivery = queue(runtime, kind="delivery")
    notice = queue(runtime, to="admin@shop.test", kind="admin_delivered")
    assert delivery is not None
    assert notice is not None
    runtime.outbox.send(delivery)
    runtime.outbox.send(notice)
    clock.advance(3599)
    runtime.outbox.send(delivery)
    assert row(runtime, delivery).failed_at is None
    clock.advance(30)
    runtime.outbox.send(delivery)
    runtime.outbox.send(notice)
    given_up = row(runtime, delivery)
    assert given_up.failed_at is not None
    assert "ConnectionRefusedError" in (given_up.last_error or "")
    assert row(runtime, notice).failed_at is None
    with SmtpSink(port=port, credentials=CREDENTIALS) as sink:
        clock.advance(30)
        runtime.outbox.send(delivery)
        runtime.outbox.send(notice)
        assert [m.recipients for m in sink.messages] == [("admin@shop.test",)]


# Reused SMTP connections: one session carries the next messages, until it idles out, the
# server closes it, or the runtime closes.


def peers(sink: SmtpSink) -> list[str]:
    return [message.peer for message in sink.messages]


def test_consecutive_emails_share_one_smtp_connection(runtime: Runtime, port: int) -> None:
    ids = [queue(runtime, to=f"buyer{n}@example.com") for n in range(3)]
    with SmtpSink(port=port, credentials=CREDENTIALS) as sink:
        for email_id in ids:
            assert email_id is not None
            runtime.outbox.send(email_id)
        assert [m.recipients for m in sink.messages] == [
            (f"buyer{n}@example.com",) for n in range(3)
        ]
        assert len(set(peers(sink))) == 1  # one TCP connection, one login
        assert sink.quits == 0  # still open, for the next message
        runtime.outbox.close()  # ends it politely
        wait_for(lambda: sink.quits == 1, what="the pooled connection's QUIT")


def own_runtime(
    tmp_path: Path, clock: FrozenClock, port: int, database_url: str, **overrides: str
) -> Runtime:
    return make_runtime(
        make_settings(
            tmp_path,
            DATABASE_URL=database_url,
            SMTP_URL=f"smtp://shop:s3cret-pa55@127.0.0.1:{port}",
            **overrides,
        ),
        clock,
    )


def test_closing_the_runtime_quits_its_smtp_connection(
    tmp_path: Path, clock: FrozenClock, port: int, database_url: str
) -> None:
    runtime = own_runtime(tmp_path, clock, port, database_url)
    with SmtpSink(port=port, credentials=CREDENTIALS) as sink:
        try:
            email_id = queue(runtime)
            assert email_id is not None
            runtime.outbox.send(email_id)
            assert sink.quits == 0
        finally:
            runtime.close()
        wait_for(lambda: sink.quits == 1, what="the pooled connection's QUIT")


def queued(runtime: Runtime, to: str = "buyer@example.com") -> int:
    """A new email in the outbox. (The tests of one session's reuse queue each email just
    before its job: a job sends every email due, not only its own.)"""
    email_id = queue(runtime, to=to)
    assert email_id is not None
    return email_id


def test_a_connection_the_server_closed_is_replaced_and_the_email_goes_once(
    runtime: Runtime, port: int
) -> None:
    first = queued(runtime)
    with SmtpSink(port=port, credentials=CREDENTIALS) as sink:
        runtime.outbox.send(first)
    # The server restarted: the idle connection the outbox kept is closed from its side.
    with SmtpSink(port=port, credentials=CREDENTIALS) as restarted:
        second = queued(runtime, to="other@example.com")
        runtime.outbox.send(second)
        assert [m.recipients for m in restarted.messages] == [("other@example.com",)]
    assert len(sink.messages) == 1
    sent = row(runtime, second)
    assert sent.sent_at is not None
    assert sent.attempts == 1
    assert sent.last_error is None


def test_a_421_on_a_reused_connection_is_sent_again_on_a_fresh_one(
    runtime: Runtime, port: int
) -> None:
    first = queued(runtime)
    with SmtpSink(port=port, credentials=CREDENTIALS) as sink:
        runtime.outbox.send(first)
        second = queued(runtime, to="other@example.com")
        sink.hang_up_at_next_mail()  # "421 closing", as a server ending an idle session
        runtime.outbox.send(second)
        assert [m.recipients for m in sink.messages] == [
            ("buyer@example.com",),
            ("other@example.com",),
        ]
        assert len(set(peers(sink))) == 2
    sent = row(runtime, second)
    assert sent.sent_at is not None
    assert sent.attempts == 1


def test_a_421_on_a_fresh_connection_too_is_a_retryable_failure(
    runtime: Runtime, port: int
) -> None:
    first = queued(runtime)
    with SmtpSink(port=port, credentials=CREDENTIALS) as sink:
        runtime.outbox.send(first)
        second = queued(runtime, to="other@example.com")
        sink.hang_up_at_next_mail(times=2)  # the reused one and the fresh one
        runtime.outbox.send(second)
        assert len(sink.messages) == 1
    failed = row(runtime, second)
    assert failed.sent_at is None
    assert failed.failed_at is None  # retried later: a 421 is not this message's fault
    assert failed.attempts == 1
    assert "421" in (failed.last_error or "")
    assert "shop:***@127.0.0.1" in (failed.last_error or "")
    assert "s3cret-pa55" not in (failed.last_error or "")


def test_a_hang_up_after_the_content_is_never_resent_at_once(
    runtime: Runtime, port: int, clock: FrozenClock
) -> None:
    """The server may have kept a message whose DATA it never answered: sending it again on
    a fresh connection could duplicate it, so the outbox records a failed try instead (and
    sends it again only on its retry schedule: at least once)."""
    first = queued(runtime)
    with SmtpSink(port=port, credentials=CREDENTIALS) as sink:
        runtime.outbox.send(first)
        second = queued(runtime, to="other@example.com")
        sink.hang_up_after_data = True
        runtime.outbox.send(second)
        assert [m.recipients for m in sink.messages] == [
            ("buyer@example.com",),
            ("other@example.com",),
        ]
        failed = row(runtime, second)
        assert failed.sent_at is None
        assert failed.attempts == 1
        assert "SMTPServerDisconnected" in (failed.last_error or "")
        sink.hang_up_after_data = False
        clock.advance(11)
        runtime.outbox.send(second)
        copies = sink.to("other@example.com")
        assert len(copies) == 2
        # The same Message-ID both times: the resend is recognisably the same message.
        assert copies[0].message["Message-ID"] == copies[1].message["Message-ID"]
    assert row(runtime, second).sent_at is not None


def test_an_idle_connection_is_not_reused_after_the_idle_time(
    runtime: Runtime, port: int, clock: FrozenClock
) -> None:
    with SmtpSink(port=port, credentials=CREDENTIALS) as sink:
        for n, wait in enumerate((0, SMTP_IDLE_SECONDS - 1, SMTP_IDLE_SECONDS)):
            clock.advance(wait)
            runtime.outbox.send(queued(runtime, to=f"buyer{n}@example.com"))
        first, second, third = peers(sink)
        assert first == second
        assert third != second
        wait_for(lambda: sink.quits == 1, what="the idle connection's QUIT")


def test_a_rejection_on_a_reused_connection_is_still_permanent_and_the_next_email_goes(
    runtime: Runtime, port: int
) -> None:
    ids = [queue(runtime), queue(runtime, to="gone@example.com"), queue(runtime, to="x@e.com")]
    with SmtpSink(port=port, credentials=CREDENTIALS) as sink:
        sink.reject("gone@example.com")
        for email_id in ids:
            assert email_id is not None
            runtime.outbox.send(email_id)
        assert [m.recipients for m in sink.messages] == [("buyer@example.com",), ("x@e.com",)]
    assert ids[1] is not None
    failed = row(runtime, ids[1])
    assert failed.failed_at is not None
    assert (failed.last_error or "").startswith("550 5.1.1 <gone@example.com>")


def test_a_non_ascii_email_arrives_intact(
    tmp_path: Path, clock: FrozenClock, port: int, database_url: str
) -> None:
    runtime = own_runtime(tmp_path, clock, port, database_url)
    long_line = "Clé: " + "é" * 600 + " fin"  # over 998 bytes once encoded in UTF-8
    text = f"Bonjour Zoë,\n\nVotre café ☕ est prêt.\n{long_line}\n.\n"
    html = f"<p>Bonjour Zoë, votre café ☕ est prêt.</p><p>{long_line}</p>"
    email = RenderedEmail(subject="Votre commande — café ☕", text=text, html=html)
    try:
        with runtime.database.transaction() as session:
            queued = runtime.outbox.queue(
                session, kind="test", to="buyer@example.com", email=email, now=clock.now()
            )
            assert queued is not None
        with SmtpSink(port=port, credentials=CREDENTIALS) as sink:
            runtime.outbox.send(queued.id)
    finally:
        runtime.close()
    [received] = sink.messages
    message = received.message
    assert received.sender == "shop@shop.test"
    assert received.recipients == ("buyer@example.com",)
    assert message["Subject"] == "Votre commande — café ☕"
    assert message["From"].addresses[0].addr_spec == "shop@shop.test"
    assert message["To"].addresses[0].addr_spec == "buyer@example.com"
    assert message["Date"].datetime is not None
    created = int(clock.now().timestamp())
    assert message["Message-ID"] == f"<whop-autocancel.{queued.id}.{created}@shop.test>"
    assert message.get_content_type() == "multipart/alternative"
    plain, rich = message.iter_parts()
    assert plain.get_content_type() == "text/plain"
    assert rich.get_content_type() == "text/html"
    assert plain.get_content().replace("\r\n", "\n") == text
    assert rich.get_content().replace("\r\n", "\n").rstrip("\n") == html


def test_sessions_are_kept_per_smtp_configuration() -> None:
    """Two SMTP_URLs (two runtimes' settings) never share a session."""
    with (
        SmtpSink(credentials=CREDENTIALS) as one,
        SmtpSink(credentials=("other", "pw-2")) as two,
    ):
        pool = SmtpPool()
        try:
            for sink, auth in (
                (one, "shop:s3cret-pa55"),
                (two, "other:pw-2"),
                (one, "shop:s3cret-pa55"),
            ):
                config = parse_smtp_url(f"smtp://{auth}@127.0.0.1:{sink.port}")
                message = build_message("shop@shop.test", "b@example.com", "S", "x", None, "k")
                pool.send(config, message, timeout=5)
        finally:
            pool.close()
        assert len(one.messages) == 2
        assert len(set(peers(one))) == 1
        assert len(two.messages) == 1
        wait_for(lambda: one.quits == 1 and two.quits == 1, what="both sessions' QUIT")


def statements_on_emails(runtime: Runtime, work: Callable[[], None]) -> list[str]:
    """Run `work`; the kinds of the statements (UPDATE, SELECT, …) it ran on `emails`."""
    with recorded(runtime.database.engine) as sent:
        work()
    return verbs([(sql, parameters) for sql, parameters in sent if "emails" in sql.lower()])


def test_a_send_reads_the_email_once_and_writes_it_twice(runtime: Runtime, port: int) -> None:
    """The claim (one UPDATE, the read of its row by its key and the look for other due
    ones) and the record of the send (one UPDATE, no second read): the database work of each
    email, which runs for every purchase."""
    email_id = queue(runtime)
    assert email_id is not None
    with SmtpSink(port=port, credentials=CREDENTIALS) as sink:
        statements = statements_on_emails(runtime, lambda: runtime.outbox.send(email_id))
    assert len(sink.messages) == 1
    assert statements == ["UPDATE", "SELECT", "SELECT", "UPDATE"]
    sent = row(runtime, email_id)
    assert sent.sent_at is not None
    assert sent.attempts == 1
    assert sent.lease_until is None
    assert sent.last_error is None


# Batches: a `mail.send` job sends every email due (its own first, up to SEND_BATCH), with one
# transaction to claim them and one to record those the server accepted.


@contextmanager
def counted_commits(runtime: Runtime) -> Iterator[list[int]]:
    """The transactions committed on the runtime's database while the block runs."""
    commits: list[int] = []
    listener = lambda _connection: commits.append(1)  # noqa: E731
    event.listen(runtime.database.engine, "commit", listener)
    try:
        yield commits
    finally:
        event.remove(runtime.database.engine, "commit", listener)


def recipients(sink: SmtpSink) -> list[str]:
    return [address for message in sink.messages for address in message.recipients]


def test_one_job_sends_the_due_emails_with_one_claim_and_one_record(
    runtime: Runtime, port: int
) -> None:
    ids = [queued(runtime, to=f"buyer{n}@example.com") for n in range(4)]
    hooked: list[tuple[int, int, bool, object, object]] = []
    runtime.outbox.listen(
        on_sent=lambda _session, email, now: hooked.append(
            (email.id, email.attempts, email.sent_at == now, email.lease_until, email.last_error)
        )
    )
    with SmtpSink(port=port, credentials=CREDENTIALS) as sink:
        with counted_commits(runtime) as commits:
            runtime.outbox.send(ids[0])
        assert len(commits) == 2  # the claim, the record of all four
        assert recipients(sink) == [f"buyer{n}@example.com" for n in range(4)]
        assert len(set(peers(sink))) == 1  # one session, one login
        for email_id in ids[1:]:  # their own jobs find them sent
            runtime.outbox.send(email_id)
        assert len(sink.messages) == 4
    assert sorted(hooked) == [(email_id, 1, True, None, None) for email_id in ids]
    for email_id in ids:
        sent = row(runtime, email_id)
        assert sent.sent_at is not None
        assert (sent.attempts, sent.lease_until, sent.last_error) == (1, None, None)


def test_a_batch_reads_and_writes_the_emails_in_five_statements(
    runtime: Runtime, port: int
) -> None:
    """The claim: its own email's UPDATE, the read of that row by its key, one SELECT of the
    others, one UPDATE of them; then one UPDATE records them all, whatever their number."""
    ids = [queued(runtime, to=f"buyer{n}@example.com") for n in range(3)]
    with SmtpSink(port=port, credentials=CREDENTIALS) as sink:
        statements = statements_on_emails(runtime, lambda: runtime.outbox.send(ids[0]))
    assert len(sink.messages) == 3
    assert statements == ["UPDATE", "SELECT", "SELECT", "UPDATE", "UPDATE"]


def send_jobs(runtime: Runtime) -> list[tuple[object, ...]]:
    """The `mail.send` jobs on the queue, by their arguments."""
    return [tuple(task.args) for task in runtime.jobs.huey.pending() if task.name == SEND_TASK]


def test_a_message_queued_without_a_job_goes_in_the_batch_of_one_with_a_job(
    runtime: Runtime, port: int
) -> None:
    """A purchase's admin notice wakes no job of its own (`wake=False`): the job of the
    customer's email, queued in the same transaction, sends both."""
    customer = queue(runtime, to="customer@example.com")
    queue(runtime, to="admin@example.com", wake=False)
    assert send_jobs(runtime) == [(customer,)]
    with SmtpSink(port=port, credentials=CREDENTIALS) as sink:
        assert drain(runtime) == 1
    assert recipients(sink) == ["customer@example.com", "admin@example.com"]


def test_a_full_batch_wakes_the_next_job_until_nothing_is_due(runtime: Runtime, port: int) -> None:
    """Messages queued without a job of their own never wait for the stuck-work sweep, however
    many: each full batch enqueues the next job, the last one (not full) none."""
    quiet = [queue(runtime, to=f"quiet{n}@example.com", wake=False) for n in range(SEND_BATCH + 3)]
    loud = queue(runtime, to="loud@example.com")
    with SmtpSink(port=port, credentials=CREDENTIALS) as sink:
        assert drain(runtime) == 2  # its own batch (full), then the one it woke (4 left)
        assert sorted(recipients(sink)) == sorted(
            [f"quiet{n}@example.com" for n in range(SEND_BATCH + 3)] + ["loud@example.com"]
        )
    assert send_jobs(runtime) == []
    assert all(row(runtime, email_id).attempts == 1 for email_id in [*quiet, loud] if email_id)


def test_a_claim_reads_no_more_of_a_backlog_than_it_takes(runtime: Runtime, port: int) -> None:
    """With thousands of emails waiting (a flash sale), each claim must read a batch, not the
    whole backlog: SQLite walks the `next_attempt_at` index in its order and stops at the
    batch's end, with no sort of every waiting row (which made each claim cost as much as the
    backlog)."""
    if runtime.database.backend != "sqlite":
        pytest.skip("reads SQLite's query plan")
    for n in range(3):
        queued(runtime, to=f"buyer{n}@example.com")
    engine = runtime.database.engine
    with recorded(engine) as sent, SmtpSink(port=port, credentials=CREDENTIALS):
        runtime.outbox.send(queued(runtime, to="own@example.com"))
    [(sql, parameters)] = [
        (sql, parameters)
        for sql, parameters in sent
        if sql.lstrip().upper().startswith("SELECT") and "FROM emails" in sql and "LIMIT" in sql
    ]
    plan = sqlite_plan(engine, sql, parameters)
    assert any("INDEX ix_emails_next_attempt_at" in step for step in plan), plan
    assert not any("TEMP B-TREE" in step for step in plan), plan


# Emails that are done: each sent one, and each given up (a rejected address, a day's SMTP
# outage). Half and half; enough that reading them costs many times a send's own work.
DONE_EMAILS = 600


def test_emails_sent_or_given_up_cost_the_next_send_and_sweep_nothing(
    runtime: Runtime, port: int
) -> None:
    """Every email ever sent stays in the table, and so does every one given up. Neither may
    make the next send, or the stuck-work sweep, read them: a shop that once had its SMTP
    server reject a day's mail would pay for it on every purchase from then on. Counted in
    SQLite's virtual-machine steps (work, not time): a send and a sweep with the done emails
    in the table, against the same with none."""
    if runtime.database.backend != "sqlite":
        pytest.skip("counts SQLite's steps")
    engine = runtime.database.engine

    def send_and_sweep() -> tuple[int, int]:
        email_id = queued(runtime, to="next@example.com")
        with sqlite_steps(engine) as send:
            runtime.outbox.send(email_id)
        with sqlite_steps(engine) as sweep:
            runtime.stuck_sweep.run(force=True)
        return send.count, sweep.count

    with SmtpSink(port=port, credentials=CREDENTIALS) as sink:
        alone = send_and_sweep()
        for n in range(DONE_EMAILS // 2):
            sink.reject(f"gone{n}@example.com")
            queue(runtime, to=f"gone{n}@example.com", wake=False)
            queue(runtime, to=f"sent{n}@example.com", wake=False)
        queue(runtime, to="last@example.com")  # one job: each full batch wakes the next
        drain(runtime)
        with runtime.database.transaction() as session:
            done = session.execute(
                select(func.count(Email.failed_at), func.count(Email.sent_at))
            ).one()
        assert tuple(done) == (DONE_EMAILS // 2, DONE_EMAILS // 2 + 2)
        among_done = send_and_sweep()
    assert recipients(sink)[-1] == "next@example.com"
    send, sweep = among_done
    assert send <= alone[0] * 1.2, f"a send: {alone[0]} steps alone, {send} among done emails"
    assert sweep <= alone[1] * 1.2, f"a sweep: {alone[1]} steps alone, {sweep} among done ones"


def test_a_job_sends_its_own_email_first_and_at_most_a_batch(runtime: Runtime, port: int) -> None:
    ids = [queued(runtime, to=f"buyer{n}@example.com") for n in range(SEND_BATCH + 2)]
    with SmtpSink(port=port, credentials=CREDENTIALS) as sink:
        runtime.outbox.send(ids[-1])
        assert recipients(sink) == [f"buyer{SEND_BATCH + 1}@example.com"] + [
            f"buyer{n}@example.com" for n in range(SEND_BATCH - 1)
        ]
        # A job whose own email went already still sends what is due: the rows are the truth.
        runtime.outbox.send(ids[0])
        assert recipients(sink)[SEND_BATCH:] == [
            f"buyer{n}@example.com" for n in (SEND_BATCH - 1, SEND_BATCH)
        ]
    assert all(row(runtime, email_id).attempts == 1 for email_id in ids)


def test_a_batch_leaves_emails_waiting_for_a_retry_and_given_up_ones(
    runtime: Runtime, port: int, clock: FrozenClock
) -> None:
    later, gone = queued(runtime, to="later@example.com"), queued(runtime, to="gone@example.com")
    with SmtpSink(port=port, credentials=CREDENTIALS) as sink:
        sink.refusing = True
        runtime.outbox.send(later)  # refused for now: both retried in 10 s
        sink.refusing = False
        sink.reject("gone@example.com")
        clock.advance(11)
        runtime.outbox.send(gone)  # both due again: "gone" is given up
        assert recipients(sink) == ["later@example.com"]
        sink.refusing = True
        fresh = queued(runtime, to="fresh@example.com")
        runtime.outbox.send(fresh)  # fresh is retried in 10 s
        sink.refusing = False
        runtime.outbox.send(queued(runtime, to="new@example.com"))
        assert recipients(sink) == ["later@example.com", "new@example.com"]
        clock.advance(11)
        runtime.outbox.send(gone)  # given up: its job still sends what is due
        assert recipients(sink)[-1] == "fresh@example.com"
    assert row(runtime, gone).failed_at is not None
    assert row(runtime, gone).attempts == 2


def test_an_email_rejected_in_a_batch_fails_alone(runtime: Runtime, port: int) -> None:
    ids = [
        queued(runtime, to="a@example.com"),
        queued(runtime, to="gone@example.com"),
        queued(runtime, to="c@example.com"),
        queued(runtime, to="d@example.com"),
    ]
    failed: list[int] = []
    sent: list[int] = []
    runtime.outbox.listen(
        on_sent=lambda _s, email, _now: sent.append(email.id),
        on_failed=lambda _s, email, _now: failed.append(email.id),
    )
    runtime.jobs.huey.flush()
    with SmtpSink(port=port, credentials=CREDENTIALS) as sink:
        sink.reject("gone@example.com")
        runtime.outbox.send(ids[0])
        assert recipients(sink) == ["a@example.com", "c@example.com", "d@example.com"]
    assert failed == [ids[1]]
    assert sorted(sent) == [ids[0], ids[2], ids[3]]
    rejected = row(runtime, ids[1])
    assert rejected.failed_at is not None
    assert rejected.attempts == 1
    assert (rejected.last_error or "").startswith("550 5.1.1 <gone@example.com>")
    assert sends_queued(runtime) == 0
    for email_id in (ids[0], ids[2], ids[3]):
        accepted = row(runtime, email_id)
        assert accepted.sent_at is not None
        assert (accepted.attempts, accepted.lease_until) == (1, None)


def sealed_between_two(runtime: Runtime, clock: FrozenClock, *, html: str) -> tuple[int, int, int]:
    """Three due emails, a@, b@ (sealed: it carries a key) and c@, their jobs dropped: the
    ids."""
    first = queued(runtime, to="a@example.com")
    message = RenderedEmail(subject="Your key", text="KEY-1", html=html)
    with runtime.database.transaction() as session:
        sealed = runtime.outbox.queue(
            session,
            kind="delivery",
            to="b@example.com",
            email=message,
            now=clock.now(),
            sealed=True,
        )
        assert sealed is not None
    last = queued(runtime, to="c@example.com")
    return first, sealed.id, last


def test_an_email_that_cannot_be_decrypted_is_retried_and_the_batch_goes_on(
    runtime: Runtime, port: int, clock: FrozenClock
) -> None:
    first, sealed, last = sealed_between_two(runtime, clock, html="<p>KEY-1</p>")
    with runtime.database.transaction() as session:
        row_of = session.get(Email, sealed)
        assert row_of is not None
        row_of.text_body = "sealed under a key we no longer have"
    runtime.jobs.huey.flush()
    with SmtpSink(port=port, credentials=CREDENTIALS) as sink:
        runtime.outbox.send(first)
        assert recipients(sink) == ["a@example.com", "c@example.com"]
    unreadable = row(runtime, sealed)
    assert unreadable.sent_at is None
    assert unreadable.failed_at is None
    assert unreadable.attempts == 1
    assert "cannot be decrypted" in (unreadable.last_error or "")
    assert unreadable.next_attempt_at > clock.now()
    assert sends_queued(runtime) == 1  # its retry
    assert row(runtime, last).sent_at is not None


def test_two_workers_never_send_one_email_twice(
    runtime: Runtime, tmp_path: Path, clock: FrozenClock, port: int, database_url: str
) -> None:
    """Two workers (two runtimes, each its own engine and SMTP sessions), with two job
    threads each, run the jobs of one burst at once, each thread from another point: every
    email goes exactly once."""
    other = own_runtime(tmp_path, clock, port, database_url)
    count = 6 * SEND_BATCH
    ids = [queued(runtime, to=f"buyer{n}@example.com") for n in range(count)]
    outboxes = [runtime.outbox, other.outbox, runtime.outbox, other.outbox]
    start = threading.Barrier(len(outboxes))
    errors: list[BaseException] = []

    def worker(outbox: Outbox, first: int) -> None:
        try:
            start.wait()
            for email_id in ids[first:] + ids[:first]:
                outbox.send(email_id)
        except BaseException as error:  # shown by the assertion below
            errors.append(error)

    try:
        with SmtpSink(port=port, credentials=CREDENTIALS) as sink:
            threads = [
                threading.Thread(target=worker, args=(outbox, n * count // len(outboxes)))
                for n, outbox in enumerate(outboxes)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert errors == []
            assert sorted(recipients(sink)) == sorted(f"buyer{n}@example.com" for n in range(count))
    finally:
        other.close()
    for email_id in ids:
        sent = row(runtime, email_id)
        assert sent.sent_at is not None
        assert (sent.attempts, sent.lease_until) == (1, None)


class SlowSink(SmtpSink):
    """A server that takes `seconds` of the service's clock to accept each message."""

    def __init__(self, clock: FrozenClock, seconds: float, **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.clock = clock
        self.seconds = seconds

    def add(self, email: ReceivedEmail) -> None:
        super().add(email)
        self.clock.advance(self.seconds)


def another_outbox(runtime: Runtime, lease_seconds: float = 35.0) -> Outbox:
    """An outbox on the runtime's database and queue, with a lease of its own and no
    STOCK_ENCRYPTION_KEY."""
    return Outbox(
        runtime.database,
        runtime.jobs,
        runtime.clock,
        smtp=runtime.settings.smtp,
        sender="shop@shop.test",
        timeout=5,
        retry_schedule=[10],
        lease_seconds=lease_seconds,
        give_up_after=3600,
    )


def test_a_batch_stops_before_its_lease_runs_out_and_releases_the_rest(
    runtime: Runtime, port: int, clock: FrozenClock
) -> None:
    lease = 60.0
    outbox = another_outbox(runtime, lease_seconds=lease)
    ids = [queued(runtime, to=f"buyer{n}@example.com") for n in range(5)]
    runtime.jobs.huey.flush()
    try:
        # 20 s a message: a third of the lease after the first, two thirds after the second.
        with SlowSink(clock, lease / 3, port=port, credentials=CREDENTIALS) as sink:
            outbox.send(ids[0])
            assert recipients(sink) == ["buyer0@example.com", "buyer1@example.com"]
            for email_id in ids[:2]:
                assert row(runtime, email_id).sent_at is not None
            for email_id in ids[2:]:  # released, untouched: any worker takes them at once
                rest = row(runtime, email_id)
                assert (rest.sent_at, rest.lease_until, rest.attempts) == (None, None, 0)
                assert rest.last_error is None
            # Their own jobs may have run already: a new one wakes them.
            [wake] = runtime.jobs.huey.pending()
            assert (wake.name, wake.args) == ("mail.send", (ids[2],))
            sink.seconds = 0
            outbox.send(ids[2])
            assert len(sink.messages) == 5
    finally:
        outbox.close()
    assert all(row(runtime, email_id).attempts == 1 for email_id in ids)


def test_emails_a_killed_worker_had_claimed_are_sent_once_their_lease_ran_out(
    runtime: Runtime, port: int, clock: FrozenClock
) -> None:
    """A worker killed between its claim and its record leaves the rows leased: the stuck-work
    sweep finds them once the lease has run out, and the next job sends them."""
    ids = [queued(runtime, to=f"buyer{n}@example.com") for n in range(3)]
    lease_until = clock.now() + timedelta(seconds=runtime.settings.SMTP_TIMEOUT * 3 + 5)
    with runtime.database.transaction() as session:  # the dead worker's claim
        session.execute(update(Email).values(lease_until=lease_until))
    with SmtpSink(port=port, credentials=CREDENTIALS) as sink:
        runtime.outbox.send(ids[0])
        assert sink.messages == []
        clock.advance(runtime.settings.STUCK_GRACE + 1)
        assert runtime.stuck_sweep.run(force=True).emails == 0  # still leased
        clock.set(lease_until + timedelta(seconds=1))
        assert runtime.stuck_sweep.run(force=True).emails == 3
        runtime.outbox.send(ids[1])
        assert sorted(recipients(sink)) == [f"buyer{n}@example.com" for n in range(3)]
    assert all(row(runtime, email_id).sent_at is not None for email_id in ids)


def test_a_batch_broken_by_surprise_records_what_went_and_releases_the_rest(
    runtime: Runtime, port: int, clock: FrozenClock
) -> None:
    """A worker without STOCK_ENCRYPTION_KEY meets a sealed email (an error that is not a
    failed attempt): the job fails, but what the server accepted before is recorded, what
    was not started is released, and the email that broke it stays leased (as if the worker
    had died sending it) until its lease runs out."""
    first, sealed, last = sealed_between_two(runtime, clock, html="")
    runtime.jobs.huey.flush()
    keyless = another_outbox(runtime)
    try:
        with SmtpSink(port=port, credentials=CREDENTIALS) as sink:
            with pytest.raises(ConfigurationError):
                keyless.send(first)
            assert recipients(sink) == ["a@example.com"]
            sent = row(runtime, first)
            assert (sent.sent_at is not None, sent.attempts) == (True, 1)
            stuck = row(runtime, sealed)
            assert (stuck.sent_at, stuck.attempts) == (None, 0)
            assert stuck.lease_until is not None
            rest = row(runtime, last)
            assert (rest.sent_at, rest.lease_until, rest.attempts) == (None, None, 0)
            [wake] = runtime.jobs.huey.pending()
            assert (wake.name, wake.args) == ("mail.send", (last,))
            runtime.outbox.send(last)  # a worker with the key
            assert recipients(sink) == ["a@example.com", "c@example.com"]
            clock.advance(36)  # the keyless worker's lease has run out
            runtime.outbox.send(last)
            assert recipients(sink)[-1] == "b@example.com"
    finally:
        keyless.close()
