"""kopf handlers, cluster observation, server-side apply and rescheduling (the operator's I/O).

Control plane: runs in the operator pod. May import `aiflow.api`, `aiflow.planner`,
`aiflow.render` and `aiflow.contract`; never torch, Triton or the data-plane rooms.
"""
