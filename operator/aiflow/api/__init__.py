"""The AIFlow API: spec types, defaults, schema and semantic validation, placement types.

Control plane: runs in the operator pod and in `aiflow validate/render/plan`. May import
`aiflow.contract` and the standard library; never torch, Triton or the data-plane rooms
(`aiflow.model`, `aiflow.stage`, `aiflow.local`).
"""
