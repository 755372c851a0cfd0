"""The chaos checkers on hand-made histories (pure)."""

from __future__ import annotations

from chaos.checker import INF, Op, check_acked_writes, check_register


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
