"""AIFlow spec + placement -> Kubernetes manifests (pure functions).

Control plane: runs in the operator pod and in `aiflow render`. May import `aiflow.api` and
`aiflow.contract`; never the planner's solver, torch, Triton or the data-plane rooms.
"""
