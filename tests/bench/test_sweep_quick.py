"""`python -m bench.sweep --quick`: the harness runs end to end on real Triton servers and writes
well-formed results. A smoke test of the harness: no speed threshold is checked."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.sweep import ADAPTIVE, COLUMNS, QUICK, grid, static_schemes

REPO = Path(__file__).resolve().parents[2]
NUMBERS = ("median_ms", "p95_ms", "mean_ms", "min_ms", "max_ms", "bytes_up", "wire_bytes_up", "bleu4", "cider", "exact_match")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    proc = subprocess.run([sys.executable, "-m", "bench.sweep", "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, f"sweep failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out, proc.stdout


def test_csv_has_every_scheme_at_every_grid_point_with_finite_numbers(quick_run):
    out, _ = quick_run
    with open(out / "sweep.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        rows = list(reader)
    schemes = set(static_schemes(QUICK)) | {ADAPTIVE}
    points = {(p.bandwidth_mbps, p.rtt_ms, p.device_factor) for p in grid(QUICK)}
    seen = {(float(r["bandwidth_mbps"]), float(r["rtt_ms"]), float(r["device_factor"]), r["scheme"]) for r in rows}
    assert seen == {(*p, s) for p in points for s in schemes}
    assert len(rows) == len(seen)  # one row per grid point and scheme
    for r in rows:
        assert int(r["requests"]) == QUICK.requests
        for name in NUMBERS:
            assert math.isfinite(float(r[name])), (r["scheme"], name, r[name])
        assert float(r["min_ms"]) <= float(r["median_ms"]) <= float(r["p95_ms"]) <= float(r["max_ms"])
        assert 0 <= float(r["exact_match"]) <= 100
    by = {(r["bandwidth_mbps"], r["scheme"]): r for r in rows}
    for r in rows:
        if r["scheme"] == ADAPTIVE:
            assert float(r["predicted_ms"]) > 0 and r["plan"]
        if r["scheme"] == "device-only":
            assert float(r["bytes_up"]) == 0  # nothing leaves the device
        if r["scheme"] == "cloud-only":  # the raw image crosses both links
            assert float(r["wire_bytes_edge_cloud"]) > float(r["bytes_up"]) > 0
            assert float(r["bytes_up"]) == float(by[(r["bandwidth_mbps"], "edge-only")]["bytes_up"])


def test_json_holds_headline_targets_machine_and_settings(quick_run):
    out, stdout = quick_run
    doc = json.loads((out / "sweep.json").read_text())
    assert len(doc["headline"]) == len(grid(QUICK))
    for h in doc["headline"]:
        assert h["best_static"] in static_schemes(QUICK)
        assert math.isfinite(h["vs_best"]) and set(h["vs"]) == set(static_schemes(QUICK))
    assert [t["met"] in (True, False) for t in doc["targets"]] == [True] * 3
    machine = doc["meta"]["machine"]
    assert machine["cores"] >= 1 and machine["python"] and machine["torch"] and machine["tritonserver"]
    assert doc["meta"]["settings"]["requests"] == QUICK.requests
    assert "--quick" in doc["meta"]["command"]
    for t in doc["targets"]:
        assert ("met" if t["met"] else "MISSED") in stdout


def test_markdown_and_plots_are_written(quick_run):
    out, _ = quick_run
    md = (out / "sweep.md").read_text()
    for part in ("## Targets", "## Headline", "adaptive / best", "tritonserver", "## Every grid point and scheme"):
        assert part in md
    for name in ("sweep_latency.png", "sweep_quality.png", "sweep_headline.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name


def test_report_only_rewrites_the_tables_from_the_json(quick_run, tmp_path):
    out, _ = quick_run
    (tmp_path / "sweep.json").write_text((out / "sweep.json").read_text())
    proc = subprocess.run([sys.executable, "-m", "bench.sweep", "--report-only", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "sweep.md").read_text() == (out / "sweep.md").read_text()
    assert (tmp_path / "sweep.csv").read_text() == (out / "sweep.csv").read_text()
