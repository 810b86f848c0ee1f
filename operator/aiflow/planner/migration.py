"""One move of a running flow from one revision to the next, make-before-break with drain. Pure.

The operator (`controller/rescheduler.py`, `controller/reconcile.py`) and the local runtime
(`local/adaptive.py`, `aiflow up --adaptive`) move a flow the same way; only the I/O differs. Whether
to move at all is `hysteresis.decide` (minimum improvement, cooldown); how a move goes is `advance`:

    Starting   the new revision comes up beside the serving one; the entry still leads to the old one.
    Switching  every stage of the new revision is up: the entry is pointed at it. The phase lasts until
               the new chain is seen to have taken the traffic (on Kubernetes: the entry Service's
               EndpointSlices list the new revision's pods only; locally: the state file the clients
               read names the new entry).
    Draining   no new request enters the old chain; those in it finish. The phase lasts the drain
               grace (`drain_grace_s`, from the flow's latency objective).
    Done       the old revision is removed (on Kubernetes its Deployments and Services are deleted, and
               Triton's exit timeout covers a request that is still on its way; locally each old model
               is unloaded entry first once its last request has left it).

`advance` takes the move and what was observed, and returns the move and the one action to take
(`WAIT`, `SWITCH`, `RETIRE`). It depends only on what it is given, so a caller that lost its memory
can rebuild the move from what the cluster shows (`Move.to_record`/`from_record`: the operator keeps
it on the entry Service too) and carry on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

STARTING, SWITCHING, DRAINING, DONE = "Starting", "Switching", "Draining", "Done"
PHASES = (STARTING, SWITCHING, DRAINING, DONE)
WAIT, SWITCH, RETIRE = "wait", "switch", "retire"

# Never drain for less: time for every client and proxy that still knows the old entry to stop
# using it (kube-proxy and DNS take seconds to follow a Service's endpoints).
DRAIN_FLOOR_S = 5.0
# A request in flight when the entry switched finishes within a few times the latency it is held to.
DRAIN_LATENCY_FACTOR = 3.0
# Without an objective or a prediction: what a client's request timeout would typically be.
DRAIN_DEFAULT_S = 30.0


def drain_grace_s(objective_ms: float | None, predicted_ms: float | None = None,
                  floor_s: float = DRAIN_FLOOR_S) -> float:
    """How long the old chain drains after the new one took the traffic: a few times the flow's
    latency objective (else the planner's predicted latency), never less than `floor_s`."""
    latency_ms = objective_ms if objective_ms else predicted_ms
    if not latency_ms or latency_ms <= 0:
        return max(floor_s, DRAIN_DEFAULT_S)
    return max(floor_s, DRAIN_LATENCY_FACTOR * latency_ms / 1e3)


@dataclass(frozen=True)
class Seen:
    """What the caller observed of a move, before acting on it."""

    now: float
    target_ready: bool  # every stage of the new revision is up (Deployments Ready, models loaded)
    switched: bool = False  # the entry leads to the new revision
    taken: bool = False  # the new chain has taken the traffic (it alone is behind the entry)


@dataclass(frozen=True)
class Move:
    source: int  # the revision the flow moves from
    target: int  # the revision it moves to
    phase: str = STARTING
    since: float | None = None  # when the phase began

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ValueError(f"unknown move phase {self.phase!r}; expected one of {', '.join(PHASES)}")

    @property
    def entry(self) -> int:
        """The revision the entry leads to in this phase."""
        return self.source if self.phase == STARTING else self.target

    def left_s(self, grace_s: float, now: float) -> float | None:
        """Seconds of drain left (None outside Draining)."""
        if self.phase != DRAINING or self.since is None:
            return None
        return max(0.0, grace_s - (now - self.since))

    def to_record(self, stamp=lambda t: t) -> dict:
        out = {"from": self.source, "to": self.target, "phase": self.phase}
        if self.since is not None:
            out["since"] = stamp(self.since)
        return out

    def to_annotation(self, stamp) -> str:
        return json.dumps(self.to_record(stamp), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_record(cls, doc, parse=lambda t: t) -> "Move | None":
        """A move from `to_record`'s form (None when absent or unusable, e.g. edited by hand)."""
        try:
            if isinstance(doc, str):
                doc = json.loads(doc)
            since = parse(doc["since"]) if doc.get("since") is not None else None
            return cls(int(doc["from"]), int(doc["to"]), str(doc.get("phase") or STARTING), since)
        except (TypeError, ValueError, KeyError, AttributeError):
            return None


def advance(move: Move, seen: Seen, grace_s: float) -> tuple[Move, str]:
    """The move after what was seen, and what to do now: `WAIT`, `SWITCH` (point the entry at the
    target; the action holds until the switch is seen) or `RETIRE` (remove the source revision)."""
    if grace_s < 0:
        raise ValueError(f"drain grace must be >= 0 s, not {grace_s:g}")
    if move.phase == STARTING:
        if not seen.target_ready:
            return move, WAIT
        return replace(move, phase=SWITCHING, since=seen.now), SWITCH
    if move.phase == SWITCHING:
        if not seen.switched:
            return move, SWITCH
        if not seen.taken:
            return move, WAIT
        move = replace(move, phase=DRAINING, since=seen.now)
    if move.phase == DRAINING:
        since = move.since if move.since is not None else seen.now
        if seen.now - since < grace_s:
            return replace(move, since=since), WAIT
        return replace(move, phase=DONE, since=seen.now), RETIRE
    return move, RETIRE
