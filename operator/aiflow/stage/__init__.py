"""What runs inside a Triton model of model_repo/: stage config, logic, codecs, wire, forwarding.

Data plane: runs in the Triton Python backend stub (`model_repo/*/1/model.py` is a thin adapter
over `aiflow.stage.triton`). May import `aiflow.model` and `aiflow.contract`; never
`aiflow.local` or the control plane.

- `config`: a stage's role and knobs (config.pbtxt parameters, load-time overrides, env)
- `logic`: `Stage.run`: decode the input, compute the partition, encode, forward, trace
- `codecs`, `wire`: features -> bytes and the self-describing message that carries them
- `forward`: the gRPC call to the next stage
- `triton`: the `TritonPythonModel` class and the request loop
"""
