"""Whether to move a running flow to a newly planned placement: hysteresis and cooldown. Pure.

The rescheduler re-plans on its interval, re-assesses the deployed candidate under the same fresh
conditions (`solver.assess`), and asks `decide`. A move must beat the current prediction by the policy's
minimum improvement and wait out the cooldown, so measurements that wobble around a decision boundary
move the flow at most once per cooldown; a current plan that can no longer run (a tier it uses has no
Ready node) is left at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiflow.planner.solver import Plan


@dataclass(frozen=True)
class Policy:
    min_improvement: float = 0.10  # fraction of the current predicted latency
    cooldown_s: float = 300.0

    @classmethod
    def from_spec(cls, rescheduling) -> "Policy":
        """From an `aiflow.api.spec.Rescheduling` (percent and seconds, as the CRD has them)."""
        return cls(rescheduling.min_improvement_percent / 100.0, float(rescheduling.cooldown_seconds))


@dataclass(frozen=True)
class Decision:
    migrate: bool
    reason: str  # one line, for an Event and status.lastDecision
    gain: float | None = None  # predicted fraction of latency saved, when both plans could be compared


def decide(current: Plan | None, candidate: Plan, policy: Policy, now: float, last_migration_at: float | None) -> Decision:
    """Move from `current` (the deployed candidate, assessed under fresh conditions; None when nothing
    runs yet) to `candidate` (the new best plan)? Times in seconds on one clock."""
    if current is None:
        return Decision(True, f"initial placement: {candidate.reason}")
    if candidate.candidate == current.candidate:
        return Decision(False, f"current plan is still the best ({current.latency_ms:.0f} ms predicted)", 0.0)
    if not current.feasible:
        return Decision(True, f"current plan can no longer run ({'; '.join(current.violations)}); moving to {candidate.reason}")
    gain = (current.latency_ms - candidate.latency_ms) / current.latency_ms
    change = f"{current.latency_ms:.0f} -> {candidate.latency_ms:.0f} ms predicted ({-gain:+.1%})"
    if gain <= 0 or gain < policy.min_improvement:
        return Decision(False, f"kept: {change} is below the minimum improvement {policy.min_improvement:.0%}", gain)
    if last_migration_at is not None and now - last_migration_at < policy.cooldown_s:
        left = policy.cooldown_s - (now - last_migration_at)
        return Decision(False, f"kept: {change}, but the cooldown has {left:.0f} s left", gain)
    return Decision(True, f"moving: {change}: {candidate.reason}", gain)
