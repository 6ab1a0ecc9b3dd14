"""CPU_AFFINITY: what each process of a deployment is pinned to (affinity.py)."""

from __future__ import annotations

import pytest

from whop_autocancel.affinity import Plan, parse, plan


@pytest.mark.parametrize(
    ("value", "parsed"),
    [("auto", "auto"), (" OFF ", "off"), ("3", (3,)), ("2, 0", (2, 0))],
)
def test_parse_reads_auto_off_and_cpu_lists(value: str, parsed: object) -> None:
    assert parse(value) == parsed


@pytest.mark.parametrize("value", ["", "fast", "1;2", "-1", "1,,2", "1,1", "\u0661"])
def test_parse_refuses_anything_else(value: str) -> None:
    with pytest.raises(ValueError, match=r"must be auto, off|names a CPU twice"):
        parse(value)


def test_auto_gives_serve_and_each_worker_it_starts_a_cpu_of_their_own_while_there_are_any() -> (
    None
):
    assert plan("auto", (0, 1, 2, 3), owns_cores=True, children=2) == Plan(0, (1, 2))
    # More processes than CPUs: the rest are left to the kernel, not stacked on a busy CPU.
    assert plan("auto", (0, 1), owns_cores=True, children=2) == Plan(0, (1, None))
    # The CPUs this process may use (a cgroup's, a taskset's), in order: not 0, 1, ...
    assert plan("auto", (4, 6), owns_cores=True, children=1) == Plan(4, (6,))


def test_auto_leaves_alone_a_process_that_may_share_the_machine_with_others_of_its_kind() -> None:
    # a `worker` or a `serve --no-worker` started on its own
    assert plan("auto", (0, 1, 2, 3), owns_cores=False) == Plan(None, ())
    # one CPU: nothing to choose
    assert plan("auto", (0,), owns_cores=True, children=1) == Plan(None, (None,))


def test_off_pins_nothing_and_tells_the_workers_so() -> None:
    chosen = plan("off", (0, 1), owns_cores=True, children=2)
    assert chosen == Plan(None, (None, None))
    assert chosen.child_setting(1) == "off"


def test_a_list_pins_this_process_to_the_first_and_the_workers_to_the_next_in_turn() -> None:
    chosen = plan((2, 3), (0, 1, 2, 3), owns_cores=False, children=3)
    assert chosen == Plan(2, (3, 2, 3))
    assert [chosen.child_setting(slot) for slot in (1, 2, 3)] == ["3", "2", "3"]


def test_a_listed_cpu_this_process_may_not_use_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="names CPU 7, which this process may not use"):
        plan((0, 7), (0, 1), owns_cores=True)


def test_where_pinning_is_impossible_nothing_is_pinned() -> None:
    assert plan((0,), (), owns_cores=True, children=1) == Plan(None, (None,))
