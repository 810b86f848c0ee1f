"""The move of a running flow (planner.migration): make-before-break, switch, drain, retire."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiflow.planner.migration import (
    DONE, DRAIN_DEFAULT_S, DRAIN_FLOOR_S, DRAINING, RETIRE, STARTING, SWITCH, SWITCHING, WAIT, Move, Seen,
    advance, drain_grace_s,
)

GRACE = 6.0


def test_a_move_goes_starting_switching_draining_done():
    move = Move(1, 2, STARTING, 0.0)
    move, action = advance(move, Seen(1.0, target_ready=False), GRACE)
    assert (move.phase, action, move.entry) == (STARTING, WAIT, 1)  # the old chain serves meanwhile
    move, action = advance(move, Seen(2.0, target_ready=True), GRACE)
    assert (move.phase, action, move.entry, move.since) == (SWITCHING, SWITCH, 2, 2.0)
    move, action = advance(move, Seen(3.0, True, switched=False), GRACE)
    assert (move.phase, action) == (SWITCHING, SWITCH)  # the switch is asked for until it is seen
    move, action = advance(move, Seen(4.0, True, switched=True, taken=False), GRACE)
    assert (move.phase, action) == (SWITCHING, WAIT)  # switched, but the new chain is not behind the entry yet
    move, action = advance(move, Seen(5.0, True, switched=True, taken=True), GRACE)
    assert (move.phase, action, move.since) == (DRAINING, WAIT, 5.0)
    move, action = advance(move, Seen(10.9, True, True, True), GRACE)
    assert (move.phase, action) == (DRAINING, WAIT)
    assert move.left_s(GRACE, 10.9) == pytest.approx(0.1)
    move, action = advance(move, Seen(11.0, True, True, True), GRACE)
    assert (move.phase, action) == (DONE, RETIRE)
    assert advance(move, Seen(12.0, True, True, True), GRACE)[1] == RETIRE


def test_a_zero_grace_retires_as_soon_as_the_traffic_is_taken():
    move, action = advance(Move(1, 2, SWITCHING, 0.0), Seen(1.0, True, True, True), 0.0)
    assert (move.phase, action) == (DONE, RETIRE)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 5), st.booleans(), st.booleans(), st.booleans()), max_size=30),
       st.floats(0, 20))
def test_the_old_revision_is_never_retired_before_the_new_one_took_the_traffic_and_drained(steps, grace):
    move, now, taken_at = Move(1, 2, STARTING, 0.0), 0.0, None
    ready_seen = False
    for dt, ready, switched, taken in steps:
        now += dt
        before = move
        move, action = advance(move, Seen(now, ready, switched, taken), grace)
        ready_seen |= ready and before.phase == STARTING
        if before.phase == SWITCHING and switched and taken and taken_at is None:
            taken_at = now
        if action == RETIRE:
            assert ready_seen and taken_at is not None and now - taken_at >= grace
            break
        assert move.entry == (1 if move.phase == STARTING else 2)


def test_a_move_survives_its_record():
    move = Move(3, 4, DRAINING, 1234.0)
    assert Move.from_record(move.to_record()) == move
    assert Move.from_record(move.to_annotation(str), float) == move
    for bad in (None, "", "{", {"from": "x", "to": 2}, {"to": 2}, {"from": 1, "to": 2, "phase": "Bogus"}):
        assert Move.from_record(bad) is None


def test_a_bad_phase_or_grace_is_refused_with_what_to_fix():
    with pytest.raises(ValueError, match="unknown move phase 'Later'"):
        Move(1, 2, "Later")
    with pytest.raises(ValueError, match="drain grace must be >= 0"):
        advance(Move(1, 2), Seen(0.0, True), -1.0)


def test_the_drain_grace_follows_the_latency_objective():
    assert drain_grace_s(4000) == 12.0  # three times the objective
    assert drain_grace_s(None, predicted_ms=3000) == 9.0  # else the prediction
    assert drain_grace_s(4000, predicted_ms=100) == 12.0  # the objective wins
    assert drain_grace_s(200) == DRAIN_FLOOR_S  # never less than the floor
    assert drain_grace_s(None) == DRAIN_DEFAULT_S
    assert drain_grace_s(50, floor_s=0.0) == pytest.approx(0.15)
