"""A model repository for one stage, with its serving settings written into the model's config.

    python -m aiflow.local.repository --source /opt/aiflow/model_repo --model vision_head --dest /tmp/model_repo

A stage pod's init container runs this (the stage image's repository is read-only): it copies the
model's folder and writes its config.pbtxt with the instances, batching and queue bound of the
AIFLOW_INSTANCES, AIFLOW_MAX_BATCH_SIZE, AIFLOW_MAX_QUEUE_DELAY_US and AIFLOW_MAX_QUEUE_SIZE
environment variables (the operator sets them from `spec.stages[].serving`), as the local runtime
does at load time. Triton then serves the copy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

from aiflow.local.tritonserver import ModelLoadError, model_config_json
from aiflow.serving import TRITON_KNOBS, ServingError


def write_stage_repository(source: Path, model: str, dest: Path, env: Mapping[str, str]) -> Path:
    """Copy `source/model` to `dest/model` with its config set from `env`; return the model folder."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    src = Path(source) / model
    if not (src / "config.pbtxt").is_file():
        raise ModelLoadError(f"model {model!r} not found in {source} (no {src / 'config.pbtxt'})")
    knobs = {k: env[k] for k in TRITON_KNOBS if env.get(k)}
    config = json_format.Parse(model_config_json(src, knobs, name=model), model_config_pb2.ModelConfig())
    for key in knobs:  # Triton reads these from the config itself; they are not stage parameters
        del config.parameters[key]
    out = Path(dest) / model
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("__pycache__", "config.pbtxt"))
    (out / "config.pbtxt").write_text(text_format.MessageToString(config))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Write one stage's model repository with its serving settings.")
    ap.add_argument("--source", type=Path, required=True, help="the image's model repository")
    ap.add_argument("--model", required=True)
    ap.add_argument("--dest", type=Path, required=True, help="a writable folder Triton then serves")
    args = ap.parse_args(argv)
    try:
        out = write_stage_repository(args.source, args.model, args.dest, os.environ)
    except (ModelLoadError, ServingError) as exc:
        print(f"aiflow: {exc}", file=sys.stderr)
        return 2
    config = json.loads(model_config_json(out))
    print(f"wrote {out}: max_batch_size {config.get('max_batch_size')}, instances "
          f"{config['instance_group'][0].get('count', 1)}, dynamic_batching {config.get('dynamic_batching')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
