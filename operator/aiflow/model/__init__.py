"""The captioning model family: architecture, checkpoints, tokenizer, training, scenes, quality.

Data plane (torch, transformers): runs inside a Triton stage (loaded by `aiflow.stage`), in
`aiflow train/evaluate/data`, and on a developer's machine. May import `aiflow.contract`; never
`aiflow.stage`, `aiflow.local` or the control plane. `weights/` holds the shipped trained family.
"""
