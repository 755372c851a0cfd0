"""The chaos checkers on hand-made histories (pure)."""

from __future__ import annotations

from chaos.checker import (
    INF,
    Op,
    check_acked_writes,
    check_decisions,
    check_register,
    check_route_count,
)


def cas(p, exp, new, t0, t1, outcome="ok", result=True):
    return Op(p, "cas", "k", (exp, new), t0, t1, outcome, result)


def read(p, value, t0, t1, outcome="ok"):
    return Op(p, "read", "k", (), t0, t1, outcome, value)


def test_sequential_history_is_linearizable():
    h = [cas(0, None, "a", 0, 1), read(1, "a", 2, 3), cas(0, "a", "b", 4, 5),
         cas(1, "a", "c", 6, 7, result=False), read(1, "b", 8, 9)]
    assert check_register(h) == "ok"


def test_concurrent_operations_may_be_ordered_either_way():
    h = [cas(0, None, "a", 0, 10), read(1, None, 1, 2), read(2, "a", 3, 4)]
    assert check_register(h) == "ok"


def test_stale_read_after_a_completed_write_is_a_violation():
    h = [cas(0, None, "a", 0, 1), read(1, None, 2, 3)]
    assert check_register(h) == "violation"


def test_lost_acknowledged_write_is_a_violation():
    h = [cas(0, None, "a", 0, 1), cas(1, "a", "b", 2, 3), read(2, "a", 4, 5)]
    assert check_register(h) == "violation"


def test_info_write_may_or_may_not_have_happened_but_failed_write_never_did():
    maybe = cas(0, None, "a", 0, INF, outcome="info", result=None)
    assert check_register([maybe, read(1, "a", 5, 6)]) == "ok"
    assert check_register([maybe, read(1, None, 5, 6)]) == "ok"
    failed = cas(0, None, "a", 0, 1, outcome="fail", result=None)
    assert check_register([failed, read(1, "a", 5, 6)]) == "violation"


def test_a_search_over_budget_reports_unknown_not_hang():
    many = [cas(i, None, f"v{i}", 0, 100, outcome="info", result=None) for i in range(12)]
    many += [read(99, f"v{i}", 101 + i, 102 + i) for i in range(0, 12, 2)]
    ticks = iter(range(10**9))
    assert check_register(many, budget_s=5, clock=lambda: next(ticks) * 10.0) == "unknown"


def test_acked_writes_missing_from_the_final_state_are_reported():
    ok = Op(0, "put", "w1", ("x",), 0, 1, "ok")
    maybe = Op(0, "put", "w2", ("y",), 0, INF, "info")
    assert check_acked_writes([ok, maybe], {"w1": "x"}) == []
    assert check_acked_writes([ok, maybe], {}) == [ok]


def route(key, invoke, complete, term, index, kind="route", outcome="ok"):
    return Op(1, kind, key, (), invoke, complete, outcome, (term, index, "n1"))


def test_decisions_from_a_leader_with_its_quorum_pass():
    ops = [route("a", 0, 1, 1, 10), route("b", 2, 3, 1, 11), route("c", 2.5, 4, 1, 11, "route-dry"),
           route("d", 5, 6, 2, 15)]
    assert check_decisions(ops) == []


def test_a_stale_leader_deciding_after_a_newer_commit_is_reported():
    """A dry-run invoked after route 'b' committed index 20 must not see an older state."""
    ops = [route("a", 0, 1, 1, 10), route("b", 2, 3, 2, 20), route("stale", 4, 5, 1, 12, "route-dry")]
    problems = check_decisions(ops)
    assert len(problems) == 1 and "stale" in problems[0] and "index 12" in problems[0]


def test_one_index_with_two_terms_is_reported():
    ops = [route("a", 0, 1, 1, 10), route("b", 0, 1, 2, 10)]
    assert "carries term" in check_decisions(ops)[0]


def test_route_count_must_cover_acknowledged_routes():
    ops = [route("a", 0, 1, 1, 10), route("b", 0, 1, 1, 11),
           route("c", 0, INF, 0, 0, outcome="info"), route("d", 0, 1, 0, 0, outcome="fail")]
    assert check_route_count(ops, 2) is None and check_route_count(ops, 3) is None
    assert "expected between 2" in check_route_count(ops, 1)
    assert check_route_count(ops, 4) is not None
