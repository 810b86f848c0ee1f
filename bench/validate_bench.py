"""How long `aiflow validate -f examples/captioning.yaml` takes, as a fresh process each time (what a
user or a CI step sees), for this checkout and, for comparison, another git ref.

    python bench/validate_bench.py [--runs 15] [--ref main]

The other ref is exported (`git archive`) to a temporary directory and run with the same Python,
its `operator/` first on sys.path. Reports the median and the best wall time and the median CPU
time (user + system of the child: less sensitive to other load on the machine than wall time).
Prints a table and writes bench/results/validate_bench.csv. Target: under 0.3 s.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import write_csv  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TARGET_SECONDS = 0.3


def run_once(checkout: Path) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": str(checkout / "operator")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "aiflow", "validate", "-f", str(checkout / "examples" / "captioning.yaml")],
                   env=env, cwd=checkout, check=True, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def export(ref: str, into: Path) -> Path:
    archive = into / "ref.tar"
    subprocess.run(["git", "archive", "-o", str(archive), ref, "operator", "crds", "examples", "model_repo"],
                   cwd=ROOT, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "checkout", filter="data")
    return into / "checkout"


def measure(checkout: Path, runs: int) -> dict:
    run_once(checkout)  # warm the file cache and any on-disk caches, as a second run would find them
    samples = [run_once(checkout) for _ in range(runs)]
    walls, cpus = [w for w, _ in samples], [c for _, c in samples]
    return {"median_wall_s": statistics.median(walls), "best_wall_s": min(walls), "median_cpu_s": statistics.median(cpus)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--ref", default="main", help="the git ref to compare with (default: main)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, checkout in ((args.ref, export(args.ref, Path(tmp))), ("this checkout", ROOT)):
            rows.append({"checkout": label, "runs": args.runs, **measure(checkout, args.runs)})
    print(f"{'checkout':<16}{'median wall s':>15}{'best wall s':>13}{'median cpu s':>14}   target < {TARGET_SECONDS} s")
    for row in rows:
        print(f"{row['checkout']:<16}{row['median_wall_s']:>15.3f}{row['best_wall_s']:>13.3f}{row['median_cpu_s']:>14.3f}")
    write_csv(RESULTS / "validate_bench.csv",
              ({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for row in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
