"""Fault schedules that once found bugs, replayed against a live cluster (short; real processes).

Each bug the chaos suite found has a focused regression test elsewhere; this replays the
kind of schedule that exposed it, so the whole path (workload, faults, checkers) stays green:

- kill-leader / restart-all under routers: a member rebuilding its state, or a new leader
  not yet caught up, answered routes with false *definite* errors (the route count exceeded
  acknowledged + unknown routes);
- power-loss: a state store left open by an earlier boot was trusted;
- the leader fsyncing in parallel with replication must lose nothing across kill -9.
"""

from __future__ import annotations

import asyncio

import pytest

from chaos.runner import run

pytestmark = pytest.mark.integration


def test_leader_kills_restarts_and_power_loss_lose_nothing(tmp_path):
    report = asyncio.run(run(6, seed=11, clients=2, routers=2, base_dir=str(tmp_path),
                             faults=("kill-leader", "restart-all", "power-loss")))
    assert report.faults == {"kill-leader": 2, "restart-all": 2, "power-loss": 2}
    assert not report.lost_writes and report.route_count is None
    assert not report.decision_violations and "violation" not in report.registers.values()
    assert report.passed, report.stalls or report.convergence
    assert report.operations_by_kind["route"]["ok"] > 0
