"""The group-commit writer: what is queued while a commit runs goes into the next one together,
each caller learns its own outcome only once its batch is done. A commit function that blocks
until the test lets it go stands in for the database."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from whop_autocancel.webhooks.group_commit import Closed, GroupCommit


class Gate:
    """A commit that records its batches and waits for the test before it returns."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.after: list[list[str | Exception]] = []
        self.entered = threading.Semaphore(0)
        self.release = threading.Semaphore(0)

    def commit(self, items: Sequence[str]) -> list[str | Exception]:
        self.batches.append(list(items))
        self.entered.release()
        assert self.release.acquire(timeout=10), "the test never let the commit go"
        if "fail-all" in items:
            raise RuntimeError("the database said no")
        return [ValueError(item) if item.startswith("bad") else item.upper() for item in items]

    def record_after(self, outcomes: Sequence[str | Exception]) -> None:
        self.after.append(list(outcomes))


@pytest.fixture
def gate() -> Gate:
    return Gate()


def writer_for(gate: Gate) -> GroupCommit[str, str]:
    return GroupCommit(gate.commit, after=gate.record_after, max_batch=3, name="test-writer")


def test_what_queues_during_a_commit_is_committed_together_and_answered_after_it(
    gate: Gate,
) -> None:
    writer = writer_for(gate)
    first = writer.submit("a")
    assert gate.entered.acquire(timeout=10)  # the first commit is running, alone
    later = [writer.submit(item) for item in ("b", "c", "d", "e")]
    assert not any(future.done() for future in [first, *later])
    gate.release.release()
    assert first.result(timeout=10) == "A"
    assert gate.entered.acquire(timeout=10)
    assert not later[0].done()  # answered only once its own batch has committed
    gate.release.release()
    assert gate.entered.acquire(timeout=10)
    gate.release.release()
    assert [future.result(timeout=10) for future in later] == ["B", "C", "D", "E"]
    # Never more than max_batch at once; `after` ran once per batch, before the answers.
    assert gate.batches == [["a"], ["b", "c", "d"], ["e"]]
    assert gate.after == [["A"], ["B", "C", "D"], ["E"]]
    writer.close()


def test_a_failed_commit_fails_its_whole_batch_and_an_item_can_fail_alone(gate: Gate) -> None:
    writer = writer_for(gate)
    blocker = writer.submit("x")
    assert gate.entered.acquire(timeout=10)
    doomed = [writer.submit("fail-all"), writer.submit("y")]
    gate.release.release()
    assert blocker.result(timeout=10) == "X"
    assert gate.entered.acquire(timeout=10)
    gate.release.release()
    for future in doomed:
        with pytest.raises(RuntimeError, match="the database said no"):
            future.result(timeout=10)
    alone = [writer.submit("bad-one"), writer.submit("good")]
    assert gate.entered.acquire(timeout=10)
    gate.release.release()
    if len(gate.batches[-1]) == 1:  # the two may come in one batch or two
        assert gate.entered.acquire(timeout=10)
        gate.release.release()
    with pytest.raises(ValueError, match="bad-one"):
        alone[0].result(timeout=10)
    assert alone[1].result(timeout=10) == "GOOD"
    writer.close()


def test_close_commits_what_is_queued_and_takes_nothing_more(gate: Gate) -> None:
    writer = writer_for(gate)
    first = writer.submit("a")
    assert gate.entered.acquire(timeout=10)
    queued = writer.submit("b")
    closing = threading.Thread(target=writer.close)
    closing.start()
    gate.release.release()
    assert gate.entered.acquire(timeout=10)
    gate.release.release()
    closing.join(timeout=10)
    assert not closing.is_alive()
    assert (first.result(timeout=1), queued.result(timeout=1)) == ("A", "B")
    with pytest.raises(Closed):
        writer.submit("c")
