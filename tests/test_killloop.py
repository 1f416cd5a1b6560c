"""The kill -9 loop (bench/killloop.py): wxd SIGKILLed at random moments under webhook events and
pushes against a sandbox with 10 % faults loses no acknowledged event or push and doubles none.

The CI form (5 kills) runs by default; the full form (50 kills, minutes) only when slow tests
are selected: `pytest -m slow tests/test_killloop.py` or WXD_SLOW_TESTS=1.
"""

from __future__ import annotations

import pathlib
import random
from collections import Counter

import pytest

from bench.killloop import Settings, run_kill_loop
from bench.proof import DbState, Ledger, SentEvent, SentPush, check_exactly_once
from wxd.sandbox import SignedRequest

FULL_KILLS = 50


def test_kill_loop_ci_form(tmp_path: pathlib.Path) -> None:
    settings = Settings(kills=5, seed=3)
    figures = run_kill_loop(settings, tmp_path)
    summary = figures.summary()
    print(summary)  # shown with -s or on failure
    assert figures.problems == [], summary
    assert figures.kills >= 5, summary
    assert figures.crashes == 0 and figures.stop_exit_code == 0, summary
    # The load really ran through the kills: events and pushes on both sides of them.
    assert figures.events_acked >= 20 and figures.pushes_acked >= 30, summary
    assert figures.final_statuses["sent"] + figures.final_statuses["delivered"] > 0, summary


@pytest.mark.slow
def test_kill_loop_full_form(tmp_path: pathlib.Path) -> None:
    """50 kills; runs only when slow tests are selected (see conftest.py)."""
    figures = run_kill_loop(Settings(kills=FULL_KILLS, seed=11), tmp_path)
    summary = figures.summary()
    print(summary)
    assert figures.problems == [], summary
    assert figures.kills >= FULL_KILLS and figures.crashes == 0, summary


def test_ledger_allows_43004_only_after_leaving() -> None:
    ledger = Ledger([True, False])
    # Person 0 follows throughout: a 43004 for them would be a wxd bug.
    assert not ledger.left_sandbox_since(0, 100.0)
    # Person 1 never followed: 43004 is WeChat's right answer.
    assert ledger.left_sandbox_since(1, 100.0)
    ledger.changes[0] = [(150.0, False), (160.0, True)]
    assert ledger.left_sandbox_since(0, 100.0)       # left after the push was first tried
    assert ledger.left_sandbox_since(0, 155.0)       # was not following when it was tried
    assert not ledger.left_sandbox_since(0, 170.0)   # followed again before the push


def test_ledger_orders_a_persons_events_and_resends_the_unanswered() -> None:
    ledger = Ledger([True])
    rng = random.Random(1)
    assert ledger.pick_event_person(rng, 1000) == 0
    event = SentEvent(0, False, 1000, {}, SignedRequest("u", {}, b"", ""), "evt:x", 0.0)
    ledger.add_event(event, 1000.5)
    assert ledger.pick_event_person(rng, 1001) is None      # unanswered: nothing new for them
    assert ledger.next_pending_event() is event
    ledger.event_acked(event)
    assert ledger.next_pending_event() is None
    assert ledger.pick_event_person(rng, 1000) is None      # same CreateTime second
    assert ledger.pick_event_person(rng, 1001) == 0
    assert ledger.pick_push_person(rng) is None             # unfollowed: no pushes to them
    push = ledger.add_push("k", 0, 1.0)
    assert ledger.next_pending_push() is push
    push.push_id = "p_1"
    assert ledger.next_pending_push() is None
    assert isinstance(push, SentPush) and not push.pending


def _db(*pushes: tuple[str, str, str | None]) -> DbState:
    rows = {pid: {"status": status, "client_msg_id": pid, "oa_openid": "o1", "msgid": msgid,
                  "errcode": 43004 if status == "failed" else None}
            for pid, status, msgid in pushes}
    return DbState(rows, Counter(), {}, Counter(), [], "ok")


def test_exactly_once_check_finds_doubles_losses_and_strangers() -> None:
    good = _db(("p_a", "delivered", "7"), ("p_b", "queued", None))
    assert check_exactly_once(good, {"p_a": [("o1", 7)]}) == []
    doubled = check_exactly_once(good, {"p_a": [("o1", 7), ("o1", 8)]})
    assert len(doubled) == 1 and "2 times" in doubled[0]
    assert check_exactly_once(good, {})                      # sent but never received
    assert check_exactly_once(good, {"p_a": [("o1", 9)]})    # wrong msgid stored
    assert check_exactly_once(good, {"p_a": [("o1", 7)], "p_z": [("o1", 1)]})  # unknown
    failed = _db(("p_c", "failed", None))
    assert check_exactly_once(failed, {"p_c": [("o1", 3)]})  # failed, yet WeChat had it
