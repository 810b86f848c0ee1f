"""The one-machine runtime: real tritonserver processes, emulated links, schemes, caption client,
adaptive mode, profiling and scheme comparison (`aiflow up/caption/demo/link/profile`).

Runs on a developer's machine and in the benchmarks, never in a pod. May import `aiflow.stage`,
`aiflow.model`, `aiflow.contract` and the control plane's pure parts (`aiflow.api`,
`aiflow.planner`); only the CLI and bench/ import it.
"""
