"""Cost model and placement/partition solver (pure functions); see docs/planner.md.

Control plane: runs in the operator pod, in `aiflow plan` and in the local runtime's adaptive mode.
May import `aiflow.api` and `aiflow.contract`; never torch, Triton or the data-plane rooms.

- `profile`: what the model's pieces cost (PlannerProfile files, `load_profile`)
- `cluster`: tiers and links as the planner sees them (`cluster_state`, ClusterSnapshot files)
- `problem`: the question and the search space its constraints admit
- `cost`: predicted latency, bytes and quality of one candidate (`evaluate`)
- `solver`: `plan(problem) -> Plan`, `assess(problem, candidate)`, and the exhaustive reference
- `hysteresis`: `decide(current, candidate, policy, now, last_migration_at)` for the rescheduler
- `migration`: how a move goes (Starting -> Switching -> Draining -> Done, `advance`), the same for
  the operator and the local runtime's adaptive mode
- `placement`: the operator's `resolve_placement` seam
"""
