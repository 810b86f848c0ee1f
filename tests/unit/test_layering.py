"""The rooms of the package import one way (docs/architecture.md):

    local -> stage -> model -> contract;   api / planner / render / controller -> contract

The operator image has no torch: importing any control-plane module must never import torch,
transformers, Triton's client or a data-plane room, at import time or inside a function.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "operator" / "aiflow"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

CONTROL_PLANE = ("api", "planner", "render", "controller")
DATA_PLANE = ("model", "stage", "local")
HEAVY = ("torch", "transformers", "tritonclient", "safetensors", "tokenizers", "PIL")

# room -> the aiflow rooms it may import (besides itself, the package root and the contract)
ALLOWED = {
    "api": set(),
    "planner": {"api"},
    "render": {"api", "serving"},
    "controller": {"api", "planner", "render", "linkprobe", "serving"},
    "linkprobe": set(),
    "serving": set(),  # torch-free like the contract: what renderer and local runtime set, stages read
    "model": set(),
    "stage": {"model"},
    "local": {"stage", "model", "api", "planner", "serving"},
    "cli": {"api", "planner", "render", "controller", "linkprobe", "model", "stage", "local", "serving"},
}


def _room(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module an aiflow source file imports, top level or inside a function."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            if node.module == "aiflow":
                out += [(node.lineno, f"aiflow.{a.name}") for a in node.names]
    return out


def _sources():
    return sorted(p for p in PACKAGE.rglob("*.py") if _room(p) not in ("__init__", "__main__", "contract"))


def test_every_room_imports_only_the_rooms_below_it():
    wrong = []
    for path in _sources():
        room = _room(path)
        for line, module in _imports(path):
            parts = module.split(".")
            if parts[0] != "aiflow" or len(parts) < 2:
                continue
            target = parts[1]
            if target in (room, "contract") or not (PACKAGE / target).exists() and not (PACKAGE / f"{target}.py").exists():
                continue
            if target not in ALLOWED[room]:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} imports {module} ({room} may import {sorted(ALLOWED[room]) or 'only the contract'})")
    assert not wrong, "\n".join(wrong)


def test_control_plane_sources_never_import_heavy_libraries():
    wrong = []
    for path in _sources():
        if _room(path) not in (*CONTROL_PLANE, "linkprobe"):
            continue
        for line, module in _imports(path):
            if module.split(".")[0] in HEAVY:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} imports {module}")
    assert not wrong, "\n".join(wrong)


CHECK = """
import importlib, json, pkgutil, sys
import aiflow
names = ["aiflow.contract", "aiflow.linkprobe"]
for room in ("api", "planner", "render", "controller"):
    pkg = importlib.import_module(f"aiflow.{room}")
    names += [f"aiflow.{room}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)]
for name in names:
    importlib.import_module(name)
print(json.dumps({"imported": names, "loaded": sorted(sys.modules)}))
"""


def test_importing_the_control_plane_loads_no_data_plane():
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["imported"]) >= 25  # every module of the four rooms, not an empty walk
    loaded = report["loaded"]
    heavy = [m for m in loaded if m.split(".")[0] in HEAVY]
    rooms = [m for m in loaded if m.split(".")[:2] in (["aiflow", r] for r in DATA_PLANE)]
    assert not heavy and not rooms, f"control plane loaded {heavy + rooms}"


@pytest.mark.parametrize("argv", [
    ["validate", "-f", str(EXAMPLES / "captioning.yaml")],
    ["render", "-f", str(EXAMPLES / "captioning.yaml")],
    ["plan", "-f", str(EXAMPLES / "auto-placement.yaml"), "--cluster", str(EXAMPLES / "cluster-thin-uplink.yaml")],
])
def test_operator_commands_load_no_data_plane(argv):
    code = (
        "import contextlib, io, json, sys\n"
        "from aiflow.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    rc = main({argv!r})\n"
        "print(json.dumps({'rc': rc, 'loaded': sorted(sys.modules)}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["rc"] == 0
    heavy = [m for m in report["loaded"] if m.split(".")[0] in HEAVY]
    rooms = [m for m in report["loaded"] if m.split(".")[:2] in (["aiflow", r] for r in ("model", "stage"))]
    assert not heavy and not rooms, f"aiflow {argv[0]} loaded {heavy + rooms}"
