"""Where each stage of a flow runs: what the planner decides and the renderer and status read.

A type of the API, not of the planner, so rendering and status need nothing of the planner.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiflow.api.spec import StageParameters


@dataclass(frozen=True)
class StagePlacement:
    stage: str
    tier: str
    reason: str  # why this tier, one line for status and Events
    parameters: StageParameters = StageParameters()


@dataclass(frozen=True)
class Placement:
    stages: tuple[StagePlacement, ...]
    plan: object | None = None  # the planner's Plan (aiflow.planner.solver); None when the simple rule placed it
    note: str = ""  # why the planner did not decide, when it did not

    def of(self, stage: str) -> StagePlacement:
        return next(p for p in self.stages if p.stage == stage)

    @property
    def summary(self) -> str:
        """`head:device, drafter:edge, verifier:cloud`."""
        return ", ".join(f"{p.stage}:{p.tier}" for p in self.stages)
